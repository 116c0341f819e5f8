"""Tests of the CCIM head against an independent transcription of eqs. 4-7 (docs/concepts/ccim.md)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ccim_lightning.head import ContextualCausalIntervention

D_H, C, N, D, D_M, D_N = 12, 5, 10, 16, 8, 6


def make_head(attention="dot_product", filled=True, dtype=torch.float64, seed=0, **kwargs):
    """A small head with every parameter and buffer randomised (BN statistics too) and, optionally, a dictionary."""
    torch.manual_seed(seed)
    options = {"hidden_dim": D_M, "attention_dim": D_N}
    options.update(kwargs)
    head = ContextualCausalIntervention(D_H, C, N, D, attention=attention, **options)
    with torch.no_grad():
        for name, tensor in head.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point() and name not in ("dictionary", "prior"):
                tensor.normal_(0.0, 0.5)
    head = head.to(dtype)
    if filled:
        prior = torch.rand(N, dtype=torch.float64) + 0.1
        head.set_dictionary(torch.randn(N, D, dtype=torch.float64), prior / prior.sum())
    return head


def reference_logits(params, h, attention, use_prior=True, uniform=False, residual_scale=0.3, eps=1e-5):
    """Eqs. 4-7 plus the reference module's residual block, as the reference module writes them.

    ``params`` is a state dict in the reference module's names (``{dataset}_fc`` is passed here as ``fc``); the
    weighted sum of eq. 5 materialises the (B, N, d) product ``lambda[:, :, None] * Z * P`` and sums it over N.
    """
    z, prior = params["dictionary"], params["prior"].reshape(-1, 1)
    x = h @ params["w_h"]
    if attention != "none":
        if uniform:  # "without lambda": no query/key projections at all
            lam = torch.ones(h.shape[0], z.shape[0], dtype=h.dtype) / z.shape[0]
        else:
            q = h @ params["causal_intervention.query.weight"].T
            k = z @ params["causal_intervention.key.weight"].T
            if attention == "dot_product":
                scores = q @ k.T / math.sqrt(z.shape[1])
            else:
                u = torch.tanh(q[:, None, :] + k[None, :, :])
                scores = (u @ params["causal_intervention.w_t.weight"].T)[..., 0]
            lam = torch.softmax(scores, dim=1)
        product = lam[:, :, None] * z[None, :, :]
        if use_prior:
            product = product * prior[None, :, :]
        g = product.sum(dim=1)
        x = x + g @ params["w_g"]
    bn = (x - params["classifier.norm.running_mean"]) / torch.sqrt(params["classifier.norm.running_var"] + eps)
    bn = bn * params["classifier.norm.weight"] + params["classifier.norm.bias"]
    a = bn @ params["classifier.fc1.weight"].T + params["classifier.fc1.bias"]
    a = 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a**3)))
    m = a @ params["classifier.fc2.weight"].T + params["classifier.fc2.bias"]
    out = x + residual_scale * m
    return out @ params["fc.weight"].T + params["fc.bias"]


def test_without_lambda_head_has_no_unused_projections():
    head = make_head("dot_product", uniform_attention=True)
    assert not hasattr(head, "causal_intervention")
    head.train()(torch.randn(4, D_H, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None for p in head.parameters())  # DDP's default strategy needs every one used


def params_of(head):
    return {name: tensor.detach().clone() for name, tensor in head.state_dict().items()}


@pytest.mark.parametrize("attention", ["dot_product", "additive"])
@pytest.mark.parametrize(("use_prior", "uniform"), [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize("batch", [1, 50])  # the dot product projects the queries (B=1) or the keys (B=50)
def test_matches_reference_transcription(attention, use_prior, uniform, batch):
    head = make_head(attention, use_prior=use_prior, uniform_attention=uniform, residual_scale=0.7).eval()
    h = torch.randn(batch, D_H, dtype=torch.float64)
    expected = reference_logits(params_of(head), h, attention, use_prior, uniform, residual_scale=0.7)
    torch.testing.assert_close(head(h), expected, rtol=1e-10, atol=1e-10)


def test_baseline_head_matches_reference_transcription():
    head = make_head("none", filled=False).eval()
    assert not head.uses_dictionary
    assert not hasattr(head, "w_g") and not hasattr(head, "causal_intervention")
    h = torch.randn(7, D_H, dtype=torch.float64)
    torch.testing.assert_close(head(h), reference_logits(params_of(head), h, "none"), rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="attention='none'"):
        head.attention_weights(h)


def test_timm_style_split_and_diagnostics():
    head = make_head("dot_product").eval()
    h = torch.randn(5, D_H, dtype=torch.float64)
    features = head.forward_features(h)
    assert features.shape == (5, D_M)
    torch.testing.assert_close(head.forward_head(features), head(h))
    weights = head.attention_weights(h)
    assert weights.shape == (5, N)
    torch.testing.assert_close(weights.sum(1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(head.intervention(h), (weights * head.prior) @ head.dictionary)


def test_dot_product_scale_is_sqrt_of_confounder_dim():
    head = make_head("dot_product", attention_dim=3).eval()  # d = 16, d_n = 3: the two scales differ
    h = torch.randn(4, D_H, dtype=torch.float64) * 3
    q = h @ head.causal_intervention.query.weight.T
    k = head.dictionary @ head.causal_intervention.key.weight.T
    weights = head.attention_weights(h)
    torch.testing.assert_close(weights, torch.softmax(q @ k.T / math.sqrt(D), dim=1))
    assert not torch.allclose(weights, torch.softmax(q @ k.T / math.sqrt(3), dim=1), atol=1e-3)


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_additive_chunks_match_single_chunk(chunk_size):
    whole, chunked = make_head("additive", chunk_size=N), make_head("additive", chunk_size=chunk_size)
    chunked.load_state_dict(whole.state_dict())
    h = torch.randn(6, D_H, dtype=torch.float64)
    torch.testing.assert_close(chunked.eval()(h), whole.eval()(h), rtol=1e-12, atol=1e-12)
    for head in (whole, chunked):  # the backward pass recomputes each chunk
        head.train()
        torch.manual_seed(1)
        head(h).square().sum().backward()
    for (name, a), b in zip(whole.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(("attention", "batch"), [("dot_product", 2), ("dot_product", 40), ("additive", 8)])
def test_gradients_reach_intervention_parameters(attention, batch):
    head = make_head(attention, dtype=torch.float32, chunk_size=4).train()
    h = torch.randn(batch, D_H, requires_grad=True)
    head(h).logsumexp(1).sum().backward()
    names = ["w_h", "w_g", "causal_intervention.query.weight", "causal_intervention.key.weight"]
    if attention == "additive":
        names.append("causal_intervention.w_t.weight")
    parameters = dict(head.named_parameters())
    for name in names:
        grad = parameters[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert h.grad is not None and h.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ["dot_product", "additive"])
def test_bf16_autocast(attention):
    head = make_head(attention, dtype=torch.float32).eval()
    h = torch.randn(4, D_H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(h)
    assert logits.shape == (4, C) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), head(h), rtol=0.1, atol=0.1)


def test_set_dictionary_fills_in_place():
    head = ContextualCausalIntervention(D_H, C, N, D, hidden_dim=D_M, attention_dim=D_N)
    assert head.dictionary.shape == (N, D) and head.prior.shape == (N,) and head.dictionary_filled.shape == ()
    torch.testing.assert_close(head.prior, torch.full((N,), 1 / N))
    assert not head.is_dictionary_filled and not bool(head.state_dict()["dictionary_filled"])
    pointers = head.dictionary.data_ptr(), head.prior.data_ptr()
    z = np.random.default_rng(0).normal(size=(N, D))  # float64 numpy, prior given as (N, 1)
    head.set_dictionary(z, np.full((N, 1), 1 / N))
    assert (head.dictionary.data_ptr(), head.prior.data_ptr()) == pointers
    assert head.dictionary.dtype == torch.float32 and head.dictionary.device.type == "cpu"
    torch.testing.assert_close(head.dictionary, torch.as_tensor(z, dtype=torch.float32))
    state = head.state_dict()
    assert state["dictionary_filled"].dtype == torch.bool and bool(state["dictionary_filled"])
    restored = ContextualCausalIntervention(D_H, C, N, D, hidden_dim=D_M, attention_dim=D_N)
    restored.load_state_dict(state)
    assert restored.is_dictionary_filled
    head.load_state_dict(ContextualCausalIntervention(D_H, C, N, D, hidden_dim=D_M, attention_dim=D_N).state_dict())
    assert not head.is_dictionary_filled  # loading an unfilled state empties the head again
    assert restored.eval()(torch.randn(3, D_H)).shape == (3, C)


@pytest.mark.parametrize(
    ("prototypes", "prior", "match"),
    [
        (torch.randn(N + 1, D), torch.full((N,), 1 / N), r"shape .*\(10, 16\), got \(11, 16\)"),
        (torch.randn(N, D), torch.full((N - 1,), 1 / (N - 1)), r"\(10,\) or \(10, 1\), got \(9,\)"),
        (torch.randn(N, D), torch.tensor([0.3, -0.1] + [0.1] * 8), "non-negative"),
        (torch.randn(N, D), torch.full((N,), 0.2), r"sums to 2.*tolerance 0.0001"),
        (torch.full((N, D), float("nan")), torch.full((N,), 1 / N), "NaN"),
        (torch.randn(N, D), torch.tensor([float("inf")] + [0.1] * 9), "NaN or infinite"),
    ],
)
def test_set_dictionary_errors(prototypes, prior, match):
    head = ContextualCausalIntervention(D_H, C, N, D)
    with pytest.raises(ValueError, match=match):
        head.set_dictionary(prototypes, prior)
    assert not head.is_dictionary_filled and not head.dictionary.any()


def test_forward_errors():
    head = make_head("dot_product", filled=False)
    with pytest.raises(RuntimeError, match="dictionary .* is empty.*ConfounderDictionaryCallback.*set_dictionary"):
        head(torch.randn(2, D_H, dtype=torch.float64))
    head = make_head("dot_product")
    with pytest.raises(ValueError, match=r"feature_dim=12\), got \(2, 13\)"):
        head(torch.randn(2, D_H + 1, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": "scaled"}, "'dot_product', 'additive', 'none'"),
        ({"num_prototypes": 0}, "num_prototypes"),
        ({"confounder_dim": -3}, "confounder_dim"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_constructor_errors(kwargs, match):
    options = {"feature_dim": D_H, "num_classes": C, "num_prototypes": N, "confounder_dim": D}
    options.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ContextualCausalIntervention(**options)


def test_state_dict_buffer_layout_is_shared():
    layouts = set()
    for attention in ("dot_product", "additive", "none"):
        state = ContextualCausalIntervention(D_H, C, N, D, attention=attention).state_dict()
        layouts.add(tuple((name, tuple(state[name].shape)) for name in ("dictionary", "prior", "dictionary_filled")))
    assert len(layouts) == 1


def official_state_dict(attention="dot_product", layers=(("emotic", 26), ("caers", 7), ("groupwalk", 4)), seed=3):
    """A state dict in the reference module's names, with random values."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    state = {
        "w_h": rand(D_H, 128),
        "w_g": rand(D, 128),
        "causal_intervention.query.weight": rand(256, D_H) * 0.1,
        "causal_intervention.key.weight": rand(256, D) * 0.1,
        "classifier.norm.weight": rand(128),
        "classifier.norm.bias": rand(128),
        "classifier.norm.running_mean": rand(128),
        "classifier.norm.running_var": torch.rand(128, generator=g) + 0.5,
        "classifier.norm.num_batches_tracked": torch.tensor(17),
        "classifier.fc1.weight": rand(512, 128) * 0.1,
        "classifier.fc1.bias": rand(512),
        "classifier.fc2.weight": rand(128, 512) * 0.1,
        "classifier.fc2.bias": rand(128),
    }
    if attention == "additive":
        state["causal_intervention.w_t.weight"] = rand(1, 256)
    for name, classes in layers:
        state[f"{name}_fc.weight"] = rand(classes, 128)
        state[f"{name}_fc.bias"] = rand(classes)
    return state


