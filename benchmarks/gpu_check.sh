#!/usr/bin/env bash
# GPU check, run as one prepared script on a lent GPU machine (see docs/results/index.md, "GPU check"):
#   bash benchmarks/gpu_check.sh            (needs torch, lightning, timm, faiss-cpu, scikit-learn importable)
# About 7 minutes on an H200 (budget: under 8; steps 5 and 7 add about 2, estimated from CPU timings: not yet run
# on a GPU; step 5's photos take about 50 ms each to draw on one core).
# 1. the CCIM head forward + backward on the GPU against the (B, N, d)-materialising reference, fp32 and bf16;
# 2. k-means of 20,000 x 2048 features into 256 clusters on the GPU through the torch-assisted assignment path
#    (faiss-gpu wheels are too large to carry there), against FAISS on the CPU, inertia and wall time;
# 3. the EmotNet training step with the CCIM head against the baseline head, bf16 (benchmarks/step.py);
# 4. a bf16 CCIM fit of EmotNet (resnet18 streams, 224 context / 128 body, N=256, d=2048) on the synthetic data
#    for a fixed number of steps, at 0 and 8 loader workers: samples/s, peak GPU memory, and the share of the
#    wall time the GPU waits for the loader (previous step's end to this step's start: fetch + host-to-device copy)
#    against compute (step start to end, CUDA synchronised);
# 5. the prepared loader feeding the same bf16 fit (step 4's clock, same process): EMOTIC-layout 640x480 JPEGs
#    (benchmarks/data.py's generator) at 8 workers, decoded on the fly against EmoticDataModule(prepared_dir=...)
#    (memory-mapped uint8 crops, flips and normalisation on the GPU): samples/s, GPU waiting share, prepare time;
# 6. the distributed k-means's torch path (one rank, no process group) on CUDA against FAISS's one-process k-means
#    on the CPU, 100,000 x 2048 features into 256 clusters: wall time and inertia;
# 7. the Predictor applied to new photos: benchmarks/predictor.py --device cuda (its own EmotNet checkpoint from a
#    2-step ccim fit, 64 written 640x480 JPEGs with 1-3 persons each): persons/s at batch 1, 16 and 64.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/head.py --device cuda --repeats 20
python3 benchmarks/head.py --device cuda --amp --repeats 20
python3 - <<'PY'
import time

import torch

import sys

sys.path.insert(0, "benchmarks")
from kmeans import make_features  # noqa: E402
from ccim_lightning.dictionary.kmeans import kmeans

features = make_features(20_000, 2048, 512, 0)
for device in ("cpu", "cuda"):
    x = torch.as_tensor(features).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = kmeans(x, 256, seed=0, num_iterations=20)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"kmeans {device}: {time.perf_counter() - start:.2f} s, inertia {result.inertia:.6g}, backend {result.backend}")
PY
python3 benchmarks/step.py --device cuda --amp --warmup 5 --repeats 30
python3 - <<'PY'
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ccim_lightning import CCIMLightningModule
from ccim_lightning.datamodules import SyntheticContextDataModule
from benchmarks.data import write_dataset
from ccim_lightning.datamodules import EmoticDataModule
from ccim_lightning.hosts import EmotNet

STEPS, SKIP, BATCH = 40, 5, 64
PREPARED_STEPS = 25  # step 5: fewer steps, as its photos are drawn first (about 900)


