"""What the CCIM head adds to an EmotNet training step, against the baseline head (``attention="none"``).

Method:
    * Two ``CCIMLightningModule`` models over ``EmotNet`` (ResNet-18 body and image streams, random init, d_h = 256,
      26 multilabel classes as EMOTIC), built from the same seed so their hosts start equal: the baseline head
      (``attention="none"``) and the CCIM head (dot-product attention, N = ``--num-prototypes`` prototypes of
      dimension ``--confounder-dim``, filled with random prototypes and a uniform prior).
    * One fixed random batch: ``subject`` (B, 3, 128, 128), ``context`` (B, 3, 224, 224), multi-hot ``target``.
    * A step is what Lightning's automatic optimisation runs for ``training_step``, without the trainer around it:
      ``model(batch)``, ``model.compute_loss``, ``backward``, the optimizer of ``configure_optimizers`` (AdamW)
      stepping, gradients reset to ``None``. Both models are in training mode (dropout, batch-norm updates).
    * ``--warmup`` unmeasured steps per model, then ``--repeats`` rounds; each round times one step of each model,
      alternating which goes first (so drifts in machine load hit both alike), CUDA synchronised around each step.
      The figure is the median over rounds of (CCIM step time / baseline step time); the per-model medians are shown
      too. On a CPU shared with other work the spread is printed so the reader can judge the noise.

Example:
    python benchmarks/step.py --repeats 5               # CPU, batch 16, N=256, d=2048
    python benchmarks/step.py --device cuda --amp --repeats 30
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from ccim_lightning.hosts import EmotNet
from ccim_lightning.module import CCIMLightningModule

NUM_CLASSES = 26


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context-size", type=int, default=224, help="side of the context image")
    parser.add_argument("--subject-size", type=int, default=128, help="side of the body crop")
    parser.add_argument("--encoder", default="resnet18", help="timm model of both streams")
    parser.add_argument("--num-prototypes", type=int, default=256, help="N")
    parser.add_argument("--confounder-dim", type=int, default=2048, help="d")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per model first")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (one step of each model per round)")
    return parser.parse_args(argv)


def build(
    attention: str, args: argparse.Namespace, device: torch.device
) -> tuple[CCIMLightningModule, torch.optim.Optimizer]:
    """A model with the given head and its optimizer, the host initialised from seed 0."""
    torch.manual_seed(0)
    model = CCIMLightningModule(
        EmotNet(args.encoder, args.encoder),
        num_classes=NUM_CLASSES,
        task="multilabel",
        num_prototypes=args.num_prototypes,
        confounder_dim=args.confounder_dim,
        attention=attention,
    ).to(device)
    if model.head.uses_dictionary:
        generator = torch.Generator().manual_seed(1)
        prototypes = torch.randn(args.num_prototypes, args.confounder_dim, generator=generator).relu()
        model.head.set_dictionary(prototypes, torch.full((args.num_prototypes,), 1.0 / args.num_prototypes))
    model.train()
    return model, model.configure_optimizers()


def make_batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    b = args.batch_size
    return {
        "subject": torch.randn(b, 3, args.subject_size, args.subject_size, generator=generator).to(device),
        "context": torch.randn(b, 3, args.context_size, args.context_size, generator=generator).to(device),
        "target": (torch.rand(b, NUM_CLASSES, generator=generator) < 0.2).float().to(device),
    }


def timed_step(model, optimizer, batch, device: torch.device, amp: bool) -> float:
    """Seconds of one training step."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with autocast:
        loss = model.compute_loss(model(batch).float(), batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = {"baseline": build("none", args, device), "ccim": build("dot_product", args, device)}
    batch = make_batch(args, device)
    for model, optimizer in models.values():
        for _ in range(args.warmup):
            timed_step(model, optimizer, batch, device, args.amp)
    times: dict[str, list[float]] = {name: [] for name in models}
    load_before = os.getloadavg()[0]
    for round_ in range(args.repeats):
        order = list(models) if round_ % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(timed_step(*models[name], batch, device, args.amp))
    load_after = os.getloadavg()[0]
    ratios = [c / b for c, b in zip(times["ccim"], times["baseline"])]
    head_parameters = {name: sum(p.numel() for p in model.head.parameters()) for name, (model, _) in models.items()}
    print(
        f"EmotNet ({args.encoder} streams, context {args.context_size}, body {args.subject_size}) training step, batch "
        f"{args.batch_size}, on {device}{' bf16 autocast' if args.amp else ''}, {torch.get_num_threads()} threads; "
        f"CCIM N={args.num_prototypes}, d={args.confounder_dim}; {args.warmup} warm-up, {args.repeats} interleaved "
        f"rounds; load average {load_before:.1f} before, {load_after:.1f} after"
    )
    print()
    print("| head | median step s | min s | max s | head parameters |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        print(
            f"| {name} | {statistics.median(values):.4f} | {min(values):.4f} | {max(values):.4f} "
            f"| {head_parameters[name]:,} |"
        )
    print()
    print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"median step time ratio CCIM / baseline: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
