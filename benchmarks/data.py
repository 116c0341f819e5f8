"""Throughput of the EMOTIC loader (subject crop + masked context) against plain PIL decode + resize of the same files.

The reference ("plain") is the least a per-person loader of these images does: decode each person's image with PIL
and resize it to the context size (``Image.open(path).convert("RGB").resize(context, BILINEAR)``, the same resize
the loader uses), returned as a uint8 tensor; one decode per person. The loader under test ("ours") is what
``EmoticDataModule(...).train_dataloader()`` gives in a Lightning run: JPEGs decoded at reduced size where the
outputs allow it (``reduced_decode``), persons of an image next to each other in the shuffled order and decoded once
(``group_by_image``), body crop resized to the subject size, context resized, random flips, V/A/D, multi-hot target,
handed over as uint8; then, counted in its time, the batch transform (``datamodule.normalize_batch``, what
``on_after_batch_transfer`` runs on the device; here the device is this CPU) normalises to float32 and zero-fills
the body box. ``ours, uint8 batches only`` is the same loader without that batch transform (what a GPU is fed
when the transform runs there; on this machine it shares the CPUs with the workers). Variants, each switch off on
its own: ``ours, per-person order`` (``group_by_image=False``),
``ours, full decode`` (``reduced_decode=False``), and ``previous`` (the loader before these changes: full decode,
float normalisation and masking in the workers, per-person shuffle). All run over the same persons, with the same
batch size and the same number of worker processes, in the same run.

Pixel difference: every person of the split through the dictionary dataset (evaluation transform, masked) with
reduced decoding on and off; the mean absolute difference of ``subject`` and ``context`` in 0-255 units, over the
persons where it was reduced (subject: the JPEG decode; context: the decode or the box-reduce), over all persons,
and for the worst person.

Data: ``--images`` generated 640x480 JPEGs (quality 90, photo-like texture, about 140 KB each like COCO photos; see
``make_image``) in the EMOTIC layout, with 1-3 persons per image (EMOTIC averages 1.4)
in the preprocessed CSV form. Every timed pass is preceded by an untimed one, so the files are in the page cache
(decode cost, not disk, is measured). A pass includes starting the workers, as an epoch does.

Method: for each worker count, the loaders alternate for ``--repeats`` timed passes; the table reports the median
samples per second of each and its ratio to plain (goal for ``ours``: >= 1.3).

Prepared data (``prepared_dir``, ``ccim_lightning.datamodules.prepared``): ``prepared`` is the training loader of
``EmoticDataModule(prepared_dir=...)``: each person was decoded once, before the timed passes, into memory-mapped
uint8 crops; a pass reads them (shuffled) and, counted in its time, flips half the batch and normalises and masks it
(``flip_batch`` + ``normalize_batch``, what ``on_after_batch_transfer`` runs on the device; here on this CPU).
``prepared, uint8 batches only`` leaves that batch transform to the device. The prepare step's time (with the
largest worker count) and the folder's size are reported per 1,000 persons (goal: ``prepared`` >= 4x plain at 2
workers). ``--litdata`` adds the storage comparison behind the choice of a memory map: the same crops written with
LitData's ``optimize`` and read with its ``StreamingDataset`` (``litdata, pixels``) against the memory-mapped
arrays read by a dataset giving the same three keys (``memmap, pixels``).

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

from ccim_lightning.datamodules.dataset import ImageGroupedSampler, collate_skipping_none
from ccim_lightning.datamodules.decode import context_reduction
from ccim_lightning.datamodules.emotic import CATEGORIES, EmoticDataModule
from ccim_lightning.datamodules.prepared import PreparedPersonDataset, flip_batch

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
    parser.add_argument("--no-prepared", action="store_true", help="leave out the prepared-data rows")
    parser.add_argument("--no-variants", action="store_true", help="leave out the three 'ours' variants")
    parser.add_argument("--litdata", action="store_true", help="also compare LitData storage (pip install litdata)")
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


class MemmapPixels(Dataset):
    """The memory-mapped side of ``--litdata``: subject, context and index of a prepared folder, nothing else."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.arrays = None
        self.size = len(np.load(folder / "ok.npy"))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.arrays is None:
            self.arrays = [np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in ("subject", "context")]
        subject, context = (torch.from_numpy(np.array(array[index])) for array in self.arrays)
        return {"subject": subject, "context": context, "index": torch.tensor(index)}


def _litdata_sample(item: tuple[str, int]) -> dict:
    folder, index = item
    subject, context = (np.load(Path(folder) / f"{name}.npy", mmap_mode="r") for name in ("subject", "context"))
    return {"index": index, "subject": np.array(subject[index]), "context": np.array(context[index])}


