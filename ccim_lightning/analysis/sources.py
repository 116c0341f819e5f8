"""Where the bias report's contexts come from: an annotation table's column, or each sample's dictionary cluster.

- :func:`read_annotation_table`: a context column and a label column of a CSV/TSV table (e.g. EMOTIC's ``Folder``
  and ``Categorical_Labels``); no images are read.
- :func:`cluster_contexts`: each training sample of a built ``ccim`` CLI goes to its nearest confounder-dictionary
  prototype in scene-feature space. It is the only function of :mod:`ccim_lightning.analysis` that uses the
  dictionary machinery (the callback's settings, the scene CNN, feature extraction, the cache, k-means).

Both return :class:`ContextLabels` for :func:`~ccim_lightning.analysis.statistics.compute_bias_report`.
"""

from __future__ import annotations

import ast
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "ContextLabels",
    "check_dictionary_file",
    "cluster_contexts",
    "nearest_prototype",
    "read_annotation_table",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- table-only mode


@dataclass
class ContextLabels:
    """Context values and labels of a dataset's samples, the input of ``compute_bias_report``.

    Attributes:
        contexts: (n,) context value per sample.
        labels: (n, C) 0/1 matrix.
        emotion_names: C names.
        multi_label: Whether a sample can show several emotions.
        context_name: What the context is.
    """

    contexts: np.ndarray
    labels: np.ndarray
    emotion_names: list[str]
    multi_label: bool
    context_name: str


def read_annotation_table(
    path: str | os.PathLike, context_column: str, label_column: str, *, emotion_names: Sequence[str] | None = None
) -> ContextLabels:
    """Reads context values and labels from an annotation table (CSV, or TSV by its ``.tsv`` suffix); no images.

    A label cell is either a Python list literal of names (``"['Engagement', 'Happiness']"``, EMOTIC's CSV form:
    multi-label) or a single name or class id (single-label). Every cell of the column must be of the same kind.

    Args:
        path: The table.
        context_column: Column holding the context value (e.g. ``Folder``).
        label_column: Column holding the label(s) (e.g. ``Categorical_Labels``).
        emotion_names: Order (and completeness) of the emotions; default: the sorted distinct labels. For EMOTIC
            the sorted order is the canonical one.

    Returns:
        The samples' contexts and labels.

    Raises:
        FileNotFoundError: No such file.
        KeyError: A column is missing (the message lists the columns that exist).
        ValueError: A label cell cannot be read, or a label is not among ``emotion_names``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Annotation table {str(path)!r} does not exist.")
    table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
    for column in (context_column, label_column):
        if column not in table.columns:
            raise KeyError(
                f"Annotation table {str(path)!r} has no column {column!r}; its columns: {list(table.columns)}."
            )
    cells = [_parse_label_cell(value, path, label_column, row) for row, value in enumerate(table[label_column])]
    kinds = {isinstance(cell, list) for cell in cells}
    if len(kinds) > 1:
        raise ValueError(
            f"Column {label_column!r} of {str(path)!r} mixes list cells (multi-label) with single labels; use one form."
        )
    multi_label = kinds == {True}
    samples = cells if multi_label else [[cell] for cell in cells]
    names = _emotion_names(samples, emotion_names, path, label_column)
    return ContextLabels(
        table[context_column].to_numpy(object), _multi_hot(samples, names), names, multi_label, context_column
    )


def _multi_hot(samples: list[list[str]], names: list[str]) -> np.ndarray:
    """(n, C) 0/1 matrix of the samples' label lists."""
    column = {name: i for i, name in enumerate(names)}
    rows = [i for i, labels in enumerate(samples) for _ in labels]
    columns = [column[label] for labels in samples for label in labels]
    matrix = np.zeros((len(samples), len(names)))
    matrix[rows, columns] = 1.0
    return matrix


def _parse_label_cell(value: str, path: Path, column: str, row: int) -> list[str] | str:
    """A list of names for a list literal, else the stripped string."""
    text = value.strip()
    if not text:
        raise ValueError(f"Row {row} (0-based, after the header) of {str(path)!r} has an empty {column!r} cell.")
    if not text.startswith("["):
        return text
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"Row {row} of {str(path)!r}: cannot read the {column!r} cell {text!r} as a list.") from exc
    if not isinstance(parsed, list):
        raise ValueError(f"Row {row} of {str(path)!r}: the {column!r} cell {text!r} is not a list.")
    return [str(label) for label in parsed]


