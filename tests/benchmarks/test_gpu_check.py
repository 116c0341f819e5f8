"""benchmarks/gpu_check.sh runs only on a lent GPU machine, so here: its bash parses, every Python heredoc in it
compiles, every script it calls exists, and its header comment lists every step."""

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_check.sh"
HEREDOC = re.compile(r"<<'PY'\n(.*?)\nPY\n", re.S)


def test_the_script_parses_as_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_python_heredoc_compiles():
    text = SCRIPT.read_text()
    sources = HEREDOC.findall(text)
    assert len(sources) == text.count("<<'PY'") >= 3
    for number, source in enumerate(sources):
        compile(source, f"{SCRIPT.name} heredoc {number}", "exec")


def test_the_scripts_it_runs_exist_and_the_header_lists_every_step():
    text = SCRIPT.read_text()
    for script in re.findall(r"python3 (benchmarks/\S+\.py)", text):
        assert (SCRIPT.parents[1] / script).is_file(), script
    header = [line for line in text.splitlines() if line.startswith("#")]
    steps = [int(m.group(1)) for line in header if (m := re.match(r"# (\d+)\. ", line))]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 7
    assert "benchmarks/predictor.py --device cuda" in text and "prepared_dir" in text
