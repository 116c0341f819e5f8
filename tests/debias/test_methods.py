"""The pseudo-group debiasing methods (reweighting, Group DRO, product of experts) against hand computations."""

import math

import pytest
import torch
from torch import nn

from ccim_lightning.debias import ClusterReweighting, GroupDRO, ProductOfExperts

CE = nn.CrossEntropyLoss(reduction="none")
BCE = nn.BCEWithLogitsLoss(reduction="none")

# Two clusters, two classes: cluster 0 holds labels 0, 0, 0, 1; cluster 1 holds labels 1, 1.
CLUSTERS = torch.tensor([0, 0, 0, 0, 1, 1])
LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


def bound(method, num_classes=2, task="multiclass", num_clusters=2):
    method.bind(num_classes=num_classes, task=task, num_clusters=num_clusters)
    return method


def fixed_loss(values):
    """An ``elementwise_loss`` that returns given per-element losses (so group losses can be worked out by hand)."""
    return lambda logits, target: values


# --- ClusterReweighting ------------------------------------------------------------------------------------------
def test_reweighting_table_from_hand_counts():
    method = bound(ClusterReweighting(smoothing=1.0, max_weight=None))
    method.fit_clusters(CLUSTERS, LABELS)
    # P(y) = 3/6 for both classes. P(y | z) with +1 smoothing over 2 classes:
    # z=0: (3+1)/6, (1+1)/6; z=1: (0+1)/4, (2+1)/4. Ratios P(y)/P(y|z):
    raw = torch.tensor([[0.5 / (4 / 6), 0.5 / (2 / 6)], [0.5 / (1 / 4), 0.5 / (3 / 4)]], dtype=torch.float64)
    assert raw[0, 0] == pytest.approx(0.75) and raw[1, 0] == pytest.approx(2.0)
    # Normalised so the six training samples' weights average 1: 3 x w[0,0] + w[0,1] + 2 x w[1,1].
    mean = (3 * raw[0, 0] + raw[0, 1] + 2 * raw[1, 1]) / 6
    torch.testing.assert_close(method.weights.double(), raw / mean)
    assert bool(method.fitted)
    per_sample = method.sample_weights(CLUSTERS, LABELS)
    assert per_sample.mean().item() == pytest.approx(1.0)


def test_reweighting_clips_the_ratio_before_normalising():
    method = bound(ClusterReweighting(smoothing=1.0, max_weight=1.2))
    method.fit_clusters(CLUSTERS, LABELS)
    raw = torch.tensor([[0.75, 1.2], [1.2, 2 / 3]], dtype=torch.float64)  # 1.5 and 2.0 clipped to 1.2
    mean = (3 * 0.75 + 1.2 + 2 * (2 / 3)) / 6
    torch.testing.assert_close(method.weights.double(), raw / mean)


