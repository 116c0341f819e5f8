"""What the image readers share: accounting, person tables, CSV reading, image checks, box clipping, hold-outs.

Every reader (EMOTIC, CAER-S, a user's table) turns its annotations into a :class:`PersonTable` (one row per
annotated person: image path, box, target, extras). :func:`scan_images` checks the images once at setup (exists,
header readable) and clips each box to the image's decoded size; ``ccim_lightning.datamodules.dataset`` then
decodes them into the suite's batch schema (``ccim_lightning.types``).

Box rules (one place, shared by all datasets): a box must be four finite numbers (NaN or infinite coordinates in an
annotation are a bad sample naming the file, row and field). Boxes are clipped to ``[0, width] x [0, height]`` of
the decoded image (stored sizes are not trusted). A box that has less than one pixel of width or height after
clipping (reversed, empty or entirely outside the image) is *degenerate*: the subject is then not localised, so the
subject crop is the whole image and nothing is masked in the context (masking the whole image would leave no
context); ``box`` reports the whole image. A box of which less than :data:`MIN_INSIDE_FRACTION` of the area lies
inside the image is kept (clipped) but counted under its own reason: such boxes usually mean swapped coordinates
or a box meant for another image. Both are counted and reported per split.

Bad input: a missing, unreadable or malformed item is an error naming the file and row (``on_bad_sample="error"``,
the default) or, with ``on_bad_sample="skip"``, is left out, counted, and reported once per split in a warning.
Duplicate rows and persons that appear in two splits are kept but counted and reported.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ccim_lightning.datamodules.decode import open_image, oriented_size

log = logging.getLogger(__name__)

OnBadSample = Literal["error", "skip"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
SKIP_HINT = "pass on_bad_sample='skip' to leave such samples out (they are counted and reported)"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MIN_INSIDE_FRACTION = 0.5
"""A box with less than this share of its area inside the image is reported (kept, clipped)."""
DUPLICATE_KEY = "duplicate rows (same image and box; kept)"
MOSTLY_OUTSIDE_KEY = f"boxes mostly outside the image (< {MIN_INSIDE_FRACTION:.0%} of the box inside; kept, clipped)"
DEGENERATE_KEY = "degenerate boxes (subject = whole image, context not masked)"


class AnnotationError(ValueError):
    """An annotation file or one of its rows is not in the expected format."""


# --- accounting ----------------------------------------------------------------------------------------------------
class BadSamples:
    """Counts what one split's build skipped, left out or repaired, and reports it once.

    Args:
        dataset: Dataset name for messages (``"EMOTIC"``).
        split: Split name for messages.
        on_bad_sample: ``"error"``: :meth:`bad` raises; ``"skip"``: it counts.
    """

    def __init__(self, dataset: str, split: str, on_bad_sample: OnBadSample = "error") -> None:
        check_on_bad_sample(on_bad_sample)
        self.dataset = dataset
        self.split = split
        self.on_bad_sample = on_bad_sample
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.reported = False

    def bad(self, reason: str, message: str, error: type[Exception] = AnnotationError) -> None:
        """A bad sample: raises ``error(message)`` in ``"error"`` mode, else counts it as skipped."""
        if self.on_bad_sample == "error":
            raise error(f"{self.dataset} {self.split}: {message}; {SKIP_HINT}")
        self.note(f"skipped ({reason})", message)

    def note(self, key: str, message: str, count: int = 1) -> None:
        """Counts something that is not an error (an image left out by design, a repaired box)."""
        self.counts[key] += count
        examples = self.examples.setdefault(key, [])
        if len(examples) < 3:
            examples.append(message)

    def merge(self, other: BadSamples) -> None:
        """Adds the counts and examples of ``other`` (e.g. from a file read once for all splits)."""
        for key, count in other.counts.items():
            self.counts[key] += count
            examples = self.examples.setdefault(key, [])
            examples.extend(other.examples[key][: 3 - len(examples)])

    def report(self, kept: int) -> dict[str, int]:
        """Logs one warning summarising the counts (once), and returns them."""
        if self.counts and not self.reported:
            parts = [f"{n} {key} (e.g. {'; '.join(self.examples[key])})" for key, n in sorted(self.counts.items())]
            log.warning("%s %s: %d samples kept; %s", self.dataset, self.split, kept, "; ".join(parts))
        self.reported = True
        return dict(self.counts)


def check_on_bad_sample(on_bad_sample: str) -> None:
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")


# --- annotation files ----------------------------------------------------------------------------------------------
def csv_rows(path: Path, required: Sequence[str], expected: str) -> Iterator[tuple[int, str, dict[str, str]]]:
    """Yields ``(position, where, row)`` for each data row of a CSV file with a header, in file order.

    ``where`` is ``"<file> line <n>"``; header names are stripped of spaces. File-level problems are errors naming
    the file: missing columns, text that is not UTF-8, and ``csv`` errors such as a field over the size limit
    (usually an unclosed quote that swallows the rest of the file).

    Args:
        path: The CSV file.
        required: Columns that must be in the header.
        expected: The expected header, for the missing-columns message.

    Raises:
        AnnotationError: As above.
    """
    line = 1  # where the next record starts
    try:
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            missing = [column for column in required if column not in header]
            if missing:
                raise AnnotationError(f"{path} lacks the columns {missing}; expected a header like {expected}")
            for position, row in enumerate(reader):
                yield position, f"{path.name} line {reader.line_num}", row
                line = reader.line_num + 1
    except UnicodeDecodeError:
        number, snippet = _first_undecodable_line(path)
        raise AnnotationError(
            f"{path} line {number} is not UTF-8 text (bytes {snippet!r}); re-save the file as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > fixed.csv`"
        ) from None
    except csv.Error as error:
        raise AnnotationError(
            f'{path} line {line}: {error}; a field over the size limit usually means an unclosed quote (") that '
            "runs on to the end of the file: check the quoting of that line"
        ) from None


def _first_undecodable_line(path: Path) -> tuple[int, bytes]:
    """The number and offending bytes of the first line that is not UTF-8 (the decoder reads ahead in blocks)."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, raw[max(error.start - 12, 0) : error.end + 12]
    return 0, b""


