"""Each training sample's confounder-dictionary cluster as its context, for ``ccim bias-report --config``.

The torch side of the bias report: the datamodule's training split, the scene CNN, the recipe's cache or build, and
the nearest prototype of each sample. What comes out is plain numpy (:class:`~ccim_lightning.analysis.sources.
ContextLabels`), for :mod:`ccim_lightning.analysis`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ccim_lightning.analysis.sources import ContextLabels, label_matrix
from ccim_lightning.dictionary.collectives import Collectives
from ccim_lightning.dictionary.features import ContextFeatureExtractor, dictionary_loader, extract_context_features
from ccim_lightning.dictionary.recipe import DictionaryRecipe, dictionary_key, training_samples
from ccim_lightning.dictionary.store import ConfounderDictionary
from ccim_lightning.sample_index import first_of_each_index

__all__ = ["check_dictionary_file", "cluster_contexts", "nearest_prototype"]

log = logging.getLogger(__name__)

#: Recipe settings a given dictionary may differ in for a report: its clusters still describe this data's scenes.
#: Other data, another scene CNN or other masking mean other clusters (a warning says so).
_REPORT_INDIFFERENT = ("num_prototypes", "seed", "num_iterations", "pca_dim", "source")


def check_dictionary_file(path: str | os.PathLike) -> ConfounderDictionary:
    """Loads a dictionary file given by the user, refusing a random-Z one (its prototypes are no scene clusters).

    Cheap (no images, no model): the command calls it before building anything, so a wrong file fails at once.

    Args:
        path: A :meth:`~ccim_lightning.dictionary.store.ConfounderDictionary.save` file.

    Returns:
        The dictionary.

    Raises:
        ValueError: The file is not a dictionary file (``DictionaryFileError``), or a random-Z one.
    """
    dictionary = ConfounderDictionary.load(path)
    if dictionary.source == "random":
        raise ValueError(
            f"Dictionary {str(path)!r} is a random-Z ablation dictionary: its prototypes are not scene "
            "clusters, so a bias report over them means nothing. Pass a clustered dictionary."
        )
    return dictionary


def nearest_prototype(features: Any, prototypes: Any, chunk_size: int = 8192) -> np.ndarray:
    """Index of the nearest prototype (Euclidean) of each feature row.

    Args:
        features: (n, d) features (tensor or array).
        prototypes: (N, d) prototypes.
        chunk_size: Rows per distance computation (bounds memory at chunk_size x N).

    Returns:
        (n,) int64 cluster ids.
    """
    features = torch.as_tensor(features, dtype=torch.float32)
    prototypes = torch.as_tensor(prototypes, dtype=torch.float32, device=features.device)
    if features.ndim != 2 or prototypes.ndim != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"Features {list(features.shape)} and prototypes {list(prototypes.shape)} must be (n, d) and (N, d) "
            "with the same d: was the dictionary built with this scene CNN?"
        )
    parts = [torch.cdist(block, prototypes).argmin(1) for block in features.split(chunk_size)]
    return torch.cat(parts).cpu().numpy().astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


class _TargetRecorder:
    """Passes a loader's batches through and keeps their ``target`` and ``index`` (one pass for features + labels)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.targets: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            self.targets.append(batch["target"].cpu())
            self.indices.append(batch["index"].cpu())
            yield batch

    def targets_in_index_order(self) -> torch.Tensor:
        """The recorded targets, one per sample, sorted by sample index (the order of the gathered features)."""
        targets = torch.cat(self.targets)
        return targets[torch.from_numpy(first_of_each_index(torch.cat(self.indices)))]


