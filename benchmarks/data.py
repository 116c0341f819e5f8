"""Throughput of the EMOTIC loader (subject crop + masked context) against plain PIL decode + resize of the same files.

The ceiling is what any loader of these images must do at least: decode each person's image with PIL and resize it to
the context size (``Image.open(path).convert("RGB").resize(context, BILINEAR)``, the same resize the loader uses),
returned as a uint8 tensor. The loader under test is ``EmoticDataModule(...).train_dataloader()``: decode, body crop
resized to the subject size, context resized, both normalised to float32, body box zero-filled, random flips, V/A/D,
multi-hot target. Both run over the same persons (one decode per person, as a per-person dataset does), with the
same batch size and the same number of worker processes, in the same run.

Data: ``--images`` generated 640x480 JPEGs (quality 90, photo-like texture, about 140 KB each like COCO photos; see
``make_image``) in the EMOTIC layout, with 1-3 persons per image (EMOTIC averages 1.4)
in the preprocessed CSV form. Every timed pass is preceded by an untimed one, so the files are in the page cache
(decode cost, not disk, is measured). A pass includes starting the workers, as an epoch does.

Method: for each worker count, the two loaders alternate for ``--repeats`` timed passes; the table reports the
median samples per second of each and their ratio (goal: >= 0.8).

Example:
    python benchmarks/data.py                          # 256 images, workers 0 and 2, batch 32
    python benchmarks/data.py --images 1024 --workers 0 4 8
    python benchmarks/data.py --threads 0                # keep torch's default main-process threads
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from ccim_lightning.datamodules.emotic import CATEGORIES, EmoticDataModule

WIDTH, HEIGHT = 640, 480


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="number of generated 640x480 JPEGs")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to compare")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per loader and worker count")
    parser.add_argument("--context-size", type=int, default=224)
    parser.add_argument("--subject-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the main process (workers always use 1); 0 = leave"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def make_image(rng: np.random.Generator) -> Image.Image:
    """A photo-like 640x480 frame: colour gradients, filled ellipses, texture at three scales and pixel noise.

    At quality 90 the files average about 140 KB, like the COCO photos that make up most of EMOTIC (smooth synthetic
    frames would decode faster than real photos and overstate the loader's own share of the time).
    """
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    slopes = rng.uniform(0.05, 0.4, size=(3, 2)).astype(np.float32)
    image = Image.fromarray(np.stack([(x * sx + y * sy) % 256 for sx, sy in slopes], axis=-1).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x1, y1 = int(rng.integers(0, WIDTH - 40)), int(rng.integers(0, HEIGHT - 40))
        w, h = int(rng.integers(20, 220)), int(rng.integers(20, 220))
        draw.ellipse([x1, y1, x1 + w, y1 + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image).astype(np.float32)
    for amplitude, cell in ((40.0, 32), (25.0, 8), (12.0, 2)):
        field = rng.normal(0.0, amplitude, size=(HEIGHT // cell, WIDTH // cell, 3)).astype(np.float32)
        for c in range(3):
            pixels[..., c] += np.asarray(
                Image.fromarray(field[..., c]).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
            )
    pixels += rng.normal(0.0, 10.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_dataset(root: Path, num_images: int, seed: int) -> int:
    """Writes the images and ``emotic_pre/{train,val,test}.csv`` (all persons in train); returns the person count."""
    rng = np.random.default_rng(seed)
    folder = root / "emotic" / "mscoco" / "images"
    folder.mkdir(parents=True)
    rows = []
    for i in range(num_images):
        name = f"{i:06d}.jpg"
        make_image(rng).save(folder / name, quality=90)
        for _ in range(int(rng.integers(1, 4))):
            w, h = int(rng.integers(60, 320)), int(rng.integers(120, 480))
            x1, y1 = int(rng.integers(-20, WIDTH - w // 2)), int(rng.integers(-20, HEIGHT - h // 2))
            labels = [
                CATEGORIES[int(k)] for k in rng.choice(len(CATEGORIES), size=int(rng.integers(1, 4)), replace=False)
            ]
            vad = [int(v) for v in rng.integers(1, 11, 3)]
            rows.append([len(rows), "mscoco/images", name, f"[{WIDTH}, {HEIGHT}]", str([x1, y1, x1 + w, y1 + h]),
                         str(sorted(labels)), str(vad), "Male", "Adult"])  # fmt: skip
    (root / "emotic_pre").mkdir()
    for split in ("train", "val", "test"):
        with (root / "emotic_pre" / f"{split}.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["Index", "Folder", "Filename", "Image Size", "BBox", "Categorical_Labels",
                             "Continuous_Labels", "Gender", "Age"])  # fmt: skip
            writer.writerows(rows if split == "train" else rows[:1])
    return len(rows)


class PlainDecodeResize(Dataset):
    """The ceiling: PIL decode + resize to the context size, one image per person, as uint8 tensors."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths = paths
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = Image.open(self.paths[index]).convert("RGB")
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(image).copy())


def timed_pass(loader: DataLoader) -> float:
    """Samples per second of one pass over ``loader`` (worker start-up included)."""
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch["index"]) if isinstance(batch, dict) else len(batch)
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # with num_workers=0 the main process collates; avoid thread contention
    results = {"images": args.images, "batch_size": args.batch_size, "cpus": os.cpu_count()}
    results.update(threads=torch.get_num_threads(), rows=[])
    with tempfile.TemporaryDirectory(prefix="ccim-data-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        persons = write_dataset(root, args.images, args.seed)
        files = list((root / "emotic").rglob("*.jpg"))
        mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1024
        results.update(persons=persons, mean_jpeg_kb=mean_kb)
        print(f"{args.images} JPEGs {WIDTH}x{HEIGHT} (mean {mean_kb:.0f} KB), {persons} persons, "
              f"written in {time.perf_counter() - start:.1f} s")  # fmt: skip
        print(f"{'workers':>7}  {'plain decode+resize /s':>22}  {'EMOTIC loader /s':>16}  {'ratio':>5}")
        for workers in args.workers:
            dm = EmoticDataModule(str(root), context_size=args.context_size, subject_size=args.subject_size,
                                  batch_size=args.batch_size, num_workers=workers)  # fmt: skip
            start = time.perf_counter()
            dm.setup("fit")
            setup_seconds = time.perf_counter() - start
            table = dm.table("train")
            ceiling = PlainDecodeResize([dm.image_root / path for path in table.paths], args.context_size)
            plain = DataLoader(ceiling, batch_size=args.batch_size, shuffle=True, num_workers=workers)

            # The same loader settings for both (no persistent workers: each pass starts its workers, like an epoch).
            ours = DataLoader(dm.train_dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                              collate_fn=dm.train_dataset.collate_fn)  # fmt: skip
            timed_pass(plain), timed_pass(ours)  # warm the page cache and the code paths
            speeds: dict[str, list[float]] = {"plain": [], "ours": []}
            for _ in range(args.repeats):
                speeds["plain"].append(timed_pass(plain))
                speeds["ours"].append(timed_pass(ours))
            plain_speed, our_speed = statistics.median(speeds["plain"]), statistics.median(speeds["ours"])
            row = {"workers": workers, "plain_per_s": plain_speed, "ours_per_s": our_speed,
                   "ratio": our_speed / plain_speed, "setup_s": setup_seconds}  # fmt: skip
            results["rows"].append(row)
            print(f"{workers:>7}  {plain_speed:>22.1f}  {our_speed:>16.1f}  {row['ratio']:>5.2f}")
        print(f"setup (annotations + image header check): {results['rows'][0]['setup_s']:.2f} s for {persons} persons")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
