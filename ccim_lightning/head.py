"""The Contextual Causal Intervention Module (CCIM) head.

The head implements eqs. 4-7 of Yang et al., "Context De-confounded Emotion Recognition" (CVPR 2023) with the
conventions of the authors' reference module (docs/concepts/ccim-head.md):

* eq. 4: the classifier input is ``x = h @ w_h + E_z[g(z)] @ w_g`` (plain matrices, no bias, Xavier-normal init);
* eq. 5: ``E_z[g(z)] = sum_i lambda_i * z_i * P(z_i)`` over the confounder dictionary ``Z`` (N, d) and prior ``P`` (N,);
* eq. 6 (``attention="dot_product"``): ``lambda = softmax_i(q . k_i / sqrt(d))`` with ``q = W_q h``, ``k_i = W_k z_i``
  and ``d`` the dimension of the prototypes (not of the attention space);
* eq. 7 (``attention="additive"``): ``lambda = softmax_i(w_t . tanh(q + k_i))``;
* then the reference module's residual block ``x + residual_scale * MLP(BatchNorm(x))`` and a linear output layer.

Unlike the reference module the weighted sum of eq. 5 is computed as ``(lambda * P) @ Z``, a (B, N) x (N, d) product,
so no (B, N, d) tensor is ever built; the additive scores (B, N, d_n) are computed in chunks of prototypes, each chunk
recomputed in the backward pass instead of stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ccim_lightning.arguments import check_float, check_int

__all__ = [
    "ATTENTION_TYPES",
    "HEAD_OPTIONS",
    "OFFICIAL_OUTPUT_LAYERS",
    "ContextualCausalIntervention",
    "OfficialLoadResult",
]

#: Valid values of ``ContextualCausalIntervention(attention=...)``; ``"none"`` is the baseline head without eq. 5.
ATTENTION_TYPES = ("dot_product", "additive", "none")

#: The head's constructor options that ``CCIMLightningModule`` exposes under the same names and defaults (the
#: module passes them through; a test keeps the two signatures in step).
HEAD_OPTIONS = (
    "num_prototypes",
    "confounder_dim",
    "attention",
    "hidden_dim",
    "attention_dim",
    "dropout",
    "residual_scale",
    "use_prior",
    "uniform_attention",
)

#: Output-layer prefix of the reference module for each dataset, and its number of classes.
OFFICIAL_OUTPUT_LAYERS = {"emotic": ("emotic_fc", 26), "caers": ("caers_fc", 7), "groupwalk": ("groupwalk_fc", 4)}

#: Buffers of the head that the reference module does not have (it keeps the dictionary outside its state dict).
_DICTIONARY_BUFFERS = ("dictionary", "prior", "dictionary_filled")

_PRIOR_SUM_TOLERANCE = 1e-4


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a tensor or an array, got {type(value).__name__}.") from err


class CausalIntervention(nn.Module):
    """Attention scores of the prototypes for a batch of features (eqs. 6 and 7, before the softmax).

    Args:
        feature_dim: Dimension ``d_h`` of the host feature ``h``.
        confounder_dim: Dimension ``d`` of the prototypes ``z_i``; the dot-product scale is ``1 / sqrt(d)``.
        attention_dim: Dimension ``d_n`` of the query and key projections.
        attention: ``"dot_product"`` (eq. 6) or ``"additive"`` (eq. 7).
        chunk_size: Number of prototypes scored at once by the additive attention; bounds its (B, chunk, d_n)
            temporaries. Chunks are recomputed during the backward pass (activation checkpointing).
    """

    def __init__(
        self, feature_dim: int, confounder_dim: int, attention_dim: int, attention: str, chunk_size: int
    ) -> None:
        super().__init__()
        if attention not in ("dot_product", "additive"):
            raise ValueError(f"`attention` must be 'dot_product' or 'additive', got {attention!r}.")
        self.attention = attention
        self.scale = 1.0 / math.sqrt(confounder_dim)
        self.chunk_size = chunk_size
        self.query = nn.Linear(feature_dim, attention_dim, bias=False)
        self.key = nn.Linear(confounder_dim, attention_dim, bias=False)
        if attention == "additive":
            self.w_t = nn.Linear(attention_dim, 1, bias=False)

    def forward(self, h: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
        """Scores every prototype for every sample.

        Args:
            h: Host features, (B, d_h).
            dictionary: Prototypes, (N, d).

        Returns:
            Unnormalised attention logits, (B, N).
        """
        q = self.query(h)
        if self.attention == "dot_product":
            return self._dot_product_scores(q, dictionary)
        k = self.key(dictionary)
        recompute = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        chunks = []
        for start in range(0, k.shape[0], self.chunk_size):
            k_chunk = k[start : start + self.chunk_size]
            if recompute:
                chunks.append(
                    checkpoint(self._additive_scores, q, k_chunk, use_reentrant=False, preserve_rng_state=False)
                )
            else:
                chunks.append(self._additive_scores(q, k_chunk))
        return torch.cat(chunks, dim=1)

    def _dot_product_scores(self, q: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
        # q (W_k Z^T) = (q W_k) Z^T: project the keys (N d d_n + B N d_n multiply-adds) or pull the queries back
        # into the prototype space (B d_n d + B d N), whichever is cheaper; the same value either way. With B=64,
        # N=1024, d=2048, d_n=256 the second is 3.3x fewer operations, in the forward and the backward pass.
        (b, d_n), (n, d) = q.shape, dictionary.shape
        if n * d * d_n + b * n * d_n <= b * d_n * d + b * d * n:
            scores = q @ self.key(dictionary).transpose(0, 1)
        else:
            scores = (q @ self.key.weight) @ dictionary.transpose(0, 1)
        return scores * self.scale

    def _additive_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # (B, 1, d_n) + (1, n, d_n) -> (B, n, d_n) -> (B, n)
        return self.w_t(torch.tanh(q[:, None, :] + k[None, :, :])).squeeze(-1)

    def extra_repr(self) -> str:
        return f"attention={self.attention!r}, scale={self.scale:.6g}, chunk_size={self.chunk_size}"


class FeedForward(nn.Module):
    """The reference module's pre-norm MLP: BatchNorm -> Linear -> GELU (tanh) -> Dropout -> Linear -> Dropout.

    The residual connection ``x + residual_scale * FeedForward(x)`` is added by the head, on the un-normalised ``x``.

    Args:
        dim: Input and output width ``d_m``.
        hidden_dim: Width of the inner layer (512 in the reference module).
        dropout: Dropout probability after each linear layer.
    """

    def __init__(self, dim: int, hidden_dim: int = 512, dropout: float = 0.5) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps (B, d_m) to (B, d_m)."""
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(self.norm(x))))))


