"""ccim-lightning: the Contextual Causal Intervention Module (CCIM, CVPR 2023) as PyTorch Lightning components."""

from ccim_lightning.dictionary.features import ContextFeatureExtractor
from ccim_lightning.dictionary.store import ConfounderDictionary
from ccim_lightning.head import ContextualCausalIntervention
from ccim_lightning.inference.predictor import Predictor
from ccim_lightning.logs import configure_package_logging
from ccim_lightning.module import CCIMLightningModule

__all__ = [
    "CCIMLightningModule",
    "ConfounderDictionary",
    "ContextFeatureExtractor",
    "ContextualCausalIntervention",
    "Predictor",
]
__version__ = "0.1.0"

configure_package_logging()
