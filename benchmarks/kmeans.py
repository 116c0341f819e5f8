"""Wall time and inertia of ``ccim_lightning.dictionary.kmeans.kmeans`` against scikit-learn's k-means++ ``KMeans``.

The data imitate pooled scene-CNN features: a mixture of ``--blobs`` Gaussian blobs (unit-variance centres, unit
noise, Dirichlet-distributed blob sizes) in ``--dim`` dimensions passed through a ReLU, float32.

Method (both sides measured alike, in one run):
    * Each method runs in a fresh Python subprocess with the same thread count (``--threads``, default all CPUs):
      ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS`` are set before anything is imported and
      ``threadpoolctl.threadpool_limits`` caps every BLAS and OpenMP pool (scikit-learn's OpenMP Lloyd loop, torch's
      and FAISS's OpenMP) to it. Without that, the two sides use whatever their libraries pick: on a machine shared
      with other work, OpenMP threads that spin-wait for descheduled siblings slow one side several-fold and the
      ratio measures the machine's load, not the algorithms.
    * Each child first fits a small slice of the data (warm-up: library loading, thread pools, first-call costs),
      then times ``--repeats`` fits; methods alternate repeat by repeat so that a change of load hits both.
    * scikit-learn: ``KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=--iterations, tol=0,
      random_state=--seed)``; ``tol=0`` stops it only when the labels stop changing, as ours stops, so both get the
      same iteration budget and stopping rule. (Its default ``tol=1e-4`` stops earlier, which is faster and worse.)
    * ours: ``kmeans(features, k, seed=--seed, num_iterations=--iterations)``, backend ``auto`` (torch on the CPU).
    * Wall time: of the fit call alone (``time.perf_counter``), the best of ``--repeats`` runs.
    * Inertia: recomputed here for both, in float64, as the sum of squared distances of the points to the centre of
      their label (scikit-learn's centres are those of its last update, ours the means of the final clusters).
    * The load average before and after is printed: on a machine shared with other work both timings inflate.
    * Prints the ratios (speed-up = scikit-learn time / ours, inertia = ours / scikit-learn); writes nothing.

Example:
    python benchmarks/kmeans.py                                 # 20000 x 2048, k=256, 20 iterations, all CPUs
    python benchmarks/kmeans.py --threads 1 --repeats 3         # one thread each
    python benchmarks/kmeans.py --n 5000 --dim 256 --k 64       # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="number of points")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension")
    parser.add_argument("--k", type=int, default=256, help="number of clusters")
    parser.add_argument("--blobs", type=int, default=384, help="number of Gaussian blobs in the data")
    parser.add_argument("--iterations", type=int, default=20, help="most Lloyd iterations, for both methods")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every pool, both methods")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of both k-means runs")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method; the fastest counts")
    parser.add_argument("--warm-up", type=int, default=2000, help="rows of the untimed warm-up fit (0: none)")
    parser.add_argument("--child", choices=("ours", "sklearn"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_features(n: int, dim: int, blobs: int, seed: int) -> np.ndarray:
    """ReLU of a Gaussian mixture: (n, dim) float32, non-negative."""
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(blobs, 2.0))
    labels = rng.choice(blobs, size=n, p=shares)
    centres = rng.standard_normal((blobs, dim), dtype=np.float32)
    features = centres[labels] + rng.standard_normal((n, dim), dtype=np.float32)
    return np.maximum(features, 0.0, out=features)


def fit(method: str, features: np.ndarray, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, int, str]:
    """One fit: centres, labels, iterations run and backend."""
    if method == "sklearn":
        from sklearn.cluster import KMeans

        model = KMeans(args.k, init="k-means++", n_init=1, max_iter=args.iterations, tol=0.0, random_state=args.seed)
        model.fit(features)
        return model.cluster_centers_, model.labels_, int(model.n_iter_), "lloyd"
    from ccim_lightning.dictionary.kmeans import kmeans

    result = kmeans(features, args.k, seed=args.seed, num_iterations=args.iterations)
    return result.centroids.numpy(), result.assignments.numpy(), result.iterations, result.backend


def run_child(args: argparse.Namespace) -> None:
    """Warms up, then fits one method once; prints JSON with the time, saves the fit's centres and labels."""
    import warnings

    from threadpoolctl import threadpool_limits

    features = np.load(args.data)
    with threadpool_limits(limits=args.threads):
        if args.child == "ours":
            import faiss
            import torch

            torch.set_num_threads(args.threads)
            faiss.omp_set_num_threads(args.threads)
        if args.warm_up:
            with warnings.catch_warnings():  # few points per cluster in the warm-up slice
                warnings.simplefilter("ignore")
                fit(args.child, features[: max(args.warm_up, args.k)], args)
        start = time.perf_counter()
        centres, labels, iterations, backend = fit(args.child, features, args)
        seconds = time.perf_counter() - start
    out = Path(args.data).with_suffix(f".{args.child}.npz")
    np.savez(out, centres=centres, labels=labels)
    print(json.dumps({"seconds": seconds, "iterations": iterations, "backend": backend, "out": str(out)}))


def inertia(features: np.ndarray, centres: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of the points to the centre of their label, in float64, in row chunks."""
    total = 0.0
    for start in range(0, len(features), 4096):
        rows = features[start : start + 4096].astype(np.float64)
        total += float(np.square(rows - centres[labels[start : start + 4096]].astype(np.float64)).sum())
    return total


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    features = make_features(args.n, args.dim, args.blobs, args.seed)
    load_before = os.getloadavg()
    rows: dict[str, dict] = {}
    threads = str(args.threads)
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "features.npy"
        np.save(data, features)
        for method in ("sklearn", "ours") * args.repeats:
            command = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--data",
                str(data),
                "--k",
                str(args.k),
                "--iterations",
                str(args.iterations),
                "--seed",
                str(args.seed),
                "--threads",
                threads,
                "--warm-up",
                str(args.warm_up),
            ]
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
            report = json.loads(done.stdout.strip().splitlines()[-1])
            if method in rows and rows[method]["seconds"] <= report["seconds"]:
                continue
            result = np.load(report["out"])
            report["inertia"] = inertia(features, result["centres"], result["labels"])
            report["clusters"] = int(len(np.unique(result["labels"])))
            rows[method] = report
    load_after = os.getloadavg()

    reference = rows["sklearn"]
    print(
        f"k-means on {args.n} x {args.dim} ReLU'd mixture of {args.blobs} blobs (float32), k={args.k}, "
        f"at most {args.iterations} iterations, seed {args.seed}, best of {args.repeats}; {args.threads} thread(s) "
        f"each of {os.cpu_count()} CPUs, warm-up {args.warm_up} rows; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
    )
    print()
    print(
        "| method | backend | wall s | iterations | clusters used | inertia | speed-up vs sklearn | inertia / sklearn |"
    )
    print("|---|---|---|---|---|---|---|---|")
    names = {"sklearn": "scikit-learn KMeans (k-means++, n_init=1)", "ours": "ccim_lightning.dictionary.kmeans.kmeans"}
    for method, report in rows.items():
        print(
            f"| {names[method]} | {report['backend']} | {report['seconds']:.2f} | {report['iterations']} | "
            f"{report['clusters']} | {report['inertia']:.6g} | {reference['seconds'] / report['seconds']:.2f}x | "
            f"{report['inertia'] / reference['inertia']:.4f} |"
        )


if __name__ == "__main__":
    main()
