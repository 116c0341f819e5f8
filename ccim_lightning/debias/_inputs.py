"""Input checks and cluster-label counts shared by the debiasing methods.

Every check raises ``ValueError`` naming the argument, the offending value or position, and what to pass instead:
an out-of-range cluster would otherwise index a wrong table row silently on CPU, or fail as an opaque device-side
assert on GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ccim_lightning.debias.base import DebiasMethod


def require_bound(method: DebiasMethod) -> None:
    """Raises if ``bind`` has not been called (the method has no parameters or buffers yet)."""
    if not hasattr(method, "num_clusters"):  # bind() sets it: its absence is the unbound state
        raise RuntimeError(
            f"{type(method).__name__} is not bound: call bind(num_classes=, task=, num_clusters=) first "
            "(CCIMLightningModule(debias=...) does this in its __init__)."
        )


def require_fitted(method: DebiasMethod) -> None:
    """Raises if the method's ``fitted`` buffer is false (``fit_clusters`` never ran and no checkpoint filled it)."""
    require_bound(method)
    if not bool(method.fitted):
        raise RuntimeError(
            f"{type(method).__name__} has no cluster statistics: fit_clusters(clusters, targets) was never called "
            "and no checkpoint restored them. Build the confounder dictionary before training "
            "(ConfounderDictionaryCallback), which hands every training sample's cluster to the method."
        )


def check_clusters(clusters: torch.Tensor, num_clusters: int, name: str = "clusters") -> torch.Tensor:
    """Checks a (n,) integer tensor of cluster ids in ``[0, num_clusters)``; returns it as int64."""
    if not isinstance(clusters, torch.Tensor) or clusters.dim() != 1:
        shape = tuple(clusters.shape) if isinstance(clusters, torch.Tensor) else type(clusters).__name__
        raise ValueError(f"{name} must be a (n,) tensor of cluster ids, got {shape}")
    if clusters.dtype.is_floating_point or clusters.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer cluster ids, got dtype {clusters.dtype}")
    clusters = clusters.long()
    bad = (clusters < 0) | (clusters >= num_clusters)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name}[{row}] = {int(clusters[row])} is outside [0, {num_clusters}): the method was bound with "
            f"num_clusters={num_clusters}; pass clusters from a dictionary of that size."
        )
    return clusters


def check_targets(
    targets: torch.Tensor, task: str, num_classes: int, num_samples: int, *, binary: bool = True, name: str = "targets"
) -> torch.Tensor:
    """Checks labels: (n,) ids in ``[0, C)`` for multiclass, (n, C) multi-hot for multilabel.

    Args:
        targets: The labels.
        task: ``"multiclass"`` or ``"multilabel"``.
        num_classes: ``C``.
        num_samples: Expected ``n`` (the number of cluster ids given with them).
        binary: Multilabel values must be exactly 0 or 1 (methods that index tables by the value need this).
        name: Argument name used in messages.

    Returns:
        int64 ids (multiclass) or the float multi-hot (multilabel).
    """
    expected = f"({num_samples},)" if task == "multiclass" else f"({num_samples}, {num_classes})"
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {expected}, got {type(targets).__name__}")
    if task == "multiclass":
        if targets.shape != (num_samples,) or targets.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be (n,) = {expected} integer class ids for task='multiclass', got shape "
                f"{tuple(targets.shape)} dtype {targets.dtype} (one-hot or multi-hot targets need task='multilabel')"
            )
        targets = targets.long()
        bad = (targets < 0) | (targets >= num_classes)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}[{row}] = {int(targets[row])} is not a class id in [0, {num_classes})")
        return targets
    if targets.shape != (num_samples, num_classes):
        raise ValueError(
            f"{name} must be (n, C) = {expected} multi-hot for task='multilabel', got shape {tuple(targets.shape)}"
        )
    targets = targets.float()
    if binary:
        bad = (targets != 0) & (targets != 1)
        if bool(bad.any()):
            row, col = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"{name}[{row}, {col}] = {float(targets[row, col])}: multilabel targets must be 0 or 1 for this "
                "method (it groups samples by each category's value)"
            )
    return targets


def check_elementwise(loss: torch.Tensor, task: str, batch_size: int, num_classes: int) -> torch.Tensor:
    """Checks the shape of ``elementwise_loss``'s output: (B,) for multiclass, (B, C) for multilabel."""
    expected = (batch_size,) if task == "multiclass" else (batch_size, num_classes)
    if loss.shape != expected:
        raise ValueError(
            f"elementwise_loss returned shape {tuple(loss.shape)}, expected {expected} for task={task!r}: pass the "
            "loss with reduction='none' (the method weights and averages it itself)."
        )
    return loss


def cluster_label_counts(
    clusters: torch.Tensor, targets: torch.Tensor, task: str, num_clusters: int, num_classes: int
) -> torch.Tensor:
    """Counts of training samples per cluster and label, in float64.

    Returns:
        (N, C) counts ``n[z, y]`` for multiclass; (N, C, 2) counts ``n[z, c, v]`` of samples in cluster ``z`` whose
        category ``c`` has value ``v`` (0 absent, 1 present) for multilabel.
    """
    if task == "multiclass":
        flat = clusters * num_classes + targets
        return torch.bincount(flat, minlength=num_clusters * num_classes).double().view(num_clusters, num_classes)
    present = torch.zeros(num_clusters, num_classes, dtype=torch.float64, device=clusters.device)
    present.index_add_(0, clusters, targets.double())
    size = torch.bincount(clusters, minlength=num_clusters).double()
    return torch.stack([size[:, None] - present, present], dim=-1)