@pytest.mark.parametrize(("attention", "dataset", "classes"), [("dot_product", "caers", 7), ("additive", "emotic", 26)])
def test_load_official_state_dict_round_trip(attention, dataset, classes):
    official = official_state_dict(attention)
    head = ContextualCausalIntervention(D_H, classes, N, D, attention=attention)
    z, prior = torch.randn(N, D), torch.softmax(torch.randn(N), 0)
    head.set_dictionary(z, prior)
    result = head.load_official_state_dict(official, dataset=dataset)
    assert result.dataset == dataset and result.output_layer == f"{dataset}_fc" and not result.loaded_dictionary
    assert len(result.ignored_output_layers) == 2
    assert head.classifier.norm.num_batches_tracked == 17
    params = {k: v.double() for k, v in official.items()}
    params.update({"fc.weight": params[f"{dataset}_fc.weight"], "fc.bias": params[f"{dataset}_fc.bias"]})
    params.update({"dictionary": z.double(), "prior": prior.double()})
    h = torch.randn(5, D_H)
    expected = reference_logits(params, h.double(), attention)
    torch.testing.assert_close(head.eval()(h).double(), expected, rtol=1e-4, atol=1e-4)


def test_load_official_state_dict_picks_single_layer_and_strips_module_prefix():
    official = {f"module.{k}": v for k, v in official_state_dict(layers=(("groupwalk", 4),)).items()}
    head = ContextualCausalIntervention(D_H, 4, N, D)
    result = head.load_official_state_dict(official)
    assert result.dataset == "groupwalk" and result.ignored_output_layers == ()
    torch.testing.assert_close(head.fc.weight, official["module.groupwalk_fc.weight"])
    torch.testing.assert_close(head.w_g, official["module.w_g"])