@dataclass(frozen=True)
class OfficialLoadResult:
    """What :meth:`ContextualCausalIntervention.load_official_state_dict` loaded.

    Attributes:
        dataset: Dataset whose output layer became ``fc`` (``"emotic"``, ``"caers"`` or ``"groupwalk"``).
        output_layer: Prefix of that output layer in the reference state dict (e.g. ``"emotic_fc"``).
        ignored_output_layers: Output layers of the other datasets, present but not loaded.
        loaded_dictionary: Whether the state dict carried the head's own ``dictionary``/``prior`` buffers.
        missing_keys: Head entries the state dict lacked (only with ``strict=False``); they keep their values.
        unexpected_keys: State-dict keys that matched nothing (only with ``strict=False``); they were ignored.
    """

    dataset: str
    output_layer: str
    ignored_output_layers: tuple[str, ...]
    loaded_dictionary: bool
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()


class ContextualCausalIntervention(nn.Module):
    """CCIM head: backdoor-adjusted classifier on top of a host model's fused feature ``h`` (eqs. 4-7).

    The confounder dictionary and its prior live in persistent buffers of fixed shape (``dictionary`` (N, d),
    ``prior`` (N,), and the 0-dim boolean ``dictionary_filled``) so that checkpoints carry them. They start as zeros,
    a uniform prior ``1/N`` and ``False``; fill them with :meth:`set_dictionary` (the
    ``ccim_lightning.callbacks.ConfounderDictionaryCallback`` does so before fitting) or by loading a checkpoint.
    Heads with ``attention="none"`` register the same buffers (unused) so every head has the same buffer layout.

    Args:
        feature_dim: Dimension ``d_h`` of the host feature ``h``.
        num_classes: Number of output logits.
        num_prototypes: Number ``N`` of confounder prototypes.
        confounder_dim: Dimension ``d`` of each prototype; the dot-product attention is scaled by ``1 / sqrt(d)``.
        attention: ``"dot_product"`` (eq. 6), ``"additive"`` (eq. 7) or ``"none"`` (the baseline: same layers without
            the ``E_z[g(z)] @ w_g`` term, no ``w_g`` and no ``causal_intervention`` parameters).
        hidden_dim: Width ``d_m`` of the classifier input (128 in the paper).
        attention_dim: Width ``d_n`` of the query and key projections (256 in the paper).
        dropout: Dropout probability inside the residual block.
        residual_scale: Weight of the residual branch, ``x + residual_scale * MLP(x)``.
        use_prior: Whether eq. 5 weights the prototypes by their prior ``P(z_i)``; ``False`` is the paper's
            "without P(z)" ablation (``E = sum_i lambda_i z_i``).
        uniform_attention: The paper's "without lambda" ablation: ``lambda_i = 1/N`` for every sample, i.e. uniform
            weights with the softmax's normalisation (they sum to one). The query and key projections would go
            unused, so they are not created: the head then trains under DDP with the default strategy (no
            ``find_unused_parameters``), and its state dict has no ``causal_intervention.*`` entries.
        chunk_size: Prototypes scored at once by the additive attention (bounds its (B, chunk, d_n) temporaries).

    Raises:
        ValueError: On an unknown ``attention`` or a non-positive size.

    Example:
        >>> head = ContextualCausalIntervention(256, 26, num_prototypes=8, confounder_dim=32)
        >>> head.set_dictionary(torch.randn(8, 32), torch.full((8,), 1 / 8))
        >>> head.eval()(torch.randn(4, 256)).shape
        torch.Size([4, 26])
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        num_prototypes: int,
        confounder_dim: int,
        attention: str = "dot_product",
        hidden_dim: int = 128,
        attention_dim: int = 256,
        dropout: float = 0.5,
        residual_scale: float = 0.3,
        use_prior: bool = True,
        uniform_attention: bool = False,
        chunk_size: int = 128,
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_TYPES:
            raise ValueError(
                f"Unknown attention {attention!r}; expected one of {', '.join(map(repr, ATTENTION_TYPES))}."
            )
        where = type(self).__name__
        self.feature_dim = check_int(where, "feature_dim", feature_dim, 1)
        self.num_classes = check_int(where, "num_classes", num_classes, 1)
        self.num_prototypes = check_int(where, "num_prototypes", num_prototypes, 1)
        self.confounder_dim = check_int(where, "confounder_dim", confounder_dim, 1)
        self.hidden_dim = check_int(where, "hidden_dim", hidden_dim, 1)
        self.attention_dim = check_int(where, "attention_dim", attention_dim, 1)
        self.chunk_size = check_int(where, "chunk_size", chunk_size, 1)
        dropout = check_float(where, "dropout", dropout, 0.0, 1.0, high_open=True)
        residual_scale = check_float(where, "residual_scale", residual_scale)
        self.attention = attention
        self.residual_scale = float(residual_scale)
        self.use_prior = bool(use_prior)
        self.uniform_attention = bool(uniform_attention)

        self.w_h = nn.Parameter(torch.empty(self.feature_dim, self.hidden_dim))
        nn.init.xavier_normal_(self.w_h)
        if self.uses_dictionary:
            self.w_g = nn.Parameter(torch.empty(self.confounder_dim, self.hidden_dim))
            nn.init.xavier_normal_(self.w_g)
        if self.uses_dictionary and not self.uniform_attention:
            self.causal_intervention = CausalIntervention(
                self.feature_dim, self.confounder_dim, self.attention_dim, attention, self.chunk_size
            )
        self.classifier = FeedForward(self.hidden_dim, 512, float(dropout))
        self.fc = nn.Linear(self.hidden_dim, self.num_classes)

        self.register_buffer("dictionary", torch.zeros(self.num_prototypes, self.confounder_dim))
        self.register_buffer("prior", torch.full((self.num_prototypes,), 1.0 / self.num_prototypes))
        self.register_buffer("dictionary_filled", torch.tensor(False))
        # Python mirror of `dictionary_filled` once it is True, so that forward() does not read a device tensor (a
        # host-device sync on CUDA) at every step; re-read after set_dictionary() and load_state_dict().
        self._known_filled = False

    @property
    def uses_dictionary(self) -> bool:
        """Whether the head adds the intervention term, i.e. needs a filled dictionary (``attention != "none"``)."""
        return self.attention != "none"

    @property
    def is_dictionary_filled(self) -> bool:
        """Whether :meth:`set_dictionary` (or a checkpoint) has filled the dictionary buffers."""
        if not self._known_filled:
            self._known_filled = bool(self.dictionary_filled)
        return self._known_filled

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A checkpoint's dictionary bypasses set_dictionary(); a NaN or inf in it would make every prediction NaN.
        # Raised here, before anything of the head (or its submodules, loaded after it) is copied.
        bad = self._non_finite_dictionary(state_dict, prefix)
        if bad:
            raise ValueError(bad)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._known_filled = False  # `dictionary_filled` may have changed either way

    def _non_finite_dictionary(self, state_dict: Mapping[str, Any], prefix: str) -> str | None:
        """A message naming the ``dictionary``/``prior`` entries of a state dict that are not finite, else None.

        Entries are checked in the buffers' dtype, into which loading casts them.
        """
        bad = []
        for name in ("dictionary", "prior"):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                cast = value.detach().to(getattr(self, name).dtype)
                if not torch.isfinite(cast).all():
                    bad.append(
                        f"buffer '{prefix}{name}' holds {int((~torch.isfinite(cast)).sum())} NaN or infinite "
                        f"value(s) (as {str(cast.dtype).removeprefix('torch.')})"
                    )
        if not bad:
            return None
        return (
            "The confounder dictionary in this state dict is not finite: "
            + "; ".join(bad)
            + ". The checkpoint is damaged or was saved from a run that diverged; use an earlier checkpoint or "
            "rebuild the dictionary (ConfounderDictionaryCallback / `ccim build-dictionary`)."
        )

    @torch.no_grad()
    def set_dictionary(self, prototypes: torch.Tensor | np.ndarray, prior: torch.Tensor | np.ndarray) -> None:
        """Fills the ``dictionary`` and ``prior`` buffers in place, keeping their device and dtype.

        Args:
            prototypes: Cluster centroids ``z_i``, (N, d).
            prior: Cluster frequencies ``P(z_i)``, (N,) or (N, 1); non-negative, summing to one.

        Raises:
            ValueError: On a shape other than the buffers', a NaN or infinite value (also one that only becomes
                infinite in the buffers' dtype, such as 1e39 in float32), a negative prior, or a prior whose sum
                differs from one by more than 1e-4.
        """
        n, d = self.num_prototypes, self.confounder_dim
        z = _as_tensor("prototypes", prototypes)
        p = _as_tensor("prior", prior)
        if _shape(z) != (n, d):
            raise ValueError(
                f"`prototypes` must have shape (num_prototypes, confounder_dim) = {(n, d)}, got {_shape(z)}."
            )
        if _shape(p) == (n, 1):
            p = p.reshape(n)
        if _shape(p) != (n,):
            raise ValueError(f"`prior` must have shape ({n},) or ({n}, 1), got {_shape(p)}.")
        z64, p64 = z.to(torch.float64), p.to(torch.float64)
        if not torch.isfinite(z64).all():
            raise ValueError(f"`prototypes` contains {int((~torch.isfinite(z64)).sum())} NaN or infinite values.")
        if not torch.isfinite(p64).all():
            raise ValueError(f"`prior` contains {int((~torch.isfinite(p64)).sum())} NaN or infinite values.")
        # Checked again in the buffers' dtype: 1e39 is finite in float64 but inf in float32 (1e5 is inf in float16).
        for name, value, buffer in (("prototypes", z, self.dictionary), ("prior", p, self.prior)):
            cast = value.to(device=buffer.device, dtype=buffer.dtype)
            if not torch.isfinite(cast).all():
                largest = float(value.to(torch.float64).abs().max())
                raise ValueError(
                    f"`{name}` reaches magnitude {largest:.3g}, which overflows the head's "
                    f"{str(buffer.dtype).removeprefix('torch.')} buffers (largest {torch.finfo(buffer.dtype).max:.3g}) "
                    f"in {int((~torch.isfinite(cast)).sum())} value(s); normalise the scene features before "
                    "clustering (or PCA them), or keep the head in float32."
                )
        if (p64 < 0).any():
            raise ValueError(f"`prior` must be non-negative; its smallest value is {float(p64.min()):.6g}.")
        total = float(p64.sum())
        if abs(total - 1.0) > _PRIOR_SUM_TOLERANCE:
            raise ValueError(
                f"`prior` must sum to 1 (cluster sizes divided by the sample count); it sums to {total:.8g}, "
                f"outside the tolerance {_PRIOR_SUM_TOLERANCE:g}."
            )
        self.dictionary.copy_(z)
        self.prior.copy_(p)
        self.dictionary_filled.fill_(True)
        self._known_filled = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Maps host features (B, d_h) to logits (B, num_classes)."""
        return self.forward_head(self.forward_features(h))

    def forward_features(self, h: torch.Tensor) -> torch.Tensor:
        """Returns the (B, d_m) feature after the residual block, before the output layer ``fc``."""
        self._check_features(h)
        x = h @ self.w_h
        if self.uses_dictionary:
            self._check_dictionary()
            x = x + self._intervention(h) @ self.w_g
        return x + self.residual_scale * self.classifier(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Maps the (B, d_m) output of :meth:`forward_features` to logits (B, num_classes)."""
        return self.fc(x)

    def intervention(self, h: torch.Tensor) -> torch.Tensor:
        """Returns ``E_z[g(z)] = sum_i lambda_i z_i P(z_i)`` (eq. 5) for host features (B, d_h), shape (B, d)."""
        self._check_attention("intervention")
        self._check_features(h)
        self._check_dictionary()
        return self._intervention(h)

    def attention_weights(self, h: torch.Tensor) -> torch.Tensor:
        """Returns the weights ``lambda`` (B, N) of the prototypes for host features (B, d_h); each row sums to one.

        Useful to see which context clusters a prediction leans on. Uniform when ``uniform_attention=True``.
        """
        self._check_attention("attention_weights")
        self._check_features(h)
        self._check_dictionary()
        return self._attention_weights(h)

    def _attention_weights(self, h: torch.Tensor) -> torch.Tensor:
        if self.uniform_attention:
            dtype = torch.promote_types(self.dictionary.dtype, torch.float32)
            return torch.full(
                (h.shape[0], self.num_prototypes), 1.0 / self.num_prototypes, dtype=dtype, device=h.device
            )
        logits = self.causal_intervention(h, self.dictionary)
        # the softmax runs in at least float32, also when the head is in half precision
        return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))

    def _intervention(self, h: torch.Tensor) -> torch.Tensor:
        # sum_i lambda_i z_i P_i = (lambda * P) @ Z: (B, N) x (N, d), never a (B, N, d) tensor
        weights = self._attention_weights(h)
        if self.use_prior:
            weights = weights * self.prior
        return weights.to(self.dictionary.dtype) @ self.dictionary

    def _check_features(self, h: torch.Tensor) -> None:
        if h.ndim != 2 or h.shape[-1] != self.feature_dim:
            raise ValueError(
                f"Expected host features of shape (batch, feature_dim={self.feature_dim}), got {_shape(h)}; "
                "check `feature_dim` against the host model's fused feature."
            )

    def _check_dictionary(self) -> None:
        if not self.is_dictionary_filled:
            raise RuntimeError(
                f"The confounder dictionary of this CCIM head (attention={self.attention!r}) is empty. Fill it before "
                "the forward pass: add `ccim_lightning.callbacks.ConfounderDictionaryCallback` to the Trainer, call "
                "`head.set_dictionary(prototypes, prior)`, or load a checkpoint that carries the dictionary."
            )

    def _check_attention(self, method: str) -> None:
        if not self.uses_dictionary:
            raise RuntimeError(f"`{method}` is undefined for a head with attention='none' (no intervention term).")

    @torch.no_grad()
    def load_official_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], dataset: str | None = None, strict: bool = True
    ) -> OfficialLoadResult:
        """Loads weights saved from the authors' reference CCIM module.

        The reference names (``w_h``, ``w_g``, ``causal_intervention.{query,key,w_t}.weight``, ``classifier.*``) match
        the head's; one of its output layers ``emotic_fc``/``caers_fc``/``groupwalk_fc`` becomes ``fc``. A
        ``module.`` prefix (DataParallel) is stripped. The reference keeps its dictionary outside the state dict, so
        the ``dictionary``/``prior``/``dictionary_filled`` buffers are left as they are unless the state dict has them
        under these names. Nothing is modified unless every check passes.

        Args:
            state_dict: The reference module's state dict.
            dataset: ``"emotic"``, ``"caers"`` or ``"groupwalk"``: which output layer to load. May be omitted when the
                state dict holds only one.
            strict: Whether missing and unexpected keys are errors. Shape mismatches always are.

        Returns:
            What was loaded, see :class:`OfficialLoadResult`.

        Raises:
            ValueError: On an unknown or absent ``dataset``, an ambiguous choice, a shape mismatch, or (strict) missing
                or unexpected keys.
        """
        source = {k.removeprefix("module."): v for k, v in state_dict.items()}
        present = [name for name, (prefix, _) in OFFICIAL_OUTPUT_LAYERS.items() if f"{prefix}.weight" in source]
        if dataset is None:
            if len(present) != 1:
                found = ", ".join(present) if present else "none"
                raise ValueError(
                    f"Cannot tell which output layer to load: the state dict has {len(present)} of "
                    f"{[prefix for prefix, _ in OFFICIAL_OUTPUT_LAYERS.values()]} (found: {found}); "
                    "pass `dataset=` ('emotic', 'caers' or 'groupwalk')."
                )
            dataset = present[0]
        if dataset not in OFFICIAL_OUTPUT_LAYERS:
            raise ValueError(f"Unknown dataset {dataset!r}; expected one of {list(OFFICIAL_OUTPUT_LAYERS)}.")
        if dataset not in present:
            raise ValueError(
                f"The state dict has no output layer '{OFFICIAL_OUTPUT_LAYERS[dataset][0]}.weight' for dataset "
                f"{dataset!r}; it has output layers for {present or 'no dataset'}."
            )
        output_layer = OFFICIAL_OUTPUT_LAYERS[dataset][0]
        ignored = tuple(OFFICIAL_OUTPUT_LAYERS[name][0] for name in present if name != dataset)

        targets = dict(self.named_parameters())
        targets.update(self.named_buffers())
        mapped: dict[str, tuple[str, torch.Tensor]] = {}  # our name -> (their name, tensor)
        unexpected = []
        for key, value in source.items():
            if key.startswith(f"{output_layer}."):
                ours = "fc." + key[len(output_layer) + 1 :]
            elif any(key.startswith(f"{prefix}.") for prefix in ignored):
                continue
            else:
                ours = key
            if ours in targets:
                mapped[ours] = (key, _as_tensor(key, value))
            else:
                unexpected.append(key)
        carried = [name for name in _DICTIONARY_BUFFERS if name in mapped]
        loaded_dictionary = "dictionary" in mapped and "prior" in mapped
        if carried and not loaded_dictionary:  # half a dictionary is no dictionary
            unexpected.extend(mapped.pop(name)[0] for name in carried)
        optional = set(_DICTIONARY_BUFFERS) | {"classifier.norm.num_batches_tracked"}
        missing = [name for name in targets if name not in mapped and name not in optional]

        if "prior" in mapped and _shape(mapped["prior"][1]) == (self.num_prototypes, 1):
            mapped["prior"] = (mapped["prior"][0], mapped["prior"][1].reshape(self.num_prototypes))
        mismatched = [
            f"'{theirs}' -> '{ours}': expected {_shape(targets[ours])}, got {_shape(value)}"
            for ours, (theirs, value) in mapped.items()
            if _shape(value) != _shape(targets[ours])
        ]
        if mismatched:
            raise ValueError(
                f"Shape mismatch loading the reference CCIM state dict into {self._describe()}: "
                + "; ".join(mismatched)
            )
        if loaded_dictionary and (bad := self._non_finite_dictionary({k: v for k, (_, v) in mapped.items()}, "")):
            raise ValueError(bad)
        if strict and (missing or unexpected):
            raise ValueError(
                f"The reference CCIM state dict does not match {self._describe()}: missing keys {missing}, "
                f"unexpected keys {unexpected}. Check `attention` (the additive head needs 'causal_intervention.w_t', "
                "attention='none' has no 'w_g'/'causal_intervention'), or pass strict=False."
            )
        if loaded_dictionary and "dictionary_filled" not in mapped:  # validate it and mark it filled
            self.set_dictionary(mapped.pop("dictionary")[1], mapped.pop("prior")[1])
        for ours, (_, value) in mapped.items():
            targets[ours].copy_(value)
        self._known_filled = False
        return OfficialLoadResult(
            dataset=dataset,
            output_layer=output_layer,
            ignored_output_layers=ignored,
            loaded_dictionary=loaded_dictionary,
            missing_keys=tuple(missing),
            unexpected_keys=tuple(unexpected),
        )

    def _describe(self) -> str:
        return (
            f"ContextualCausalIntervention(feature_dim={self.feature_dim}, num_classes={self.num_classes}, "
            f"confounder_dim={self.confounder_dim}, attention={self.attention!r})"
        )

    def extra_repr(self) -> str:
        return (
            f"feature_dim={self.feature_dim}, num_classes={self.num_classes}, num_prototypes={self.num_prototypes}, "
            f"confounder_dim={self.confounder_dim}, attention={self.attention!r}, use_prior={self.use_prior}, "
            f"uniform_attention={self.uniform_attention}, residual_scale={self.residual_scale}"
        )