def _emotion_names(samples: list[list[str]], given: Sequence[str] | None, path: Path, column: str) -> list[str]:
    """The given names (checked to cover every label) or the sorted distinct labels."""
    seen = sorted({label for labels in samples for label in labels}, key=_natural_key)
    if given is None:
        return seen
    unknown = sorted(set(seen) - set(given))
    if unknown:
        raise ValueError(f"Labels {unknown} in column {column!r} of {str(path)!r} are not among the emotion names.")
    return list(given)


def _natural_key(label: str) -> tuple[int, float, str]:
    """Numbers in numeric order before text in alphabetical order."""
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


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

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.targets: list[Any] = []
        self.indices: list[Any] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.targets.append(batch["target"].cpu())
            self.indices.append(batch["index"].cpu())
            yield batch


# ----------------------------------------------------------------------------------------------- cluster mode


def check_dictionary_file(path: str | os.PathLike) -> Any:
    """Loads a dictionary file given by the user, refusing a random-Z one (its prototypes are no scene clusters).

    Cheap (no images, no model): the command calls it before building anything, so a wrong file fails at once.

    Args:
        path: A :meth:`~ccim_lightning.dictionary.store.ConfounderDictionary.save` file.

    Returns:
        The :class:`~ccim_lightning.dictionary.store.ConfounderDictionary`.

    Raises:
        ValueError: The file is not a dictionary file (``DictionaryFileError``), or a random-Z one.
    """
    from ccim_lightning.dictionary.store import ConfounderDictionary

    dictionary = ConfounderDictionary.load(path)
    if dictionary.source == "random":
        raise ValueError(
            f"Dictionary {str(path)!r} is a random-Z ablation dictionary: its prototypes are not scene "
            "clusters, so a bias report over them means nothing. Pass a clustered dictionary."
        )
    return dictionary


