"""The package's shape as the README's "Layout" section states it: one-way imports, small modules, all listed."""

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Folder on disk -> installed package (setup.cfg's package_dir).
PACKAGES = {
    "ccim_lightning": "ccim_lightning",
    "datamodules": "ccim_lightning.datamodules",
    "callbacks": "ccim_lightning.callbacks",
}
#: Layers, lowest first; a module may import its own layer or lower ones at import time, never a higher one.
#: Anything else under ccim_lightning (head, hosts, losses, weights, checkpoints, compat, logs) is layer 0.
LAYERS = {
    "ccim_lightning.dictionary": 1,
    "ccim_lightning.debias": 1,
    "ccim_lightning.datamodules": 2,
    "ccim_lightning.module": 3,
    "ccim_lightning.callbacks": 3,
    "ccim_lightning.cli": 4,
    "ccim_lightning.analysis": 4,
}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Installed module name -> file, for every tracked module of the three package folders."""
    tracked = subprocess.run(
        ["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    modules = {}
    for name in tracked:
        path = Path(name)
        if path.suffix == ".py":
            parts = [PACKAGES[path.parts[0]], *path.with_suffix("").parts[1:]]
            modules[".".join(p for p in parts if p != "__init__")] = ROOT / path
    return modules


def layer(module: str) -> int:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else 0


def _import_time_imports(path: Path) -> list[str]:
    """The ccim_lightning modules a file imports at module level (imports inside functions are deferred)."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [name for name in names if name.startswith("ccim_lightning")]


def test_layers_of_hand_picked_modules():
    names = ("ccim_lightning.head", "ccim_lightning.dictionary.recipe", "ccim_lightning.cli")
    assert [layer(name) for name in names] == [0, 1, 4]
    assert layer("ccim_lightning.datamodules.schema") == 2 and layer("ccim_lightning.callbacks") == 3


def test_imports_point_one_way():
    modules = _modules()
    assert "ccim_lightning.dictionary.recipe" in modules and "ccim_lightning.datamodules.base" in modules
    upward = []
    for name, path in modules.items():
        if path.name == "__init__.py":
            continue  # a package's index re-exports its parts
        for target in _import_time_imports(path):
            if layer(target) > layer(name):
                upward.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
    assert upward == []


def test_no_module_over_the_size_limit_and_no_test_tooling_in_the_package():
    too_long, mocks = [], []
    for path in _modules().values():
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        if "unittest.mock" in text or "from unittest import mock" in text:
            mocks.append(str(path.relative_to(ROOT)))
    assert too_long == [] and mocks == []


@pytest.mark.parametrize("folder", [*PACKAGES, "benchmarks"])
def test_readme_layout_lists_every_module(folder):
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") : readme.index("## Status and known limits")]
    tracked = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [Path(f) for f in tracked.stdout.split() if f.endswith(".py") and not f.endswith("__init__.py")]
    assert files
    assert [str(f) for f in files if f.name not in layout] == []
