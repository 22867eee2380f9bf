"""The README stays true: its commands exist, its quickstart targets exist, its one-liner runs."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from free.cli import app
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


@dataclass
class Block:
    """A ```bash block of the README: run by the README test in a fresh shell unless marked.

    The marker is an HTML comment on the line before the fence: ``<!-- readme-test: skip (why) -->``
    (not run, e.g. hours on a GPU), or ``<!-- readme-test: new-shell -->`` (the lines every new shell
    starts with; run before each other block).
    """

    line: int
    code: str
    marker: str | None

    @property
    def skip_reason(self) -> str | None:
        m = re.fullmatch(r"skip \((.+)\)", self.marker or "")
        return m.group(1) if m else None

    @property
    def new_shell(self) -> bool:
        return self.marker == "new-shell"


def readme_blocks(text: str = README) -> list[Block]:
    blocks = []
    for m in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        before = text[: m.start()].rstrip().splitlines()
        marker = re.fullmatch(r"<!-- readme-test: (.+?) -->", before[-1].strip()) if before else None
        blocks.append(Block(text[: m.start()].count("\n") + 1, m.group(1), marker.group(1) if marker else None))
    return blocks


def test_every_readme_block_is_run_or_says_why_not() -> None:
    blocks = readme_blocks()
    assert sum(b.new_shell for b in blocks) == 1, "exactly one new-shell block"
    for block in blocks:
        assert block.marker is None or block.new_shell or block.skip_reason, f"README line {block.line}: {block.marker}"
    assert sum(b.skip_reason is None for b in blocks) > 5  # most are run


def test_readme_block_markers_are_parsed() -> None:
    text = "x\n<!-- readme-test: skip (a GPU) -->\n```bash\nmake gpu\n```\n\n```bash\nls\n```\n"
    first, second = readme_blocks(text)
    assert (first.skip_reason, first.code, first.line) == ("a GPU", "make gpu\n", 3)
    assert (second.skip_reason, second.new_shell, second.code) == (None, False, "ls\n")


def readme_free_commands() -> list[list[str]]:
    """The subcommand path of every `free ...` line in the README's bash blocks."""
    commands = []
    for block in BASH_BLOCKS:
        for line in block.splitlines():
            words = line.split("#")[0].split()
            if "free" in words:
                words = words[words.index("free") + 1 :]
                commands.append([w for w in words if re.fullmatch(r"[a-z]+", w)][:2])
    return commands


def test_quickstart_is_exactly_two_make_commands() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in quickstart.strip().splitlines()] == ["make run", "make test"]
    makefile = (REPO / "Makefile").read_text()
    for target in ("run", "test", "setup"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"Makefile has no '{target}' target"
    assert "make test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", readme_free_commands(), ids=" ".join)
def test_readme_commands_exist(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, f"`free {' '.join(command)}` from the README: {result.output}"


RESULTS = sorted((REPO / "benchmarks" / "results").glob("*.json"))


def test_every_benchmark_result_is_in_the_results_document() -> None:
    assert {p.stem for p in RESULTS} >= {"recovery", "accuracy", "eval", "pipeline"}, "benchmark results missing"


@pytest.mark.parametrize("result", RESULTS, ids=lambda p: p.stem)
def test_results_document_shows_the_committed_numbers(result) -> None:
    """docs/RESULTS.md holds each committed result's tables exactly as `python -m free.bench.report` renders
    them, and its plot beside it."""
    from free.bench.report import render

    document = (REPO / "docs" / "RESULTS.md").read_text()
    assert render(result) in document, f"docs/RESULTS.md does not show {result.name} as rendered; update it"
    assert f"benchmarks/results/{result.stem}.png" in document
    assert result.with_suffix(".png").is_file()
