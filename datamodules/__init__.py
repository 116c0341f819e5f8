"""LightningDataModules of ccim-lightning (installed as ``ccim_lightning.datamodules``), one batch schema for all."""

from ccim_lightning.datamodules.caers import CAERSDataModule
from ccim_lightning.datamodules.emotic import EmoticDataModule
from ccim_lightning.datamodules.groupwalk import GroupWalkDataModule
from ccim_lightning.datamodules.synthetic import SyntheticContextDataModule
from ccim_lightning.datamodules.table import TableDataModule

__all__ = [
    "CAERSDataModule",
    "EmoticDataModule",
    "GroupWalkDataModule",
    "SyntheticContextDataModule",
    "TableDataModule",
]
