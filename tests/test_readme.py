"""README is short and true (issue 28): every command of its cheat-sheet exists and answers ``--help``, every link
into the documentation names a page that exists, and its test command is the one CI runs."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = re.findall(r"^\| `python -m ([\w.]+)", README, flags=re.MULTILINE)


def test_readme_is_short_and_lists_the_commands() -> None:
    assert len(README.splitlines()) <= 150
    assert len(COMMANDS) >= 14 and len(set(COMMANDS)) == len(COMMANDS)


@pytest.mark.parametrize("module", COMMANDS)
def test_every_cheat_sheet_command_answers_help(module: str, capsys: pytest.CaptureFixture) -> None:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_every_link_into_the_site_names_a_page() -> None:
    links = re.findall(r"\]\(((?:docs/|ARCHITECTURE)[^)#\s]*)", README)
    assert len(links) >= 20
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, missing


def test_readme_test_command_is_the_one_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in README and "\npython -m pytest -q\n" in ci