class StepClock(Callback):
    """After SKIP warm-up steps: seconds waiting for each batch, seconds computing it, samples seen."""

    def __init__(self):
        self.wait, self.compute, self.samples, self.last_end, self.start = [], [], 0, None, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()
        if self.last_end is not None and batch_idx >= SKIP:
            self.wait.append(self.start - self.last_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.last_end = time.perf_counter()
        if batch_idx >= SKIP:
            self.compute.append(self.last_end - self.start)
            self.samples += int(batch["target"].shape[0])


def clocked_fit(data, label, steps=STEPS):
    """A bf16 CCIM fit of EmotNet on ``data`` for ``steps`` steps; prints the clock's figures after SKIP steps."""
    torch.manual_seed(0)
    model = CCIMLightningModule(
        EmotNet(), num_classes=data.num_classes, task=data.task, num_prototypes=256, confounder_dim=2048
    )
    # Random prototypes: the step's cost does not depend on what the dictionary holds.
    model.head.set_dictionary(torch.randn(256, 2048).relu(), torch.full((256,), 1 / 256))
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=data)
    wait, compute = sum(clock.wait), sum(clock.compute)
    print(
        f"bf16 CCIM fit of EmotNet, batch {BATCH}, {label}, steps {SKIP}..{steps}: "
        f"{clock.samples / (wait + compute):.0f} samples/s wall ({clock.samples / compute:.0f} if never waiting), "
        f"GPU waiting on data {wait / (wait + compute):.0%} of the time (median wait "
        f"{sorted(clock.wait)[len(clock.wait) // 2] * 1e3:.1f} ms, compute "
        f"{sorted(clock.compute)[len(clock.compute) // 2] * 1e3:.1f} ms per step), "
        f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    )


# Step 4: synthetic data, rendered in the loader.
for workers in (0, 8):
    data = SyntheticContextDataModule(
        image_size=224, subject_size=128, batch_size=BATCH, num_workers=workers, train_size=BATCH * (STEPS + 2)
    )
    clocked_fit(data, f"synthetic data, {workers} loader workers")

# Step 5: JPEG files decoded per step against the prepared (decoded once, memory-mapped) crops of the same persons.
with tempfile.TemporaryDirectory(prefix="gpu_check_prepared_") as scratch:
    root = Path(scratch)
    needed = BATCH * (PREPARED_STEPS + 2)  # one epoch covers the fit: no worker restart inside the clocked steps
    persons = write_dataset(root, needed // 2 + 64, seed=0)  # 1-3 persons per photo, 2 on average
    if persons < needed:
        raise SystemExit(f"step 5: only {persons} persons written, {needed} needed for {PREPARED_STEPS} steps")
    sizes = dict(context_size=224, subject_size=128, batch_size=BATCH, num_workers=8)
    label = f"EMOTIC-layout JPEGs decoded per step ({persons} persons), 8 workers"
    clocked_fit(EmoticDataModule(str(root), **sizes), label, PREPARED_STEPS)
    data = EmoticDataModule(str(root), prepared_dir=str(root / "prepared"), **sizes)
    start = time.perf_counter()
    data.prepare_data()  # the one-off decode; the fit below finds the folder and reuses it
    print(f"prepare_data (8 workers): {time.perf_counter() - start:.1f} s for {persons} persons")
    clocked_fit(data, "the same persons from prepared_dir (memory-mapped uint8), 8 workers", PREPARED_STEPS)
PY
python3 - <<'PY'
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from kmeans import make_features  # noqa: E402
from ccim_lightning.dictionary.distributed import distributed_kmeans
from ccim_lightning.dictionary.kmeans import kmeans

features = make_features(100_000, 2048, 512, 0)
start = time.perf_counter()
reference = kmeans(features, 256, seed=0, num_iterations=20)
cpu_seconds = time.perf_counter() - start
x = torch.from_numpy(features).cuda()
distributed_kmeans(x[:4096], 256, seed=0, num_iterations=2)  # CUDA context, kernels
torch.cuda.synchronize()
start = time.perf_counter()
result = distributed_kmeans(x, 256, seed=0, num_iterations=20)
torch.cuda.synchronize()
gpu_seconds = time.perf_counter() - start
print(
    f"k-means 100000 x 2048, k=256, 20 iterations: FAISS CPU ({torch.get_num_threads()} threads) {cpu_seconds:.2f} s, "
    f"inertia {reference.inertia:.6g}; distributed_kmeans torch on CUDA (1 rank) {gpu_seconds:.2f} s, inertia "
    f"{result.inertia:.6g} ({result.inertia / reference.inertia:.4f} of FAISS), {result.iterations} iterations"
)
PY
python3 benchmarks/predictor.py --device cuda --images 64 --batch-sizes 1 16 64 --repeats 3