def write_litdata(folder: Path, out: Path, workers: int) -> float:
    """LitData ``optimize`` of a prepared folder's crops into ``out``; returns the seconds it took."""
    import litdata  # optional: only for --litdata

    start = time.perf_counter()
    inputs = [(str(folder), i) for i in range(len(np.load(folder / "ok.npy")))]
    litdata.optimize(fn=_litdata_sample, inputs=inputs, output_dir=str(out), chunk_bytes="64MB",
                     num_workers=max(workers, 1))  # fmt: skip
    return time.perf_counter() - start


def prepared_loaders(dm: EmoticDataModule, args: argparse.Namespace, workers: int, litdata_dir: Path | None) -> dict:
    """``prepared`` rows (module docstring) as (loader, batch transform or None)."""
    common = dict(batch_size=args.batch_size, num_workers=workers, collate_fn=collate_skipping_none, shuffle=True)
    dataset = dm.train_dataset.with_output("uint8")
    assert isinstance(dataset, PreparedPersonDataset) and dataset.augment
    loader = DataLoader(dataset, **common)
    out = {
        "prepared": (loader, lambda batch: dm.normalize_batch(flip_batch(batch))),
        "prepared, uint8 batches only": (loader, None),
    }
    if litdata_dir is not None:
        import litdata

        out["memmap, pixels"] = (DataLoader(MemmapPixels(dataset.folder), **common), None)
        streaming = litdata.StreamingDataset(str(litdata_dir), shuffle=True)
        out["litdata, pixels"] = (litdata.StreamingDataLoader(streaming, batch_size=args.batch_size,
                                                              num_workers=workers), None)  # fmt: skip
    return out


def prepare(root: Path, args: argparse.Namespace, workers: int) -> tuple[EmoticDataModule, dict]:
    """Builds the prepared folder (timed) and its LitData copy (``--litdata``); returns the datamodule and figures."""
    sizes = dict(context_size=args.context_size, subject_size=args.subject_size, batch_size=args.batch_size)
    dm = EmoticDataModule(str(root), num_workers=workers, prepared_dir=str(root / "prepared"), **sizes)
    dm.table("train")  # annotations and image headers: the same setup work as without prepared data
    start = time.perf_counter()
    dm.prepare_data()
    seconds = time.perf_counter() - start
    dm.setup("fit")
    persons = len(dm.train_dataset) + len(dm.val_dataset)
    folder = dm.train_dataset.folder
    size = sum(f.stat().st_size for f in (root / "prepared").rglob("*") if f.is_file())
    figures = {"prepare_s_per_1000": seconds / persons * 1000, "disk_mb_per_1000": size / 2**20 / persons * 1000}
    figures["prepare_workers"] = workers
    if args.litdata:
        figures["litdata_optimize_s"] = write_litdata(folder, root / "litdata", workers)
        figures["litdata_mb"] = sum(f.stat().st_size for f in (root / "litdata").rglob("*") if f.is_file()) / 2**20
        figures["memmap_pixels_mb"] = sum((folder / f"{n}.npy").stat().st_size for n in ("subject", "context")) / 2**20
    return dm, figures


def timed_pass(loader: DataLoader, finish=None) -> float:
    """Samples per second of one pass over ``loader`` (worker start-up and the batch transform ``finish`` included)."""
    start = time.perf_counter()
    count = 0
    for batch in loader:
        if finish is not None:
            batch = finish(batch)
        count += len(batch["index"]) if isinstance(batch, dict) else len(batch)
    return count / (time.perf_counter() - start)


def loaders(root: Path, args: argparse.Namespace, workers: int) -> dict[str, tuple[DataLoader, object]]:
    """Plain, ours and the variants (module docstring) as (loader, batch transform or None)."""
    out = {}
    sizes = dict(context_size=args.context_size, subject_size=args.subject_size, batch_size=args.batch_size)
    common = dict(batch_size=args.batch_size, num_workers=workers, collate_fn=collate_skipping_none)
    settings = {
        "ours": dict(grouped=True, reduced=True, uint8=True),
        "ours, per-person order": dict(grouped=False, reduced=True, uint8=True),
        "ours, full decode": dict(grouped=True, reduced=False, uint8=True),
        "previous": dict(grouped=False, reduced=False, uint8=False),
    }
    if args.no_variants:
        settings = {"ours": settings["ours"]}
    for name, setting in settings.items():
        dm = EmoticDataModule(str(root), num_workers=workers, reduced_decode=setting["reduced"], **sizes)
        dm.setup("fit")
        dataset = dm.train_dataset.with_output("uint8" if setting["uint8"] else "float")
        if "plain" not in out:
            table = dm.table("train")
            ceiling = PlainDecodeResize([dm.image_root / path for path in table.paths], args.context_size)
            out["plain"] = (DataLoader(ceiling, shuffle=True, batch_size=args.batch_size, num_workers=workers), None)
        sampler = ImageGroupedSampler(dataset.table.paths) if setting["grouped"] else None
        # no persistent workers: each pass starts its workers, like an epoch of the plain loader
        loader = DataLoader(dataset, shuffle=sampler is None, sampler=sampler, **common)
        out[name] = (loader, dm.normalize_batch if setting["uint8"] else None)
        if name == "ours":  # what reaches the device when the batch transform runs there, not on this CPU
            out["ours, uint8 batches only"] = (loader, None)
    return out


