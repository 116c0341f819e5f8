"""Debiasing methods that change what the host learns (``CCIMLightningModule(debias=...)``).

* :class:`ClusterReweighting`: backdoor adjustment by inverse propensity, ``w = P(y) / P(y | z)``.
* :class:`GroupDRO`: worst-group optimisation over groups (label, cluster).
* :class:`GroupBalancedReweighting`: equal total loss weight per pseudo-group (label, coarse cluster).
* :class:`ProductOfExperts`: training in a product with a bias-only expert ``p_b(y | z)``.
* :class:`CLEF`: a context-only branch whose direct effect is subtracted at inference.

The first three read each training sample's confounder-dictionary cluster ``z``; CLEF reads the masked image.
"""

from ccim_lightning.debias.base import DebiasMethod
from ccim_lightning.debias.clef import CLEF
from ccim_lightning.debias.group_balanced import GroupBalancedReweighting
from ccim_lightning.debias.group_dro import GroupDRO
from ccim_lightning.debias.product_of_experts import ProductOfExperts
from ccim_lightning.debias.reweighting import ClusterReweighting

__all__ = ["CLEF", "ClusterReweighting", "DebiasMethod", "GroupBalancedReweighting", "GroupDRO", "ProductOfExperts"]
