"""``ccim predict-files``: a checkpoint's predictions for a folder of images or a video, one CSV row per person.

A subcommand of its own, not a datamodule for ``ccim predict``: a folder of photos or a video has no labels, no
splits and often no boxes, and the person boxes may come from a detector, so none of LightningCLI's trainer
machinery (loops, loggers, DDP) helps; :class:`~ccim_lightning.inference.predictor.Predictor` does the model work.

- Input: a folder (images with the suffixes of :data:`IMAGE_SUFFIXES`, sorted by their path relative to the
  folder; sub-folders only with ``--recursive``) or a video file (frames 0, N, 2N, ... with ``--stride N``).
- Persons: a boxes CSV (``--boxes``: columns ``file`` or ``frame``, ``x1, y1, x2, y2``, one row per person), a
  detector (``--detector faces|bodies``), or, by default, the whole image as one person.
- Output: ``<run folder>/predictions/<input name>.csv`` (the run folder is the checkpoint's
  ``lightning_logs/version_N``), numbered ``_2``, ``_3``, ... when taken; ``--out FILE`` names it, and an existing
  ``FILE`` is an error. Files are never overwritten.
- Skips (unreadable images or frames, images without a person) are counted and reported in one line at the end.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ccim_lightning.commands.errors import CommandError
from ccim_lightning.datamodules.common import clip_boxes
from ccim_lightning.datamodules.decode import load_rgb
from ccim_lightning.inference.detection import DETECTORS, Box, MissingOpenCVError, make_detector
from ccim_lightning.inference.predictor import BoxError, Predictor
from ccim_lightning.inference.video import VIDEO_SUFFIXES, VideoFrames, is_video

__all__ = [
    "IMAGE_SUFFIXES",
    "PredictFilesError",
    "SkipReport",
    "add_arguments",
    "default_output_path",
    "list_images",
    "predict_files",
    "read_boxes_table",
    "run",
]

log = logging.getLogger(__name__)
PROG = "ccim predict-files"
#: Image file suffixes read from a folder (any case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BOX_COLUMNS = ("x1", "y1", "x2", "y2")


class PredictFilesError(ValueError):
    """Bad input to ``ccim predict-files``: the message names the file, row or value and what to do."""


# --- inputs --------------------------------------------------------------------------------------------------------
def list_images(folder: Path, *, recursive: bool = False) -> list[str]:
    """The image files of ``folder`` as POSIX paths relative to it, sorted; sub-folders only when ``recursive``."""
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    found = [p.relative_to(folder).as_posix() for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def read_boxes_table(path: Path, key: str) -> dict[str | int, list[tuple[int, Box]]]:
    """Reads a boxes CSV: ``key`` (``file`` or ``frame``) and ``x1, y1, x2, y2``, one row per person.

    Args:
        path: The CSV file.
        key: ``file`` (a path relative to the input folder) or ``frame`` (a frame number from 0).

    Returns:
        Each file or frame's persons as ``(CSV line number, box)``, in the table's order.

    Raises:
        PredictFilesError: A missing column, or a row whose frame or box is not valid (naming the line).
    """
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise PredictFilesError(f"--boxes {path}: cannot be read as a CSV table ({error})") from error
    missing = [c for c in (key, *BOX_COLUMNS) if c not in table.columns]
    if missing:
        raise PredictFilesError(
            f"--boxes {path}: missing column(s) {', '.join(missing)}; it needs {key}, x1, y1, x2, y2 "
            f"(it has: {', '.join(map(str, table.columns))})"
        )
    persons: dict[str | int, list[tuple[int, Box]]] = {}
    for position, row in enumerate(table.itertuples(index=False)):
        line = position + 2  # the header is line 1
        record = row._asdict()
        where = f"--boxes {path} line {line}"
        name = str(record[key]).strip()
        if key == "frame":
            if not name.isdigit():
                raise PredictFilesError(f"{where}: frame {name!r} is not a frame number (0, 1, 2, ...)")
            name = int(name)
        elif not name:
            raise PredictFilesError(f"{where}: empty file name")
        try:
            box = tuple(float(record[c]) for c in BOX_COLUMNS)
        except ValueError as error:
            raise PredictFilesError(f"{where}: a box value is not a number ({error})") from error
        if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            raise PredictFilesError(f"{where}: box {box} is not x1 < x2, y1 < y2 with finite values")
        persons.setdefault(name, []).append((line, box))
    return persons


def _check_box_inside(box: Box, image: np.ndarray, where: str) -> None:
    """A box needs at least one pixel of width and height inside its image (the datamodules' ``clip_boxes`` rule).

    The predictor clips boxes that reach outside the image and refuses the others; checked here to name the line.
    """
    height, width = image.shape[:2]
    _, localised = clip_boxes(np.asarray([box], dtype=np.float64), np.asarray([[width, height]]))
    if not localised[0]:
        raise PredictFilesError(
            f"{where}: box {box} has less than one pixel inside the {width}x{height} image; check that it belongs to "
            "this image and is in its pixels"
        )


@dataclass
class _Item:
    """One image or frame: its name in the CSV, its pixels (None: unreadable), its boxes (None: the whole image)."""

    key: str | int
    image: np.ndarray | None
    boxes: list[Box] | None


@dataclass
class SkipReport:
    """What the command read, wrote and skipped (the end-of-run summary line)."""

    kind: str
    read: int = 0
    persons: int = 0
    images_with_persons: int = 0
    unreadable: list[str] = field(default_factory=list)
    without_person: list[str] = field(default_factory=list)

    def line(self, out: Path) -> str:
        """One line: the rows written, where, and each kind of skip with its first few names."""

        def listed(names: list[str], what: str) -> str:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            return f"{len(names)} {what} ({shown})" if names else f"0 {what}"

        return (
            f"{PROG}: {self.persons} person(s) in {self.images_with_persons} of {self.read} {self.kind}(s) written to "
            f"{out}; skipped {listed(self.unreadable, f'unreadable {self.kind}(s)')}, "
            f"{listed(self.without_person, f'{self.kind}(s) without a person')}"
        )


def _folder_items(folder: Path, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray | None]]:
    for name in names:
        try:
            yield name, np.asarray(load_rgb(folder / name))
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # a bomb is not an OSError
            log.warning("%s is skipped, it cannot be read as an image (%s)", folder / name, error)
            yield name, None


def _video_items(frames: VideoFrames) -> Iterator[tuple[int, np.ndarray | None]]:
    for number, frame in frames:
        if frame is None:
            log.warning("frame %d of %s is skipped, it cannot be decoded", number, frames.path)
        yield number, frame


def _with_boxes(
    items: Iterable[tuple[str | int, np.ndarray | None]],
    table: dict[str | int, list[tuple[int, Box]]] | None,
    detector: Callable[[np.ndarray], list[Box]] | None,
    boxes_path: Path | None,
) -> Iterator[_Item]:
    for key, image in items:
        if image is None:
            yield _Item(key, None, None)
        elif table is not None:
            persons = table.get(key, [])
            for line, box in persons:
                _check_box_inside(box, image, f"--boxes {boxes_path} line {line}")
            yield _Item(key, image, [box for _, box in persons])
        elif detector is not None:
            yield _Item(key, image, detector(image))
        else:
            yield _Item(key, image, None)


# --- output --------------------------------------------------------------------------------------------------------
def run_folder(ckpt_path: Path) -> Path:
    """The run folder of a checkpoint: ``version_N`` for ``version_N/checkpoints/x.ckpt``, else its folder."""
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def default_output_path(ckpt_path: Path, input_path: Path) -> Path:
    """``<run folder>/predictions/<input name>.csv``, or the first free ``<input name>_2.csv``, ``_3``, ..."""
    folder = run_folder(ckpt_path) / "predictions"
    stem = input_path.stem if input_path.is_file() else input_path.resolve().name
    candidate, number = folder / f"{stem}.csv", 1
    while candidate.exists():
        number += 1
        candidate = folder / f"{stem}_{number}.csv"
    return candidate


def _rows(frame: pd.DataFrame, batch: list[_Item], key_column: str) -> pd.DataFrame:
    """The predictor's table with its ``image`` column (a position in ``batch``) replaced by the file or frame."""
    keys = [batch[int(i)].key for i in frame["image"]]
    return frame.drop(columns="image").assign(**{key_column: keys})[[key_column, *frame.columns.drop("image")]]


# --- the command ---------------------------------------------------------------------------------------------------
def predict_files(
    ckpt_path: str | Path,
    input_path: str | Path,
    *,
    boxes: str | Path | None = None,
    detector: str = "none",
    stride: int = 1,
    recursive: bool = False,
    out: str | Path | None = None,
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
    predictor: Predictor | None = None,
) -> tuple[Path, SkipReport]:
    """Predicts every person of a folder of images or a video and writes one CSV row per person.

    Args:
        ckpt_path: The model checkpoint.
        input_path: A folder of images or a video file.
        boxes: A CSV of person boxes (``file`` or ``frame``, ``x1, y1, x2, y2``); images it does not list have no
            person (counted as skips). Rows naming a file or frame that is not read are an error.
        detector: ``none`` (each image is one person), ``faces`` or ``bodies``; not together with ``boxes``.
        stride: For a video, keep frames 0, stride, 2*stride, ...
        recursive: For a folder, also read its sub-folders.
        out: The CSV to write (must not exist); default :func:`default_output_path`.
        batch_size: Persons per forward pass; also the images or frames held in memory at once.
        device: The model's device (default: the predictor's choice).
        progress: Show a progress bar.
        predictor: An already loaded predictor (then ``ckpt_path`` and ``device`` only name the run folder).

    Returns:
        The CSV written and what was read and skipped.

    Raises:
        PredictFilesError: Bad input; the message names the file, line or value.
        FileExistsError: ``out`` exists.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    ckpt_path, input_path = Path(ckpt_path), Path(input_path)
    boxes_path = Path(boxes) if boxes is not None else None
    if detector not in DETECTORS:
        raise PredictFilesError(f"--detector {detector!r}: one of {', '.join(DETECTORS)}")
    if boxes_path is not None and detector != "none":
        raise PredictFilesError("give either --boxes or --detector, not both (the boxes CSV names every person)")
    if batch_size < 1:
        raise PredictFilesError(f"--batch-size must be 1 or more, not {batch_size}")
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")

    if input_path.is_dir():
        if stride != 1:
            raise PredictFilesError(f"--stride {stride} is for videos; {input_path} is a folder, every image is read")
        key_column, kind = "file", "image"
        names = list_images(input_path, recursive=recursive)
        total: int | None = len(names)
        items: Iterable[tuple[str | int, np.ndarray | None]] = _folder_items(input_path, names)
        known: set[str] | None = set(names)
        frames = None
    elif is_video(input_path):
        key_column, kind = "frame", "frame"
        frames = VideoFrames(input_path, stride)
        total = frames.expected_count() or None
        items = _video_items(frames)
        known = None
    elif input_path.exists():
        raise PredictFilesError(f"--input {input_path}: neither a folder nor a video ({', '.join(VIDEO_SUFFIXES)})")
    else:
        raise FileNotFoundError(f"--input {input_path} does not exist")

    table = read_boxes_table(boxes_path, key_column) if boxes_path is not None else None
    if table is not None:
        _check_table_keys(table, boxes_path, known, input_path, stride, frames.reported_frames if frames else 0)
    out_path = Path(out) if out is not None else default_output_path(ckpt_path, input_path)
    _refuse_existing(out_path)  # before the slow part; opening with "x" below closes the race
    detect = make_detector(detector)  # type: ignore[arg-type]
    model = predictor if predictor is not None else Predictor.from_checkpoint(ckpt_path, device=device)
    if key_column in model.class_names:
        raise PredictFilesError(f"the model has a class named {key_column!r}, the table's first column; rename it")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = SkipReport(kind)
    try:
        handle = out_path.open("x", newline="")  # "x": an existing file is an error, never replaced
    except FileExistsError:
        _refuse_existing(out_path)
        raise
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with handle, Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task(f"{PROG}: {input_path.resolve().name}", total=total)
            header = True
            for batch in _batches(_with_boxes(items, table, detect, boxes_path), batch_size):
                predicted = _predict_batch(model, batch, report, batch_size)
                if predicted is not None:
                    _rows(predicted, batch, key_column).to_csv(handle, header=header, index=False)
                    header = False
                bar.advance(task, len(batch))
        if table is not None and frames is not None:
            _check_frames_read(table, boxes_path, frames.frames_read)
        if header:  # nothing predicted: still a table with the columns a non-empty one has
            decision = "prediction" if model.task == "multiclass" else "labels"
            columns = [key_column, "person", *BOX_COLUMNS, *model.class_names, decision]
            out_path.write_text(",".join(columns) + "\n")
    except BaseException:
        out_path.unlink(missing_ok=True)  # a partial table would pass for a complete one
        raise
    log.info(report.line(out_path))
    return out_path, report


def _refuse_existing(out_path: Path) -> None:
    if out_path.exists():
        raise FileExistsError(f"--out {out_path} already exists and is not overwritten; name another file")


def _batches(items: Iterable[_Item], batch_size: int) -> Iterator[list[_Item]]:
    """Groups of items with at most ``batch_size`` images and about ``batch_size`` persons."""
    batch: list[_Item] = []
    persons = 0
    for item in items:
        batch.append(item)
        persons += 1 if item.boxes is None else len(item.boxes)
        if len(batch) >= batch_size or persons >= batch_size:
            yield batch
            batch, persons = [], 0
    if batch:
        yield batch


def _predict_batch(model: Predictor, batch: list[_Item], report: SkipReport, batch_size: int) -> pd.DataFrame | None:
    """Counts the batch's skips and predicts its persons; the table's ``image`` is a position in ``batch``."""
    report.read += len(batch)
    images, boxes, positions = [], [], []
    for position, item in enumerate(batch):
        if item.image is None:
            report.unreadable.append(str(item.key))
        elif item.boxes is not None and not item.boxes:
            report.without_person.append(str(item.key))
        else:
            images.append(item.image)
            boxes.append(item.boxes)
            positions.append(position)
    if not images:
        return None
    frame = model.predict(images, boxes, batch_size=batch_size)
    frame["image"] = [positions[int(i)] for i in frame["image"]]
    report.images_with_persons += len(images)
    report.persons += len(frame)
    return frame


def _check_table_keys(
    table: dict, boxes_path: Path, known: set[str] | None, input_path: Path, stride: int, reported_frames: int
) -> None:
    """Every row of the boxes CSV names a file or frame that is read; else an error naming the first such line."""
    for key, persons in table.items():
        line = persons[0][0]
        where = f"--boxes {boxes_path} line {line}"
        if known is not None and key not in known:
            hint = ", with --recursive for sub-folders" if "/" in str(key) else ""
            raise PredictFilesError(
                f"{where}: file {key!r} is not an image of {input_path} ({len(known)} found; paths are relative to "
                f"the folder{hint}). Fix or drop the row."
            )
        if known is None and key % stride:
            raise PredictFilesError(
                f"{where}: frame {key} is not read with --stride {stride} (frames 0, {stride}, {2 * stride}, ...); "
                "drop the row or change --stride"
            )
        if known is None and reported_frames and key >= reported_frames:
            raise PredictFilesError(f"{where}: frame {key} is beyond the video's {reported_frames} frames")


def _check_frames_read(table: dict, boxes_path: Path, frames_read: int) -> None:
    beyond = sorted(k for k in table if k >= frames_read)
    if beyond:
        line = table[beyond[0]][0][0]
        raise PredictFilesError(
            f"--boxes {boxes_path} line {line}: frame {beyond[0]} is beyond the video's end ({frames_read} frames)"
        )


# --- the subcommand -------------------------------------------------------------------------------------------------
HELP = "label the people in a folder of images or a video with a checkpoint (one CSV row per person)"
DESCRIPTION = __doc__.split("\n\n")[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ccim predict-files`` options (it reads no config: the checkpoint holds every setting)."""
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="the model checkpoint (.ckpt)")
    parser.add_argument("--input", required=True, help="a folder of images or a video file")
    parser.add_argument("--recursive", action="store_true", help="folder: also read the images of sub-folders")
    parser.add_argument("--boxes", help="CSV of person boxes: file (or frame for a video), x1, y1, x2, y2")
    parser.add_argument(
        "--detector",
        choices=DETECTORS,
        default="none",
        help="person boxes when --boxes is not given: none (the whole image), faces (OpenCV Haar cascade, for "
        "face-crop models), bodies (OpenCV HOG, for body-box models); default: %(default)s",
    )
    parser.add_argument("--stride", type=int, default=1, help="video: every N-th frame, from frame 0 (default: 1)")
    parser.add_argument("--out", help="the CSV to write (must not exist); default: <run folder>/predictions/")
    parser.add_argument("--batch-size", type=int, default=32, help="persons per forward pass (default: 32)")
    parser.add_argument("--device", help="the model's device, e.g. cpu or cuda:0 (default: the predictor's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(options: argparse.Namespace, config_args: list[str]) -> Path:
    """Runs ``ccim predict-files``; bad input is a :class:`CommandError` naming the file, line or value.

    Args:
        options: The options of :func:`add_arguments`.
        config_args: Must be empty: the checkpoint, not a config, says how the model reads its inputs.

    Returns:
        The CSV written.
    """
    if config_args:
        raise CommandError(
            f"predict-files: unknown arguments {' '.join(config_args)}; it reads no config (the checkpoint holds "
            "every input setting). See `ccim predict-files --help`."
        )
    try:
        # the options named as predict_files' keywords, passed through by name
        passed = ("boxes", "detector", "stride", "recursive", "out", "batch_size", "device")
        settings = {name: getattr(options, name) for name in passed}
        out, _ = predict_files(options.ckpt_path, options.input, progress=not options.no_progress, **settings)
    except (PredictFilesError, BoxError, MissingOpenCVError, FileExistsError) as error:
        raise CommandError(f"predict-files: {error}") from error
    return out
