"""The package's shape as docs/reference/layout.md states it: one-way imports, small modules, all listed."""

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
#: Layers, lowest first: a module may import its own layer or lower ones, never a higher one, also inside functions.
#: Every module must fall under one of these names (the longest matching prefix decides).
LAYERS = {
    "ccim_lightning.types": 0,
    "ccim_lightning.arguments": 0,
    **dict.fromkeys(
        (
            f"ccim_lightning.{name}"
            for name in (
                "head",
                "hosts",
                "losses",
                "weights",
                "checkpoints",
                "class_paths",
                "compat",
                "logs",
                "sample_index",
                "thresholds",
            )
        ),
        1,
    ),
    "ccim_lightning.dictionary": 2,
    "ccim_lightning.debias": 2,
    "ccim_lightning.datamodules": 3,
    "ccim_lightning.module": 4,
    "ccim_lightning.callbacks": 4,
    "ccim_lightning.analysis": 5,
    "ccim_lightning.inference": 5,
    "ccim_lightning.commands": 6,
    # The package index re-exports the model side (module, layer 4) and the Predictor (layer 5).
    "ccim_lightning": 5,
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
    """The layer of a module (or of the module an import names); KeyError for one the table does not place."""
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise KeyError(
            f"{module} is in no layer of tests/test_layout.py's LAYERS: add it there and to docs/reference/layout.md."
        )
    return LAYERS[max(matches, key=len)]


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _project_imports(path: Path, module: str = "") -> list[str]:
    """The ccim_lightning modules a file imports, anywhere in it: at module level, in blocks, classes and functions.

    Only ``if TYPE_CHECKING:`` bodies are left out (they never run). An import inside a function runs later, but
    it is a dependency all the same: an upward one there is a hidden cycle. Relative imports are resolved against
    ``module`` (the file's installed name).
    """
    names: list[str] = []

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            for statement in node.orelse if _is_type_checking(node.test) else [*node.body, *node.orelse]:
                self.visit(statement)
            self.visit(node.test)

        def visit_Import(self, node: ast.Import) -> None:
            names.extend(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            base = node.module or ""
            if node.level:  # from . import x / from ..a import b, relative to this module's package
                package = module.split(".")[: -node.level] if module else []
                base = ".".join([*package, base] if base else package)
            # The imported name may be a module or an object in one; the longest layer prefix places either.
            names.extend(f"{base}.{alias.name}" for alias in node.names)

    Visitor().visit(ast.parse(path.read_text()))
    return [name for name in names if name == "ccim_lightning" or name.startswith("ccim_lightning.")]


def test_import_scan_sees_blocks_and_functions_but_not_type_checking(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "import typing\nfrom typing import TYPE_CHECKING\n"
        "try:\n    import ccim_lightning.a\nexcept ImportError:\n    from ccim_lightning.b import x\n"
        "if TYPE_CHECKING:\n    import ccim_lightning.typing_only\nelse:\n    import ccim_lightning.runtime\n"
        "if typing.TYPE_CHECKING:\n    import ccim_lightning.typing_only_too\n"
        "class C:\n    from ccim_lightning.c import y\n"
        "    def method(self):\n        import ccim_lightning.in_method\n"
        "def f():\n    import ccim_lightning.later\n    if True:\n        from ccim_lightning.nested import z\n"
        "g = lambda: __import__('os')\n"
    )
    assert _project_imports(source) == [
        "ccim_lightning.a",
        "ccim_lightning.b.x",
        "ccim_lightning.runtime",
        "ccim_lightning.c.y",
        "ccim_lightning.in_method",
        "ccim_lightning.later",
        "ccim_lightning.nested.z",
    ]


def test_relative_imports_are_resolved(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("from . import sibling\nfrom ..dictionary import store\nfrom .inner import thing\n")
    assert _project_imports(source, "ccim_lightning.analysis.sample") == [
        "ccim_lightning.analysis.sibling",
        "ccim_lightning.dictionary.store",
        "ccim_lightning.analysis.inner.thing",
    ]


def test_an_upward_import_inside_a_function_is_reported(tmp_path):
    # A dictionary module that reaches up into the datamodules only when a function runs: the scan must see it.
    source = tmp_path / "recipe.py"
    source.write_text(
        "from ccim_lightning.dictionary.store import ConfounderDictionary\n\n\n"
        "def build(datamodule):\n    from ccim_lightning.datamodules.base import PersonDataModule\n"
        "    return isinstance(datamodule, PersonDataModule)\n"
    )
    assert upward_imports({"ccim_lightning.dictionary.recipe": source}) == [
        "ccim_lightning.dictionary.recipe (layer 2) imports ccim_lightning.datamodules.base.PersonDataModule (layer 3)"
    ]


def test_layers_of_hand_picked_modules():
    names = ("ccim_lightning.types", "ccim_lightning.head", "ccim_lightning.dictionary.recipe",
             "ccim_lightning.datamodules.base", "ccim_lightning.callbacks", "ccim_lightning.analysis.report",
             "ccim_lightning.commands.main")  # fmt: skip
    assert [layer(name) for name in names] == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(KeyError, match="ccim_lightning_extra"):
        layer("ccim_lightning_extra.x")


def test_every_module_has_a_layer():
    unplaced = []
    for name in _modules():
        try:
            layer(name)
        except KeyError:
            unplaced.append(name)
    assert unplaced == []


def upward_imports(modules: dict[str, Path]) -> list[str]:
    """Every import of a higher layer by these modules, as readable lines."""
    upward = []
    for name, path in modules.items():
        if path.name == "__init__.py":
            continue  # a package's index re-exports its parts
        for target in _project_imports(path, name):
            if layer(target) > layer(name):
                upward.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
    return upward


def test_imports_point_one_way():
    modules = _modules()
    assert "ccim_lightning.dictionary.recipe" in modules and "ccim_lightning.commands.main" in modules
    assert upward_imports(modules) == []


def test_analysis_is_pure_numpy_pandas_matplotlib():
    heavy = []
    for name, path in _modules().items():
        if name.startswith("ccim_lightning.analysis"):
            for statement in ast.walk(ast.parse(path.read_text())):
                if isinstance(statement, ast.Import):
                    roots = [alias.name.split(".")[0] for alias in statement.names]
                elif isinstance(statement, ast.ImportFrom) and statement.module:
                    roots = [statement.module.split(".")[0]]
                else:
                    continue
                heavy += [f"{name} imports {root}" for root in roots if root in ("torch", "torchmetrics", "lightning")]
    assert heavy == []


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


LAYOUT_PAGE = ROOT / "docs" / "reference" / "layout.md"


def documented_layout() -> set[str]:
    """The files the layout page's tree lists, as paths (``folder/name.py``), parsed from its indentation."""
    page = LAYOUT_PAGE.read_text()
    block = page[page.index("```text\n") + len("```text\n") :]
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


def test_layout_parser_reads_folders_and_asides():
    listed = documented_layout()
    for path in ("ccim_lightning/head.py", "ccim_lightning/dictionary/kmeans.py", "datamodules/_drawing.py",
                 "benchmarks/debias/report.py", "benchmarks/gpu_check.sh"):  # fmt: skip
        assert path in listed, path
    assert "ccim_lightning/kmeans.py" not in listed and "datamodules/head.py" not in listed


@pytest.mark.parametrize("folder", [*PACKAGES, "benchmarks"])
def test_layout_page_lists_every_module(folder):
    tracked = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [f for f in tracked.stdout.split() if f.endswith((".py", ".sh")) and not f.endswith("__init__.py")]
    assert files
    listed = documented_layout()
    assert [f for f in files if f not in listed] == []


def test_setup_cfg_installs_every_package_folder():
    """A wheel holds only the packages setup.cfg lists: every folder of the package with an __init__.py."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    folders = {module for module, path in _modules().items() if path.name == "__init__.py"}
    assert folders <= listed, f"setup.cfg [options] packages lacks {sorted(folders - listed)}"
