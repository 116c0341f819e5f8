"""The docs' snippets: every command and Python block a user would paste from README.md and docs/ is run here on tiny
data, or says in its first line what it needs that the tests lack (``# needs: a dataset``, ``# needs: a GPU``, ...).

How a page's blocks run (the ``slow`` tests): in order, in one scratch folder that links ``configs/`` and holds a
drawn ``photo.jpg``, so a later block can use what an earlier one wrote (a checkpoint, a dictionary file). ``bash``
blocks run under ``bash -eo pipefail`` with this environment's ``ccim`` and ``python`` first on the PATH; ``python``
blocks run with this interpreter. ``ccim`` there is a wrapper that appends :data:`TINY` to every subcommand that
trains or builds a dictionary (and to ``bias-report --config``), so a block shows the real command and the test runs
it on 64 synthetic images.
"""

import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
#: Languages of blocks that are commands or code; every other block must name a language too (text, yaml, ...).
RUNNABLE = ("bash", "python")
NEEDS = "# needs: "
#: Appended by the ``ccim`` wrapper to the subcommands below: 64 training images, one epoch, 4 prototypes, one CPU.
TINY = (
    "--data.init_args.train_size 64 --data.init_args.val_size 16 --data.init_args.test_size 16 "
    "--data.init_args.num_workers 0 --model.init_args.num_prototypes 4 --trainer.max_epochs 1 "
    "--trainer.accelerator cpu --trainer.devices 1"
)
TINY_SUBCOMMANDS = ("fit", "validate", "test", "predict", "build-dictionary")
#: Seconds one block may take before the test fails (a tiny run takes well under a minute on 2 shared cores).
BLOCK_TIMEOUT = 600


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: its language, its text, and where it starts (for messages)."""

    page: Path
    line: int
    language: str
    text: str

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"

    @property
    def needs(self) -> str | None:
        """What the block needs that the tests lack (its first line's ``# needs:``), or None: the tests run it."""
        first = self.text.lstrip("\n").splitlines()[0] if self.text.strip() else ""
        return first[len(NEEDS) :] if first.startswith(NEEDS) else None


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced (```) block of a Markdown page, in order; an unclosed fence is an error naming the line."""
    blocks, opened, language, body = [], None, "", []
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        fence = re.match(r"^\s*```(.*)$", line)
        if opened is None and fence:
            opened, language, body = number, fence.group(1).strip(), []
        elif opened is not None and fence and not fence.group(1).strip():
            blocks.append(Block(page, opened, language, "\n".join(body) + "\n"))
            opened = None
        elif opened is not None:
            body.append(line)
    assert opened is None, f"{Block(page, opened, language, '').where}: a fenced block is not closed"
    return blocks


def _all_blocks() -> list[Block]:
    return [block for page in PAGES for block in fenced_blocks(page)]


def test_fenced_blocks_parser_reads_languages_bodies_and_needs(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n```bash\n# needs: a GPU\nccim fit\n```\n\n```python\nprint(1)\n```\n\n"
        "- item\n\n  ```text\n  out\n  ```\n"
    )
    blocks = fenced_blocks(page)
    assert [(b.line, b.language) for b in blocks] == [(3, "bash"), (8, "python"), (14, "text")]
    assert blocks[0].needs == "a GPU" and blocks[1].needs is None and blocks[1].text == "print(1)\n"
    page.write_text("```bash\nls\n")
    with pytest.raises(AssertionError, match="page.md:1: a fenced block is not closed"):
        fenced_blocks(page)


def test_every_block_names_its_language():
    unnamed = [block.where for block in _all_blocks() if not block.language]
    assert unnamed == [], "give these blocks a language (bash, python, yaml, text, ...)"


def test_every_yaml_block_parses():
    for block in _all_blocks():
        if block.language == "yaml":
            yaml.safe_load(block.text)


def test_the_docs_have_runnable_blocks_and_marked_ones():
    # The marking must not become a way to run nothing: most pages that teach commands run them.
    runnable = [block for block in _all_blocks() if block.language in RUNNABLE]
    run = [block for block in runnable if block.needs is None]
    assert len(run) >= 15 and len(runnable) - len(run) >= 10
    for block in runnable:
        if block.needs is not None:
            assert block.needs.strip(), f"{block.where}: say what the block needs after '# needs:'"


def _pages_with_runs() -> list[Path]:
    return [page for page in PAGES if any(b.language in RUNNABLE and b.needs is None for b in fenced_blocks(page))]


def _scratch_folder(tmp_path: Path) -> dict[str, str]:
    """The folder a page's blocks run in, and their environment (the ``ccim`` wrapper first on the PATH)."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    real = Path(sys.executable).with_name("ccim")
    subcommands = "|".join(TINY_SUBCOMMANDS)
    # bias-report takes the overrides only with --config (with --table they are an error); help options take none
    (bin_dir / "ccim").write_text(
        f'#!/usr/bin/env bash\n[[ " $* " == *help* ]] && exec "{real}" "$@"\n'
        f'case "$1" in\n  {subcommands}) exec "{real}" "$@" {TINY} ;;\n'
        f'  bias-report) if [[ " $* " == *" --config "* ]]; then exec "{real}" "$@" {TINY}; fi ;;\n'
        f'esac\nexec "{real}" "$@"\n'
    )
    (bin_dir / "ccim").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_runs(), ids=lambda page: str(page.relative_to(ROOT)))
def test_the_runnable_blocks_of_a_page_run(page, tmp_path):
    env = _scratch_folder(tmp_path)
    for number, block in enumerate(fenced_blocks(page)):
        if block.language not in RUNNABLE or block.needs is not None:
            continue
        if block.language == "bash":
            command = ["bash", "-eo", "pipefail", "-c", block.text]
        else:
            script = tmp_path / f".block_{number}.py"
            script.write_text(block.text)
            command = [sys.executable, str(script)]
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT, check=False
        )
        output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert done.returncode == 0, f"{block.where} failed ({done.returncode}):\n{output}"


def _help_text(args: list[str], monkeypatch) -> str:
    """What ``ccim ARGS`` prints, run in this process at 100 columns (argparse wraps at $COLUMNS)."""
    from ccim_lightning.commands.main import main

    monkeypatch.setenv("COLUMNS", "100")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(args)
    return out.getvalue()


def test_the_help_texts_on_the_command_page_are_current(monkeypatch):
    page = ROOT / "docs" / "reference" / "cli.md"
    marked = re.findall(r"<!-- help: (.*?) -->\n```text\n(.*?)```\n", page.read_text(), flags=re.S)
    assert [command for command, _ in marked] == [
        "ccim",
        "ccim build-dictionary --help",
        "ccim bias-report --help",
        "ccim predict-files --help",
    ]
    for command, text in marked:
        current = _help_text(command.split()[1:], monkeypatch)
        assert text.rstrip() == current.rstrip(), (
            f"docs/reference/cli.md's block for `{command}` is stale: replace it with the output of "
            f"`COLUMNS=100 {command}`"
        )


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs' toc both make it for plain headings: lower case, punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", text)


def test_slug_matches_github_and_mkdocs_for_our_headings():
    assert _slug("How much the demo's numbers vary") == "how-much-the-demos-numbers-vary"
    assert _slug("Photos and videos: `ccim predict-files`") == "photos-and-videos-ccim-predict-files"


def test_the_readme_links_into_the_docs_resolve():
    """The README is not part of the site, so the strict build does not check its links: this test does."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len(local) >= 15
    broken = []
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        if not target.is_file():
            broken.append(f"{link}: no file {path}")
        elif anchor:
            headings = re.findall(r"^#+ (.*)$", target.read_text(), flags=re.M)
            if anchor not in {_slug(heading) for heading in headings}:
                broken.append(f"{link}: no heading with the anchor #{anchor} in {path}")
    assert broken == []


def test_the_api_reference_documents_every_public_name():
    """Every name of the public packages' ``__all__`` is defined in a module that an API page renders (``:::``)."""
    import importlib
    import inspect

    # The docs tool sees the top-level folders by their own names (setup.cfg's package_dir maps them on install).
    installed = {"callbacks.": "ccim_lightning.callbacks.", "datamodules.": "ccim_lightning.datamodules."}
    rendered = set()
    for page in (ROOT / "docs" / "reference" / "api").glob("*.md"):
        for line in page.read_text().splitlines():
            if line.startswith(":::"):
                target = line.removeprefix(":::").strip()
                for folder, package in installed.items():
                    if target.startswith(folder):
                        target = package + target.removeprefix(folder)
                rendered.add(target)
    missing = []
    for package in ("ccim_lightning", "ccim_lightning.debias", "ccim_lightning.callbacks"):
        module = importlib.import_module(package)
        for name in module.__all__:
            home = inspect.getmodule(getattr(module, name)).__name__
            if home not in rendered:
                missing.append(f"{package}.{name} (defined in {home})")
    assert not missing, f"not rendered on any docs/reference/api page: {missing}"
