"""Which method takes the scene shortcut out? Biased and unbiased accuracy on the synthetic data, per setting.

Trains the demo model (``configs/synthetic.yaml``: ``TwoStreamHost`` with two ``small_cnn`` streams, ``d_h = 128``,
N = 32 prototypes of 256-dim ``test_efficientnet`` scene features, 4 epochs of AdamW) on
``SyntheticContextDataModule`` and tests the final-epoch weights on a biased test set (the training distribution)
and an unbiased one (scene and emotion independent), 5,000 samples each.

``--ccim-checkpoint`` adds the row ``ccim_fit`` for the seed the checkpoint was trained with: a ``ccim fit --config
configs/synthetic.yaml`` checkpoint, checked to be trained as ``ccim_dot`` is (its hyper-parameters and its run's
``config.yaml``) and tested on the same test sets, not trained again (``debias_checkpoint.py``); with ``--quick`` it
takes ``ccim_dot``'s place, which is how ``make demo`` reuses its own fit.

Rows (``--list`` prints them): the baseline (``attention="none"``); CCIM with dot-product and additive attention;
the paper's four ablations (random Z, without lambda = uniform attention, without P(z), dictionary from unmasked
images); each method of ``ccim_lightning.debias`` on the baseline head and on CCIM; the **oracle** (the baseline
trained on bias-0 data, tested on the same two test sets); a bias sweep of the baseline, CCIM and the best method.
The per-method hyper-parameters are in ``METHODS`` (and in each row's description).

Method:
    * Seed ``s`` sets everything of a run: the data (``SyntheticContextDataModule(seed=s)``), the initialisation and
      batch order (``seed_everything(s)``) and the k-means seed. Runs of one seed share their test samples, so every
      comparison is paired by seed and by test sample.
    * Each split is rendered once into memory per process (``RenderedSplit``: the datamodule's samples, its random
      flips for training).
    * The confounder dictionary of (seed, training bias, N, masking) is built once by ``DictionaryRecipe`` before
      the run that first needs it and written to ``<out>/cache/``; the runs' ``ConfounderDictionaryCallback`` reads
      it from there (``cache=``), so a built and a cached dictionary give the same training.
    * CPU, 1 torch thread per run (``--jobs`` deals the runs out to parallel processes), no validation loop, no
      checkpoints, no logger; accuracy is counted per test sample from ``model(batch)`` (which applies a debiasing
      method's inference rule, e.g. CLEF's TIE).
    * Each run appends one JSON line to ``<out>/debias_runs.jsonl``: configuration, seed, ``biased_acc``,
      ``unbiased_acc``, the per-sample correctness (for the bootstrap), the command that reproduces it. The report
      (``debias_report.py``: table with paired-bootstrap 95% intervals, plots) is rebuilt from those lines.

Example:
    python benchmarks/debias.py --out /tmp/debias --resume --jobs 2   # full run
    python benchmarks/debias.py --quick                              # 1 seed, 4 rows, in a scratch folder
    python benchmarks/debias.py --quick --test-size 1000 --ccim-checkpoint runs/synthetic/.../last.ckpt   # make demo
    python benchmarks/debias.py --report-only                        # rebuild debias.md and plots from the JSON lines
    python benchmarks/debias.py --only reweight --seeds 1 --out /tmp/debias   # one row, one seed
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import logging
import shlex
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import debias_report  # noqa: E402  (the report half, next to this file)
from debias_checkpoint import (  # noqa: E402
    checkpoint_mismatches,
    expected_data,
    expected_model,
    expected_run,
    file_digest,
    read_run_config,
    training_steps,
)
from debias_data import DataCache, RenderedDataModule, RenderedSplit, RunConfig, generator_settings  # noqa: E402, F401

from ccim_lightning import CCIMLightningModule  # noqa: E402
from ccim_lightning import debias as methods  # noqa: E402
from ccim_lightning.callbacks import ConfounderDictionaryCallback  # noqa: E402
from ccim_lightning.checkpoints import load_checkpoint  # noqa: E402
from ccim_lightning.dictionary.collectives import Collectives  # noqa: E402
from ccim_lightning.dictionary.recipe import DictionaryRecipe  # noqa: E402
from ccim_lightning.hosts import TwoStreamHost  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_BIAS = 0.9
DEFAULT_N = 32
BIAS_SWEEP = (0.7, 0.97)
EXTRACTOR = "test_efficientnet"
CONFOUNDER_DIM = 256
KMEANS_ITERATIONS = 25
DEFAULT_SEEDS = (0, 1, 2, 3, 4)

#: Per-method hyper-parameters used by the benchmark (row name prefix -> class name and keyword arguments).
METHODS: dict[str, tuple[str, dict]] = {
    "reweight": ("ClusterReweighting", {"smoothing": 1.0, "max_weight": 10.0}),
    "group_dro": ("GroupDRO", {"eta": 0.01}),
    "poe": ("ProductOfExperts", {"smoothing": 1.0}),
    "clef": ("CLEF", {"encoder": "small_cnn"}),
}
#: The method carried into the bias sweep and ``--quick`` (the best at bias 0.9 in the full run).
BEST = "clef"
#: The row of ``--ccim-checkpoint`` (group ``"checkpoint"``: only run when a checkpoint is given).
CHECKPOINT_ROW = "ccim_fit"
#: Relative cost of a run when dealing runs out to workers (CLEF trains a second encoder: 50 s vs 30 s per run on
#: the idle machine; testing a checkpoint is a few seconds).
RUN_COST = {"CLEF": 1.6, "checkpoint": 0.1}


@dataclass(frozen=True)
class Setting:
    """One row of the table, trained once per seed.

    Attributes:
        name: Row name (``--only`` takes it).
        description: What it is, with its hyper-parameters.
        group: ``"main"`` (CCIM and the ablations), ``"method"`` (debiasing methods), ``"oracle"``, ``"sweep"`` or
            ``"tuning"`` (investigations, run only when named with ``--only``).
        attention: ``"dot_product"``, ``"additive"`` or ``"none"``.
        bias: The bias of the training data and of the biased test set.
        train_bias: Bias of the training data when it differs (the oracle: 0); the test sets stay at ``bias``.
        num_prototypes: N.
        use_prior: Multiply by P(z).
        uniform_attention: Uniform lambda.
        source: Dictionary source, ``"features"`` or ``"random"``.
        mask_subject: Mask the subject out of the images the dictionary is built from.
        debias: Class name in ``ccim_lightning.debias``, or None.
        debias_args: Its keyword arguments.
        sampler: Draw training samples with ``ClusterReweighting(**debias_args).sample_weights`` through a
            ``WeightedRandomSampler`` (the method's documented resampling variant) instead of passing ``debias`` to
            the model.
        lr: AdamW learning rate (None: torch's default 1e-3).
        epochs: Training epochs (None: ``--epochs``).
    """

    name: str
    description: str
    group: str = "main"
    attention: str = "dot_product"
    bias: float = DEFAULT_BIAS
    train_bias: float | None = None
    num_prototypes: int = DEFAULT_N
    use_prior: bool = True
    uniform_attention: bool = False
    source: str = "features"
    mask_subject: bool = True
    debias: str | None = None
    debias_args: dict = field(default_factory=dict, hash=False)
    sampler: bool = False
    lr: float | None = None
    epochs: int | None = None

    @property
    def data_bias(self) -> float:
        """The bias of the training split."""
        return self.bias if self.train_bias is None else self.train_bias

    @property
    def needs_dictionary(self) -> bool:
        """Whether the head or the method reads the confounder dictionary."""
        method_needs = self.debias is not None and getattr(methods, self.debias).needs_clusters
        return self.attention != "none" or method_needs or self.sampler


def _args_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def method_settings(prefix: str, bias: float = DEFAULT_BIAS, group: str = "method", suffix: str = "") -> list[Setting]:
    """A method of ``METHODS`` on the baseline head (``<prefix>``) and on CCIM (``<prefix>_ccim``)."""
    cls, kwargs = METHODS[prefix]
    what = f"{cls}({_args_text(kwargs)})" + (f", bias {bias:g}" if suffix else "")
    return [
        Setting(f"{prefix}{suffix}", f"{what}, baseline head", group, "none", bias, debias=cls, debias_args=kwargs),
        Setting(f"{prefix}_ccim{suffix}", f"{what} + CCIM dot", group, bias=bias, debias=cls, debias_args=kwargs),
    ]


def all_settings() -> list[Setting]:
    """Every row, in table order."""
    settings = [
        Setting("baseline", "host + head, attention none (no intervention)", attention="none"),
        Setting("ccim_dot", "CCIM, dot-product attention (paper default)"),
        Setting(
            CHECKPOINT_ROW,
            "ccim_dot's model from `ccim fit` (--ccim-checkpoint; validated each epoch, own "
            "dictionary; tested here, not retrained)",
            "checkpoint",
        ),  # fmt: skip
        Setting("ccim_additive", "CCIM, additive attention", attention="additive"),
        Setting("random_dictionary", "ablation: random Z, uniform prior", source="random"),
        Setting("without_lambda", "ablation: uniform attention (without lambda)", uniform_attention=True),
        Setting("without_prior", "ablation: without P(z)", use_prior=False),
        Setting("without_masking", "ablation: dictionary from unmasked images", mask_subject=False),
    ]
    for prefix in METHODS:
        settings += method_settings(prefix)
    settings.append(Setting("oracle", "baseline trained on bias-0 data", "oracle", "none", train_bias=0.0))
    for bias in BIAS_SWEEP:
        settings += [
            Setting(f"baseline_bias{bias:g}", f"baseline, bias {bias:g}", "sweep", "none", bias),
            Setting(f"ccim_dot_bias{bias:g}", f"CCIM dot, bias {bias:g}", "sweep", bias=bias),
            method_settings(BEST, bias, "sweep", f"_bias{bias:g}")[0],
        ]
    settings += tuning_settings()
    return settings


#: Variants tried while tuning: name -> (method key of ``METHODS``, keyword overrides, epochs, learning rate).
TUNING: dict[str, tuple[str, dict, int | None, float | None]] = {
    "reweight_sampler": ("reweight", {}, None, None),
    "reweight_sampler_epochs8": ("reweight", {}, 8, None),
    "reweight_max3": ("reweight", {"max_weight": 3.0}, None, None),
    "reweight_max30": ("reweight", {"max_weight": 30.0}, None, None),
    "reweight_smooth0": ("reweight", {"smoothing": 0.0}, None, None),
    "reweight_epochs8": ("reweight", {}, 8, None),
    "reweight_epochs12": ("reweight", {}, 12, None),
    "reweight_lr3e-3": ("reweight", {}, None, 3e-3),
    "reweight_lr3e-4_epochs8": ("reweight", {}, 8, 3e-4),
    "poe_epochs8": ("poe", {}, 8, None),
    "group_dro_eta0.1": ("group_dro", {"eta": 0.1, "normalize": True}, None, None),
    "group_dro_eta1": ("group_dro", {"eta": 1.0, "normalize": True}, None, None),
    "oracle_epochs8": ("oracle", {}, 8, None),
}


def tuning_settings() -> list[Setting]:
    """The ``TUNING`` variants (baseline head, bias 0.9; run only when named with ``--only``)."""
    rows = []
    for name, (key, overrides, epochs, lr) in TUNING.items():
        extra = "".join(f", {label}" for label, v in ((f"{epochs} epochs", epochs), (f"lr {lr}", lr)) if v)
        if key == "oracle":
            rows.append(Setting(name, f"oracle{extra}", "tuning", "none", train_bias=0.0, epochs=epochs, lr=lr))
            continue
        cls, kwargs = METHODS[key]
        kwargs = {**kwargs, **overrides}
        what = f"{cls}({_args_text(kwargs)}){extra}"
        if "sampler" in name:
            what = f"{cls}({_args_text(kwargs)}) weights in a WeightedRandomSampler{extra}"
            rows.append(Setting(name, what, "tuning", "none", debias_args=kwargs, sampler=True, epochs=epochs, lr=lr))
            continue
        rows.append(Setting(name, what, "tuning", "none", debias=cls, debias_args=kwargs, epochs=epochs, lr=lr))
    return rows


def quick_names(checkpoint: bool = False) -> list[str]:
    """``--quick``: baseline, CCIM (``ccim_fit`` when a checkpoint is given), the best method, the oracle."""
    return ["baseline", CHECKPOINT_ROW if checkpoint else "ccim_dot", BEST, "oracle"]


def run_cost(setting: Setting) -> float:
    """The expected duration of a run of ``setting``, relative to a plain one (see ``RUN_COST``)."""
    if setting.group == "checkpoint":
        return RUN_COST["checkpoint"]
    return RUN_COST.get(setting.debias or "", 1.0)


def deal(plan: list[tuple[int, str]], jobs: int, settings: dict[str, Setting]) -> list[list[tuple[int, str]]]:
    """Splits the plan over ``jobs`` workers: each run goes to the least loaded so far, plan order kept inside."""
    shares: list[list[tuple[int, str]]] = [[] for _ in range(jobs)]
    loads = [0.0] * jobs
    for seed, name in plan:
        worker = loads.index(min(loads))
        shares[worker].append((seed, name))
        loads[worker] += run_cost(settings[name])
    return shares


# --- one run -----------------------------------------------------------------------------------------------------


def dictionary_recipe(out: Path, config: RunConfig, setting: Setting, seed: int) -> DictionaryRecipe:
    """The recipe of this run's dictionary; its cache file is named by (seed, training bias, N, masking)."""
    name = (
        f"dict_{EXTRACTOR}_seed{seed}_bias{setting.data_bias:g}_train{config.train_size}_N{setting.num_prototypes}"
        f"_{'masked' if setting.mask_subject else 'unmasked'}.pt"
    )
    cache = None if setting.source == "random" else str(out / "cache" / name)
    return DictionaryRecipe(
        extractor=EXTRACTOR,
        source=setting.source,
        mask_subject=setting.mask_subject,
        seed=seed,
        num_iterations=KMEANS_ITERATIONS,
        cache=cache,
        progress=False,
    )


def reproduce_command(args: argparse.Namespace, setting: str, seed: int) -> str:
    """The command line that reruns one setting with one seed under the same configuration."""
    parts = ["python", "benchmarks/debias.py", "--only", setting, "--seeds", str(seed)]
    defaults = parse_args([])
    for option in ("train_size", "test_size", "batch_size", "epochs"):
        if getattr(args, option) != getattr(defaults, option):
            parts += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    if setting == CHECKPOINT_ROW:
        parts += ["--ccim-checkpoint", str(args.ccim_checkpoint)]
    return shlex.join(parts)


@torch.inference_mode()
def correctness(model: CCIMLightningModule, dataset: Dataset, batch_size: int = 500) -> np.ndarray:
    """Whether the model's top-1 prediction is right, per sample of ``dataset`` (in sample order)."""
    model.eval()
    right = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        right.append((model(batch).argmax(dim=-1) == batch["target"]).numpy())
    return np.concatenate(right)


def pack(right: np.ndarray) -> str:
    """Per-sample correctness as base64 of its packed bits (``debias_report.unpack`` reverses it)."""
    return base64.b64encode(np.packbits(right.astype(np.uint8)).tobytes()).decode("ascii")


def comparable(record: dict) -> str:
    """What a stored run must share with this invocation to count (everything but the seed and the timings)."""
    config = record["config"]
    data = {k: v for k, v in config["data"].items() if k not in ("seed", "bias", "class")}
    return json.dumps(
        [config["setting"], data, config["trainer"]["max_epochs"], config.get("checkpoint")], sort_keys=True
    )


def run_config_of(setting: Setting, seed: int, config: RunConfig) -> dict:
    """The ``config`` part of a run's record (also used to match stored runs for ``--resume``)."""
    run = {
        "setting": asdict(setting),
        "data": {
            **config.data_kwargs(seed, setting.data_bias),
            "test_bias": setting.bias,
            "class": "SyntheticContextDataModule",
            "generator": generator_settings(),
        },
        "model": {
            "host": f"TwoStreamHost(small_cnn, small_cnn, feature_dim={config.feature_dim})",
            "num_prototypes": setting.num_prototypes,
            "confounder_dim": CONFOUNDER_DIM,
            "attention": setting.attention,
            "use_prior": setting.use_prior,
            "uniform_attention": setting.uniform_attention,
            "debias": setting.debias,
            "debias_args": setting.debias_args,
            "optimizer": f"AdamW(lr={setting.lr or 1e-3}, other torch defaults)",
        },
        "dictionary": None
        if not setting.needs_dictionary
        else {"extractor": EXTRACTOR, "source": setting.source, "mask_subject": setting.mask_subject},  # fmt: skip
        "trainer": {
            "max_epochs": setting.epochs or config.epochs,
            "accelerator": "cpu",
            "threads": 1,
            "validation": "none",
            "weights_tested": "final epoch",
        },
    }
    if setting.group == "checkpoint":
        fitted = read_run_config(config.checkpoint)
        run["checkpoint"] = {"path": config.checkpoint, "sha256": file_digest(config.checkpoint)}
        run["data"].update(val_size=fitted["data"]["init_args"]["val_size"], num_workers="as ccim fit's config")
        run["trainer"].update(
            accelerator=fitted["trainer"]["accelerator"],
            threads="torch's default",
            validation="every epoch (ccim fit)",
            weights_tested="last.ckpt of ccim fit",
        )
    return run


def build_model(setting: Setting, config: RunConfig, num_classes: int, class_names: list[str]) -> CCIMLightningModule:
    """The model of a run of ``setting`` (the demo's host; the setting's head and method)."""
    debias = getattr(methods, setting.debias)(**setting.debias_args) if setting.debias else None
    return CCIMLightningModule(
        TwoStreamHost("small_cnn", "small_cnn", feature_dim=config.feature_dim),
        num_classes=num_classes,
        num_prototypes=setting.num_prototypes,
        confounder_dim=CONFOUNDER_DIM,
        attention=setting.attention,
        use_prior=setting.use_prior,
        uniform_attention=setting.uniform_attention,
        debias=debias,
        optimizer=lambda params: torch.optim.AdamW(params, lr=setting.lr or 1e-3),
        class_names=class_names,
    )


def check_checkpoint(setting: Setting, seed: int, config: RunConfig) -> dict:
    """The ``--ccim-checkpoint`` file, read safely; exits naming every field where it was trained differently."""
    checkpoint = load_checkpoint(config.checkpoint)
    problems = checkpoint_mismatches(
        checkpoint,
        expected_model(setting.num_prototypes, CONFOUNDER_DIM, config.feature_dim),
        expected_data(seed, setting.data_bias, config.train_size, config.batch_size),
        training_steps(config.train_size, config.batch_size, config.epochs),
        read_run_config(config.checkpoint),
        expected_run(seed, config.epochs, EXTRACTOR, KMEANS_ITERATIONS),
    )
    if problems:
        raise SystemExit(
            f"--ccim-checkpoint {config.checkpoint} was not trained as this benchmark trains ccim_dot (seed {seed}):"
            "\n  "
            + "\n  ".join(problems)
            + "\nTrain it with `ccim fit --config configs/synthetic.yaml`, or pass the --seeds, --train-size, "
            "--batch-size and --epochs it was trained with."
        )
    return checkpoint


def evaluate_checkpoint(setting: Setting, seed: int, config: RunConfig, cache: DataCache, reproduce: str) -> dict:
    """Tests the ``--ccim-checkpoint`` model on the run's test sets; returns its JSON record (nothing is trained)."""
    start = time.perf_counter()
    checkpoint = check_checkpoint(setting, seed, config)
    hparams = checkpoint["hyper_parameters"]
    model = build_model(setting, config, hparams["num_classes"], hparams["class_names"])
    model.on_load_checkpoint(checkpoint)  # sizes the per-sample cluster buffer, as Lightning does before loading
    model.load_state_dict(checkpoint["state_dict"])
    biased_set, unbiased_set = cache.test_sets(config, seed, setting.bias)
    biased, unbiased = correctness(model, biased_set), correctness(model, unbiased_set)
    return run_record(setting, seed, config, biased, unbiased, start, 0.0, {}, reproduce)


def run_one(setting: Setting, seed: int, config: RunConfig, cache: DataCache, out: Path, reproduce: str) -> dict:
    """Trains and tests one setting with one seed; returns its JSON record."""
    if setting.group == "checkpoint":
        return evaluate_checkpoint(setting, seed, config, cache, reproduce)
    start = time.perf_counter()
    datamodule = cache.datamodule(config, seed, setting)
    callbacks, stats = [], {}
    if setting.needs_dictionary:
        recipe = dictionary_recipe(out, config, setting, seed)
        # Built (or checked) here, before seeding: the run's callback then reads the same dictionary from the cache,
        # and training consumes the same random numbers whether the file existed or not.
        dictionary = recipe.load_or_build(datamodule, setting.num_prototypes, CONFOUNDER_DIM,
                                          Collectives.current(torch.device("cpu")))  # fmt: skip
        stats = {k: float(dictionary.extra[k]) for k in ("scene_purity", "scene_nmi") if k in dictionary.extra}
        if setting.sampler:
            weights = methods.ClusterReweighting(**setting.debias_args)
            weights.bind(num_classes=datamodule.num_classes, task="multiclass", num_clusters=setting.num_prototypes)
            weights.fit_clusters(dictionary.assignments, dictionary.targets)
            datamodule.sample_weights = weights.sample_weights(dictionary.assignments, dictionary.targets)
        callbacks.append(ConfounderDictionaryCallback(recipe))
    L.seed_everything(seed, verbose=False)
    model = build_model(setting, config, datamodule.num_classes, datamodule.class_names)
    with tempfile.TemporaryDirectory(prefix="ccim-debias-") as root:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=setting.epochs or config.epochs,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
            callbacks=callbacks,
        )
        trainer.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    biased = correctness(model, datamodule.test_dataset)
    unbiased = correctness(model, datamodule.test_unbiased_dataset)
    return run_record(setting, seed, config, biased, unbiased, start, train_seconds, stats, reproduce)


def run_record(
    setting: Setting,
    seed: int,
    config: RunConfig,
    biased: np.ndarray,
    unbiased: np.ndarray,
    start: float,
    train_seconds: float,
    stats: dict,
    reproduce: str,
) -> dict:
    """The JSON record of a run: accuracies, per-sample correctness, configuration, timings, the command."""
    return {
        "setting": setting.name,
        "seed": seed,
        "biased_acc": float(biased.mean()),
        "unbiased_acc": float(unbiased.mean()),
        "gap": float(biased.mean() - unbiased.mean()),
        "correct": {"biased": pack(biased), "unbiased": pack(unbiased), "size": int(len(biased))},
        "dictionary_stats": stats,
        "config": run_config_of(setting, seed, config),
        "seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(train_seconds, 1),
        "reproduce": reproduce,
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
    }


def _quiet() -> None:
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "ccim_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*random weights.*", ".*LeafSpec.*", "k-means with"):
        warnings.filterwarnings("ignore", message=message)