def test_load_official_state_dict_errors():
    official = official_state_dict()
    head = ContextualCausalIntervention(D_H, 7, N, D)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match=r"found: emotic, caers, groupwalk.*dataset="):
        head.load_official_state_dict(official)
    with pytest.raises(ValueError, match=r"'emotic_fc.weight' -> 'fc.weight': expected \(7, 128\), got \(26, 128\)"):
        head.load_official_state_dict(official, dataset="emotic")
    with pytest.raises(ValueError, match="Unknown dataset"):
        head.load_official_state_dict(official, dataset="affectnet")
    with pytest.raises(ValueError, match=r"missing keys \['causal_intervention.w_t.weight'\]"):
        ContextualCausalIntervention(D_H, 7, N, D, attention="additive").load_official_state_dict(official, "caers")
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        head.load_official_state_dict({**official, "extra": torch.zeros(1)}, dataset="caers")
    for name, tensor in head.state_dict().items():  # failed loads change nothing
        torch.testing.assert_close(tensor, before[name])
    result = head.load_official_state_dict({**official, "extra": torch.zeros(1)}, dataset="caers", strict=False)
    assert result.unexpected_keys == ("extra",)


def test_load_official_state_dict_takes_own_dictionary_buffers():
    official = official_state_dict(layers=(("caers", 7),))
    z = torch.randn(N, D)
    official.update({"dictionary": z, "prior": torch.full((N, 1), 1 / N)})
    head = ContextualCausalIntervention(D_H, 7, N, D)
    assert head.load_official_state_dict(official).loaded_dictionary
    assert head.is_dictionary_filled
    torch.testing.assert_close(head.dictionary, z)