def cluster_contexts(
    cli: Any,
    dictionary_path: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> ContextLabels:
    """Each training sample's confounder-dictionary cluster and its label, for a built ``ccim`` CLI.

    The CLI's datamodule gives the training split (``dictionary_dataset(mask_subject=...)``); its trainer's
    ``ConfounderDictionaryCallback`` (or the callback's defaults) gives the scene CNN, its weights, the masking, the
    seed and the cache; its model's head gives the number of prototypes. The dictionary is the file at
    ``dictionary_path`` when given, else the callback's ``cache`` file when it matches this run, else built as the
    callback would (k-means; saved to the ``cache`` file when one is set). Each sample goes to its nearest prototype
    in feature space. All use of the dictionary machinery in the bias report is in this function.

    Args:
        cli: ``ccim_lightning.cli.build_cli([...], run=False)``, with ``datamodule``, ``trainer`` and ``model``.
        dictionary_path: A dictionary file (:meth:`ConfounderDictionary.save`), e.g. the callback's cache.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        batch_size: Extraction batch size; default: the callback's, else the datamodule's, else 64.
        num_workers: Loader workers; default: the callback's, else the datamodule's, else 0.
        progress: Show a progress bar.

    Returns:
        Cluster ids (as contexts) and labels of the training samples.
    """
    import dataclasses

    from ccim_lightning.callbacks import ConfounderDictionaryCallback
    from ccim_lightning.dictionary.collectives import Collectives
    from ccim_lightning.dictionary.features import ContextFeatureExtractor, dictionary_loader, extract_context_features
    from ccim_lightning.dictionary.recipe import dictionary_key

    given = None if dictionary_path is None else check_dictionary_file(dictionary_path)  # fail before the slow part
    datamodule = cli.datamodule
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ConfounderDictionaryCallback)]
    recipe = callback.recipe  # the run's --dictionary.* settings
    recipe = dataclasses.replace(
        recipe,
        batch_size=batch_size or recipe.batch_size,
        num_workers=_first_set(num_workers, recipe.num_workers, getattr(datamodule, "num_workers", 0)),
        progress=progress,
        source="features",
    )
    dataset = _training_samples(datamodule, recipe.mask_subject)
    torch_device = _device(device)
    num_prototypes, dim = cli.model.dictionary_shape
    names = list(getattr(datamodule, "class_names", None) or [])
    if given is None:
        # The recipe's own dictionary (the cache when it matches, else built and cached): each training sample's
        # cluster is recorded in it.
        dictionary = recipe.load_or_build(datamodule, num_prototypes, dim, Collectives.current(torch_device))
        known = dictionary.assignments >= 0
        clusters = dictionary.assignments[known].numpy()
        matrix, multi_label = _target_matrix(dictionary.targets[known], getattr(datamodule, "num_classes", None))
        names = names or [f"class {i}" for i in range(matrix.shape[1])]
        return ContextLabels(clusters, matrix, names, multi_label, "cluster")

    extractor = ContextFeatureExtractor(recipe.extractor, recipe.weights).to(torch_device)
    loader = dictionary_loader(
        dataset, batch_size=recipe.batch_size or getattr(datamodule, "batch_size", 64), num_workers=recipe.num_workers
    )
    recorder = _TargetRecorder(loader)  # one pass gives the features and the labels
    features = extract_context_features(extractor, recorder, torch_device, progress=progress).in_index_order()
    wanted = dictionary_key(recipe, datamodule, dataset, extractor, num_prototypes)
    # Another N, seed or k-means setting is fine for a report; other data, scene CNN or masking means other clusters.
    ignored = ("num_prototypes", "seed", "num_iterations", "pca_dim", "source")
    reasons = given.mismatches(wanted, ignore=ignored)
    if reasons:
        log.warning(
            "Dictionary %s was not built for this config's data and scene CNN (%s); assigning anyway.",
            dictionary_path,
            "; ".join(reasons),
        )
    dictionary = given
    clusters = nearest_prototype(features.features.cpu(), dictionary.prototypes)
    matrix, multi_label = _target_matrix(_targets_in_index_order(recorder), getattr(datamodule, "num_classes", None))
    names = names or [f"class {i}" for i in range(matrix.shape[1])]
    if len(clusters) != len(matrix):
        raise RuntimeError(f"{len(clusters)} features but {len(matrix)} labels: the loader repeated or lost samples.")
    return ContextLabels(clusters, matrix, names, multi_label, "cluster")


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _first_set(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def _training_samples(datamodule: Any, mask_subject: bool) -> Any:
    """The datamodule's training split as the dictionary callback sees it."""
    if callable(getattr(datamodule, "prepare_data", None)):
        datamodule.prepare_data()
    datamodule.setup("fit")
    if not callable(getattr(datamodule, "dictionary_dataset", None)):
        raise TypeError(
            f"{type(datamodule).__name__} has no dictionary_dataset(mask_subject=...): cannot list the "
            "training samples. Use a ccim_lightning datamodule or add that method."
        )
    return datamodule.dictionary_dataset(mask_subject=mask_subject)


def _targets_in_index_order(recorder: _TargetRecorder) -> torch.Tensor:
    """The recorded targets, one per sample, sorted by sample index (the order of the gathered features)."""
    from ccim_lightning.sample_index import first_of_each_index

    indices, targets = torch.cat(recorder.indices), torch.cat(recorder.targets)
    return targets[torch.from_numpy(first_of_each_index(indices))]


def _target_matrix(targets: torch.Tensor, num_classes: int | None) -> tuple[np.ndarray, bool]:
    """(n, C) 0/1 labels from int class targets (single-label) or multi-hot float targets (multi-label)."""
    array = targets.cpu().numpy()
    if array.ndim == 2:
        return (array > 0.5).astype(np.float64), True
    classes = array.astype(np.int64)
    num_classes = num_classes or (int(classes.max()) + 1 if classes.size else 0)
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(
            f"Class targets {int(classes.min())}..{int(classes.max())} are outside 0..{num_classes - 1} "
            "(the datamodule's num_classes)."
        )
    return np.eye(num_classes)[classes], False
