"""The ``metalearn`` entry points: the command list, ``--version``, ``python -m``."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from metalearn.cli import COMMANDS, main


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"metalearn {importlib.metadata.version('metalearn')}")


def test_python_m_metalearn_lists_every_command_with_its_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "metalearn", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name, (_, line) in COMMANDS.items():
        assert any(row.split() == [name] + line.split() for row in done.stdout.splitlines()), name
    bad = subprocess.run([sys.executable, "-m", "metalearn", "no-such-command"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
