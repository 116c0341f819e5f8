"""GroupBalancedReweighting and GroupDRO(groups="coarse") against hand computations; their checkpoint state."""

from pathlib import Path

import pytest
import torch
from torch import nn

from ccim_lightning import CCIMLightningModule
from ccim_lightning.debias import GroupBalancedReweighting, GroupDRO
from ccim_lightning.dictionary.store import ConfounderDictionary, DictionaryKey
from ccim_lightning.hosts import TwoStreamHost

CE = nn.CrossEntropyLoss(reduction="none")
# Prototypes 0-1 near (0, 0), 2-3 near (10, 0): two coarse clusters for any class using both blobs.
PROTOTYPES = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.1]])
# Class 0: clusters 0, 1, 1, 2, 3 (blob A x3, blob B x2); class 1: clusters 0, 1, 3, 3, 2, 2, 2 (A x2, B x5).
CLUSTERS = torch.tensor([0, 1, 1, 2, 3, 0, 1, 3, 3, 2, 2, 2])
LABELS = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1])


def bound(method, num_clusters=4):
    method.bind(num_classes=2, task="multiclass", num_clusters=num_clusters)
    return method


def fitted(method):
    method = bound(method)
    method.fit_dictionary(PROTOTYPES)
    method.fit_clusters(CLUSTERS, LABELS)
    return method


def test_group_balanced_weights_by_hand_with_fine_groups():
    clusters = torch.tensor([0, 0, 0, 0, 1, 1])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    method = bound(GroupBalancedReweighting(groups="prototypes"), num_clusters=2)
    method.fit_clusters(clusters, labels)
    # Groups z * 2 + y = 0, 0, 0, 1, 3, 3: sizes 3, 1, -, 2 over G = 3 filled groups and n = 6 samples.
    # w_g = n / (G n_g) = 6/9, 6/3, -, 6/6; the samples' mean is (3 * 2/3 + 2 + 2 * 1) / 6 = 1 already.
    torch.testing.assert_close(method.weights, torch.tensor([2 / 3, 2.0, 1.0, 1.0]))


def test_group_balanced_weights_by_hand_with_coarse_groups():
    method = fitted(GroupBalancedReweighting(groups="coarse"))
    groups = method.pseudo_groups(CLUSTERS, LABELS)
    # Coarse groups: (class 0, blob A) 3 samples, (0, B) 2, (1, A) 2, (1, B) 5; n = 12, G = 4.
    sizes = torch.tensor([3.0, 3, 3, 2, 2, 2, 2, 5, 5, 5, 5, 5])
    expected = 12 / (4 * sizes)
    expected = expected / expected.mean()
    torch.testing.assert_close(method.weights[groups], expected)
    # Every group's total weight is the same.
    totals = torch.zeros(method.pseudo_groups.num_groups).index_add(0, groups, method.weights[groups])
    assert torch.allclose(totals[totals > 0], totals[totals > 0][0])
    # The loss is the mean of w_i * CE_i.
    logits = torch.randn(12, 2, requires_grad=True)
    loss, _ = method.training_loss(logits, {"target": LABELS}, CLUSTERS, CE)
    torch.testing.assert_close(loss, (expected * CE(logits, LABELS)).mean())


def test_group_balanced_max_weight_bounds_before_renormalising():
    clusters = torch.tensor([0, 0, 0, 0, 1, 1])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    method = bound(GroupBalancedReweighting(groups="prototypes", max_weight=1.5), num_clusters=2)
    method.fit_clusters(clusters, labels)
    raw = torch.tensor([2 / 3, 1.5, 1.0, 1.0])  # 2 clipped to 1.5
    mean = (3 * 2 / 3 + 1.5 + 2 * 1.0) / 6
    torch.testing.assert_close(method.weights, raw / mean)


def test_group_balanced_refuses_multilabel_and_unfitted_use():
    with pytest.raises(ValueError, match="task='multiclass'"):
        GroupBalancedReweighting().bind(num_classes=2, task="multilabel", num_clusters=4)
    method = bound(GroupBalancedReweighting())
    with pytest.raises(RuntimeError, match="no cluster statistics"):
        method.training_loss(torch.zeros(1, 2), {"target": torch.tensor([0])}, torch.tensor([0]), CE)
    with pytest.raises(ValueError, match="prototypes, got None"):
        method.fit_clusters(CLUSTERS, LABELS)  # fit_dictionary never called


def test_group_dro_with_coarse_groups_uses_the_coarse_group_losses():
    method = fitted(GroupDRO(eta=1.0, groups="coarse"))
    assert method.num_groups == 2 * 8 and method.q.shape == (16,)
    groups = method.pseudo_groups(CLUSTERS, LABELS)
    blob = (CLUSTERS >= 2).long()
    assert len(groups.unique()) == 4
    for y in (0, 1):
        for b in (0, 1):
            assert len(groups[(LABELS == y) & (blob == b)].unique()) == 1
    losses = torch.arange(12, dtype=torch.float32)
    sums, counts = method.group_losses(losses, CLUSTERS, LABELS)
    for g in groups.unique():
        member = groups == g
        assert sums[g] == losses[member].sum() and counts[g] == member.sum()
    # One step by hand: q starts uniform over 16; q_g <- q_g exp(eta L_g) / sum; loss = sum_g q_g L_g.
    logits = torch.zeros(12, 2, requires_grad=True)
    loss, _ = method.training_loss(logits, {"target": LABELS}, CLUSTERS, lambda scores, target: losses)
    mean_loss = torch.zeros(16).index_add(0, groups, losses) / torch.bincount(groups, minlength=16).clamp_min(1)
    q = torch.softmax(mean_loss, dim=0)
    torch.testing.assert_close(method.q, q)
    torch.testing.assert_close(loss, (q * mean_loss).sum())


