"""Tests for the debiasing study (benchmarks.debias): a tiny --quick run, determinism, resume, the report's
statistics against hand and normal-approximation references, the --ccim-checkpoint row, the committed report."""

import base64
import json
import logging
import math
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.debias import checkpoint as checks
from benchmarks.debias import report
from benchmarks.debias.cli import COMMAND, DEFAULT_OUT, main
from benchmarks.debias.data import DataCache, RunConfig
from benchmarks.debias.settings import BEST, DEFAULT_SEEDS, METHODS, Setting, all_settings, deal, quick_names


@pytest.fixture(autouse=True)
def restore_global_state():
    """The script quietens Lightning's and our loggers and sets torch's threads; later tests need them back."""
    import torch

    names = ("lightning", "lightning.pytorch", "lightning.fabric", "ccim_lightning")
    levels = {name: logging.getLogger(name).level for name in names}
    threads = torch.get_num_threads()
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    torch.set_num_threads(threads)


TINY = ["--train-size", "96", "--test-size", "48", "--epochs", "1", "--batch-size", "32", "--bootstrap", "200"]


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "debias_runs.jsonl").read_text().splitlines()]


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| setting")]


def test_quick_run_records_are_deterministic_and_resumable(tmp_path, capsys):
    assert main(["--quick", *TINY, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    # the demo's output: the side-by-side rows, no internal goal check from one seed (that stays in debias.md)
    assert "Side by side (seed 0" in printed and "One seed:" in printed
    assert "Goal check" not in printed and "# Context-bias benchmark" not in printed

    records = _records(tmp_path)
    assert [r["setting"] for r in records] == quick_names()
    for record in records:
        assert record["seed"] == 0
        for test_set in ("biased", "unbiased"):
            right = report.unpack(record["correct"][test_set], record["correct"]["size"])
            assert len(right) == 48
            assert record[f"{test_set}_acc"] == pytest.approx(right.mean())  # the accuracy is the per-sample mean
        assert record["config"]["data"]["train_size"] == 96
        assert record["config"]["trainer"]["max_epochs"] == 1
        assert record["reproduce"].startswith(f"{COMMAND} --only {record['setting']} --seeds 0")
        assert "--train-size 96" in record["reproduce"]
    by_name = {r["setting"]: r for r in records}
    assert by_name["baseline"]["config"]["dictionary"] is None
    assert by_name["oracle"]["config"]["data"]["bias"] == 0.0
    assert by_name["oracle"]["config"]["data"]["test_bias"] == 0.9
    assert by_name[BEST]["config"]["model"]["debias"] == METHODS[BEST][0]
    # CCIM and the cluster method share one dictionary per (seed, bias, N, mask): one cache file.
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        "dict_test_efficientnet_seed0_bias0.9_train96_N32_masked.pt"
    ]

    table = (tmp_path / "debias.md").read_text()
    assert [row.split(" | ")[0].strip("| ") for row in _table_rows(table)] == quick_names()
    assert "Goal check" in table and (tmp_path / "debias_gap_closed.png").exists()

    # --resume skips what is done.
    capsys.readouterr()
    assert main(["--quick", *TINY, "--out", str(tmp_path), "--resume"]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 4
    assert len(_records(tmp_path)) == 4

    # Determinism: each reproduce command, run alone in a fresh process state, gives the same per-sample results,
    # whether the dictionary is built (first run) or read from the cache (now).
    for name in ("baseline", "ccim_dot", BEST):
        command = by_name[name]["reproduce"].removeprefix(COMMAND).split()
        assert main([*command, "--bootstrap", "200", "--out", str(tmp_path)]) == 0
        rerun = _records(tmp_path)[-1]
        assert (rerun["setting"], rerun["seed"]) == (name, 0)
        assert rerun["correct"] == by_name[name]["correct"], name

    # --report-only rebuilds the same table from the JSON lines.
    table = (tmp_path / "debias.md").read_text()
    assert main(["--quick", *TINY, "--out", str(tmp_path), "--report-only"]) == 0
    assert _table_rows((tmp_path / "debias.md").read_text()) == _table_rows(table)


def test_quick_scratch_folders_are_new_per_run_and_named_after_the_user():
    import getpass
    import tempfile

    from benchmarks.debias.cli import quick_scratch_folder

    first, second = quick_scratch_folder(), quick_scratch_folder()
    try:
        assert first != second and first.is_dir() and second.is_dir() and not any(first.iterdir())
        assert first.parent == Path(tempfile.gettempdir())
        assert first.name.startswith(f"ccim-debias-quick-{getpass.getuser()}-")
    finally:
        first.rmdir()
        second.rmdir()


def test_quick_never_writes_over_committed_results():
    with pytest.raises(SystemExit, match="never writes over the committed results"):
        main(["--quick", "--out", str(DEFAULT_OUT)])


def test_settings_cover_the_issue():
    settings = {s.name: s for s in all_settings()}
    for name in ("baseline", "ccim_dot", "ccim_additive", "random_dictionary", "without_lambda", "without_prior",
                 "without_masking", "oracle"):  # fmt: skip
        assert name in settings
    assert settings["random_dictionary"].source == "random"
    assert settings["without_lambda"].uniform_attention and not settings["without_prior"].use_prior
    assert not settings["without_masking"].mask_subject
    assert settings["oracle"].train_bias == 0.0 and settings["oracle"].attention == "none"
    for cls in ("ClusterReweighting", "GroupDRO", "ProductOfExperts", "CLEF"):
        heads = sorted(s.attention for s in settings.values() if s.debias == cls and s.group == "method"
                       and s.debias_args.get("groups", "prototypes") == "prototypes" and not s.select
                       and s.num_prototypes == 32)  # fmt: skip
        assert heads == ["dot_product", "none"], cls
    # The coarse pseudo-group rows, each on both heads, and the last-layer refit.
    for name in ("group_balanced", "group_dro_coarse"):
        assert settings[name].debias_args["groups"] == "coarse" and settings[name].attention == "none"
        assert settings[f"{name}_ccim"].attention == "dot_product"
    for name in ("group_balanced_aligned", "group_dro_aligned"):
        assert settings[name].debias_args["groups"] == "aligned" and settings[name].attention == "none"
    # Epoch selection on worst-pseudo-group validation accuracy: a validation split, more epochs, never multilabel.
    selected = [s for s in settings.values() if s.select]
    assert {s.name for s in selected} >= {"poe_select", "group_dro_aligned_select", "clef_select"}
    assert settings["dfr_aligned"].last_layer == "aligned" and report.cluster_only(settings["dfr_aligned"])
    assert all(s.val_size > 1 and s.epochs and s.needs_dictionary for s in selected)
    assert settings["group_dro_aligned_select"].weight_decay == 1.0
    assert settings["reweight_N128"].num_prototypes == 128 and settings["poe_N128"].debias == "ProductOfExperts"
    assert settings["baseline"].val_size == 1
    from benchmarks.debias.cli import task_row

    caers = {s.name for s in settings.values() if task_row(s, "caers_like")}
    emotic = {s.name for s in settings.values() if task_row(s, "emotic_like")}
    assert {"poe_select", "group_balanced", "group_dro_aligned", "oracle", "baseline", "ccim_dot"} <= caers
    assert not any(name.endswith("_ccim") for name in caers)
    assert not {"group_balanced", "poe_select", "dfr", "group_dro_coarse"} & emotic and "poe" in emotic
    assert settings["dfr"].last_layer and settings["dfr"].needs_dictionary and settings["dfr"].debias is None
    assert settings["dfr_ccim"].last_layer and settings["dfr_ccim"].attention == "dot_product"
    sweep = {(s.name.rsplit("_bias", 1)[0], s.bias) for s in settings.values() if s.group == "sweep"}
    assert {stem for stem, _ in sweep} == {"baseline", "ccim_dot", BEST}
    assert len({b for _, b in sweep}) >= 2
    assert len(DEFAULT_SEEDS) >= 5
    with pytest.raises(SystemExit, match="Unknown setting"):
        main(["--only", "nope", "--out", "unused"])


# --- the report's statistics ---------------------------------------------------------------------------------------


class Row:
    def __init__(self, name, bias=0.9, group="main"):
        self.name, self.bias, self.group, self.description = name, bias, group, name


def _record(name, seed, biased, unbiased):
    def packed(right):
        return base64.b64encode(np.packbits(np.asarray(right, dtype=np.uint8)).tobytes()).decode()

    return {
        "setting": name,
        "seed": seed,
        "biased_acc": float(np.mean(biased)),
        "unbiased_acc": float(np.mean(unbiased)),
        "seconds": 1.0,
        "correct": {"biased": packed(biased), "unbiased": packed(unbiased), "size": len(biased)},
    }


def test_gap_closed_and_intervals_against_hand_and_normal_references():
    rng = np.random.default_rng(5)
    n = 4000
    records = []
    hand = {}
    for seed in (0, 1):
        base_u = rng.random(n) < 0.60
        oracle_u = base_u | (rng.random(n) < 0.5)  # the oracle gets right what the baseline does and more
        method_u = base_u.copy()
        flip = np.flatnonzero(~base_u & oracle_u)[: int(0.75 * (oracle_u.sum() - base_u.sum()))]
        method_u[flip] = True
        biased = rng.random(n) < 0.9
        for name, u in (("baseline", base_u), ("oracle", oracle_u), ("method", method_u)):
            records.append(_record(name, seed, biased, u))
            hand.setdefault(name, []).append(u.mean())
    rows = [Row("baseline"), Row("oracle", group="oracle"), Row("method", group="method")]
    summary = report.summarise(records, rows, resamples=1000)

    mean = {name: np.mean(values) for name, values in hand.items()}
    closed = (mean["method"] - mean["baseline"]) / (mean["oracle"] - mean["baseline"])
    assert summary["method"]["closed"][0] == pytest.approx(closed)
    assert summary["method"]["delta"][0] == pytest.approx(mean["method"] - mean["baseline"])
    low, high = summary["method"]["closed"][1:]
    assert low < closed < high
    # Accuracy interval of one row against the normal approximation: with two seeds of equal accuracy, seed
    # resampling adds little, so the half-width is about 1.96 sqrt(p (1 - p) / (2 n)) (plus the seed-mean spread).
    p = mean["baseline"]
    spread = abs(hand["baseline"][0] - hand["baseline"][1]) / 2
    half = 1.96 * math.sqrt(p * (1 - p) / (2 * n))
    width = (summary["baseline"]["unbiased"][2] - summary["baseline"]["unbiased"][1]) / 2
    assert half * 0.8 < width < half * 1.2 + 1.96 * spread
    # The paired Δ interval: the method differs from the baseline on a fixed set of samples, so the resampled Δ
    # is the mean of the per-sample differences d_i in {0, 1}: normal reference 1.96 sqrt(d (1 - d) / (2 n)), plus
    # the seed-mean spread.
    per_seed = [hand["method"][s] - hand["baseline"][s] for s in (0, 1)]
    d = np.mean(per_seed)
    paired_half = 1.96 * math.sqrt(d * (1 - d) / (2 * n))
    delta_low, delta_high = summary["method"]["delta"][1:]
    assert paired_half * 0.8 < (delta_high - delta_low) / 2 < paired_half * 1.2 + 1.96 * abs(per_seed[0] - d)


def test_resampling_variant_draws_by_the_weights():
    import torch

    config = RunConfig(train_size=16, test_size=8, batch_size=8)
    datamodule = DataCache().datamodule(config, 0, Setting("x", "x", attention="none"))
    datamodule.setup()
    weights = torch.zeros(16)
    weights[[3, 11]] = 1.0  # only samples 3 and 11 may be drawn
    datamodule.sample_weights = weights
    torch.manual_seed(0)
    drawn = torch.cat([batch["index"] for batch in datamodule.train_dataloader()])
    assert len(drawn) == 16 and set(drawn.tolist()) == {3, 11}
    row = {s.name: s for s in all_settings()}["reweight_sampler"]
    assert row.sampler and row.debias is None and row.needs_dictionary


def test_runs_are_dealt_by_expected_cost():
    settings = {s.name: s for s in all_settings()}
    plan = [(0, "baseline"), (0, "ccim_fit"), (0, "clef"), (0, "oracle")]
    # costs 1, 0.1, 1.6, 1: baseline -> A, ccim_fit -> B, clef -> B (0.1 < 1), oracle -> A (1 < 1.7)
    assert deal(plan, 2, settings) == [[(0, "baseline"), (0, "oracle")], [(0, "ccim_fit"), (0, "clef")]]
    assert deal(plan, 1, settings) == [plan]


def test_checkpoint_mismatches_name_each_field_and_both_values():
    model = checks.expected_model(32, 256, 128)
    data = checks.expected_data(0, 0.9, 96, 32)
    steps = checks.training_steps(96, 32, 1)
    assert steps == 3 and checks.training_steps(97, 32, 2) == 6  # 97 = 3 x 32 + 1: the 1-sample batch is dropped

    def nest(flat: dict) -> dict:
        tree: dict = {}
        for path, value in flat.items():
            *parents, leaf = path.split(".")
            node = tree
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return tree

    good = {"hyper_parameters": nest(model), "datamodule_hyper_parameters": nest(data), "global_step": 3}
    assert checks.checkpoint_mismatches(good, model, data, steps) == []
    bad = json.loads(json.dumps(good))
    bad["hyper_parameters"]["attention"] = "additive"
    bad["datamodule_hyper_parameters"]["train_size"] = 4000
    del bad["hyper_parameters"]["backbone"]["init_args"]["feature_dim"]
    bad["global_step"] = 252
    assert checks.checkpoint_mismatches(bad, model, data, steps) == [
        "hyper_parameters.backbone.init_args.feature_dim: not in the checkpoint, benchmark 128",
        "hyper_parameters.attention: checkpoint 'additive', benchmark 'dot_product'",
        "datamodule_hyper_parameters.train_size: checkpoint 4000, benchmark 96",
        "global_step: checkpoint 252, benchmark 3 (the epochs)",
    ]
    # the run's config.yaml: a random-Z dictionary, another seed and clipping, which the hyper-parameters never show
    run = checks.expected_run(0, 1, "test_efficientnet", 25)
    config = nest({**run, "trainer.precision": None})  # None is Lightning's default, 32-true
    assert checks.checkpoint_mismatches(good, model, data, steps, config, run) == []
    config["dictionary"]["source"], config["seed_everything"] = "random", 7
    config["trainer"]["gradient_clip_val"] = 0.01
    assert checks.checkpoint_mismatches(good, model, data, steps, config, run) == [
        "config.yaml.seed_everything: checkpoint 7, benchmark 0",
        "config.yaml.trainer.gradient_clip_val: checkpoint 0.01, benchmark None",
        "config.yaml.dictionary.source: checkpoint 'random', benchmark 'features'",
    ]
    assert run["model.init_args.optimizer.init_args.betas"] == [0.9, 0.999]  # torch's AdamW defaults, as YAML lists
    python_saved = {"hyper_parameters": {"num_classes": 4}, "global_step": 3}
    assert any(
        "datamodule_hyper_parameters: missing" in p
        for p in checks.checkpoint_mismatches(python_saved, model, data, steps)
    )


def test_ccim_fit_checkpoint_is_tested_as_its_own_row(tmp_path, monkeypatch, capsys):
    from ccim_lightning.commands.cli import build_cli

    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[2] / "configs" / "synthetic.yaml")
    fit = [f"--data.init_args.{k}={v}" for k, v in (("train_size", 96), ("test_size", 48), ("batch_size", 32))]
    fitted = build_cli(["fit", "--config", config, *fit, "--data.init_args.num_workers=0", "--trainer.max_epochs=1",
                        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0"])  # fmt: skip
    checkpoint = next(tmp_path.glob("runs/**/checkpoints/last.ckpt"))
    out = tmp_path / "bench"
    assert (
        main(["--only", "ccim_fit", "--seeds", "0", *TINY, "--out", str(out), "--ccim-checkpoint", str(checkpoint)])
        == 0
    )
    (record,) = _records(out)
    assert record["setting"] == "ccim_fit" and record["train_seconds"] == 0.0
    assert record["config"]["checkpoint"]["path"] == str(checkpoint)
    assert len(record["config"]["checkpoint"]["sha256"]) == 64  # a retrained file is another run for --resume

    # the same accuracy as the fitted model itself on the benchmark's test sets, counted independently here
    import torch

    cache = DataCache()
    biased, unbiased = cache.test_sets(RunConfig(96, 48, 32, 1), 0, 0.9)
    model = fitted.model.eval()
    with torch.inference_mode():
        for dataset, key in ((biased, "biased_acc"), (unbiased, "unbiased_acc")):
            batch = {k: v for k, v in dataset.tensors.items()}
            right = (model(batch).argmax(1) == batch["target"]).float().mean().item()
            assert record[key] == pytest.approx(right), key

    # trained differently (2 epochs asked for, 1 run): an error naming the field before anything is trained
    with pytest.raises(SystemExit, match=r"global_step: checkpoint 3, benchmark 6"):
        main(["--quick", *TINY, "--epochs", "2", "--out", str(out), "--ccim-checkpoint", str(checkpoint)])
    with pytest.raises(SystemExit, match="pass --ccim-checkpoint"):
        main(["--only", "ccim_fit", *TINY, "--out", str(out)])
    # one model, one seed: its seed must be run; other seeds get no ccim_fit row
    with pytest.raises(SystemExit, match=r"seed_everything 0, which is not among --seeds \[1\]"):
        main(["--only", "ccim_fit", "--seeds", "1", *TINY, "--out", str(out), "--ccim-checkpoint", str(checkpoint)])
    # the run's recipe is read from its config.yaml: an edited recipe, or no config beside the file, stops the run
    run_config = checkpoint.parents[1] / "config.yaml"
    run_config.write_text(run_config.read_text().replace("mask_subject: true", "mask_subject: false"))
    with pytest.raises(SystemExit, match=r"config.yaml.dictionary.mask_subject: checkpoint False, benchmark True"):
        main(["--only", "ccim_fit", "--seeds", "0", *TINY, "--out", str(out), "--ccim-checkpoint", str(checkpoint)])
    moved = tmp_path / "moved.ckpt"
    moved.write_bytes(checkpoint.read_bytes())
    with pytest.raises(SystemExit, match="config.yaml that `ccim fit` writes"):
        main(["--only", "ccim_fit", "--seeds", "0", *TINY, "--out", str(out), "--ccim-checkpoint", str(moved)])


def test_python_dash_m_runs_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m benchmarks.debias", "--list"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("benchmarks.debias", run_name="__main__")
    assert exited.value.code == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [s.name for s in all_settings()]


@pytest.mark.slow
def test_committed_results_regenerate_unchanged_with_report_only(tmp_path):
    shutil.copy(DEFAULT_OUT / "debias_runs.jsonl", tmp_path)
    assert main(["--report-only", "--out", str(tmp_path)]) == 0
    committed, rebuilt = ((folder / "debias.md").read_text().splitlines() for folder in (DEFAULT_OUT, tmp_path))
    # Only the first paragraph's command differs: it names the scratch folder.
    assert committed[2].startswith(f"Written by `{COMMAND} --report-only` from")
    assert rebuilt[2].startswith(f"Written by `{COMMAND} --report-only --out {tmp_path}` from")
    assert committed[:2] + committed[3:] == rebuilt[:2] + rebuilt[3:]
    for plot in ("debias_gap_closed.png", "debias_bias_sweep.png"):
        assert (tmp_path / plot).read_bytes() == (DEFAULT_OUT / plot).read_bytes(), plot


@pytest.mark.slow
@pytest.mark.parametrize("task", ["caers_like", "continuous"])  # emotic_like's mAP bootstrap takes ~15 minutes
def test_committed_task_results_regenerate_unchanged_with_report_only(tmp_path, task):
    shutil.copy(DEFAULT_OUT / task / "debias_runs.jsonl", tmp_path)
    assert main(["--task", task, "--report-only", "--out", str(tmp_path)]) == 0
    committed, rebuilt = ((folder / "debias.md").read_text().splitlines() for folder in (DEFAULT_OUT / task, tmp_path))
    assert committed[:2] + committed[3:] == rebuilt[:2] + rebuilt[3:]  # all but the command line
    plot = "debias_gap_closed.png"
    assert (tmp_path / plot).read_bytes() == (DEFAULT_OUT / task / plot).read_bytes()


def test_goal_is_checked_for_the_best_cluster_only_method_and_for_clef():
    settings = {s.name: s for s in all_settings()}

    def row(name, biased, closed, low):
        return {"setting": settings[name], "biased": (biased, 0, 0), "closed": (closed, low, 1.0)}

    summary = {
        "oracle": {"setting": settings["oracle"], "biased": (0.80, 0, 0)},
        "clef": row("clef", 0.78, 0.95, 0.90),  # best overall, but not cluster-only
        "reweight": row("reweight", 0.775, 0.82, 0.70),  # 2.5 points below the oracle: within 3
        "poe": row("poe", 0.79, 0.60, 0.50),
        "ccim_dot": row("ccim_dot", 0.95, 0.99, 0.95),  # not a method row
    }
    lines = [line for line in report.goal_lines(summary, list(settings.values())) if line]
    assert len(lines) == 2
    assert "the best cluster-only method, `reweight`: gap closed 82.0%" in lines[0] and "**met**" in lines[0]
    assert "CLEF, `clef`" in lines[1] and "**met**" in lines[1]
    summary["reweight"] = row("reweight", 0.765, 0.82, 0.70)  # 3.5 points below the oracle
    assert "**not met**" in report.goal_lines(summary, list(settings.values()))[0]
    assert report.cluster_only(settings["dfr"]) and report.cluster_only(settings["poe_select"])
    assert not report.cluster_only(settings["clef"]) and not report.cluster_only(settings["ccim_dot"])


def test_summary_cells_and_folders():
    from benchmarks.debias.summary import cell, folder_of

    row = {"closed": (0.704, 0.62, 0.77), "biased": (0.772, 0, 0)}
    assert cell(row) == "+70 [+62, +77] (77.2)" and cell(None) == "-" and cell({"biased": (0.5, 0, 0)}) == "-"
    assert folder_of("default", Path("r")) == Path("r") and folder_of("caers_like", Path("r")) == Path("r/caers_like")


def test_summary_reads_the_main_table_of_a_report(tmp_path):
    from benchmarks.debias.summary import read_report

    (tmp_path / "debias.md").write_text(
        "# x\n\n## Bias 0.9: rows\n\n| setting | what | seeds | biased acc | unbiased acc | Δ | gap closed (%) | s |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| baseline | b | 5 | 92.4 [91.4, 93.3] | 50.9 [49.2, 52.4] | - | - | 58 |\n"
        "| reweight | r | 5 | 85.2 [84.0, 86.4] | 59.8 [57.2, 62.0] | +8.9 [+6.9, +11.3] "
        "| +40.8 [+31.3, +51.1] | 53 |\n"
        "\n## Bias sweep\n\n| baseline_bias0.7 | b | 5 | 1.0 [1.0, 1.0] | 1.0 [1.0, 1.0] | - | - | 1 |\n"
    )
    rows = read_report(tmp_path / "debias.md")
    assert set(rows) == {"baseline", "reweight"} and "closed" not in rows["baseline"]
    assert rows["reweight"]["closed"] == pytest.approx((0.408, 0.313, 0.511))
    assert rows["reweight"]["biased"] == pytest.approx((0.852, 0.840, 0.864)) and rows["reweight"]["seeds"] == 5
    assert read_report(tmp_path / "missing.md") == {}


def test_summary_prints_every_task_from_the_committed_reports(capsys):
    from benchmarks.debias.summary import main as summary_main

    assert summary_main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| row | caers_like | continuous | emotic_like | default |"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert {"baseline", "clef", "group_dro_aligned_select", "oracle"} <= set(rows)
    assert "U 44.6" in rows["oracle"]  # the multilabel oracle's unbiased mAP, read from emotic_like/debias.md
    assert sum(line.startswith("- ") for line in lines) == 4  # the goal line of each task


def test_best_weights_keeps_the_best_epochs_weights():
    from types import SimpleNamespace

    import torch
    from torch import nn

    from benchmarks.debias.runs import BestWeights

    layer, keeper = nn.Linear(2, 1), BestWeights("val/worst")
    for epoch, value in enumerate([0.2, 0.5, 0.4]):
        layer.weight.data.fill_(float(epoch))
        trainer = SimpleNamespace(callback_metrics={"val/worst": torch.tensor(value)}, current_epoch=epoch)
        keeper.on_validation_end(trainer, layer)
    assert keeper.epoch == 1 and keeper.best == pytest.approx(0.5)
    assert torch.equal(keeper.state["weight"], torch.ones(1, 2))  # a copy: later epochs did not change it
    empty = BestWeights("val/worst")
    empty.on_validation_end(SimpleNamespace(callback_metrics={}, current_epoch=0), layer)
    assert empty.state is None
