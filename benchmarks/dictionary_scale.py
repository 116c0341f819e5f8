"""Per-rank peak memory, wall time and inertia of ``kmeans`` on 1, 2 and 4 gloo CPU ranks.

The dictionary build under DDP clusters features that stay on the rank that extracted them
(``ccim_lightning.dictionary.kmeans.kmeans`` over ``Collectives``). This measures whether memory per rank shrinks with
the ranks and what the collectives cost in time and in clustering quality.

Method:
    * Data: a ReLU'd mixture of ``--blobs`` Gaussian blobs (unit-variance centres, unit noise, Dirichlet blob
      sizes) in ``--dim`` dimensions, float32, as in ``benchmarks/kmeans.py``, but generated in blocks of
      ``BLOCK`` rows, block b from the seed sequence (seed, b). Rank r of W holds rows ``[n*r/W, n*(r+1)/W)`` and
      generates only the blocks it needs, so no rank ever holds the whole set and every world size clusters the same
      data.
    * Each world size runs in fresh processes (``torch.multiprocessing`` spawn, gloo over 127.0.0.1), all on this
      machine, each rank with ``--threads`` torch threads (default 1: on a CPU shared with other work, two OpenMP
      threads per rank made one rank 5-10x slower, waiting for each other in every small parallel region). So the
      times compare W single-threaded ranks sharing this machine's cores with one single-threaded rank.
    * Peak memory per rank (resident set, not tensor accounting): the ranks run with ``MALLOC_MMAP_THRESHOLD_=65536``
      (glibc hands every freed block of 64 KiB or more straight back to the kernel); once the process group is up
      and a warm-up clustering of a small random set has run (library code pages, the collectives' connections),
      each rank returns free heap pages (``malloc_trim``), resets its high-water
      mark (``echo 5 > /proc/self/clear_refs``) and notes its resident size, generates its shard, resets the
      high-water mark again (the generator's temporaries do not count) and runs ``kmeans``. Its figure is
      ``VmHWM`` minus the resident size noted before the shard: the shard plus every page the clustering touched
      (the collectives' buffers included). The table shows the largest rank's figure.
    * Time: wall time of the ``kmeans`` call (the slowest rank), without generating the data.
    * Inertia: as the call returns it (float64, all-reduced). The reference row is ``kmeans`` of the whole set in a
      process without a process group (same seed and iterations), measured the same way; the draws follow global
      row numbers, so every world size should report its inertia up to summation order.
    * Ratios are against one rank; the goal for memory is ``1/W + 0.05``.

Example:
    python benchmarks/dictionary_scale.py --quick           # 100,000 x 256, k=256, 10 iterations (a few minutes)
    python benchmarks/dictionary_scale.py                   # 400,000 x 256, k=256, 20 iterations
    python benchmarks/dictionary_scale.py --write           # also writes benchmarks/results/dictionary_scale.md
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _proc import status_kib  # benchmarks/ is on sys.path when a script here runs

BLOCK = 4096
"""Rows per generated block."""

_MMAP_THRESHOLD = 64 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help="points (default 400,000; 100,000 with --quick)")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension")
    parser.add_argument("--k", type=int, default=256, help="number of clusters")
    parser.add_argument("--blobs", type=int, default=384, help="Gaussian blobs in the data")
    parser.add_argument("--iterations", type=int, default=None, help="most Lloyd iterations (default 20; 10 quick)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4], help="numbers of ranks to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the clustering")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--quick", action="store_true", help="100,000 points, 10 iterations")
    parser.add_argument("--no-faiss", action="store_true", help="skip the one-process FAISS reference")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/dictionary_scale.md")
    args = parser.parse_args(argv)
    args.n = args.n or (100_000 if args.quick else 400_000)
    args.iterations = args.iterations or (10 if args.quick else 20)
    if 1 not in args.world_sizes:
        parser.error("--world-sizes must include 1: every figure is a ratio against one rank")
    return args


def generate_rows(start: int, stop: int, dim: int, blobs: int, seed: int) -> torch.Tensor:
    """Rows ``start:stop`` of the data set: (stop - start, dim) float32, built from the blocks that cover them."""
    rng = np.random.default_rng([seed, 0])
    shares = rng.dirichlet(np.full(blobs, 2.0))
    centres = rng.standard_normal((blobs, dim), dtype=np.float32)
    out = torch.empty(stop - start, dim, dtype=torch.float32)
    for block in range(start // BLOCK, -(-stop // BLOCK)):
        rng = np.random.default_rng([seed, 1, block])
        labels = rng.choice(blobs, size=BLOCK, p=shares)
        rows = centres[labels] + rng.standard_normal((BLOCK, dim), dtype=np.float32)
        lo, hi = max(start, block * BLOCK), min(stop, (block + 1) * BLOCK)
        out[lo - start : hi - start] = torch.from_numpy(np.maximum(rows, 0.0))[lo - block * BLOCK : hi - block * BLOCK]
    return out


def _reset_peak() -> int:
    """Returns free heap to the kernel, resets VmHWM and gives the resident bytes now (the baseline)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return status_kib("VmRSS") * 1024


