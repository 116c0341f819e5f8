"""Does CCIM remove the scene shortcut? Accuracy on biased and unbiased test sets of the synthetic data, per setting.

Trains the demo model (``configs/synthetic.yaml``: ``TwoStreamHost`` with two ``small_cnn`` streams, ``d_h = 128``,
N = 32 prototypes of 256-dim ``test_efficientnet`` scene features, 4 epochs of AdamW) on ``SyntheticContextDataModule``
and tests the final-epoch weights on the biased test set (same scene-emotion correlation as training) and on the
unbiased one (scene and emotion independent). The gap between the two measures how much a model relies on the scene.

Settings (``--list`` prints them):
    * ``baseline``: the same host and head with ``attention="none"`` (no intervention);
    * ``ccim_dot`` (the paper's default) and ``ccim_additive``;
    * the paper's ablations: ``random_dictionary`` (random Z, uniform prior), ``without_lambda`` (uniform attention),
      ``without_prior`` (no P(z)), ``without_masking`` (dictionary from images with the subject left in);
    * a dictionary-size sweep ``ccim_dot_N<k>`` (N = 32 is ``ccim_dot``);
    * a bias-strength sweep ``baseline_bias<b>`` / ``ccim_dot_bias<b>`` (the default bias is ``baseline``/``ccim_dot``).

Method:
    * Seed ``s`` sets everything of one run: the data (``SyntheticContextDataModule(seed=s)``), the weight
      initialisation and batch order (``seed_everything(s)``), and the k-means (or random-dictionary) seed.
    * Each data setting (seed, bias) is rendered once into memory and shared by all its runs (samples are a pure
      function of seed, split and index, so this is the same data the datamodule renders on the fly); training flips
      are drawn per sample as in the datamodule.
    * The confounder dictionary depends only on (seed, bias, N, masking, extractor): scene features are extracted once
      per (seed, bias, masking), clustered once per N, and written to ``<out>/cache/`` (git-ignored), where
      ``ConfounderDictionaryCallback(cache=...)`` picks them up (it rebuilds a file whose metadata does not match).
    * CPU, ``--threads`` torch threads (1 by default: on a busy 2-core machine more threads are slower), no
      checkpoints, no logger.
    * Each run appends one JSON line (full configuration, seed, numbers, the command that reproduces it) to
      ``<out>/debias_runs.jsonl``; the table and the plot are then rebuilt from all lines of the current
      configuration, so ``--resume`` continues an interrupted run and ``--only`` reruns single rows.

Example:
    python benchmarks/debias.py                       # full: 3 seeds, all settings (budget: 45 min on 2 idle cores)
    python benchmarks/debias.py --quick               # 1 seed: baseline, ccim_dot, random_dictionary (< 5 min)
    python benchmarks/debias.py --only ccim_dot --seeds 1 --out /tmp/debias   # one row, one seed
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset

from ccim_lightning import CCIMLightningModule
from ccim_lightning.callbacks import ConfounderDictionaryCallback
from ccim_lightning.datamodules import SyntheticContextDataModule
from ccim_lightning.datamodules.synthetic import SyntheticContextDataset
from ccim_lightning.dictionary.features import ContextFeatureExtractor
from ccim_lightning.dictionary.recipe import (
    cluster_dictionary,
    dictionary_loader,
    expected_cache_key,
    extract_context_features,
    fingerprint_of,
)
from ccim_lightning.dictionary.store import ConfounderDictionary, DictionaryFileError
from ccim_lightning.hosts import TwoStreamHost

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_BIAS = 0.9
DEFAULT_N = 32
SIZE_SWEEP = (8, 16, 64)
BIAS_SWEEP = (0.5, 0.7, 0.97)
QUICK_SETTINGS = ("baseline", "ccim_dot", "random_dictionary")
EXTRACTOR = "test_efficientnet"
CONFOUNDER_DIM = 256
KMEANS_ITERATIONS = 25


@dataclass(frozen=True)
class Setting:
    """One row of the table: a model and dictionary configuration, trained once per seed.

    Attributes:
        name: Row name (``--only`` takes it).
        description: What differs from ``ccim_dot``.
        group: ``"main"`` (default bias and N), ``"size"`` (dictionary-size sweep) or ``"bias"`` (bias sweep).
        attention: ``"dot_product"``, ``"additive"`` or ``"none"``.
        num_prototypes: N.
        bias: The data's scene-emotion bias.
        use_prior: Multiply by P(z).
        uniform_attention: Uniform lambda.
        source: Dictionary source, ``"features"`` or ``"random"``.
        mask_subject: Mask the subject out of the images the dictionary is built from.
    """

    name: str
    description: str
    group: str = "main"
    attention: str = "dot_product"
    num_prototypes: int = DEFAULT_N
    bias: float = DEFAULT_BIAS
    use_prior: bool = True
    uniform_attention: bool = False
    source: str = "features"
    mask_subject: bool = True

    @property
    def uses_dictionary(self) -> bool:
        """Whether the head needs a confounder dictionary."""
        return self.attention != "none"


def all_settings() -> list[Setting]:
    """Every setting of the full benchmark, in table order."""
    settings = [
        Setting("baseline", "host + head, attention none (no intervention)", attention="none"),
        Setting("ccim_dot", "CCIM, dot-product attention (paper default)"),
        Setting("ccim_additive", "CCIM, additive attention", attention="additive"),
        Setting("random_dictionary", "ablation: random Z, uniform prior", source="random"),
        Setting("without_lambda", "ablation: uniform attention weights", uniform_attention=True),
        Setting("without_prior", "ablation: no P(z)", use_prior=False),
        Setting("without_masking", "ablation: dictionary from unmasked images", mask_subject=False),
    ]
    settings += [
        Setting(f"ccim_dot_N{n}", f"CCIM dot product, N = {n}", group="size", num_prototypes=n) for n in SIZE_SWEEP
    ]
    for bias in BIAS_SWEEP:
        settings += [
            Setting(f"baseline_bias{bias:g}", f"baseline, bias {bias:g}", group="bias", attention="none", bias=bias),
            Setting(f"ccim_dot_bias{bias:g}", f"CCIM dot product, bias {bias:g}", group="bias", bias=bias),
        ]
    return settings


@dataclass
class RunConfig:
    """What is shared by all runs of one invocation (the data sizes and the training budget)."""

    train_size: int = 4000
    val_size: int = 800
    test_size: int = 1000
    batch_size: int = 64
    epochs: int = 4
    threads: int = 1
    feature_dim: int = 128
    extractor: str = EXTRACTOR

    def data_kwargs(self, seed: int, bias: float) -> dict:
        """Keyword arguments of ``SyntheticContextDataModule`` for one data setting."""
        return {
            "seed": seed,
            "bias": bias,
            "train_size": self.train_size,
            "val_size": self.val_size,
            "test_size": self.test_size,
            "batch_size": self.batch_size,
            "num_workers": 0,
        }


# --- data --------------------------------------------------------------------------------------------------------


class RenderedSplit(Dataset):
    """A split of ``SyntheticContextDataset`` rendered once into memory, with the datamodule's random flips.

    Args:
        source: The split to render (``flip=False``; its samples are stacked here).
        flip: Flip each sample horizontally with probability 1/2 (subject, context and box together), drawn from the
            torch RNG as ``SyntheticContextDataset`` does.
    """

    def __init__(self, source: Dataset, flip: bool = False) -> None:
        samples = [source[i] for i in range(len(source))]
        self.tensors = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        self.flip = flip
        self.image_size = int(self.tensors["context"].shape[-1])

    def __len__(self) -> int:
        return int(self.tensors["index"].shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {key: value[index] for key, value in self.tensors.items()}
        if self.flip and torch.rand(()) < 0.5:
            sample["context"] = sample["context"].flip(-1)
            sample["subject"] = sample["subject"].flip(-1)
            x1, y1, x2, y2 = sample["box"].tolist()
            sample["box"] = torch.tensor([self.image_size - x2, y1, self.image_size - x1, y2], dtype=torch.float32)
        return sample


class RenderedDataModule(SyntheticContextDataModule):
    """``SyntheticContextDataModule`` whose train/val/test splits come pre-rendered (``RenderedSplit``).

    ``dictionary_dataset`` is inherited: the dictionary is built from the datamodule's own (unflipped) train split.

    Args:
        splits: ``{"train", "val", "test", "test_unbiased"}`` -> ``RenderedSplit`` of the same settings.
        **kwargs: ``SyntheticContextDataModule`` arguments the splits were rendered with.
    """

    def __init__(self, splits: dict[str, RenderedSplit], **kwargs) -> None:
        super().__init__(**kwargs)
        self._splits = splits

    def setup(self, stage: str | None = None) -> None:
        self.train_dataset = self._splits["train"]
        self.val_dataset = self._splits["val"]
        self.test_dataset = self._splits["test"]
        self.test_unbiased_dataset = self._splits["test_unbiased"]


class DataCache:
    """Rendered splits and scene features of the current data setting (one at a time, to bound memory)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.splits: dict[str, RenderedSplit] = {}
        self.features: dict[bool, object] = {}

    def datamodule(self, config: RunConfig, seed: int, bias: float) -> RenderedDataModule:
        """A datamodule over the rendered splits of (seed, bias), rendering them on first use."""
        kwargs = config.data_kwargs(seed, bias)
        key = tuple(sorted(kwargs.items()))
        if key != self.key:
            self.key, self.features = key, {}
            self.splits = {}
            plain = SyntheticContextDataModule(**kwargs)
            plain.setup()
            start = time.perf_counter()
            self.splits = {
                "train": RenderedSplit(plain.dictionary_dataset(mask_subject=True), flip=plain.hparams.flip),
                "val": RenderedSplit(plain.val_dataset),
                "test": RenderedSplit(plain.test_dataset),
                "test_unbiased": RenderedSplit(plain.test_unbiased_dataset),
            }
            print(f"  rendered data seed={seed} bias={bias:g} in {time.perf_counter() - start:.0f} s", flush=True)
        return RenderedDataModule(self.splits, **kwargs)


