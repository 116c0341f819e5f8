"""LightningDataModules of ccim-lightning (installed as ``ccim_lightning.datamodules``), one batch schema for all.

The shared constructor arguments live in :class:`PersonDataModule` (``base.py``); the contracts callers rely on
(batch keys, :class:`DictionaryDataModule`, :class:`IdentifiedDataset`) in :mod:`ccim_lightning.types`.
"""

from ccim_lightning.datamodules.base import PersonDataModule
from ccim_lightning.datamodules.caers import CAERSDataModule
from ccim_lightning.datamodules.common import AnnotationError
from ccim_lightning.datamodules.emotic import EmoticDataModule
from ccim_lightning.datamodules.groupwalk import GroupWalkDataModule
from ccim_lightning.datamodules.synthetic import SceneSettings, SyntheticContextDataModule
from ccim_lightning.datamodules.table import TableDataModule
from ccim_lightning.datamodules.transforms import ContextTransform
from ccim_lightning.types import BATCH_KEYS, DictionaryDataModule, IdentifiedDataset

__all__ = [
    "BATCH_KEYS",
    "AnnotationError",
    "CAERSDataModule",
    "ContextTransform",
    "DictionaryDataModule",
    "EmoticDataModule",
    "GroupWalkDataModule",
    "IdentifiedDataset",
    "PersonDataModule",
    "SceneSettings",
    "SyntheticContextDataModule",
    "TableDataModule",
]
