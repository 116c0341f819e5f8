"""Lightning callbacks of ccim-lightning (installed as ``ccim_lightning.callbacks``)."""

from ccim_lightning.callbacks.confounder_dictionary import ConfounderDictionaryCallback
from ccim_lightning.callbacks.finite_guard import FiniteLossGuard, NonFiniteTrainingError
from ccim_lightning.callbacks.last_layer import LastLayerRetraining
from ccim_lightning.callbacks.prediction_writer import PredictionWriter
from ccim_lightning.callbacks.worst_group import WorstGroupValidation

__all__ = [
    "ConfounderDictionaryCallback",
    "FiniteLossGuard",
    "LastLayerRetraining",
    "NonFiniteTrainingError",
    "PredictionWriter",
    "WorstGroupValidation",
]