def generator_settings() -> str:
    """The synthetic generator's version and default settings but seed and bias (from its sample identities).

    Stored with every run: the table only pools runs of the same generator, and ``--resume`` reruns the others.
    """
    identity = SyntheticContextDataset("train", 1).sample_identities()[0].rsplit(":", 2)[0]
    return re.sub(r"seed=[^,]*,bias=[^,]*,", "", identity)


# --- dictionary --------------------------------------------------------------------------------------------------


def cache_path(out: Path, config: RunConfig, setting: Setting, seed: int) -> Path:
    """The dictionary file of (data, N, masking, extractor, k-means seed) under ``<out>/cache/``."""
    name = (
        f"dict_{config.extractor}_seed{seed}_bias{setting.bias:g}_train{config.train_size}_N{setting.num_prototypes}"
        f"_{'masked' if setting.mask_subject else 'unmasked'}.pt"
    )
    return out / "cache" / name


def ensure_dictionary(
    path: Path, datamodule: RenderedDataModule, cache: DataCache, config: RunConfig, setting: Setting, seed: int
) -> dict:
    """Writes the clustered dictionary of this run to ``path`` unless a matching one is there; returns its stats.

    Scene features are extracted once per data setting and masking (kept in ``cache``) and clustered per N.
    """
    dataset = datamodule.dictionary_dataset(mask_subject=setting.mask_subject)
    extractor = ContextFeatureExtractor(config.extractor)
    fingerprint = fingerprint_of(dataset)
    wanted = expected_cache_key(
        extractor=extractor,
        num_prototypes=setting.num_prototypes,
        mask_subject=setting.mask_subject,
        seed=seed,
        source="features",
        fingerprint=fingerprint,
    )
    if path.exists():
        try:
            existing = ConfounderDictionary.load(path)
            if not existing.mismatches(wanted):
                return _dictionary_stats(existing)
        except DictionaryFileError:
            pass
    features = cache.features.get(setting.mask_subject)
    if features is None:
        start = time.perf_counter()
        loader = dictionary_loader(dataset, batch_size=config.batch_size, num_workers=0, world_size=1, rank=0)
        with torch.inference_mode():
            features = extract_context_features(extractor, loader, torch.device("cpu"), progress=False)
        cache.features[setting.mask_subject] = features
        print(
            f"  scene features ({'masked' if setting.mask_subject else 'unmasked'}) in "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    dictionary = cluster_dictionary(
        features,
        setting.num_prototypes,
        extractor_name=wanted["extractor"],
        weights_digest=wanted["weights_digest"],
        mask_subject=setting.mask_subject,
        seed=seed,
        fingerprint=fingerprint,
        num_iterations=KMEANS_ITERATIONS,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    dictionary.save(path)
    return _dictionary_stats(dictionary)


def _dictionary_stats(dictionary: ConfounderDictionary) -> dict:
    return {key: dictionary.extra[key] for key in ("scene_purity", "scene_nmi") if key in dictionary.extra}


# --- one run -----------------------------------------------------------------------------------------------------


def reproduce_command(args: argparse.Namespace, setting: str, seed: int) -> str:
    """The command line that reruns one setting with one seed under the same configuration."""
    parts = ["python", "benchmarks/debias.py", "--only", setting, "--seeds", str(seed)]
    defaults = parse_args([])
    for option in ("train_size", "val_size", "test_size", "batch_size", "epochs", "threads"):
        if getattr(args, option) != getattr(defaults, option):
            parts += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return shlex.join(parts)


def run_one(
    setting: Setting, seed: int, config: RunConfig, cache: DataCache, out: Path, args: argparse.Namespace
) -> dict:
    """Trains and tests one setting with one seed; returns its JSON record."""
    start = time.perf_counter()
    datamodule = cache.datamodule(config, seed, setting.bias)
    callback_kwargs = {}
    dictionary_stats: dict = {}
    if setting.uses_dictionary:
        callback_kwargs = {
            "extractor": config.extractor,
            "source": setting.source,
            "mask_subject": setting.mask_subject,
            "seed": seed,
            "num_iterations": KMEANS_ITERATIONS,
            "progress": False,
        }
        if setting.source == "features":
            path = cache_path(out, config, setting, seed)
            dictionary_stats = ensure_dictionary(path, datamodule, cache, config, setting, seed)
            callback_kwargs["cache"] = str(path)
    model_kwargs = {
        "num_classes": datamodule.num_classes,
        "num_prototypes": setting.num_prototypes,
        "confounder_dim": CONFOUNDER_DIM,
        "attention": setting.attention,
        "use_prior": setting.use_prior,
        "uniform_attention": setting.uniform_attention,
    }
    L.seed_everything(seed, verbose=False)
    model = CCIMLightningModule(
        TwoStreamHost("small_cnn", "small_cnn", feature_dim=config.feature_dim),
        class_names=datamodule.class_names,
        **model_kwargs,
    )
    callbacks = [ConfounderDictionaryCallback(**callback_kwargs)] if setting.uses_dictionary else []
    with tempfile.TemporaryDirectory(prefix="ccim-debias-") as root:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=config.epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
            callbacks=callbacks,
        )
        trainer.fit(model, datamodule=datamodule)
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        results = trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for result in results for k, v in result.items() if "/acc" in k or "macro_acc" in k}
    metrics.update(val)
    biased, unbiased = metrics["test_biased/acc"], metrics["test_unbiased/acc"]
    return {
        "setting": setting.name,
        "seed": seed,
        "biased_acc": biased,
        "unbiased_acc": unbiased,
        "gap": biased - unbiased,
        "metrics": metrics,
        "dictionary_stats": dictionary_stats,
        "config": {
            "setting": asdict(setting),
            "data": {
                **config.data_kwargs(seed, setting.bias),
                "class": "SyntheticContextDataModule",
                "generator": generator_settings(),
            },
            "model": {
                **model_kwargs,
                "host": f"TwoStreamHost(small_cnn, small_cnn, feature_dim={config.feature_dim})",
                "optimizer": "AdamW (torch defaults)",
            },
            "dictionary_callback": callback_kwargs or None,
            "trainer": {
                "max_epochs": config.epochs,
                "accelerator": "cpu",
                "threads": config.threads,
                "weights_tested": "final epoch",
            },
        },
        "seconds": round(time.perf_counter() - start, 1),
        "reproduce": reproduce_command(args, setting.name, seed),
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
    }