def _append(path: Path, record: dict) -> None:
    with path.open("a") as stream:
        fcntl.flock(stream, fcntl.LOCK_EX)  # parallel workers append whole lines
        stream.write(json.dumps(record) + "\n")
        stream.flush()
        fcntl.flock(stream, fcntl.LOCK_UN)


def run_plan(plan: list[tuple[int, str]], config: RunConfig, out: Path, reproduce: dict, total: int) -> int:
    """Runs (seed, setting name) pairs in order in this process, appending each record; returns the count."""
    _quiet()
    settings = {s.name: s for s in all_settings()}
    cache = DataCache()
    begin = time.perf_counter()
    for seed, name in plan:
        record = run_one(settings[name], seed, config, cache, out, reproduce[(seed, name)])
        _append(out / "debias_runs.jsonl", record)
        print(
            f"  {name} seed={seed}: biased {record['biased_acc']:.4f} unbiased {record['unbiased_acc']:.4f} "
            f"({record['seconds']:.0f} s; this worker {(time.perf_counter() - begin) / 60:.1f} min, {total} planned)",
            flush=True,
        )
    return len(plan)


# --- command line ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed; baseline, ccim_dot, the best method, oracle")
    parser.add_argument("--only", nargs="+", metavar="SETTING", help="run only these settings (see --list)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0-4; --quick: 0)")
    parser.add_argument("--train-size", type=int, default=4000, help="training samples")
    parser.add_argument("--test-size", type=int, default=5000, help="samples in each test set")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs")
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 torch thread each)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results for full runs, a "
                        "scratch folder for --quick)")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="skip runs already in <out>/debias_runs.jsonl")
    parser.add_argument("--report-only", action="store_true", help="rebuild debias.md and plots from the JSON lines")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--list", action="store_true", help="print the settings and exit")
    parser.add_argument("--ccim-checkpoint", type=Path, metavar="CKPT", help=f"test this `ccim fit --config "
                        f"configs/synthetic.yaml` checkpoint as row {CHECKPOINT_ROW} (with --quick: instead of "
                        "training ccim_dot)")  # fmt: skip
    return parser.parse_args(argv)


