"""Speed and peak memory of the CCIM head against the reference module's way of computing eqs. 5-7.

The reference module evaluates eq. 5 as ``(lambda[:, :, None] * Z * P).sum(1)``, materialising a (B, N, d) tensor
(512 MiB in float32 at B=64, N=1024, d=2048, twice over in the forward pass and again in the backward pass).
``ContextualCausalIntervention`` computes the same value as ``(lambda * P) @ Z``. Both variants here share one head's
parameters and layers (``w_h``, ``w_g``, query/key/``w_t``, residual block, ``fc``); only eqs. 5-7 differ. Each
measurement is one training step: forward, ``logsumexp`` loss, backward (host features ``h`` require grad, as they
do behind a host model), gradients reset to ``None`` between steps.

Method:
    * Time: a fresh Python subprocess per (attention, variant) runs ``--warmup`` steps, then reports the median wall
      time of ``--repeats`` steps (CUDA synchronised after each step).
    * Peak memory: another fresh subprocess per (attention, variant), so no allocator cache carries over, runs one
      unmeasured step (lazy imports, first-use initialisation), frees its gradients (so gradients count in the peak)
      and then measures two steps. On CUDA the figure is ``torch.cuda.max_memory_allocated()`` over those steps
      minus the memory allocated before them (head, dictionary, inputs). On CPU PyTorch keeps no allocator
      statistics and ``tracemalloc`` does not see its allocations, so the subprocess reads the kernel's resident-set
      high-water mark: it runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then returns every freed block of
      64 KiB or more to the kernel at once instead of caching it), returns other freed heap pages
      (``malloc_trim``), resets ``VmHWM`` (``echo 5 > /proc/self/clear_refs``), runs the steps and reports ``VmHWM``
      minus the resident size at the reset: every page the steps touched above what was already resident. Where
      ``clear_refs`` is not writable it falls back to the ``ru_maxrss`` increase, which can only under-report (the
      table header says which).
    * Agreement: the timing subprocesses compute eval-mode logits once at the end; the table reports the largest
      absolute difference between the two variants.

Example:
    python benchmarks/head.py                      # B=64, N=1024, d=2048, d_h=256 on the CPU
    python benchmarks/head.py --threads 1          # on a CPU shared with other work (avoids OpenMP contention)
    python benchmarks/head.py --device cuda --amp  # on a GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _proc import status_kib  # benchmarks/ is on sys.path when a script here runs

from ccim_lightning.head import ContextualCausalIntervention

VARIANTS = ("reference", "ours")

# On CPU the memory subprocesses fix glibc's mmap threshold (which also turns off its dynamic growth): every freed
# block of 64 KiB or more goes back to the kernel at once, so the resident set follows the live tensors.
_MMAP_THRESHOLD = 64 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="B")
    parser.add_argument("--num-prototypes", type=int, default=1024, help="N")
    parser.add_argument("--confounder-dim", type=int, default=2048, help="d")
    parser.add_argument("--feature-dim", type=int, default=256, help="d_h")
    parser.add_argument("--num-classes", type=int, default=26)
    parser.add_argument("--chunk-size", type=int, default=128, help="prototypes per additive chunk (ours)")
    parser.add_argument("--attention", nargs="+", default=["dot_product", "additive"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (at least 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "attention:variant:logits-path"
    return parser.parse_args(argv)


def reference_forward(head: ContextualCausalIntervention, h: torch.Tensor) -> torch.Tensor:
    """Eqs. 4-7 as the reference module evaluates them, with ``head``'s parameters: builds (B, N, d)."""
    ci = head.causal_intervention
    z, prior = head.dictionary, head.prior[:, None]  # the reference keeps the prior as (N, 1)
    q, k = ci.query(h), ci.key(z)
    if head.attention == "dot_product":
        scores = q @ k.transpose(0, 1) / math.sqrt(z.shape[1])
    else:
        scores = ci.w_t(torch.tanh(q[:, None, :] + k[None, :, :])).squeeze(-1)
    weights = torch.softmax(scores, dim=-1)
    g = (weights[:, :, None] * z * prior).sum(dim=1)
    x = h @ head.w_h + g @ head.w_g
    x = x + head.residual_scale * head.classifier(x)
    return head.fc(x)