def test_reweighting_without_smoothing_makes_cluster_and_label_independent():
    # With s = 0 and every cell filled, the weighted counts factorise: sum_i w_i [z_i=z, y_i=y] ∝ n_z n_y.
    clusters = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    labels = torch.tensor([0, 0, 1, 0, 1, 1, 1, 1])
    method = bound(ClusterReweighting(smoothing=0.0, max_weight=None))
    method.fit_clusters(clusters, labels)
    w = method.sample_weights(clusters, labels).double()
    weighted = torch.zeros(2, 2, dtype=torch.float64).index_put_((clusters, labels), w, accumulate=True)
    n_z = torch.tensor([3.0, 5.0], dtype=torch.float64)
    n_y = torch.tensor([3.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(weighted, torch.outer(n_z, n_y) / 8)


def test_reweighting_loss_is_the_weighted_mean_of_the_cross_entropy():
    method = bound(ClusterReweighting(smoothing=1.0, max_weight=None))
    method.fit_clusters(CLUSTERS, LABELS)
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 1.0]], requires_grad=True)
    target, clusters = torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1])
    loss, terms = method.training_loss(logits, {"target": target}, clusters, CE)
    ce = -torch.log_softmax(logits, dim=1)[torch.arange(3), target]
    w = method.weights[clusters, target]
    assert loss.item() == pytest.approx(((w * ce).sum() / 3).item())
    assert terms["weight_max"].item() == pytest.approx(w.max().item())
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_reweighting_multilabel_per_category_weights_by_hand():
    clusters = torch.tensor([0, 0, 0, 1, 1])
    targets = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1], [0, 1]], dtype=torch.float32)
    s = 0.5
    method = bound(ClusterReweighting(smoothing=s, max_weight=None), task="multilabel")
    method.fit_clusters(clusters, targets)
    assert method.weights.shape == (2, 2, 2)
    # One cell by hand: category 0 in cluster 0 is present in 2 of 3 samples; present in 2 of 5 overall.
    # P(y0=1 | z=0) = (2 + 0.5) / (3 + 1) = 0.625, P(y0=1) = 0.4, ratio 0.64.
    expected = torch.zeros(2, 2, 2, dtype=torch.float64)
    for z in range(2):
        n_z = int((clusters == z).sum())
        for c in range(2):
            for v in range(2):
                count = int(((clusters == z) & (targets[:, c] == v)).sum())
                marginal = int((targets[:, c] == v).sum()) / 5
                expected[z, c, v] = marginal / ((count + s) / (n_z + 2 * s))
    assert expected[0, 0, 1] == pytest.approx(0.64)
    for c in range(2):  # mean 1 per category over the training samples
        expected[:, c] /= sum(expected[clusters[i], c, int(targets[i, c])] for i in range(5)) / 5
    torch.testing.assert_close(method.weights.double(), expected)

    logits = torch.randn(5, 2, requires_grad=True)
    loss, _ = method.training_loss(logits, {"target": targets}, clusters, BCE)
    p = torch.sigmoid(logits)
    bce = -(targets * p.log() + (1 - targets) * (1 - p).log())
    w = torch.stack([torch.stack([expected[clusters[i], c, int(targets[i, c])] for c in range(2)]) for i in range(5)])
    assert loss.item() == pytest.approx((w * bce.double()).mean().item(), rel=1e-5)


