#!/usr/bin/env bash
# GPU check, run as one prepared script on a lent GPU machine (see README, "GPU check"):
#   bash benchmarks/gpu_check.sh            (needs torch, timm, faiss-cpu, scikit-learn importable)
# 1. the CCIM head forward + backward on the GPU against the (B, N, d)-materialising reference, fp32 and bf16;
# 2. k-means of 20,000 x 2048 features into 256 clusters on the GPU through the torch-assisted assignment path
#    (faiss-gpu wheels are too large to carry there), against FAISS on the CPU, inertia and wall time.
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
