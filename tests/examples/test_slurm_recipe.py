"""Tests for examples/slurm/ccim_fit.sbatch, run with bash against stub ``srun`` and ``ccim`` commands.

The stubs log their arguments (and srun the ``SRUN_CPUS_PER_TASK`` it sees) to a file, one call a line, fields
separated by tabs; srun then runs the command it was given, as the real one does.
"""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "examples" / "slurm" / "ccim_fit.sbatch"

SRUN = """#!/bin/bash
{ printf 'srun\\tSRUN_CPUS_PER_TASK=%s' "${SRUN_CPUS_PER_TASK:-}"; printf '\\t%s' "$@"; printf '\\n'; } >> "$STUB_LOG"
while [[ $# -gt 0 && "$1" != ccim ]]; do shift; done  # srun's own options end where the command starts
exec "$@"
"""
CCIM = """#!/bin/bash
{ printf 'ccim'; printf '\\t%s' "$@"; printf '\\n'; } >> "$STUB_LOG"
if [[ "$1" == "${FAIL_SUBCOMMAND:-}" ]]; then exit 3; fi
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_recipe(tmp_path, **env):
    """Runs the script with the stubs first on PATH; returns (result, [(command, args), ...] in call order)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("ccim", CCIM)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.tsv"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
    base.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log), CCIM_ROOT=str(tmp_path))
    for key in ("CONFIG", "DATA", "DICTIONARY", "FACE_BOXES", "SCENE_WEIGHTS", "EXTRA", "FAIL_SUBCOMMAND"):
        base.pop(key, None)
    result = subprocess.run(["bash", str(SCRIPT)], env={**base, **env}, capture_output=True, text=True, timeout=60)
    lines = log.read_text().splitlines() if log.exists() else []
    calls = [(line.split("\t")[0], line.split("\t")[1:]) for line in lines]
    return result, calls


def after_last_config(args):
    return args[len(args) - args[::-1].index("--config") + 1 :]


def contains(args, part):
    return any(args[i : i + len(part)] == part for i in range(len(args) - len(part) + 1))


JOB = {"SLURM_CPUS_PER_TASK": "6", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4"}


def test_both_steps_get_the_same_overrides_and_srun_gets_the_cpus(tmp_path):
    (tmp_path / "runs" / "ablation_a").mkdir(parents=True)  # an unquoted $EXTRA would glob runs/ablation_* to this
    extra = [
        "--dictionary.source", "random", "--dictionary.mask_subject", "false",
        "--model.init_args.num_prototypes", "64", "--trainer.default_root_dir", "runs/ablation_*",
    ]  # fmt: skip
    result, calls = run_recipe(
        tmp_path, **JOB, CONFIG="configs/caers_caernet.yaml", DATA="/data/CAER-S", DICTIONARY="runs/d.pt",
        SCENE_WEIGHTS="/models/places.pth", EXTRA=" ".join(extra),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [command for command, _ in calls] == ["srun", "ccim", "srun", "ccim"]
    (_, srun_dictionary), (_, dictionary), (_, srun_fit), (_, fit) = calls

    assert dictionary[0] == "build-dictionary" and fit[0] == "fit"
    shared = [
        "--config", "configs/caers_caernet.yaml", "--data.init_args.root", "/data/CAER-S",
        "--dictionary.cache", "runs/d.pt", "--dictionary.weights", "/models/places.pth",
    ]  # fmt: skip
    for args in (dictionary, fit):
        assert args[1 : 1 + len(shared)] == shared
        assert contains(after_last_config(args), extra)  # after the presets, so the job's overrides win
        assert not any(arg.startswith("--trainer.callbacks") for arg in args)  # the named groups only
    assert dictionary[-2:] == ["--out", "runs/d.pt"]
    assert contains(fit, ["--config", "configs/trainer/ddp.yaml"])
    assert contains(fit, ["--trainer.num_nodes", "2"]) and contains(fit, ["--trainer.devices", "4"])

    for srun in (srun_dictionary, srun_fit):
        assert srun[0] == "SRUN_CPUS_PER_TASK=6"
        assert contains(srun, ["--cpus-per-task", "6"])
    assert contains(srun_dictionary, ["--ntasks=1"])


def test_without_extra_or_a_cpu_count_the_calls_stay_clean(tmp_path):
    job = {k: v for k, v in JOB.items() if k != "SLURM_CPUS_PER_TASK"}
    result, calls = run_recipe(tmp_path, **job)
    assert result.returncode == 0, result.stderr
    assert "SLURM_CPUS_PER_TASK is not set" in result.stderr
    (_, srun_dictionary), (_, dictionary), (_, srun_fit), (_, fit) = calls
    assert "" not in dictionary + fit  # no empty argument from an empty EXTRA
    assert not any(arg.startswith("--dictionary.weights") for arg in dictionary + fit)
    assert srun_dictionary[0] == srun_fit[0] == "SRUN_CPUS_PER_TASK="
    assert "--cpus-per-task" not in srun_dictionary + srun_fit
    assert fit[-4:] == ["--trainer.num_nodes", "2", "--trainer.devices", "4"]


def test_a_failed_dictionary_step_stops_the_job(tmp_path):
    result, calls = run_recipe(tmp_path, **JOB, FAIL_SUBCOMMAND="build-dictionary")
    assert result.returncode == 3
    assert [args[0] for command, args in calls if command == "ccim"] == ["build-dictionary"]  # no training


def test_a_model_without_dictionary_skips_the_dictionary_step(tmp_path):
    # the README's baseline: `ccim build-dictionary` refuses a model that uses no dictionary, so the job never trained
    extra = "--model.init_args.attention none --trainer.default_root_dir runs/baseline"
    result, calls = run_recipe(tmp_path, **JOB, DICTIONARY="none", EXTRA=extra, FAIL_SUBCOMMAND="build-dictionary")
    assert result.returncode == 0, result.stderr
    assert "DICTIONARY=none: no dictionary is built" in result.stderr
    assert [command for command, _ in calls] == ["srun", "ccim"]
    fit = calls[1][1]
    assert fit[0] == "fit" and contains(fit, extra.split())
    assert not any(arg.startswith("--dictionary.") for arg in fit)


def test_face_boxes_reach_both_steps(tmp_path):
    result, calls = run_recipe(
        tmp_path, **JOB, CONFIG="configs/caers_caernet.yaml", DATA="/data/CAER-S", FACE_BOXES="/data/CAER-S/faces"
    )
    assert result.returncode == 0, result.stderr
    (_, dictionary), (_, fit) = [call for call in calls if call[0] == "ccim"]
    for args in (dictionary, fit):
        assert contains(args, ["--data.init_args.face_boxes", "/data/CAER-S/faces"])


def test_the_caers_example_in_the_header_passes_face_boxes():
    header = SCRIPT.read_text().split("#SBATCH")[0]
    caers = [line for line in header.splitlines() if "CAER-S" in line and "CONFIG=" in line]
    assert caers and all("FACE_BOXES=" in line for line in caers)