def test_reweighting_sampler_weights_refuse_multilabel():
    method = bound(ClusterReweighting(), task="multilabel")
    method.fit_clusters(torch.tensor([0, 1]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="multiclass"):
        method.sample_weights(torch.tensor([0, 1]), torch.tensor([0, 1]))


# --- GroupDRO ----------------------------------------------------------------------------------------------------
def test_group_dro_two_steps_by_hand():
    eta = 0.5
    method = bound(GroupDRO(eta=eta))  # 2 clusters x 2 classes = 4 groups, g = z * 2 + y
    assert method.q.tolist() == [0.25] * 4
    logits = torch.zeros(4, 2)

    # Step 1: groups 0, 1, 3, 3 with losses 1, 2, 0.5, 1.5 -> L = [1, 2, 0 (absent), 1].
    per_sample = torch.tensor([1.0, 2.0, 0.5, 1.5], requires_grad=True)
    batch = {"target": torch.tensor([0, 1, 1, 1])}
    loss, terms = method.training_loss(logits, batch, torch.tensor([0, 0, 1, 1]), fixed_loss(per_sample))
    unnormalised = [0.25 * math.exp(eta * L) for L in (1.0, 2.0, 0.0, 1.0)]
    q1 = [u / sum(unnormalised) for u in unnormalised]
    torch.testing.assert_close(method.q, torch.tensor(q1))
    assert loss.item() == pytest.approx(q1[0] * 1.0 + q1[1] * 2.0 + q1[3] * 1.0, rel=1e-6)
    assert terms["worst_group_loss"].item() == 2.0 and terms["groups_in_batch"].item() == 3
    loss.backward()  # each sample gets q_g / (samples in its group)
    torch.testing.assert_close(per_sample.grad, torch.tensor([q1[0], q1[1], q1[3] / 2, q1[3] / 2]))

    # Step 2: groups 2 (z=1, y=0) and 0 with losses 3 and 1.
    per_sample = torch.tensor([3.0, 1.0])
    batch = {"target": torch.tensor([0, 0])}
    loss, _ = method.training_loss(logits[:2], batch, torch.tensor([1, 0]), fixed_loss(per_sample))
    unnormalised = [q1[0] * math.exp(eta * 1.0), q1[1], q1[2] * math.exp(eta * 3.0), q1[3]]
    q2 = [u / sum(unnormalised) for u in unnormalised]
    torch.testing.assert_close(method.q, torch.tensor(q2))
    assert loss.item() == pytest.approx(q2[2] * 3.0 + q2[0] * 1.0, rel=1e-6)


def test_group_dro_normalize_divides_by_the_mass_of_the_present_groups():
    method = bound(GroupDRO(eta=0.0, normalize=True))  # eta = 0: q stays uniform
    per_sample = torch.tensor([1.0, 3.0])
    loss, _ = method.training_loss(
        torch.zeros(2, 2), {"target": torch.tensor([0, 1])}, torch.tensor([0, 0]), fixed_loss(per_sample)
    )
    assert loss.item() == pytest.approx((0.25 * 1.0 + 0.25 * 3.0) / 0.5)


@pytest.mark.parametrize("normalize", [False, True])
def test_group_dro_weights_survive_a_long_run_of_large_losses(normalize):
    # Group 0 (z=0, y=0) loses 50 and group 3 (z=1, y=1) loses 1 at each of 500 steps: by the exponentiated-gradient
    # rule q_3 ends near exp(-245), far below float32's smallest number (exp(-103)). Stored as q it became exactly 0,
    # and a batch of group 3 alone then gave the normalised loss 0 / 0 = NaN (and the plain sum no gradient ever).
    eta, steps = 0.01, 500
    method = bound(GroupDRO(eta=eta, normalize=normalize))
    log_q = [math.log(1 / 4)] * 4  # the rule by hand, in float64 log space

    def hand_step(group_losses):
        nonlocal log_q
        raised = [lq + eta * loss for lq, loss in zip(log_q, group_losses)]
        top = max(raised)
        log_total = top + math.log(sum(math.exp(r - top) for r in raised))
        log_q = [r - log_total for r in raised]

    batch = {"target": torch.tensor([0, 1])}
    for _ in range(steps):
        loss, _ = method.training_loss(
            torch.zeros(2, 2), batch, torch.tensor([0, 1]), fixed_loss(torch.tensor([50.0, 1.0]))
        )
        hand_step([50.0, 0.0, 0.0, 1.0])
        assert math.isfinite(loss.item())
    assert log_q[3] < -240
    torch.testing.assert_close(method.log_q.double(), torch.tensor(log_q, dtype=torch.float64), rtol=1e-5, atol=1e-3)

    per_sample = torch.tensor([1.0], requires_grad=True)  # a batch of group 3 alone
    loss, _ = method.training_loss(
        torch.zeros(1, 2), {"target": torch.tensor([1])}, torch.tensor([1]), fixed_loss(per_sample)
    )
    hand_step([0.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(method.log_q.double(), torch.tensor(log_q, dtype=torch.float64), rtol=1e-5, atol=1e-3)
    # normalised: q_3 / q_3 * L_3 = 1; the sum: q_3 * L_3 = exp(log q_3), 0 in float32, but never NaN.
    assert loss.item() == (1.0 if normalize else pytest.approx(math.exp(log_q[3]) * 1.0, abs=1e-30))
    loss.backward()
    assert torch.isfinite(per_sample.grad).all()


def test_group_dro_loads_a_checkpoint_that_stored_q():
    method = bound(GroupDRO())
    method.load_state_dict({"q": torch.tensor([0.5, 0.25, 0.25, 0.0])})  # an older checkpoint; q_3 had underflowed
    torch.testing.assert_close(method.q, torch.tensor([0.5, 0.25, 0.25, 0.0]))
    assert torch.isfinite(method.log_q).all() and method.log_q[0].item() == pytest.approx(math.log(0.5))
    assert set(method.state_dict()) == {"log_q"}


def test_group_dro_multilabel_category_cluster_groups():
    eta = 1.0
    method = bound(GroupDRO(eta=eta), task="multilabel")  # G = 2 clusters x 2 categories x 2 values = 8
    assert method.q.shape == (8,)
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    losses = torch.tensor([[0.2, 0.4], [0.6, 0.8]])
    loss, _ = method.training_loss(torch.zeros(2, 2), {"target": targets}, torch.tensor([0, 1]), fixed_loss(losses))
    # g = (z * C + c) * 2 + v: sample 0 -> groups 1 (c0, present) and 2 (c1, absent); sample 1 -> groups 5 and 7.
    group_loss = [0.0] * 8
    group_loss[1], group_loss[2], group_loss[5], group_loss[7] = 0.2, 0.4, 0.6, 0.8
    unnormalised = [math.exp(eta * L) / 8 for L in group_loss]
    q = [u / sum(unnormalised) for u in unnormalised]
    torch.testing.assert_close(method.q, torch.tensor(q))
    assert loss.item() == pytest.approx(sum(qg * L for qg, L in zip(q, group_loss)), rel=1e-6)


def test_group_dro_multilabel_cluster_groups_average_the_categories():
    method = bound(GroupDRO(eta=1.0, multilabel_groups="cluster"), task="multilabel")
    assert method.q.shape == (2,)
    losses = torch.tensor([[0.2, 0.4], [0.6, 0.8], [1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    loss, _ = method.training_loss(torch.zeros(3, 2), {"target": targets}, torch.tensor([0, 0, 1]), fixed_loss(losses))
    group_loss = [(0.3 + 0.7) / 2, 1.0]  # cluster 0: samples' category means 0.3 and 0.7; cluster 1: 1.0
    unnormalised = [0.5 * math.exp(L) for L in group_loss]
    q = [u / sum(unnormalised) for u in unnormalised]
    torch.testing.assert_close(method.q, torch.tensor(q))
    assert loss.item() == pytest.approx(q[0] * group_loss[0] + q[1] * group_loss[1], rel=1e-6)


# --- ProductOfExperts --------------------------------------------------------------------------------------------
def test_product_of_experts_loss_by_hand():
    # Cluster 0: labels 0, 0, 1 -> counts [2, 1, 0] + 1 = [3, 2, 1] / 6; cluster 1: label 2 -> [1, 1, 2] / 4.
    method = bound(ProductOfExperts(smoothing=1.0), num_classes=3)
    method.fit_clusters(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 2]))
    log_pb = torch.tensor([[3 / 6, 2 / 6, 1 / 6], [1 / 4, 1 / 4, 2 / 4]]).log()
    torch.testing.assert_close(method.bias_log_prob, log_pb)

    logits = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]], requires_grad=True)
    target, clusters = torch.tensor([1, 2]), torch.tensor([0, 1])
    loss, terms = method.training_loss(logits, {"target": target}, clusters, CE)
    combined = torch.log_softmax(logits, dim=1) + log_pb[clusters]
    expected = -torch.log_softmax(combined, dim=1)[torch.arange(2), target].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    host = -torch.log_softmax(logits, dim=1)[torch.arange(2), target].mean()
    assert terms["host_loss"].item() == pytest.approx(host.item(), rel=1e-6)
    # Inference is the host alone.
    assert torch.equal(method.inference_logits(logits, {}), logits)


def test_product_of_experts_multilabel_adds_the_bias_log_odds():
    method = bound(ProductOfExperts(smoothing=1.0), num_classes=2, task="multilabel")
    clusters = torch.tensor([0, 0, 0, 1])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    method.fit_clusters(clusters, targets)
    # p_b(y_c=1 | z) = (n1 + 1) / (n_z + 2): z=0: 3/5, 2/5; z=1: 1/3, 1/3.
    p = torch.tensor([[3 / 5, 2 / 5], [1 / 3, 1 / 3]])
    torch.testing.assert_close(method.bias_log_prob, (p / (1 - p)).log())
    logits = torch.tensor([[0.5, -0.5], [1.0, 2.0]])
    batch_targets, batch_clusters = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    loss, _ = method.training_loss(logits, {"target": batch_targets}, batch_clusters, BCE)
    prob = torch.sigmoid(logits + (p / (1 - p)).log()[batch_clusters])
    expected = -(batch_targets * prob.log() + (1 - batch_targets) * (1 - prob).log()).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# --- shared behaviour --------------------------------------------------------------------------------------------
FITTED = [
    lambda: ClusterReweighting(smoothing=0.5, max_weight=3.0),
    lambda: ProductOfExperts(smoothing=0.5),
    lambda: GroupDRO(eta=0.3),
]


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
@pytest.mark.parametrize("make", FITTED, ids=["reweighting", "poe", "group_dro"])
def test_state_dict_round_trip_restores_the_statistics(make, task):
    generator = torch.Generator().manual_seed(0)
    clusters = torch.randint(0, 32, (200,), generator=generator)
    if task == "multiclass":
        targets = torch.randint(0, 4, (200,), generator=generator)
    else:
        targets = (torch.rand(200, 4, generator=generator) < 0.3).float()
    method = bound(make(), num_classes=4, task=task, num_clusters=32)
    method.fit_clusters(clusters, targets)
    logits = torch.randn(16, 4, generator=generator)
    elementwise = CE if task == "multiclass" else BCE
    method.training_loss(logits, {"target": targets[:16]}, clusters[:16], elementwise)  # moves GroupDRO's q

    fresh = bound(make(), num_classes=4, task=task, num_clusters=32)
    fresh.load_state_dict(method.state_dict())  # no fit_clusters: the checkpoint holds the statistics
    for name, buffer in method.named_buffers():
        assert torch.equal(dict(fresh.named_buffers())[name], buffer), name
    a, _ = method.training_loss(logits, {"target": targets[16:32]}, clusters[16:32], elementwise)
    b, _ = fresh.training_loss(logits, {"target": targets[16:32]}, clusters[16:32], elementwise)
    assert a.item() == b.item()


@pytest.mark.parametrize("make", FITTED[:2], ids=["reweighting", "poe"])
def test_training_before_fit_clusters_is_a_clear_error(make):
    method = bound(make())
    with pytest.raises(RuntimeError, match="fit_clusters"):
        method.training_loss(torch.zeros(2, 2), {"target": torch.tensor([0, 1])}, torch.tensor([0, 1]), CE)


@pytest.mark.parametrize("make", FITTED, ids=["reweighting", "poe", "group_dro"])
def test_bad_inputs_are_clear_errors(make):
    with pytest.raises(RuntimeError, match="not bound"):
        make().fit_clusters(CLUSTERS, LABELS)
    method = bound(make(), num_clusters=2)
    with pytest.raises(ValueError, match=r"clusters\[1\] = 2 is outside \[0, 2\)"):
        method.fit_clusters(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="integer cluster ids"):
        method.fit_clusters(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"task='multilabel'"):  # one-hot targets for a multiclass method
        method.fit_clusters(torch.tensor([0, 1]), torch.eye(2))
    with pytest.raises(ValueError, match=r"\(3,\)"):  # one label short
        method.fit_clusters(torch.tensor([0, 1, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not a class id"):
        method.fit_clusters(torch.tensor([0, 1]), torch.tensor([0, 5]))
    method.fit_clusters(CLUSTERS, LABELS)
    batch = {"target": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match="clusters of the batch"):
        method.training_loss(torch.zeros(2, 2), batch, torch.tensor([0, -1]), CE)
    with pytest.raises(ValueError, match="clusters=None"):
        method.training_loss(torch.zeros(2, 2), batch, None, CE)
    with pytest.raises(ValueError, match="reduction='none'"):
        method.training_loss(torch.zeros(2, 2), batch, torch.tensor([0, 1]), nn.CrossEntropyLoss())

    multilabel = bound(make(), task="multilabel", num_clusters=2)
    with pytest.raises(ValueError, match=r"\(2, 2\) multi-hot"):
        multilabel.fit_clusters(torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_non_binary_multilabel_targets_are_refused_where_they_index_tables():
    method = bound(ClusterReweighting(), task="multilabel")
    with pytest.raises(ValueError, match=r"targets\[0, 1\] = 0.5"):
        method.fit_clusters(torch.tensor([0, 1]), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="smoothing"):
        ClusterReweighting(smoothing=-1)
    with pytest.raises(ValueError, match="max_weight"):
        ClusterReweighting(max_weight=0)
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        ProductOfExperts(smoothing=0)
    with pytest.raises(ValueError, match="multilabel_groups"):
        GroupDRO(multilabel_groups="scene")
    with pytest.raises(ValueError, match="task"):
        GroupDRO().bind(num_classes=2, task="binary", num_clusters=2)


def test_reweighting_without_smoothing_gives_empty_cells_a_finite_neutral_ratio():
    method = bound(ClusterReweighting(smoothing=0.0, max_weight=None))
    method.fit_clusters(CLUSTERS, LABELS)  # cell (z=1, y=0) is empty
    # Filled cells: P(y)/P(y|z) = 0.5/(3/4), 0.5/(1/4), 0.5/1; mean over samples (3 x 2/3 + 2 + 2 x 0.5) / 6 = 5/6.
    raw = torch.tensor([[2 / 3, 2.0], [1.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(method.weights.double(), raw / (5 / 6))