def cluster_contexts(
    recipe: DictionaryRecipe,
    datamodule: Any,
    dictionary_shape: tuple[int, int],
    given: ConfounderDictionary | None = None,
    *,
    given_path: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> ContextLabels:
    """Each training sample's confounder-dictionary cluster and its label.

    The datamodule gives the training split (``dictionary_dataset(mask_subject=...)``); the recipe (the run's
    ``--dictionary.*``) gives the scene CNN, its weights, the masking, the seed and the cache. The dictionary is
    ``given`` when there is one (each sample then goes to its nearest prototype in feature space), else the recipe's
    cache when it matches this run, else built as the callback would (k-means; saved to the cache when one is set),
    which records each sample's cluster itself.

    Args:
        recipe: The run's dictionary recipe.
        datamodule: The run's datamodule.
        dictionary_shape: The model's (number of prototypes, their dimension).
        given: A dictionary to assign the samples to (:func:`check_dictionary_file`).
        given_path: Its file, for the log.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        batch_size: Extraction batch size; default: the recipe's, else the datamodule's, else 64.
        num_workers: Loader workers; default: the recipe's, else the datamodule's, else 0.
        progress: Show a progress bar.

    Returns:
        Cluster ids (as contexts) and labels of the training samples.
    """
    recipe = dataclasses.replace(
        recipe,
        batch_size=batch_size or recipe.batch_size,
        num_workers=_first_set(num_workers, recipe.num_workers, getattr(datamodule, "num_workers", 0)),
        progress=progress,
        source="features",
    )
    dataset = _training_samples(datamodule, recipe.mask_subject)
    torch_device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    num_prototypes, dim = dictionary_shape
    num_classes = getattr(datamodule, "num_classes", None)
    if given is None:
        # The recipe's own dictionary (the cache when it matches, else built and cached) records each sample's cluster.
        dictionary = recipe.load_or_build(datamodule, num_prototypes, dim, Collectives.current(torch_device))
        known = dictionary.assignments >= 0
        clusters = dictionary.assignments[known].numpy()
        targets = dictionary.targets[known].numpy()
    else:
        clusters, targets = _assign_to_given(recipe, datamodule, dataset, given, given_path, torch_device, progress)
    matrix, multi_label = label_matrix(targets, num_classes)
    if len(clusters) != len(matrix):
        raise RuntimeError(f"{len(clusters)} features but {len(matrix)} labels: the loader repeated or lost samples.")
    names = list(getattr(datamodule, "class_names", None) or []) or [f"class {i}" for i in range(matrix.shape[1])]
    return ContextLabels(clusters, matrix, names, multi_label, "cluster")


def _assign_to_given(
    recipe: DictionaryRecipe,
    datamodule: Any,
    dataset: Dataset,
    given: ConfounderDictionary,
    given_path: str | os.PathLike | None,
    device: torch.device,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The samples' clusters in ``given`` and their targets, both in sample-index order.

    When the file's key matches this data, scene CNN and masking, the clusters it stores for each sample are used
    as they are (no features extracted); otherwise each sample goes to its nearest prototype, with a warning naming
    what differs.
    """
    extractor = ContextFeatureExtractor(recipe.extractor, recipe.weights).to(device)
    wanted = dictionary_key(recipe, datamodule, dataset, extractor, given.num_prototypes)
    reasons = given.mismatches(wanted, ignore=_REPORT_INDIFFERENT)
    if not reasons and given.assignments is not None and given.targets is not None:
        known = given.assignments >= 0  # -1: skipped at decode time when the file was built
        log.info(
            "Dictionary %s matches this data: using the clusters it stores for %d samples (%d not clustered).",
            given_path or "(given)", int(known.sum()), int((~known).sum()),
        )  # fmt: skip
        return given.assignments[known].numpy(), given.targets[known].numpy()
    loader = dictionary_loader(
        dataset, batch_size=recipe.batch_size or getattr(datamodule, "batch_size", 64), num_workers=recipe.num_workers
    )
    recorder = _TargetRecorder(loader)  # one pass gives the features and the labels
    features = extract_context_features(extractor, recorder, device, progress=progress).in_index_order()
    if reasons:
        log.warning(
            "Dictionary %s was not built for this config's data and scene CNN (%s); assigning anyway.",
            given_path or "(given)",
            "; ".join(reasons),
        )
    clusters = nearest_prototype(features.features.cpu(), given.prototypes)
    return clusters, recorder.targets_in_index_order().numpy()


def _first_set(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def _training_samples(datamodule: Any, mask_subject: bool) -> Dataset:
    """The datamodule's training split as the dictionary callback sees it."""
    if callable(getattr(datamodule, "prepare_data", None)):
        datamodule.prepare_data()
    datamodule.setup("fit")
    return training_samples(datamodule, mask_subject)  # names what a datamodule without the contract lacks