def load_records(path: Path) -> list[dict]:
    """The JSON lines of ``path`` (none if it does not exist); a damaged line raises naming its number."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}:{number} is not a JSON line ({error}); delete or repair that line") from None
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = all_settings()
    names = [s.name for s in settings]
    if args.list:
        for setting in settings:
            print(f"{setting.name:24s} [{setting.group}] {setting.description}")
        return 0
    default_rows = [s.name for s in settings if s.group not in ("tuning", "checkpoint")]
    given = args.ccim_checkpoint is not None
    wanted = args.only or (quick_names(given) if args.quick else default_rows + [CHECKPOINT_ROW] * given)
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise SystemExit(f"Unknown setting(s) {unknown}; choose from: {', '.join(names)}")
    if CHECKPOINT_ROW in wanted and not given:
        raise SystemExit(f"The row {CHECKPOINT_ROW} tests a checkpoint: pass --ccim-checkpoint CKPT")
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(DEFAULT_SEEDS))
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "ccim-debias-quick" if args.quick else DEFAULT_OUT
    out: Path = args.out
    if args.quick and out.resolve() == DEFAULT_OUT.resolve():
        raise SystemExit(f"--quick never writes over the committed results in {DEFAULT_OUT}: pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = None if args.ccim_checkpoint is None else str(args.ccim_checkpoint)
    config = RunConfig(args.train_size, args.test_size, args.batch_size, args.epochs, checkpoint=checkpoint)
    runs_path = out / "debias_runs.jsonl"
    records = load_records(runs_path)
    if not args.report_only:
        by_name = {s.name: s for s in settings}
        # The bias-0.9 table first, then the sweep; inside each, seed-major and by bias (renders each split once).
        order = {name: i for i, name in enumerate(names)}
        plan = sorted(
            ((seed, name) for seed in seeds for name in wanted),
            key=lambda p: (
                by_name[p[1]].group == "sweep",
                p[0],
                by_name[p[1]].data_bias != DEFAULT_BIAS,
                by_name[p[1]].bias,
                order[p[1]],
            ),
        )
        if CHECKPOINT_ROW in wanted:
            # One model, one seed: the row is planned for the seed the checkpoint was trained with, and checked
            # before any training, so a mismatch fails in seconds.
            if not Path(config.checkpoint).is_file():
                raise SystemExit(f"--ccim-checkpoint {config.checkpoint}: no such file")
            fitted_seed = read_run_config(config.checkpoint).get("seed_everything")
            if fitted_seed not in seeds:
                raise SystemExit(
                    f"--ccim-checkpoint {config.checkpoint} was trained with seed_everything {fitted_seed!r}, which is "
                    f"not among --seeds {seeds}: add it"
                )
            plan = [(seed, name) for seed, name in plan if name != CHECKPOINT_ROW or seed == fitted_seed]
            check_checkpoint(by_name[CHECKPOINT_ROW], fitted_seed, config)
        if args.resume:
            done = {(r["setting"], r["seed"], comparable(r)) for r in records}
            probe = lambda seed, name: comparable({"config": run_config_of(by_name[name], seed, config)})  # noqa: E731
            skipped = [p for p in plan if (p[1], p[0], probe(*p)) in done]
            for seed, name in skipped:
                print(f"{name} seed={seed}: already done, skipped", flush=True)
            plan = [p for p in plan if p not in skipped]
        reproduce = {(seed, name): reproduce_command(args, name, seed) for seed, name in plan}
        print(f"debias: {len(plan)} runs ({len(wanted)} settings x seeds {seeds}) in {out}", flush=True)
        start = time.perf_counter()
        jobs = max(1, min(args.jobs, len(plan)))
        if jobs == 1:
            run_plan(plan, config, out, reproduce, len(plan))
        else:
            # Dealt by expected cost in plan order: the workers finish together, each meets a seed's runs in a row.
            shares = deal(plan, jobs, by_name)
            with ProcessPoolExecutor(jobs) as pool:
                for future in [pool.submit(run_plan, s, config, out, reproduce, len(plan)) for s in shares]:
                    future.result()
        print(f"debias: {len(plan)} runs in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        records = load_records(runs_path)
    reference = {"train_size": config.train_size, "test_size": config.test_size, "batch_size": config.batch_size}
    current = [
        r
        for r in records
        if r["seed"] in seeds
        and r["config"]["data"].get("generator") == generator_settings()
        and all(r["config"]["data"][k] == v for k, v in reference.items())
        and r["config"]["trainer"]["max_epochs"] == (by_setting_epochs(settings, r["setting"]) or config.epochs)
    ]
    command = "python benchmarks/debias.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text, summary = debias_report.write_report(
        current, settings, out, command.strip(), generator_settings(), args.bootstrap
    )
    print(text)
    if args.quick:
        print(f"Side by side (seed {seeds[0]}, {config.test_size}-sample test sets; table and plots in {out}):")
        print(debias_report.side_by_side(summary, quick_names(given)))
    return 0


def by_setting_epochs(settings: list[Setting], name: str) -> int | None:
    """The epoch override of a setting (None when it uses ``--epochs`` or is unknown)."""
    return next((s.epochs for s in settings if s.name == name), None)


if __name__ == "__main__":
    sys.exit(main())
