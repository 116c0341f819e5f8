"""CLEF (Yang et al., CVPR 2024): a context-only branch, SUM fusion, and prediction from the total indirect effect."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ccim_lightning.arguments import check_float
from ccim_lightning.debias._inputs import require_bound
from ccim_lightning.debias.base import DebiasMethod, LossOf, Tensor, Terms
from ccim_lightning.hosts import build_encoder, encoder_dim
from ccim_lightning.types import CONTEXT, Batch, Task

KLDirection = Literal["counterfactual_factual", "factual_counterfactual"]


class CLEF(DebiasMethod):
    """Counterfactual context debiasing: subtract the context branch's direct effect at inference.

    The rule follows counterfactual VQA's SUM fusion (Niu et al., CVPR 2021), as CLEF does:

    * A context-only branch ``N_C`` (an image encoder and a linear classifier, its own parameters) reads
      ``batch["context"]``, the image with the subject zeroed, and gives logits ``Y_c`` (B, C). The host's logits
      ``Y_e`` are the module's ``logits``. The branch shares nothing with the host, so it sends it no gradient.
    * Factual: ``Y_ce = log sigmoid(Y_c + Y_e)``. Counterfactual (host replaced by one learned vector ``e*`` (C,)
      shared by all samples, initialised to the same value in every class): ``Y_ce* = log sigmoid(Y_c + e*)``.
    * Loss ``= CE(Y_ce, y) + CE(Y_ce*, y) + KL``, each averaged over the batch, the CE being the module's own loss
      (``elementwise_loss``) with ``Y_ce`` / ``Y_ce*`` as its logits (its softmax normalises ``sigmoid(.)`` over
      the classes). With ``p = softmax(Y_ce*)`` and ``p_f = softmax(Y_ce)``:

      - ``kl_direction="counterfactual_factual"`` (default): ``KL(p || p_f) = sum_k p_k (log p_k - log p_f,k)``,
        the ``KL(Y_ce* || Y_ce)`` of CLEF's paper;
      - ``"factual_counterfactual"``: ``KL(p_f || p) = sum_k p_f,k (log p_f,k - log p_k)``, the direction of
        counterfactual VQA's code (which minimises the cross-entropy ``-sum p_f log p``: the same gradient).

      Either way ``p_f`` is detached and the KL's ``Y_ce*`` is computed from a detached ``Y_c``, so the KL term
      trains ``e*`` alone: ``e*`` learns the counterfactual's typical host response, while the host learns only
      from the factual CE and the branch from the two CE terms.
    * Inference: the total indirect effect ``TIE = Y_ce - Y_ce*`` (total effect minus the context's natural direct
      effect); :meth:`inference_logits` returns it, and the module predicts from it as from logits.

    Multilabel (each category a binary task): ``s = Y_c + Y_e`` and ``s* = Y_c + e*``; ``Y_ce = log sigmoid(s)`` is
    the log-probability that the category is present, so the CE terms are the BCE of ``sigmoid(s)`` and
    ``sigmoid(s*)``, i.e. the module's BCE-with-logits on ``s`` and ``s*``; the KL is the Bernoulli KL per category
    (same direction and detaching as above), averaged over samples and categories; TIE is
    ``log sigmoid(s) - log sigmoid(s*)`` per category, a log-ratio of presence probabilities that ranks samples
    per category (what average precision reads; ``sigmoid(TIE)`` is a score, not a calibrated probability).

    Args:
        encoder: Context-branch encoder: ``"small_cnn"`` (the suite's tiny CNN, fast on CPU) or any timm model name,
            created with ``pretrained=False`` (CLEF's paper uses a Places365 ResNet-152).
        weights: Optional local checkpoint for the encoder, loaded with
            :func:`~ccim_lightning.weights.load_pretrained_weights` (its classifier is not loaded).
        e_star_init: Initial value of every entry of ``e*``.
        kl_direction: Direction of the KL term (see above).
        context_key: Batch key of the subject-masked image.
    """

    binary_targets: ClassVar[bool] = False  # soft multi-hot targets are fine here

    needs_clusters = False

    def __init__(
        self,
        encoder: str = "small_cnn",
        weights: str | None = None,
        e_star_init: float = 0.0,
        kl_direction: KLDirection = "counterfactual_factual",
        context_key: str = CONTEXT,
    ) -> None:
        super().__init__()
        if kl_direction not in ("counterfactual_factual", "factual_counterfactual"):
            raise ValueError(
                f"kl_direction must be 'counterfactual_factual' or 'factual_counterfactual', got {kl_direction!r}"
            )
        self.e_star_init = check_float(type(self).__name__, "e_star_init", e_star_init)
        self.encoder = build_encoder(encoder, weights)
        self.kl_direction = kl_direction
        self.context_key = context_key

    def bind(self, *, num_classes: int, task: Task, num_clusters: int) -> None:
        super().bind(num_classes=num_classes, task=task, num_clusters=num_clusters)
        self.classifier = nn.Linear(encoder_dim(self.encoder), num_classes)
        self.e_star = nn.Parameter(torch.full((num_classes,), self.e_star_init))

    def fit_clusters(self, clusters: torch.Tensor, targets: torch.Tensor) -> None:
        """Nothing to fit: CLEF reads no clusters."""

    def context_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``Y_c``: the context-only branch's logits (B, C) for the batch's subject-masked image."""
        require_bound(self)
        if self.context_key not in batch:
            raise ValueError(
                f"CLEF reads the subject-masked image batch[{self.context_key!r}], which this batch lacks (keys: "
                f"{sorted(batch)}); use a datamodule of the suite's schema or set context_key="
            )
        return self.classifier(self.encoder(batch[self.context_key])).float()

    def fuse(self, context_logits: torch.Tensor, host_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activation sums ``s = Y_c + Y_e`` and ``s* = Y_c + e*`` (B, C); ``Y_ce = log sigmoid(s)``."""
        if context_logits.shape != host_logits.shape:
            raise ValueError(
                f"The context branch gave logits of shape {tuple(context_logits.shape)} but the host "
                f"{tuple(host_logits.shape)}: the batch's context images and the host's batch must be the same samples"
            )
        return context_logits + host_logits.float(), context_logits + self.e_star

    def objective(
        self, logits: Tensor, target: Tensor, clusters: Tensor | None, batch: Batch, loss_of: LossOf
    ) -> Terms:
        y_c = self.context_logits(batch)
        s, s_cf = self.fuse(y_c, logits)
        # The KL's counterfactual sees a detached branch and its factual is detached: only e* gets its gradient.
        s_kl, s_fact = y_c.detach() + self.e_star, s.detach()
        if self.task == "multiclass":
            factual, counterfactual = F.logsigmoid(s), F.logsigmoid(s_cf)
            kl = self._categorical_kl(F.logsigmoid(s_kl), F.logsigmoid(s_fact))
        else:  # BCE-with-logits on s is the BCE of sigmoid(s) = exp(Y_ce)
            factual, counterfactual = s, s_cf
            kl = self._bernoulli_kl(s_kl, s_fact)
        fused, counter = loss_of(factual).mean(), loss_of(counterfactual).mean()
        total = fused + counter + kl
        return total, {"fused_loss": fused.detach(), "counterfactual_loss": counter.detach(), "kl": kl.detach()}

    def _categorical_kl(self, counterfactual: torch.Tensor, factual: torch.Tensor) -> torch.Tensor:
        """Batch mean of the KL between ``softmax`` of the two (B, C) log-sigmoid scores, in ``kl_direction``."""
        log_p, log_q = torch.log_softmax(counterfactual, dim=-1), torch.log_softmax(factual, dim=-1)
        if self.kl_direction == "factual_counterfactual":
            log_p, log_q = log_q, log_p
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()

    def _bernoulli_kl(self, counterfactual: torch.Tensor, factual: torch.Tensor) -> torch.Tensor:
        """Mean over samples and categories of the Bernoulli KL between ``sigmoid`` of two (B, C) logits."""
        if self.kl_direction == "factual_counterfactual":
            counterfactual, factual = factual, counterfactual
        p = torch.sigmoid(counterfactual)
        # log(p / q) for presence and absence, from logits: log sigmoid(a) - log sigmoid(b) and likewise for -a, -b.
        present = F.logsigmoid(counterfactual) - F.logsigmoid(factual)
        absent = F.logsigmoid(-counterfactual) - F.logsigmoid(-factual)
        return (p * present + (1 - p) * absent).mean()

    def inference_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """TIE ``= log sigmoid(Y_c + Y_e) - log sigmoid(Y_c + e*)`` (B, C)."""
        s, s_cf = self.fuse(self.context_logits(batch), logits)
        return F.logsigmoid(s) - F.logsigmoid(s_cf)
