"""Lightning callbacks of ccim-lightning (installed as ``ccim_lightning.callbacks``)."""

from ccim_lightning.callbacks.confounder_dictionary import ConfounderDictionaryCallback

__all__ = ["ConfounderDictionaryCallback"]
