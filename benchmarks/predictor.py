"""Throughput of ``Predictor.predict`` in persons/s: a trained checkpoint applied to new photos, decoding included.

Method:
    * The checkpoint is made here, the way a user makes one: ``ccim fit --config configs/synthetic.yaml`` (through
      ``ccim_lightning.commands.cli.build_cli``) with the host swapped for ``--host`` (``emotnet``: EmotNet, ResNet-18
      body and image streams, random init; ``synthetic``: the config's small TwoStreamHost), the CCIM head with its
      dictionary built as in any fit, ``--context-size`` / ``--subject-size`` inputs, and only ``--fit-steps``
      optimizer steps on a small synthetic split: the weights' values do not change the cost of a forward pass.
    * ``--images`` photos of 640x480 pixels are written as JPEGs (random pixels, so decoding costs what a real photo
      costs), each with 1 to 3 person boxes drawn from a fixed seed.
    * For each ``--batch-sizes`` entry: one unmeasured ``predict`` over all photos (warm-up: allocator, kernels,
      cuDNN autotuning), then ``--repeats`` timed calls; the figure is persons / median seconds. ``predict``
      returns a table built from the probabilities on the CPU, so every call ends synchronised with the device.
    * Everything is written to a temporary folder that is removed at the end; nothing goes into the repository.

Example:
    python benchmarks/predictor.py --images 16 --repeats 3                 # CPU, EmotNet at 224/128
    python benchmarks/predictor.py --device cuda --images 64 --batch-sizes 1 16 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from ccim_lightning import Predictor
from ccim_lightning.commands.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
PHOTO_SIZE = (640, 480)
HOSTS = {
    "emotnet": {"class_path": "ccim_lightning.hosts.EmotNet"},
    "synthetic": None,  # the config's own host
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the fit and the predictor)")
    parser.add_argument("--images", type=int, default=32, help="photos written and predicted per call")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="persons per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed predict calls per batch size")
    parser.add_argument("--host", choices=sorted(HOSTS), default="emotnet", help="the checkpoint's host")
    parser.add_argument("--context-size", type=int, default=224, help="side of the model's context input")
    parser.add_argument("--subject-size", type=int, default=128, help="side of the model's subject input")
    parser.add_argument("--fit-steps", type=int, default=2, help="steps of the fit writing the checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    for name in ("images", "repeats", "fit_steps", "context_size", "subject_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    return args


def write_checkpoint(folder: Path, args: argparse.Namespace) -> Path:
    """Fits the synthetic config for ``args.fit_steps`` steps with ``ccim fit``; returns the ``last.ckpt`` written."""
    batch_size = 8
    overrides = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu" if args.device == "cpu" else "gpu", "devices": 1,
                    "max_steps": args.fit_steps, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                    "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(folder / "run")},
        "data": {"init_args": {"train_size": batch_size * args.fit_steps, "val_size": batch_size,
                               "test_size": batch_size, "batch_size": batch_size, "num_workers": 0,
                               "image_size": args.context_size, "subject_size": args.subject_size}},
        "model": {"init_args": {"num_prototypes": 4}},
    }  # fmt: skip
    if HOSTS[args.host] is not None:
        overrides["model"]["init_args"]["backbone"] = HOSTS[args.host]
    config = folder / "overrides.yaml"
    config.write_text(yaml.safe_dump(overrides))
    build_cli(["fit", "--config", str(ROOT / "configs" / "synthetic.yaml"), "--config", str(config)])
    checkpoints = sorted((folder / "run").rglob("last.ckpt"))
    if len(checkpoints) != 1:
        raise RuntimeError(f"expected one last.ckpt under {folder / 'run'} after the fit, found {checkpoints}")
    return checkpoints[0]


def write_photos(folder: Path, count: int, seed: int = 0) -> tuple[list[str], list[list[tuple[int, int, int, int]]]]:
    """``count`` 640x480 JPEGs of random pixels and 1-3 person boxes each (at least 32 pixels a side)."""
    rng = np.random.default_rng(seed)
    width, height = PHOTO_SIZE
    paths, boxes = [], []
    for number in range(count):
        path = folder / f"photo_{number:04d}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
        photo_boxes = []
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = int(rng.integers(0, width - 64)), int(rng.integers(0, height - 64))
            x2, y2 = int(rng.integers(x1 + 32, width + 1)), int(rng.integers(y1 + 32, height + 1))
            photo_boxes.append((x1, y1, x2, y2))
        paths.append(str(path))
        boxes.append(photo_boxes)
    return paths, boxes


def measure(predictor: Predictor, paths: list[str], boxes: list, batch_size: int, repeats: int) -> list[float]:
    """Seconds of ``repeats`` timed ``predict`` calls over all photos, after one unmeasured call."""
    persons = sum(len(b) for b in boxes)
    table = predictor.predict(paths, boxes, batch_size=batch_size)
    if len(table) != persons:
        raise RuntimeError(f"predict gave {len(table)} rows for {persons} persons")
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict(paths, boxes, batch_size=batch_size)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> dict[int, float]:
    """Runs the benchmark; prints one line per batch size and returns {batch size: persons/s}."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ccim_predictor_bench_") as scratch:
        folder = Path(scratch)
        checkpoint = write_checkpoint(folder, args)
        (folder / "photos").mkdir()
        paths, boxes = write_photos(folder / "photos", args.images)
        persons = sum(len(b) for b in boxes)
        predictor = Predictor.from_checkpoint(checkpoint, device=args.device)
        print(
            f"Predictor.predict, host {args.host} (context {args.context_size}, subject {args.subject_size}), "
            f"{args.images} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} with {persons} persons, device "
            f"{args.device}, {torch.get_num_threads()} CPU threads, median of {args.repeats} (decoding included):"
        )
        for batch_size in args.batch_sizes:
            seconds = measure(predictor, paths, boxes, batch_size, args.repeats)
            median = statistics.median(seconds)
            results[batch_size] = persons / median
            print(
                f"  batch {batch_size:4d}: {results[batch_size]:8.1f} persons/s ({median * 1e3:.0f} ms per call, "
                f"spread {min(seconds) * 1e3:.0f}-{max(seconds) * 1e3:.0f} ms)"
            )
    return results


if __name__ == "__main__":
    main()