def pixel_difference(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Mean absolute difference (0-255 units) of reduced-decode outputs from full-decode ones (module docstring)."""
    sizes = dict(context_size=args.context_size, subject_size=args.subject_size, num_workers=0)
    reduced = EmoticDataModule(str(root), **sizes).dictionary_dataset()
    full = EmoticDataModule(str(root), reduced_decode=False, **sizes).dictionary_dataset()
    std = torch.tensor(reduced.transform.std)[:, None, None] * 255.0
    diffs = {"subject": [], "context": []}
    for i in range(len(full)):
        a, b = reduced[i], full[i]
        for key in diffs:
            diffs[key].append(float(((a[key] - b[key]).abs() * std).mean()))
    transform = reduced.transform
    masks = {  # subject: the JPEG decode was reduced; context: it comes from a reduced image (decode or box-reduce)
        "subject": reduced.reductions > 1,
        "context": np.array([context_reduction(size, transform.context_size) > 1 for size in reduced.table.sizes]),
    }
    out = {"persons": len(full), "decode_reduced_persons": int(masks["subject"].sum())}
    out["context_reduced_persons"] = int(masks["context"].sum())
    out["reductions"] = {int(r): int((reduced.reductions == r).sum()) for r in np.unique(reduced.reductions)}
    for key, values in diffs.items():
        values, mask = np.asarray(values), masks[key]
        out[f"{key}_mad_all"] = float(values.mean())
        out[f"{key}_mad_reduced"] = float(values[mask].mean()) if mask.any() else 0.0
        out[f"{key}_mad_max"] = float(values.max())
    return out


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
        print(f"load before: {os.getloadavg()[0]:.2f} (1-min average over {os.cpu_count()} CPUs)")
        dm = None
        if not args.no_prepared:
            dm, figures = prepare(root, args, max(args.workers))
            results["prepared"] = figures
            per_1000 = f"{figures['prepare_s_per_1000']:.1f} s and {figures['disk_mb_per_1000']:.0f} MB"
            print(f"prepare (decode once, {figures['prepare_workers']} workers): {per_1000} per 1,000 persons")
            if args.litdata:
                sizes_mb = f"{figures['litdata_mb']:.0f} MB (memmap pixels {figures['memmap_pixels_mb']:.0f} MB)"
                print(f"litdata optimize of the same crops: {figures['litdata_optimize_s']:.1f} s, {sizes_mb}")
        for workers in args.workers:
            chosen = loaders(root, args, workers)
            if dm is not None:
                litdata_dir = root / "litdata" if args.litdata else None
                chosen.update(prepared_loaders(dm, args, workers, litdata_dir))
            for loader, finish in chosen.values():  # warm the page cache and the code paths
                timed_pass(loader, finish)
            speeds: dict[str, list[float]] = {name: [] for name in chosen}
            for _ in range(args.repeats):
                for name, (loader, finish) in chosen.items():
                    speeds[name].append(timed_pass(loader, finish))
            medians = {name: statistics.median(values) for name, values in speeds.items()}
            row = {"workers": workers, "per_s": medians, "ratio": {n: v / medians["plain"] for n, v in medians.items()}}
            results["rows"].append(row)
            print(f"workers={workers}: samples/s (median of {args.repeats}) and ratio to plain")
            for name, value in medians.items():
                print(f"  {name:<24} {value:>8.1f}  {row['ratio'][name]:>5.2f}")
        diff = pixel_difference(root, args)
        results["pixel_difference"] = diff
        print(
            f"reduced decode: JPEG decode reduced for {diff['decode_reduced_persons']} of {diff['persons']} persons "
            f"(reductions {diff['reductions']}), context from a reduced image for {diff['context_reduced_persons']}"
        )
        print("mean absolute difference from full decode, 0-255 units (over those persons / all / worst person): "
              f"subject {diff['subject_mad_reduced']:.2f} / {diff['subject_mad_all']:.2f} / "
              f"{diff['subject_mad_max']:.2f}, context {diff['context_mad_reduced']:.2f} / "
              f"{diff['context_mad_all']:.2f} / {diff['context_mad_max']:.2f}")  # fmt: skip
        print(f"load after: {os.getloadavg()[0]:.2f}")
        for row in results["rows"]:
            print(f"ours / plain at {row['workers']} workers: {row['ratio']['ours']:.2f}")
            if "prepared" in row["ratio"]:
                print(f"prepared / plain at {row['workers']} workers: {row['ratio']['prepared']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
