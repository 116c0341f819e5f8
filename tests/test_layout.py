"""The package's shape as the README's "Layout" section states it: one-way imports, small modules, all listed."""

import ast
import re
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
    """The ccim_lightning modules a file imports when it is imported.

    Module-level imports, also inside ``try``/``with``/``if`` blocks and class bodies; imports inside functions run
    later and ``if TYPE_CHECKING:`` blocks never run, so neither counts.
    """
    names: list[str] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            elif isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.If):
                typing_only = isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                visit(node.orelse if typing_only else [*node.body, *node.orelse])
            elif isinstance(node, ast.Try):
                visit([*node.body, *[s for h in node.handlers for s in h.body], *node.orelse, *node.finalbody])
            elif isinstance(node, (ast.With, ast.ClassDef)):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return [name for name in names if name.startswith("ccim_lightning")]


def test_import_scan_sees_blocks_but_not_functions(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "try:\n    import ccim_lightning.a\nexcept ImportError:\n    from ccim_lightning.b import x\n"
        "if TYPE_CHECKING:\n    import ccim_lightning.typing_only\n"
        "class C:\n    from ccim_lightning.c import y\n"
        "def f():\n    import ccim_lightning.later\n"
    )
    assert _import_time_imports(source) == ["ccim_lightning.a", "ccim_lightning.b", "ccim_lightning.c"]


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


#: One listed name: ``x.py`` or ``x.sh``, a ``(+ a.py, b.py)`` aside, or a sub-folder ``x/``.
_ENTRY = r"(?:[\w.]+\.(?:py|sh)|\(\+ [^)]*\)|[\w.]+/)"


def readme_layout() -> set[str]:
    """The files the README's layout tree lists, as paths (``folder/name.py``), parsed from its indentation."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Layout") : readme.index("## Status and known limits")]
    block = section[section.index("```\n") + 4 :]
    block = block[: block.index("```")]
    listed, stack = set(), []
    for line in filter(str.strip, block.splitlines()):
        depth = (len(line) - len(line.lstrip(" "))) // 2
        first, _, rest = line.strip().partition(" ")
        if first.endswith("/") and depth <= len(stack):  # a folder, maybe followed by its files
            stack = [*stack[:depth], first.rstrip("/")]
            folder = "/".join(stack)
        else:  # files of the folder at this depth; deeper indentation continues the deepest folder
            folder, rest = "/".join(stack[: min(depth, len(stack))]), line
        names = re.match(rf"\s*({_ENTRY}(?:,?\s+{_ENTRY})*)", rest)  # the description after the names is prose
        listed |= {f"{folder}/{name}" for name in re.findall(r"\w+\.(?:py|sh)", names.group(1) if names else "")}
    return listed


def test_readme_layout_parser_reads_folders_and_asides():
    listed = readme_layout()
    for path in ("ccim_lightning/head.py", "ccim_lightning/dictionary/kmeans.py", "datamodules/_drawing.py",
                 "benchmarks/debias/report.py", "benchmarks/gpu_check.sh"):  # fmt: skip
        assert path in listed, path
    assert "ccim_lightning/kmeans.py" not in listed and "datamodules/head.py" not in listed


@pytest.mark.parametrize("folder", [*PACKAGES, "benchmarks"])
def test_readme_layout_lists_every_module(folder):
    tracked = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [f for f in tracked.stdout.split() if f.endswith((".py", ".sh")) and not f.endswith("__init__.py")]
    assert files
    listed = readme_layout()
    assert [f for f in files if f not in listed] == []