def test_set_dictionary_rejects_values_that_overflow_the_buffer_dtype():
    head = ContextualCausalIntervention(D_H, C, N, D)  # float32 buffers
    z = torch.randn(N, D, dtype=torch.float64)
    z[3, 4] = 1e39  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"`prototypes` reaches magnitude 1e\+39, which overflows .*float32.*1 value"):
        head.set_dictionary(z, torch.full((N,), 1 / N, dtype=torch.float64))
    assert not head.is_dictionary_filled and not head.dictionary.any()
    half = ContextualCausalIntervention(D_H, C, N, D).half()
    with pytest.raises(ValueError, match=r"`prototypes` reaches magnitude 7e\+04, .*float16"):
        half.set_dictionary(torch.full((N, D), 7e4), torch.full((N,), 1 / N))
    # the largest float32 itself is accepted
    head.set_dictionary(torch.full((N, D), torch.finfo(torch.float32).max, dtype=torch.float64), torch.full((N,), 0.1))
    assert torch.isfinite(head.dictionary).all()


@pytest.mark.parametrize(
    ("name", "value"), [("dictionary", float("nan")), ("prior", float("inf")), ("dictionary", 1e39)]
)
def test_load_state_dict_rejects_a_non_finite_dictionary_and_names_the_buffer(name, value):
    source = nn.Sequential()
    source.add_module("head", make_head("dot_product"))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state[f"head.{name}"][1] = value
    target = nn.Sequential()
    target.add_module("head", make_head("dot_product", filled=False, dtype=torch.float32, seed=1))
    before = params_of(target.head)
    with pytest.raises(ValueError, match=rf"buffer 'head\.{name}' holds \d+ NaN or infinite value\(s\) .*earlier"):
        target.load_state_dict(state)
    for key, tensor in target.head.state_dict().items():  # the head itself was left as it was
        torch.testing.assert_close(tensor, before[key])
    assert not target.head.is_dictionary_filled


def test_load_official_state_dict_rejects_a_non_finite_dictionary():
    official = official_state_dict(layers=(("caers", 7),))
    official.update({"dictionary": torch.full((N, D), float("nan")), "prior": torch.full((N,), 1 / N)})
    head = ContextualCausalIntervention(D_H, 7, N, D)
    with pytest.raises(ValueError, match=r"buffer 'dictionary' holds 160 NaN"):
        head.load_official_state_dict(official)
    assert not head.is_dictionary_filled
