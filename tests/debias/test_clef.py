"""CLEF: fusion, counterfactual, TIE and the three loss terms by hand; where gradients go; weights and round trip."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccim_lightning.debias import CLEF

CE = nn.CrossEntropyLoss(reduction="none")
BCE = nn.BCEWithLogitsLoss(reduction="none")

Y_C = [[0.5, -1.0, 0.2], [0.0, 0.4, -0.3]]  # the context branch's logits
Y_E = [[1.0, 0.3, -0.4], [-0.2, 0.1, 0.6]]  # the host's logits
TARGET = [0, 2]
E_STAR = 0.1


def transparent_clef(num_classes=3, task="multiclass", **kwargs):
    """A bound CLEF whose branch returns ``batch["context"]`` itself, so ``Y_c`` can be chosen in the test."""
    clef = CLEF(e_star_init=E_STAR, **kwargs)
    clef.bind(num_classes=num_classes, task=task, num_clusters=1)
    clef.encoder, clef.classifier = nn.Identity(), nn.Identity()
    return clef


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def softmax(v):
    total = sum(math.exp(x) for x in v)
    return [math.exp(x) / total for x in v]


def cross_entropy(v, y):
    return -(v[y] - math.log(sum(math.exp(x) for x in v)))


def test_clef_multiclass_fusion_tie_and_loss_by_hand():
    clef = transparent_clef()
    context, logits = torch.tensor(Y_C), torch.tensor(Y_E)
    batch = {"context": context, "target": torch.tensor(TARGET)}
    loss, terms = clef.training_loss(logits, batch, None, CE)

    fused, counter, kl, tie = [], [], [], []
    for yc, ye, y in zip(Y_C, Y_E, TARGET):
        factual = [log_sigmoid(c + e) for c, e in zip(yc, ye)]  # Y_ce = log sigmoid(Y_c + Y_e)
        counterfactual = [log_sigmoid(c + E_STAR) for c in yc]  # Y_ce* = log sigmoid(Y_c + e*)
        fused.append(cross_entropy(factual, y))
        counter.append(cross_entropy(counterfactual, y))
        p, p_f = softmax(counterfactual), softmax(factual)
        kl.append(sum(a * math.log(a / b) for a, b in zip(p, p_f)))  # KL(p(Y_ce*) || p(Y_ce))
        tie.append([f - c for f, c in zip(factual, counterfactual)])
    assert terms["fused_loss"].item() == pytest.approx(sum(fused) / 2, rel=1e-6)
    assert terms["counterfactual_loss"].item() == pytest.approx(sum(counter) / 2, rel=1e-6)
    assert terms["kl"].item() == pytest.approx(sum(kl) / 2, rel=1e-5)
    assert loss.item() == pytest.approx((sum(fused) + sum(counter) + sum(kl)) / 2, rel=1e-6)
    torch.testing.assert_close(clef.inference_logits(logits, batch), torch.tensor(tie))


def test_clef_kl_in_the_direction_of_the_counterfactual_vqa_code():
    clef = transparent_clef(kl_direction="factual_counterfactual")
    batch = {"context": torch.tensor(Y_C), "target": torch.tensor(TARGET)}
    _, terms = clef.training_loss(torch.tensor(Y_E), batch, None, CE)
    kl = []
    for yc, ye in zip(Y_C, Y_E):
        p_f = softmax([log_sigmoid(c + e) for c, e in zip(yc, ye)])
        p = softmax([log_sigmoid(c + E_STAR) for c in yc])
        kl.append(sum(a * math.log(a / b) for a, b in zip(p_f, p)))  # KL(p(Y_ce) || p(Y_ce*))
    assert terms["kl"].item() == pytest.approx(sum(kl) / 2, rel=1e-5)


def test_clef_gradients_go_only_where_intended():
    clef = transparent_clef()
    context = torch.tensor(Y_C, requires_grad=True)  # stands for the branch's output Y_c
    logits = torch.tensor(Y_E, requires_grad=True)  # the host's output Y_e
    target = torch.tensor(TARGET)
    loss, _ = clef.training_loss(logits, {"context": context, "target": target}, None, CE)
    loss.backward()

    # Independent reference terms, each on fresh leaves.
    yc, ye = torch.tensor(Y_C, requires_grad=True), torch.tensor(Y_E, requires_grad=True)
    e = torch.full((3,), E_STAR, requires_grad=True)
    fused = F.cross_entropy(torch.log(torch.sigmoid(yc + ye)), target)
    counter = F.cross_entropy(torch.log(torch.sigmoid(yc + e)), target)
    p_cf = torch.softmax(torch.log(torch.sigmoid(yc.detach() + e)), dim=1)
    p_f = torch.softmax(torch.log(torch.sigmoid(yc + ye)), dim=1).detach()
    kl = (p_cf * (p_cf.log() - p_f.log())).sum(1).mean()

    # The host learns from the factual CE alone: neither the counterfactual CE nor the KL reaches it.
    (host_grad,) = torch.autograd.grad(fused, ye, retain_graph=True)
    torch.testing.assert_close(logits.grad, host_grad)
    # The branch learns from the two CE terms; the KL sends it nothing.
    branch_grad = torch.autograd.grad(fused + counter, yc, retain_graph=True)[0]
    torch.testing.assert_close(context.grad, branch_grad)
    # e* learns from the counterfactual CE and, through its own path, from the KL.
    (kl_grad,) = torch.autograd.grad(kl, e, retain_graph=True)
    (counter_grad,) = torch.autograd.grad(counter, e)
    assert kl_grad.abs().sum() > 1e-4
    torch.testing.assert_close(clef.e_star.grad, counter_grad + kl_grad)


def test_clef_multilabel_per_category_binary_version_by_hand():
    clef = transparent_clef(num_classes=3, task="multilabel")
    targets = [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    batch = {"context": torch.tensor(Y_C), "target": torch.tensor(targets)}
    loss, terms = clef.training_loss(torch.tensor(Y_E), batch, None, BCE)

    def bce(logit, y):  # BCE of the probability sigmoid(logit) = exp(log sigmoid(logit))
        return -(y * log_sigmoid(logit) + (1 - y) * log_sigmoid(-logit))

    fused, counter, kl, tie = 0.0, 0.0, 0.0, []
    for yc, ye, ys in zip(Y_C, Y_E, targets):
        row = []
        for c, e, y in zip(yc, ye, ys):
            s, s_cf = c + e, c + E_STAR
            fused += bce(s, y)
            counter += bce(s_cf, y)
            p, q = 1 / (1 + math.exp(-s_cf)), 1 / (1 + math.exp(-s))  # counterfactual, factual presence
            kl += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
            row.append(log_sigmoid(s) - log_sigmoid(s_cf))
        tie.append(row)
    assert terms["fused_loss"].item() == pytest.approx(fused / 6, rel=1e-6)
    assert terms["counterfactual_loss"].item() == pytest.approx(counter / 6, rel=1e-6)
    assert terms["kl"].item() == pytest.approx(kl / 6, rel=1e-5)
    assert loss.item() == pytest.approx((fused + counter + kl) / 6, rel=1e-6)
    torch.testing.assert_close(clef.inference_logits(torch.tensor(Y_E), batch), torch.tensor(tie))


def test_clef_real_branch_trains_itself_and_e_star_but_sends_nothing_into_the_host():
    torch.manual_seed(0)
    clef = CLEF()  # default encoder: the tiny CNN
    assert clef.needs_clusters is False
    clef.bind(num_classes=4, task="multiclass", num_clusters=32)
    clef.eval()  # fixed BatchNorm statistics, so Y_c can be recomputed below
    producer = nn.Linear(5, 4)  # stands for the host
    features, images = torch.randn(6, 5), torch.randn(6, 3, 64, 64)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    loss, _ = clef.training_loss(producer(features), {"context": images, "target": target}, None, CE)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in clef.encoder.parameters() if p.requires_grad)
    assert clef.classifier.weight.grad.abs().sum() > 0 and clef.e_star.grad.abs().sum() > 0

    with torch.no_grad():
        y_c = clef.context_logits({"context": images})
    reference = nn.Linear(5, 4)
    reference.load_state_dict(producer.state_dict())
    F.cross_entropy(torch.log(torch.sigmoid(y_c + reference(features))), target).backward()
    torch.testing.assert_close(producer.weight.grad, reference.weight.grad)


def test_clef_state_dict_round_trip_and_local_weights(tmp_path):
    torch.manual_seed(0)
    clef = CLEF(e_star_init=0.3)
    clef.bind(num_classes=4, task="multiclass", num_clusters=32)
    with torch.no_grad():
        clef.e_star.add_(torch.arange(4.0))
    batch = {"context": torch.randn(3, 3, 32, 32)}
    logits = torch.randn(3, 4)
    fresh = CLEF()
    fresh.bind(num_classes=4, task="multiclass", num_clusters=32)
    fresh.load_state_dict(clef.state_dict())
    clef.eval(), fresh.eval()
    torch.testing.assert_close(fresh.inference_logits(logits, batch), clef.inference_logits(logits, batch))

    path = tmp_path / "encoder.pth"
    torch.save(clef.encoder.state_dict(), path)
    loaded = CLEF(weights=str(path))
    for (name, a), b in zip(clef.encoder.state_dict().items(), loaded.encoder.state_dict().values()):
        assert torch.equal(a, b), name


def test_clef_bad_inputs():
    with pytest.raises(ValueError, match="kl_direction"):
        CLEF(kl_direction="forward")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLEF(weights="/nonexistent/places365.pth")
    clef = transparent_clef()
    with pytest.raises(ValueError, match=r"batch\['context'\]"):
        clef.training_loss(torch.zeros(2, 3), {"target": torch.tensor([0, 1])}, None, CE)
    with pytest.raises(ValueError, match="same samples"):
        clef.inference_logits(torch.zeros(2, 3), {"context": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="task='multilabel'"):
        clef.training_loss(torch.zeros(2, 3), {"context": torch.zeros(2, 3), "target": torch.ones(2, 3)}, None, CE)
    with pytest.raises(RuntimeError, match="not bound"):
        CLEF().context_logits({"context": torch.zeros(1, 3, 32, 32)})
