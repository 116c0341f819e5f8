"""One run of the study (train and test one setting with one seed, or test the ``--ccim-checkpoint`` model), its JSON
record, and a worker's loop over its share of the plan."""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from benchmarks.debias import multilabel
from benchmarks.debias.checkpoint import (
    checkpoint_mismatches,
    expected_data,
    expected_model,
    expected_run,
    file_digest,
    read_run_config,
    training_steps,
)
from benchmarks.debias.data import DataCache, RunConfig, generator_settings
from benchmarks.debias.settings import (
    CONFOUNDER_DIM,
    EXTRACTOR,
    KMEANS_ITERATIONS,
    SELECT_GROUPS,
    SELECTION_VAL_SIZE,
    Setting,
    all_settings,
)
from ccim_lightning import CCIMLightningModule
from ccim_lightning import debias as methods
from ccim_lightning.callbacks import ConfounderDictionaryCallback, LastLayerRetraining, WorstGroupValidation
from ccim_lightning.callbacks.worst_group import WORST_GROUP_METRIC
from ccim_lightning.checkpoints import load_checkpoint
from ccim_lightning.dictionary.recipe import DictionaryRecipe
from ccim_lightning.hosts import TwoStreamHost


def dictionary_recipe(out: Path, config: RunConfig, setting: Setting, seed: int) -> DictionaryRecipe:
    """The recipe of this run's dictionary; its cache file is named by (seed, training bias, N, masking)."""
    task = "" if config.task == "default" else f"{config.task}_"
    name = (
        f"dict_{task}{EXTRACTOR}_seed{seed}_bias{setting.data_bias:g}_train{config.train_size}_N{setting.num_prototypes}"
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


def correctness(model: CCIMLightningModule, dataset: Dataset, batch_size: int = 500) -> np.ndarray:
    """Whether the model's top-1 prediction is right, per sample of ``dataset`` (in sample order).

    For a multilabel model: ``(probabilities, labels)``, (n, C) each, in sample order.
    """
    model.eval()
    right, scores, labels = [], [], []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            logits = model(batch)
            if model.task == "multilabel":
                scores.append(model.predict_probabilities(logits).numpy())
                labels.append(batch["target"].numpy() > 0.5)
            else:
                right.append((logits.argmax(dim=-1) == batch["target"]).numpy())
    if model.task == "multilabel":
        return np.concatenate(scores), np.concatenate(labels)
    return np.concatenate(right)


def pack(right: np.ndarray) -> str:
    """Per-sample correctness as base64 of its packed bits (``report.unpack`` reverses it)."""
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
    described = asdict(setting)
    for added in ("last_layer", "select", "weight_decay"):  # fields added later: records without them stay comparable
        if not described[added]:
            del described[added]
    run = {
        "setting": described,
        "data": {
            **config.data_kwargs(seed, setting.data_bias, setting.val_size),
            "test_bias": setting.bias,
            "class": "SyntheticContextDataModule",
            "generator": generator_settings(config.task),
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
            "optimizer": f"AdamW(lr={setting.lr or 1e-3}, other torch defaults)"
            if setting.weight_decay is None
            else f"AdamW(lr={setting.lr or 1e-3}, weight_decay={setting.weight_decay:g}, other torch defaults)",
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
    if setting.select:
        run["trainer"].update(
            validation=f"every epoch, {SELECTION_VAL_SIZE} samples at the training bias",
            weights_tested=f"the epoch of the best val/worst_group_acc ({SELECT_GROUPS} pseudo-groups)",
        )
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


def build_model(
    setting: Setting, config: RunConfig, num_classes: int, class_names: list[str], task: str = "multiclass"
) -> CCIMLightningModule:
    """The model of a run of ``setting`` (the demo's host; the setting's head and method)."""
    debias = getattr(methods, setting.debias)(**setting.debias_args) if setting.debias else None
    return CCIMLightningModule(
        TwoStreamHost("small_cnn", "small_cnn", feature_dim=config.feature_dim),
        num_classes=num_classes,
        task=task,
        num_prototypes=setting.num_prototypes,
        confounder_dim=CONFOUNDER_DIM,
        attention=setting.attention,
        use_prior=setting.use_prior,
        uniform_attention=setting.uniform_attention,
        debias=debias,
        optimizer=lambda params: torch.optim.AdamW(params, **optimizer_args(setting)),
        class_names=class_names,
    )


def optimizer_args(setting: Setting) -> dict:
    """AdamW's keyword arguments of ``setting`` (torch's defaults where the setting names none)."""
    args = {"lr": setting.lr or 1e-3}
    if setting.weight_decay is not None:
        args["weight_decay"] = setting.weight_decay
    return args


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


class BestWeights(Callback):
    """Keeps a copy of the weights of the epoch with the highest ``monitor`` (in memory: the benchmark's rendered
    datamodule is not a checkpoint hyper-parameter that ``load_checkpoint`` would accept)."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.best = -float("inf")
        self.state: dict | None = None
        self.epoch = -1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and float(value) > self.best:
            self.best, self.epoch = float(value), trainer.current_epoch
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


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
        dictionary = recipe.load_or_build(datamodule, setting.num_prototypes, CONFOUNDER_DIM)
        stats = {k: float(dictionary.extra[k]) for k in ("scene_purity", "scene_nmi") if k in dictionary.extra}
        if setting.sampler:
            weights = methods.ClusterReweighting(**setting.debias_args)
            weights.bind(num_classes=datamodule.num_classes, task="multiclass", num_clusters=setting.num_prototypes)
            weights.fit_clusters(dictionary.assignments, dictionary.targets)
            datamodule.sample_weights = weights.sample_weights(dictionary.assignments, dictionary.targets)
        callbacks.append(ConfounderDictionaryCallback(recipe))
        if setting.last_layer:  # after the dictionary callback: it reads the dictionary from it
            groups = "coarse" if setting.last_layer is True else setting.last_layer
            callbacks.append(LastLayerRetraining(groups=groups, checkpoint=None))
    L.seed_everything(seed, verbose=False)
    model = build_model(setting, config, datamodule.num_classes, datamodule.class_names, datamodule.task)
    with tempfile.TemporaryDirectory(prefix="ccim-debias-") as root:
        selector = None
        if setting.select:
            selector = BestWeights(WORST_GROUP_METRIC)
            callbacks += [WorstGroupValidation(SELECT_GROUPS, seed=seed), selector]
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=setting.epochs or config.epochs,
            limit_val_batches=1.0 if setting.select else 0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
            callbacks=callbacks,
        )
        trainer.fit(model, datamodule=datamodule)
        if selector is not None:  # the selected epoch's weights (the dictionary buffers are the same in every epoch)
            if selector.state is None:
                raise RuntimeError(f"{setting.name} seed={seed}: {WORST_GROUP_METRIC} was never logged")
            model.load_state_dict(selector.state)
            stats["selected_epoch"] = float(selector.epoch)
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
    """The JSON record of a run: accuracies, per-sample correctness, configuration, timings, the command.

    A multilabel run (``biased`` and ``unbiased`` are ``(scores, labels)``) records ``metric: "mAP"``,
    ``biased_mAP``, ``unbiased_mAP`` and the per-sample ``scores`` instead (``multilabel.py``).
    """
    if isinstance(biased, tuple):
        packed = {name: multilabel.pack_scores(*value) for name, value in (("biased", biased), ("unbiased", unbiased))}
        # the mAP of the stored (float16) scores, so the record and its bootstrap agree
        values = [multilabel.mean_average_precision(*multilabel.unpack_scores(packed[n])) for n in packed]
        results = {"metric": "mAP", "biased_mAP": values[0], "unbiased_mAP": values[1], "gap": values[0] - values[1]}
        results["scores"] = {**packed, "size": int(len(biased[0]))}
    else:
        results = {
            "biased_acc": float(biased.mean()),
            "unbiased_acc": float(unbiased.mean()),
            "gap": float(biased.mean() - unbiased.mean()),
            "correct": {"biased": pack(biased), "unbiased": pack(unbiased), "size": int(len(biased))},
        }
    return {
        "setting": setting.name,
        "seed": seed,
        **results,
        "dictionary_stats": stats,
        "config": run_config_of(setting, seed, config),
        "seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(train_seconds, 1),
        "reproduce": reproduce,
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
    }


def quiet_worker() -> None:
    """One torch thread, and no library logs or known warnings in the study's output (each worker calls it)."""
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
    quiet_worker()
    settings = {s.name: s for s in all_settings()}
    cache = DataCache()
    begin = time.perf_counter()
    for seed, name in plan:
        record = run_one(settings[name], seed, config, cache, out, reproduce[(seed, name)])
        _append(out / "debias_runs.jsonl", record)
        metric = record.get("metric", "acc")
        biased, unbiased = record[f"biased_{metric}"], record[f"unbiased_{metric}"]
        print(
            f"  {name} seed={seed}: biased {metric} {biased:.4f} unbiased {unbiased:.4f} "
            f"({record['seconds']:.0f} s; this worker {(time.perf_counter() - begin) / 60:.1f} min, {total} planned)",
            flush=True,
        )
    return len(plan)


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