# --- summary -----------------------------------------------------------------------------------------------------


def _mean_std(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def summarise(records: list[dict], settings: list[Setting]) -> dict[str, dict]:
    """Per setting: the seeds, and the biased, unbiased, gap and paired (vs the same-bias baseline) values."""
    by_setting: dict[str, dict[int, dict]] = {}
    for record in records:
        by_setting.setdefault(record["setting"], {})[record["seed"]] = record  # the latest run of a seed wins
    baseline_of = {DEFAULT_BIAS: "baseline", **{b: f"baseline_bias{b:g}" for b in BIAS_SWEEP}}
    summary = {}
    for setting in settings:
        runs = by_setting.get(setting.name, {})
        if not runs:
            continue
        seeds = sorted(runs)
        base = by_setting.get(baseline_of.get(setting.bias, ""), {})
        summary[setting.name] = {
            "setting": setting,
            "seeds": seeds,
            "biased": [runs[s]["biased_acc"] for s in seeds],
            "unbiased": [runs[s]["unbiased_acc"] for s in seeds],
            "gap": [runs[s]["gap"] for s in seeds],
            "delta": [runs[s]["unbiased_acc"] - base[s]["unbiased_acc"] for s in seeds if s in base],
        }
    return summary


def markdown_table(summary: dict[str, dict], groups: tuple[str, ...], also: tuple[str, ...] = ()) -> str:
    """Rows of the summary whose setting is in ``groups`` (or named in ``also``), as markdown (accuracies in %)."""
    lines = [
        "| setting | what | N | bias | seeds | biased acc | unbiased acc | gap | Δ unbiased vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        setting: Setting = row["setting"]
        if setting.group not in groups and name not in also:
            continue
        n = str(setting.num_prototypes) if setting.uses_dictionary else "-"
        delta = "-" if setting.attention == "none" else _mean_std(row["delta"])
        lines.append(
            f"| {name} | {setting.description} | {n} | {setting.bias:g} | {len(row['seeds'])} | "
            f"{_mean_std(row['biased'])} | {_mean_std(row['unbiased'])} | {_mean_std(row['gap'])} | {delta} |"
        )
    return "\n".join(lines)


def plot_bias_sweep(summary: dict[str, dict], path: Path) -> bool:
    """Unbiased (solid) and biased (dashed) accuracy of baseline and CCIM against the bias; False if < 2 points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for label, default_name, prefix in (
        ("baseline", "baseline", "baseline_bias"),
        ("CCIM (dot)", "ccim_dot", "ccim_dot_bias"),
    ):
        points = []
        for name, row in summary.items():
            if name == default_name or name.startswith(prefix):
                points.append((row["setting"].bias, row["unbiased"], row["biased"]))
        curves[label] = sorted(points)
    if max(len(points) for points in curves.values()) < 2:
        return False
    figure, axis = plt.subplots(figsize=(6, 4))
    for (label, points), colour in zip(curves.items(), ("#c44e52", "#4c72b0")):
        if not points:
            continue
        biases = [p[0] for p in points]
        for index, style, kind in ((1, "-o", "unbiased"), (2, "--", "biased")):
            means = [100 * statistics.fmean(p[index]) for p in points]
            stds = [100 * statistics.stdev(p[index]) if len(p[index]) > 1 else 0.0 for p in points]
            axis.errorbar(
                biases,
                means,
                yerr=stds,
                fmt=style,
                color=colour,
                capsize=3,
                label=f"{label}, {kind} test",
                alpha=1.0 if kind == "unbiased" else 0.5,
            )
    axis.set_xlabel("bias: probability that a training sample's emotion is set to its scene's dominant one")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title("Synthetic context bias: accuracy vs bias strength (mean ± std over seeds)")
    axis.title.set_fontsize(9)
    axis.xaxis.label.set_fontsize(8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(records: list[dict], settings: list[Setting], out: Path, command: str) -> str:
    """Writes ``debias.md`` (and the bias-sweep PNG when there are >= 2 bias values); returns the markdown."""
    summary = summarise(records, settings)
    parts = [
        "# Context-bias benchmark (synthetic data)",
        "",
        "Top-1 accuracy (%) of the final-epoch weights on the biased test set (training distribution) and the "
        "unbiased one (scene and emotion independent), mean ± sample std over seeds; "
        "gap = biased − unbiased; Δ = unbiased accuracy minus the same-bias baseline's, paired by seed. "
        "The table holds the stored runs (the latest of each setting and seed) of the seeds and the data size and "
        f"epoch budget of `{command}`, which wrote it. Per-run configurations and the command that reproduces each "
        f"run alone: `debias_runs.jsonl`. Data generator: `{generator_settings()}`.",
        "",
        "## Baseline, CCIM and the paper's ablations (bias 0.9, N = 32)",
        "",
        markdown_table(summary, ("main",)),
    ]
    if any(row["setting"].group == "size" for row in summary.values()):
        parts += ["", "## Dictionary size (bias 0.9)", "", markdown_table(summary, ("size",), also=("ccim_dot",))]
    if any(row["setting"].group == "bias" for row in summary.values()):
        parts += ["", "## Bias strength", "", markdown_table(summary, ("bias",), also=("baseline", "ccim_dot"))]
        if plot_bias_sweep(summary, out / "debias_bias_sweep.png"):
            parts += ["", "![accuracy vs bias](debias_bias_sweep.png)"]
    base = summary.get("baseline")
    if base:
        gap = statistics.fmean(base["gap"]) * 100
        verdict = "confounded as required (>= 10 points)" if gap >= 10 else "NOT confounded enough (< 10 points)"
        parts += ["", f"Check: the baseline's biased-unbiased gap at bias 0.9 is {gap:.1f} points: {verdict}."]
    text = "\n".join(parts) + "\n"
    (out / "debias.md").write_text(text)
    return text


# --- command line ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"one seed, settings {', '.join(QUICK_SETTINGS)}")
    parser.add_argument("--only", nargs="+", metavar="SETTING", help="run only these settings (see --list)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds to run (default: 0 1 2; --quick: 0)")
    parser.add_argument("--train-size", type=int, default=4000, help="training samples")
    parser.add_argument("--val-size", type=int, default=800, help="validation samples")
    parser.add_argument("--test-size", type=int, default=1000, help="samples in each test set")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the JSON lines with this config")
    parser.add_argument("--list", action="store_true", help="print the settings and exit")
    return parser.parse_args(argv)


def _comparable(record: dict) -> tuple:
    """What must match for a stored run to count as this configuration's run (everything but the seed)."""
    config = record["config"]
    data = {k: v for k, v in config["data"].items() if k not in ("seed", "class", "generator_note")}
    return json.dumps([config["setting"], data, config["trainer"]["max_epochs"]], sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = all_settings()
    names = [s.name for s in settings]
    if args.list:
        for setting in settings:
            print(f"{setting.name:22s} {setting.description}")
        return 0
    wanted = args.only or (list(QUICK_SETTINGS) if args.quick else names)
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise SystemExit(f"Unknown setting(s) {unknown}; choose from: {', '.join(names)}")
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    chosen = [s for s in settings if s.name in wanted]
    config = RunConfig(args.train_size, args.val_size, args.test_size, args.batch_size, args.epochs, args.threads)
    torch.set_num_threads(args.threads)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "ccim_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*random weights.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "debias_runs.jsonl"
    records = (
        [json.loads(line) for line in runs_path.read_text().splitlines() if line.strip()] if runs_path.exists() else []
    )
    # Order: by seed, then by bias (so each data setting is rendered once), then table order.
    plan = sorted(
        ((seed, s) for seed in seeds for s in chosen), key=lambda p: (p[0], p[1].bias != DEFAULT_BIAS, p[1].bias)
    )
    cache = DataCache()
    print(f"debias: {len(plan)} runs ({len(chosen)} settings x seeds {seeds}), results in {out}", flush=True)
    total_start = time.perf_counter()
    for position, (seed, setting) in enumerate(plan, 1):
        if args.resume:
            probe = {
                "config": {
                    "setting": asdict(setting),
                    "data": {**config.data_kwargs(seed, setting.bias), "generator": generator_settings()},
                    "trainer": {"max_epochs": config.epochs},
                }
            }
            if any(
                r["setting"] == setting.name and r["seed"] == seed and _comparable(r) == _comparable(probe)
                for r in records
            ):
                print(f"[{position}/{len(plan)}] {setting.name} seed={seed}: already done, skipped", flush=True)
                continue
        record = run_one(setting, seed, config, cache, out, args)
        records.append(record)
        with runs_path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        print(
            f"[{position}/{len(plan)}] {setting.name} seed={seed}: biased {record['biased_acc']:.3f} unbiased "
            f"{record['unbiased_acc']:.3f} gap {record['gap']:+.3f} ({record['seconds']:.0f} s, total "
            f"{(time.perf_counter() - total_start) / 60:.1f} min)",
            flush=True,
        )
    # The report covers the stored runs of this configuration (sizes, epochs) and of the requested seeds, whichever
    # invocation ran them, so --only/--resume add up while every row averages over the same seeds.
    reference = {
        "train_size": args.train_size,
        "val_size": args.val_size,
        "test_size": args.test_size,
        "batch_size": args.batch_size,
    }
    current = [
        r
        for r in records
        if r["seed"] in seeds
        and r["config"]["data"].get("generator") == generator_settings()
        and r["config"]["trainer"]["max_epochs"] == args.epochs
        and all(r["config"]["data"][k] == v for k, v in reference.items())
    ]
    command = "python benchmarks/debias.py" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    print(write_report(current, settings, out, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