def _release_free_heap() -> None:
    """Returns freed heap pages to the kernel (glibc ``malloc_trim``) so that reused pages count as new again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory (MiB) used between ``start()`` and ``stop()``, see the module docstring for the method."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base, self.method = torch.cuda.memory_allocated(self.device), "torch.cuda.max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.base, self.method = status_kib("VmRSS") * 1024, "VmHWM after clear_refs reset (fresh process)"
        except OSError:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss increase (fresh process; lower bound)"

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            peak = status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return (peak - self.base) / 2**20


def run_child(args: argparse.Namespace) -> dict:
    """Measures one (mode, attention, variant) in this process; returns the numbers."""
    mode, attention, variant, logits_path = args.child.split(":", 3)
    device = torch.device(args.device)
    torch.manual_seed(0)
    head = ContextualCausalIntervention(
        args.feature_dim,
        args.num_classes,
        args.num_prototypes,
        args.confounder_dim,
        attention=attention,
        chunk_size=args.chunk_size,
    )
    prior = torch.softmax(torch.randn(args.num_prototypes), dim=0)
    head.set_dictionary(torch.randn(args.num_prototypes, args.confounder_dim), prior)
    head = head.to(device).train()
    h = torch.randn(args.batch_size, args.feature_dim, device=device, requires_grad=True)
    forward = head if variant == "ours" else (lambda x: reference_forward(head, x))

    def step() -> None:
        head.zero_grad(set_to_none=True)
        h.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = forward(h).float().logsumexp(dim=1).mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # never measured: lazy imports, kernel selection, first-use initialisation
    if mode == "memory":
        head.zero_grad(set_to_none=True)  # the gradients are part of each measured step's peak
        h.grad = None
        gc.collect()
        _release_free_heap()
        memory = PeakMemory(device)
        memory.start()
        for _ in range(2):
            step()
        return {"peak_mib": memory.stop(), "memory_method": memory.method}

    for _ in range(args.warmup - 1):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    head.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        torch.save(forward(h.detach()).float().cpu(), logits_path)
    return {"median_ms": 1e3 * statistics.median(times)}


def measure(argv: list[str], mode: str, attention: str, variant: str, logits_path: str) -> dict:
    """Runs one measurement in a fresh subprocess with the command-line arguments ``argv``."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        *argv,
        "--child",
        f"{mode}:{attention}:{variant}:{logits_path}",
    ]
    env = dict(os.environ)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD)
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {attention}/{variant} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1: the first step is never measured")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    rows, method = [], ""
    with tempfile.TemporaryDirectory() as tmp:
        for attention in args.attention:
            result, logits = {}, {}
            for variant in VARIANTS:
                path = str(Path(tmp) / f"{attention}-{variant}.pt")
                result[variant] = measure(argv, "time", attention, variant, path)
                result[variant].update(measure(argv, "memory", attention, variant, path))
                logits[variant] = torch.load(path)
                method = result[variant]["memory_method"]
                print(f"{attention:>11} {variant:>9}: {result[variant]}", file=sys.stderr)
            ref, ours = result["reference"], result["ours"]
            diff = (logits["reference"] - logits["ours"]).abs().max().item()
            rows.append(
                f"| {attention} | {ref['median_ms']:.1f} | {ours['median_ms']:.1f} | "
                f"{ref['median_ms'] / ours['median_ms']:.1f}x | {ref['peak_mib']:.1f} | {ours['peak_mib']:.1f} | "
                f"{ref['peak_mib'] / max(ours['peak_mib'], 1e-3):.1f}x | {diff:.2e} |"
            )
    print(
        f"B={args.batch_size}, N={args.num_prototypes}, d={args.confounder_dim}, d_h={args.feature_dim}, "
        f"device={args.device}, amp={args.amp}, threads={torch.get_num_threads()}, forward+backward, "
        f"median of {args.repeats} after {args.warmup} warm-up; peak memory: {method}\n"
    )
    columns = ["attention", "reference ms", "ours ms", "speed-up", "reference peak MiB", "ours peak MiB"]
    columns += ["memory ratio", "max abs diff"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