def check_cells(row: dict) -> None:
    """A ``csv.DictReader`` row with more or fewer cells than the header is malformed."""
    if None in row or None in row.values():
        header = sum(1 for key in row if key is not None)
        cells = header + len(row.get(None, [])) - sum(1 for value in row.values() if value is None)
        raise AnnotationError(f"has {cells} cells but the header has {header}")


def finite_box(values: Sequence[float], name: str) -> list[float]:
    """``values`` as four floats; NaN or infinite coordinates are malformed (named by ``name``)."""
    box = [float(v) for v in values]
    if len(box) != 4:
        raise AnnotationError(f"{name} {box} has {len(box)} numbers, expected 4 (x1, y1, x2, y2)")
    if not all(math.isfinite(v) for v in box):
        raise AnnotationError(f"{name} {box} is not finite (NaN or infinite coordinate); fix or remove the row")
    return box


# --- person tables -------------------------------------------------------------------------------------------------
@dataclass
class PersonTable:
    """One row per annotated person.

    Attributes:
        paths: Image paths relative to the image root (``/`` separators).
        boxes: (N, 4) float64 x1, y1, x2, y2 in image pixels; a row of NaN means no box (subject not localised).
        targets: (N,) int64 class indices or (N, C) float32 multi-hot.
        sources: Where each row came from (``"train.csv line 5"``), for messages.
        extras: Per-person float32 arrays (N, k) added to each sample under their key (e.g. ``vad``).
        rows: (N,) int64 position of each row in its annotation source (e.g. to index ``*_arr.npy``).
        sizes: (N, 2) int64 decoded image width and height, set by :func:`scan_images`.
        localised: (N,) bool, False where the subject has no usable box, set by :func:`scan_images`.
        groups: Per row, the group a validation hold-out must keep together (e.g. the video); None: the image.
        path_field: Where the annotation holds each row's image path (``"column 'image'"``), for messages.
    """

    paths: list[str]
    boxes: np.ndarray
    targets: np.ndarray
    sources: list[str]
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    rows: np.ndarray | None = None
    sizes: np.ndarray | None = None
    localised: np.ndarray | None = None
    groups: list[str] | None = None
    path_field: str = "image path"

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: Sequence[int] | np.ndarray) -> PersonTable:
        """The rows ``keep`` (indices or a boolean mask), in that order."""
        keep = np.asarray(keep)
        keep = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)

        def take(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[keep]

        return replace(
            self,
            paths=[self.paths[i] for i in keep],
            boxes=self.boxes[keep],
            targets=self.targets[keep],
            sources=[self.sources[i] for i in keep],
            extras={key: value[keep] for key, value in self.extras.items()},
            rows=take(self.rows),
            sizes=take(self.sizes),
            localised=take(self.localised),
            groups=None if self.groups is None else [self.groups[i] for i in keep],
        )

    def identities(self) -> list[str]:
        """One stable string per row: image path and box."""
        return [f"{path}|{','.join(f'{v:g}' for v in box)}" for path, box in zip(self.paths, self.boxes)]

    def holdout_groups(self) -> list[str]:
        """The group of each row that a hold-out must keep on one side.

        Rows are joined when they share an image or a non-empty ``groups`` value (transitively: an image whose
        rows name two videos joins both), so neither an image nor a group can straddle the split. Each group is
        named by the smallest image path in it, which does not depend on the row order.
        """
        parent: dict[str, str] = {}

        def find(key: str) -> str:
            while parent.setdefault(key, key) != key:
                parent[key] = parent[parent[key]]
                key = parent[key]
            return key

        groups = self.groups if self.groups is not None else [""] * len(self)
        for path, group in zip(self.paths, groups):
            if group:
                parent[find("image:" + path)] = find("group:" + group)
        names: dict[str, str] = {}
        for path in self.paths:
            root = find("image:" + path)
            names[root] = min(names.get(root, path), path)
        return [names[find("image:" + path)] for path in self.paths]


def make_table(
    paths: list[str],
    boxes: Sequence[Sequence[float]],
    targets: Sequence,
    sources: list[str],
    extras: dict[str, Sequence] | None = None,
    rows: Sequence[int] | None = None,
    multilabel: bool = False,
    num_classes: int | None = None,
    groups: list[str] | None = None,
    path_field: str = "image path",
) -> PersonTable:
    """Builds a :class:`PersonTable` from Python lists (targets as class indices, or multi-hot rows)."""
    n = len(paths)
    if multilabel:
        target_array = np.asarray(targets, dtype=np.float32).reshape(n, num_classes or -1)
    else:
        target_array = np.asarray(targets, dtype=np.int64).reshape(n)
    return PersonTable(
        paths=paths,
        boxes=np.asarray(boxes, dtype=np.float64).reshape(n, 4),
        targets=target_array,
        sources=sources,
        # an empty split has no rows to infer the width from
        extras={
            key: np.asarray(value, dtype=np.float32).reshape(n, -1 if n else 0) for key, value in (extras or {}).items()
        },
        rows=None if rows is None else np.asarray(rows, dtype=np.int64),
        groups=groups,
        path_field=path_field,
    )


def note_duplicates(table: PersonTable, bad: BadSamples) -> None:
    """Counts rows that repeat an earlier row's image and box (they weigh that person twice)."""
    first: dict[str, int] = {}
    for i, identity in enumerate(table.identities()):
        if identity in first:
            bad.note(DUPLICATE_KEY, f"{table.sources[i]} repeats {table.sources[first[identity]]}")
        else:
            first[identity] = i


def note_overlap(table: PersonTable, split: str, others: dict[str, PersonTable], bad: BadSamples) -> None:
    """Counts the persons (image and box) of ``table`` that are also in another, already built split."""
    mine = table.identities()
    for other_split, other in others.items():
        if other_split == split:
            continue
        shared = set(mine) & set(other.identities())
        if shared:
            example = next(table.sources[i] for i, identity in enumerate(mine) if identity in shared)
            bad.note(f"persons also in {other_split} (same image and box)", example, count=len(shared))


# --- images and boxes ----------------------------------------------------------------------------------------------
def _read_size(path: Path) -> tuple[int, int] | BaseException:
    try:
        with open_image(path) as image:
            return oriented_size(image)
    except Exception as error:  # noqa: BLE001 - reported per file by the caller
        return error


def clip_boxes(boxes: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clips boxes to their images and applies the degenerate-box rule (module docstring).

    Args:
        boxes: (N, 4) x1, y1, x2, y2; NaN rows mean no box.
        sizes: (N, 2) image width and height.

    Returns:
        ``(boxes, localised)``: clipped boxes, the whole image where the subject is not localised; and the
        (N,) bool mask of localised subjects.
    """
    width, height = sizes[:, 0:1].astype(np.float64), sizes[:, 1:2].astype(np.float64)
    x = np.clip(boxes[:, 0::2], 0.0, width)
    y = np.clip(boxes[:, 1::2], 0.0, height)
    with np.errstate(invalid="ignore"):
        localised = ((x[:, 1] - x[:, 0]) >= 1.0) & ((y[:, 1] - y[:, 0]) >= 1.0)
    clipped = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    whole = np.concatenate([np.zeros_like(width), np.zeros_like(height), width, height], axis=1)
    return np.where(localised[:, None], clipped, whole), localised


def path_outside_root(path: str, allow_absolute_paths: bool = False) -> str | None:
    """Why an annotation's image ``path`` leads outside the dataset root, or None when it stays inside.

    Checked on the text, before anything is opened: an absolute path (refused unless ``allow_absolute_paths``), or
    a relative one whose ``..`` parts climb above the root. A symlink inside the root is followed wherever it
    points: the root's owner made it, unlike the annotation file's text (README "Image files").
    """
    if Path(path).is_absolute():
        if allow_absolute_paths:
            return None
        return (
            "is an absolute path, which is refused by default (image paths are relative to the dataset root); make "
            "it relative, or pass allow_absolute_paths=True (--data.init_args.allow_absolute_paths true) to read it"
        )
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        return "climbs out of the dataset root through '..'; image paths must stay inside the root"
    return None


def scan_images(
    root: Path, table: PersonTable, bad: BadSamples, threads: int = 8, allow_absolute_paths: bool = False
) -> PersonTable:
    """Checks every image once (inside the root, a regular file, header readable), records sizes, clips the boxes.

    Paths outside the root (:func:`path_outside_root`), missing or unreadable images, anything but a regular file
    and unsupported image modes are bad samples (error or skipped, see :class:`BadSamples`); degenerate boxes fall
    back to the whole image and are counted (module docstring). Sizes are the EXIF-oriented (displayed) sizes.

    Args:
        root: Folder the table's paths are relative to.
        table: The split's persons.
        bad: The split's accounting.
        threads: Threads reading image headers.
        allow_absolute_paths: Read absolute image paths as they are (refused by default).

    Returns:
        The rows whose images are usable, with ``sizes`` and ``localised`` set and boxes clipped.
    """
    inside = []
    for i, path in enumerate(table.paths):
        reason = path_outside_root(path, allow_absolute_paths)
        if reason is None:
            inside.append(i)
        else:
            bad.bad("image path outside the root", f"{table.sources[i]}: {table.path_field} = {path!r} {reason}")
    if len(inside) < len(table):
        table = table.subset(inside)
    unique = list(dict.fromkeys(table.paths))
    with ThreadPoolExecutor(max(1, min(threads, len(unique)))) as pool:
        results = dict(zip(unique, pool.map(lambda p: _read_size(root / p), unique)))
    keep, sizes = [], []
    for i, path in enumerate(table.paths):
        result = results[path]
        if isinstance(result, FileNotFoundError):
            bad.bad("missing image", f"{table.sources[i]}: image {root / path} does not exist", FileNotFoundError)
        elif isinstance(result, BaseException):
            bad.bad("unreadable image", f"{table.sources[i]}: cannot read image {root / path}: {result}", OSError)
        else:
            keep.append(i)
            sizes.append(result)
    kept = table.subset(keep)
    kept.sizes = np.asarray(sizes, dtype=np.int64).reshape(len(keep), 2)
    return apply_box_rule(kept, bad)


def apply_box_rule(table: PersonTable, bad: BadSamples) -> PersonTable:
    """Clips ``table.boxes`` to ``table.sizes`` in place, sets ``localised``, counts degenerate and outlying boxes."""
    has_box = ~np.isnan(table.boxes).any(axis=1)
    original = table.boxes
    table.boxes, table.localised = clip_boxes(table.boxes, table.sizes)
    for i in np.flatnonzero(has_box & ~table.localised):
        width, height = table.sizes[i]
        bad.note(DEGENERATE_KEY, f"{table.sources[i]}: box {original[i].tolist()} in a {width}x{height} image")
    with np.errstate(invalid="ignore"):
        area = (original[:, 2] - original[:, 0]) * (original[:, 3] - original[:, 1])
        inside = (table.boxes[:, 2] - table.boxes[:, 0]) * (table.boxes[:, 3] - table.boxes[:, 1])
        outlying = has_box & table.localised & (inside < MIN_INSIDE_FRACTION * area)
    for i in np.flatnonzero(outlying):
        width, height = table.sizes[i]
        bad.note(
            MOSTLY_OUTSIDE_KEY,
            f"{table.sources[i]}: box {original[i].tolist()} in a {width}x{height} image, {inside[i] / area[i]:.0%} "
            "inside",
        )
    return table


# --- hold-out ------------------------------------------------------------------------------------------------------
def stratified_holdout(
    identities: Sequence[str],
    strata: Sequence[Any],
    fraction: float,
    seed: int,
    groups: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Splits rows into (train, val) indices, keeping each group on one side, about ``fraction`` of each stratum.

    Rows of one group (an image with several persons, the frames of one video) are never split: a validation
    person whose image (or video) is also in train measures memorisation, not generalisation. Groups are ranked by
    a hash of ``(seed, group)``, so the choice does not depend on the row order; walking that ranking, a group goes
    to val when it brings the val rows of its strata closer, in total, to their targets (``fraction`` of each
    stratum's rows, rounded half up) and leaves every stratum at least one row in train. With one row per group
    this holds out exactly the rounded share of each stratum, and a row keeps its side when rows of other strata
    are added or removed.

    Args:
        identities: One stable string per row (e.g. the image path); the group key when ``groups`` is None.
        strata: One stratum key per row (e.g. the label).
        fraction: Share of each stratum held out, in (0, 1).
        seed: Changes the choice.
        groups: One group key per row (e.g. from ``PersonTable.holdout_groups``); default: ``identities``.

    Returns:
        Sorted train indices and sorted val indices.

    Raises:
        ValueError: When no row is held out (all strata too small for ``fraction``).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    groups = identities if groups is None else groups
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    totals = Counter(strata)
    targets = {stratum: math.floor(fraction * total + 0.5) for stratum, total in totals.items()}
    held: Counter = Counter()
    val: list[int] = []
    for group in sorted(members, key=lambda g: hashlib.blake2b(f"{seed}:{g}".encode()).digest()):
        counts = Counter(strata[i] for i in members[group])
        change = sum(abs(held[s] + n - targets[s]) - abs(held[s] - targets[s]) for s, n in counts.items())
        if change < 0 and all(held[s] + n < totals[s] for s, n in counts.items()):
            held.update(counts)
            val.extend(members[group])
    if not val:
        sizes = sorted(totals.values())
        raise ValueError(
            f"val_fraction={fraction} holds out no row: every class (stratum) is too small for it (stratum sizes "
            f"{sizes} in {len(members)} images or groups kept together); raise val_fraction or give validation rows"
        )
    val_mask = np.zeros(len(groups), dtype=bool)
    val_mask[val] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
