"""Coarse pseudo-groups: the silhouette against scikit-learn, k chosen by it, the (cluster, class) -> group table."""

import pytest
import torch
from sklearn.metrics import silhouette_score as sklearn_silhouette

from ccim_lightning.debias.groups import PseudoGroups, coarse_clusters, silhouette_score


@pytest.mark.parametrize("k", [2, 3, 5])
def test_silhouette_matches_scikit_learn(k):
    generator = torch.Generator().manual_seed(k)
    points = torch.randn(40, 6, generator=generator)
    labels = torch.randint(0, k, (40,), generator=generator)
    labels[:k] = torch.arange(k)  # every label present
    assert silhouette_score(points, labels) == pytest.approx(sklearn_silhouette(points.numpy(), labels.numpy()))


def test_silhouette_singleton_cluster_counts_zero_like_scikit_learn():
    points = torch.tensor([[0.0], [0.1], [0.2], [5.0]])
    labels = torch.tensor([0, 0, 0, 1])  # the point at 5 is alone: s = 0
    # By hand: a of 0, 0.1, 0.2 = 0.15, 0.1, 0.15; b = 5, 4.9, 4.8.
    by_hand = ((5 - 0.15) / 5 + (4.9 - 0.1) / 4.9 + (4.8 - 0.15) / 4.8 + 0.0) / 4
    assert silhouette_score(points, labels) == pytest.approx(by_hand)
    assert silhouette_score(points, labels) == pytest.approx(sklearn_silhouette(points.numpy(), labels.numpy()))


def test_silhouette_rejects_one_cluster():
    with pytest.raises(ValueError, match="2 <= clusters <= points - 1"):
        silhouette_score(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long))


def blobs(centres, per_blob, spread=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.as_tensor(centres, dtype=torch.float32)
    return torch.cat([c + spread * torch.randn(per_blob, centres.shape[1], generator=generator) for c in centres])


@pytest.mark.parametrize("num_blobs", [2, 3, 5])
def test_coarse_clusters_finds_the_number_of_blobs(num_blobs):
    centres = [[10.0 * i, (-1) ** i * 10.0] for i in range(num_blobs)]
    centroids, score = coarse_clusters(blobs(centres, 6))
    assert len(centroids) == num_blobs and score > 0.9
    found = sorted(round(float(c[0]) / 10) for c in centroids)
    assert found == list(range(num_blobs))


def test_coarse_clusters_of_fewer_than_four_points_keeps_each():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    centroids, score = coarse_clusters(points)
    torch.testing.assert_close(centroids, points)
    assert score != score  # nan: not computed


def test_fine_groups_are_cluster_times_classes_plus_class():
    groups = PseudoGroups("prototypes")
    groups.bind(num_clusters=3, num_classes=2)
    assert groups.num_groups == 6
    assert groups(torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1])).tolist() == [1, 4, 3]


def test_coarse_groups_split_each_class_by_its_prototypes_blobs():
    # Prototypes 0-3 near (0, 0), 4-7 near (10, 0), 8-11 near (0, 10). Class 0 uses the first two blobs, class 1 all
    # three: class 0 gets 2 groups, class 1 gets 3; prototypes 8-11, unused by class 0, join its nearest group.
    prototypes = blobs([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], 4)
    clusters = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7] + list(range(12)))
    targets = torch.tensor([0] * 8 + [1] * 12)
    groups = PseudoGroups("coarse", max_clusters=4)
    groups.bind(num_clusters=12, num_classes=2)
    assert not bool(groups.fitted)
    assert groups.fit(prototypes, clusters, targets) == [2, 3]
    table = groups.table
    assert groups.num_groups == 8
    blob = torch.arange(12) // 4
    for y, groups_of_class in ((0, 2), (1, 3)):
        ids = table[:, y]
        assert ((ids >= 4 * y) & (ids < 4 * y + groups_of_class)).all()
        for b in range(3 if y == 1 else 2):  # each blob used by the class is one group, different blobs differ
            assert len(ids[blob == b].unique()) == 1
        assert len(ids[blob < (3 if y == 1 else 2)].unique()) == groups_of_class
    # Class 0 never saw blob 2 (near (0, 10)); its prototypes join class 0's nearer group: blob 0's, at distance 10
    # (blob 1 is sqrt(200) away).
    assert (table[8:, 0] == table[0, 0]).all()
    assert groups(torch.tensor([5, 9]), torch.tensor([0, 1])).tolist() == [int(table[5, 0]), int(table[9, 1])]


def test_coarse_groups_need_prototypes_and_a_fit():
    groups = PseudoGroups("coarse")
    groups.bind(num_clusters=4, num_classes=2)
    with pytest.raises(RuntimeError, match="never fitted"):
        groups(torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(4, d\) prototypes, got None"):
        groups.fit(None, torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="'prototypes', 'coarse' or 'aligned'"):
        PseudoGroups("scenes")


def test_aligned_groups_by_hand():
    # 3 clusters, 2 classes; n = 10, n_y = (6, 4), P(y) = (0.6, 0.4).
    # cluster 0: 4 x class 0, 1 x class 1 -> P(0|z) = 0.8 >= 0.6 aligned; P(1|z) = 0.2 < 0.4 conflicting.
    # cluster 1: 1 x class 0, 3 x class 1 -> P(0|z) = 0.25 conflicting; P(1|z) = 0.75 aligned.
    # cluster 2: 1 x class 0 -> P(0|z) = 1 aligned; P(1|z) = 0 conflicting.  cluster 3: empty -> both conflicting.
    clusters = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 2])
    labels = torch.tensor([0, 0, 0, 0, 1, 0, 1, 1, 1, 0])
    groups = PseudoGroups("aligned")
    groups.bind(num_clusters=4, num_classes=2)
    assert groups.num_groups == 4 and not groups.needs_prototypes
    assert groups.fit(None, clusters, labels) == [2, 2]
    # group 2y aligned, 2y + 1 conflicting
    expected = torch.tensor([[0, 3], [1, 2], [0, 3], [1, 3]])
    assert torch.equal(groups.table, expected)
    assert torch.equal(groups(clusters, labels), torch.tensor([0, 0, 0, 0, 3, 1, 2, 2, 2, 0]))


def test_aligned_groups_tie_counts_as_aligned():
    # P(0|z) = 0.5 = P(0) in cluster 0: n[z, y] n = 1 * 4 = n_y n_z = 2 * 2 -> aligned (>=).
    clusters = torch.tensor([0, 0, 1, 1])
    labels = torch.tensor([0, 1, 0, 1])
    groups = PseudoGroups("aligned")
    groups.bind(num_clusters=2, num_classes=2)
    groups.fit(None, clusters, labels)
    assert torch.equal(groups.table, torch.tensor([[0, 2], [0, 2]]))


def test_unknown_group_mode_names_the_choices():
    with pytest.raises(ValueError, match="'prototypes', 'coarse' or 'aligned', got 'fine'"):
        PseudoGroups("fine")