def test_group_dro_coarse_is_multiclass_only_and_fine_groups_keep_their_state_keys():
    with pytest.raises(ValueError, match="groups='coarse'\\) is for task='multiclass'"):
        GroupDRO(groups="coarse").bind(num_classes=2, task="multilabel", num_clusters=4)
    assert set(bound(GroupDRO()).state_dict()) == {
        "log_q"
    }  # no pseudo-group table: the fine groups keep their state keys


@pytest.mark.parametrize("make", [lambda: GroupBalancedReweighting(), lambda: GroupDRO(groups="coarse")])
def test_coarse_state_round_trips_through_a_state_dict(make):
    trained = fitted(make())
    restored = bound(make())
    restored.load_state_dict(trained.state_dict())
    assert torch.equal(restored.pseudo_groups.table, trained.pseudo_groups.table)
    assert bool(restored.pseudo_groups.fitted)
    torch.testing.assert_close(restored.pseudo_groups(CLUSTERS, LABELS), trained.pseudo_groups(CLUSTERS, LABELS))


def test_module_hands_the_prototypes_to_a_coarse_method():
    model = CCIMLightningModule(TwoStreamHost(feature_dim=16), num_classes=2, num_prototypes=4, confounder_dim=2,
                                attention="none", debias=GroupBalancedReweighting())  # fmt: skip
    key = DictionaryKey("x", "y", 4, True, 0, "features", 25, None, "none", "f")
    counts = torch.bincount(CLUSTERS, minlength=4)
    model.set_dictionary(
        ConfounderDictionary.from_clustering(PROTOTYPES, counts, key, assignments=CLUSTERS, targets=LABELS)
    )
    assert bool(model.debias.fitted) and len(model.debias.pseudo_groups(CLUSTERS, LABELS).unique()) == 4


SYNTHETIC = str(Path(__file__).parents[2] / "configs" / "synthetic.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["coarse", "aligned"])
def test_pseudo_group_dro_trains_from_the_cli_and_restores_for_test(tmp_path, monkeypatch, mode):
    from ccim_lightning.commands.cli import build_cli

    monkeypatch.chdir(tmp_path)
    args = ["--config", SYNTHETIC, "--data.init_args.train_size=96", "--data.init_args.val_size=32",
            "--data.init_args.test_size=32", "--data.init_args.image_size=32", "--data.init_args.subject_size=16",
            "--data.init_args.num_workers=0", "--model.init_args.num_prototypes=8", "--dictionary.num_iterations=5",
            "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--model.init_args.attention=none",
            "--model.init_args.debias=ccim_lightning.debias.GroupDRO",
            f"--model.init_args.debias.init_args.groups={mode}"]  # fmt: skip
    fitted_cli = build_cli(["fit", *args])
    table = fitted_cli.model.debias.pseudo_groups.table
    assert bool(fitted_cli.model.debias.pseudo_groups.fitted)
    tested = build_cli(["test", *args, "--ckpt_path", "last"])
    assert torch.equal(tested.model.debias.pseudo_groups.table, table)
    torch.testing.assert_close(tested.model.debias.q, fitted_cli.model.debias.q)


def test_group_balanced_and_group_dro_with_aligned_groups_by_hand():
    # Class 0: clusters 0, 1, 1, 2, 3; class 1: clusters 0, 1, 3, 3, 2, 2, 2; n = 12, n_y = (5, 7).
    # n_z = (2, 3, 4, 3). Aligned iff n[z, y] * 12 >= n_y * n_z:
    # class 0: z0 1*12 >= 10 yes; z1 2*12 >= 15 yes; z2 1*12 >= 20 no; z3 1*12 >= 15 no.
    # class 1: z0 12 >= 14 no; z1 12 >= 21 no; z2 36 >= 28 yes; z3 24 >= 21 yes.
    method = fitted(GroupBalancedReweighting(groups="aligned"))
    groups = method.pseudo_groups(CLUSTERS, LABELS)
    assert torch.equal(groups, torch.tensor([0, 0, 0, 1, 1, 3, 3, 2, 2, 2, 2, 2]))
    sizes = torch.tensor([3.0, 3, 3, 2, 2, 2, 2, 5, 5, 5, 5, 5])  # groups 0: 3, 1: 2, 2: 5, 3: 2
    expected = 12 / (4 * sizes)
    torch.testing.assert_close(method.weights[groups], expected / expected.mean())
    dro = fitted(GroupDRO(eta=1.0, groups="aligned"))
    assert dro.num_groups == 4 and torch.equal(dro.pseudo_groups(CLUSTERS, LABELS), groups)
    with pytest.raises(ValueError, match="groups='aligned'\\) is for task='multiclass'"):
        GroupDRO(groups="aligned").bind(num_classes=2, task="multilabel", num_clusters=4)