def _rank(rank: int, world_size: int, port: int, args: argparse.Namespace, out: str, faiss_reference: bool) -> None:
    """One rank (or the one-process FAISS reference): generate the shard, cluster, report to ``out``."""
    import torch.distributed as dist

    from ccim_lightning.dictionary.kmeans import kmeans

    threads = args.threads
    torch.set_num_threads(threads)
    if not faiss_reference:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        dist.all_reduce(torch.zeros(args.k, args.dim, dtype=torch.float64))  # warm-up: connections and buffers
    # Warm-up on a small random set: the code pages and lazily built tables of every library the clustering uses
    # become resident here, not during the measurement (about 15 MiB, the same at every world size).
    warm_up = torch.rand(6 * args.k + 8, args.dim, generator=torch.Generator().manual_seed(rank))
    if faiss_reference:
        with warnings.catch_warnings():  # its small-cluster warning is about the warm-up set only
            warnings.simplefilter("ignore")
            kmeans(warm_up, args.k, seed=args.seed, num_iterations=2)
    else:
        kmeans(warm_up, args.k, seed=args.seed, num_iterations=2)
        dist.barrier()
    del warm_up
    base = _reset_peak()
    start, stop = args.n * rank // world_size, args.n * (rank + 1) // world_size
    shard = generate_rows(start, stop, args.dim, args.blobs, args.seed)
    _reset_peak()  # the generator's temporaries are not the clustering's: the peak counts from here, above `base`
    clock = time.perf_counter()
    result = kmeans(shard, args.k, seed=args.seed, num_iterations=args.iterations)
    seconds = time.perf_counter() - clock
    peak = status_kib("VmHWM") * 1024 - base
    report = {
        "rank": rank,
        "rows": stop - start,
        "threads": threads,
        "seconds": seconds,
        "peak_bytes": peak,
        "shard_bytes": shard.numel() * shard.element_size(),
        "inertia": result.inertia,
        "iterations": result.iterations,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    if not faiss_reference:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(world_size: int, args: argparse.Namespace, faiss_reference: bool = False) -> dict:
    """Runs ``world_size`` ranks (or the FAISS reference) in fresh processes; the slowest/largest rank's figures."""
    import torch.multiprocessing as mp

    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD)  # read by glibc when each child starts
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world_size, _free_port(), args, out, faiss_reference), nprocs=world_size, join=True)
        reports = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world_size)]
    inertias = {report["inertia"] for report in reports}
    if len(inertias) != 1:
        raise RuntimeError(f"ranks disagree on the inertia: {sorted(inertias)}")
    return {
        "ranks": world_size,
        "threads": reports[0]["threads"],
        "rows": max(report["rows"] for report in reports),
        "peak_mib": max(report["peak_bytes"] for report in reports) / 2**20,
        "shard_mib": max(report["shard_bytes"] for report in reports) / 2**20,
        "seconds": max(report["seconds"] for report in reports),
        "inertia": reports[0]["inertia"],
        "iterations": reports[0]["iterations"],
    }


def table(rows: list[dict], reference: dict | None, args: argparse.Namespace, loads: tuple[float, float]) -> str:
    """The results as a markdown table with a header line."""
    one = next(row for row in rows if row["ranks"] == 1)
    lines = [
        f"kmeans on {args.n:,} x {args.dim} ReLU'd mixture of {args.blobs} blobs (float32, "
        f"{args.n * args.dim * 4 / 2**20:.0f} MiB in all), k={args.k}, at most {args.iterations} iterations, seed "
        f"{args.seed}; gloo ranks on {os.cpu_count()} CPUs; load average {loads[0]:.1f} before, {loads[1]:.1f} after. "
        "Peak = resident-set high-water mark above the rank's baseline (shard + clustering), largest rank.",
        "",
        "| ranks | threads/rank | rows/rank | shard MiB | peak MiB/rank | peak / 1 rank | goal 1/W+0.05 | wall s "
        "| time / 1 rank | iterations | inertia | inertia / 1 rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['ranks']} | {row['threads']} | {row['rows']:,} | {row['shard_mib']:.1f} | {row['peak_mib']:.1f} "
            f"| {row['peak_mib'] / one['peak_mib']:.3f} | {1 / row['ranks'] + 0.05:.3f} | {row['seconds']:.2f} "
            f"| {row['seconds'] / one['seconds']:.2f} | {row['iterations']} | {row['inertia']:.6g} "
            f"| {row['inertia'] / one['inertia']:.5f} |"
        )
    if reference is not None:
        lines.append(
            f"| FAISS `kmeans`, 1 process | {reference['threads']} | {reference['rows']:,} "
            f"| {reference['shard_mib']:.1f} | {reference['peak_mib']:.1f} "
            f"| {reference['peak_mib'] / one['peak_mib']:.3f} | | {reference['seconds']:.2f} "
            f"| {reference['seconds'] / one['seconds']:.2f} | {reference['iterations']} "
            f"| {reference['inertia']:.6g} | {reference['inertia'] / one['inertia']:.5f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not os.access("/proc/self/clear_refs", os.W_OK):
        sys.exit(
            "dictionary_scale.py needs a writable /proc/self/clear_refs (Linux) to reset the memory high-water mark"
        )
    before = os.getloadavg()[0]
    rows = [run(world_size, args) for world_size in sorted(set(args.world_sizes))]
    reference = None if args.no_faiss else run(1, args, faiss_reference=True)
    text = table(rows, reference, args, (before, os.getloadavg()[0]))
    largest, one = rows[-1], rows[0]
    print(text)
    if args.write:
        command = shlex.join(
            ["python", "benchmarks/dictionary_scale.py", *(argv if argv is not None else sys.argv[1:])]
        )
        out = Path(__file__).with_name("results") / "dictionary_scale.md"
        out.write_text(f"# Distributed dictionary build: memory per rank\n\n`{command}`\n\n{text}\n")
        print(f"\nwrote {out}")
    print(f"per-rank peak memory at {largest['ranks']} ranks: {largest['peak_mib'] / one['peak_mib']:.3f} of one rank")


if __name__ == "__main__":
    main()
