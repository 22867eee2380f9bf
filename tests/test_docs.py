"""The README stays true: its commands exist, its quickstart targets exist, its one-liner runs."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from free.cli import app
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


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
