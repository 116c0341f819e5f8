"""benchmarks/predictor.py: the photos it writes, its argument checks, and a tiny CPU run whose printed figures agree
with each other (persons / median seconds) and which leaves nothing behind."""

import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import predictor as bench

ROOT = Path(__file__).parents[2]


def test_the_photos_are_640x480_jpegs_with_one_to_three_boxes_inside(tmp_path):
    paths, boxes = bench.write_photos(tmp_path, 6)
    assert [Path(p).name for p in paths] == [f"photo_{i:04d}.jpg" for i in range(6)]
    for path, photo_boxes in zip(paths, boxes, strict=True):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (640, 480)
        assert 1 <= len(photo_boxes) <= 3
        for x1, y1, x2, y2 in photo_boxes:
            assert 0 <= x1 and x1 + 32 <= x2 <= 640 and 0 <= y1 and y1 + 32 <= y2 <= 480
    assert bench.write_photos(tmp_path / "again", 0) == ([], [])
    (tmp_path / "again").mkdir()
    assert bench.write_photos(tmp_path / "again", 6)[1] == boxes  # a fixed seed


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--images", "0"], "--images must be >= 1"), (["--batch-sizes", "4", "0"], "--batch-sizes must all be >= 1")],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_tiny_cpu_run_prints_consistent_figures_and_writes_nothing(capsys):
    threads = torch.get_num_threads()
    before = set(Path(tempfile.gettempdir()).glob("ccim_predictor_bench_*"))
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    try:
        results = bench.main(
            ["--host", "synthetic", "--context-size", "32", "--subject-size", "16", "--images", "3",
             "--batch-sizes", "1", "4", "--repeats", "2", "--threads", "1"]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    persons = int(re.search(r"3 JPEGs of 640x480 with (\d+) persons, device cpu", out).group(1))
    assert persons == sum(len(b) for b in bench.write_photos(Path(tempfile.mkdtemp()), 3)[1])
    lines = re.findall(r"batch +(\d+): +([\d.]+) persons/s \((\d+) ms per call", out)
    assert [int(b) for b, _, _ in lines] == [1, 4] and sorted(results) == [1, 4]
    for batch, rate, milliseconds in lines:
        assert float(rate) == pytest.approx(results[int(batch)], abs=0.05) and results[int(batch)] > 0
        # persons/s is persons over the median call, as printed in ms (rounded to 1 ms)
        assert persons / float(rate) * 1e3 == pytest.approx(int(milliseconds), abs=1)
    assert set(Path(tempfile.gettempdir()).glob("ccim_predictor_bench_*")) == before
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout == status
