"""Debiasing methods that change what the host learns (``CCIMLightningModule(debias=...)``)."""

from ccim_lightning.debias.base import DebiasMethod

__all__ = ["DebiasMethod"]
