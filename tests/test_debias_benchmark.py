"""Tests for benchmarks/debias.py: its --quick mode on a tiny configuration writes the table and the run records."""

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "debias.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("debias_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_logger_levels():
    """The script quietens Lightning's and our loggers and sets torch's threads; later tests need them back."""
    import torch

    names = ("lightning", "lightning.pytorch", "lightning.fabric", "ccim_lightning")
    levels = {name: logging.getLogger(name).level for name in names}
    threads = torch.get_num_threads()
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    torch.set_num_threads(threads)


TINY = ["--train-size", "128", "--val-size", "32", "--test-size", "64", "--epochs", "1", "--batch-size", "32"]


@pytest.mark.filterwarnings("ignore:k-means with")  # 128 training samples into 32 clusters
def test_quick_mode_writes_table_and_records(tmp_path, capsys):
    debias = _load_script()
    assert debias.main(["--quick", *TINY, "--out", str(tmp_path)]) == 0

    records = [json.loads(line) for line in (tmp_path / "debias_runs.jsonl").read_text().splitlines()]
    assert [r["setting"] for r in records] == list(debias.QUICK_SETTINGS)
    for record in records:
        assert record["seed"] == 0
        for key in ("biased_acc", "unbiased_acc"):
            assert 0.0 <= record[key] <= 1.0
        assert record["gap"] == pytest.approx(record["biased_acc"] - record["unbiased_acc"])
        assert record["config"]["data"]["train_size"] == 128
        assert record["config"]["trainer"]["max_epochs"] == 1
        assert record["reproduce"].startswith(f"python benchmarks/debias.py --only {record['setting']} --seeds 0")
        assert "--train-size 128" in record["reproduce"]
    by_name = {r["setting"]: r for r in records}
    assert by_name["baseline"]["config"]["model"]["attention"] == "none"
    assert by_name["baseline"]["config"]["dictionary_callback"] is None
    assert by_name["random_dictionary"]["config"]["dictionary_callback"]["source"] == "random"
    # The clustered dictionary was written to the cache folder and handed to the callback from there.
    cache = Path(by_name["ccim_dot"]["config"]["dictionary_callback"]["cache"])
    assert cache.parent == tmp_path / "cache" and cache.exists()

    table = (tmp_path / "debias.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == list(debias.QUICK_SETTINGS)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        biased, unbiased = float(cells[5]), float(cells[6])  # percentages, one seed: no spread
        assert 0.0 <= biased <= 100.0 and 0.0 <= unbiased <= 100.0
    assert "Check: the baseline's biased-unbiased gap" in table

    # --resume skips what is done.
    capsys.readouterr()
    assert debias.main(["--quick", *TINY, "--out", str(tmp_path), "--resume"]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 3
    assert len((tmp_path / "debias_runs.jsonl").read_text().splitlines()) == 3

    # A row's reproduce command, run alone, gives the same numbers; the table keeps the other rows.
    command = by_name["baseline"]["reproduce"].split()
    assert debias.main([*command[2:], "--out", str(tmp_path)]) == 0
    rerun = json.loads((tmp_path / "debias_runs.jsonl").read_text().splitlines()[-1])
    assert (rerun["setting"], rerun["seed"]) == ("baseline", 0)
    assert rerun["biased_acc"] == pytest.approx(by_name["baseline"]["biased_acc"])
    assert rerun["unbiased_acc"] == pytest.approx(by_name["baseline"]["unbiased_acc"])
    assert "| random_dictionary |" in (tmp_path / "debias.md").read_text()


def test_settings_cover_the_issue():
    debias = _load_script()
    names = [s.name for s in debias.all_settings()]
    for name in (
        "baseline",
        "ccim_dot",
        "ccim_additive",
        "random_dictionary",
        "without_lambda",
        "without_prior",
        "without_masking",
    ):
        assert name in names
    assert len([s for s in debias.all_settings() if s.group == "size"]) >= 2
    assert len({s.bias for s in debias.all_settings()}) >= 3
    with pytest.raises(SystemExit, match="Unknown setting"):
        debias.main(["--only", "nope", "--out", "unused"])
