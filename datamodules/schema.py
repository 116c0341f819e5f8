"""Moved to :mod:`ccim_lightning.types` (delete this file at merge).

Kept only until ``dictionary/recipe.py`` (another engineer's file) imports the contracts from there.
"""

from ccim_lightning.types import BATCH_KEYS, EXTRA_KEYS, DictionaryDataModule, IdentifiedDataset, missing_members

__all__ = ["BATCH_KEYS", "EXTRA_KEYS", "DictionaryDataModule", "IdentifiedDataset", "missing_members"]
