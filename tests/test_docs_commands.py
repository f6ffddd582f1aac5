"""Every command line the docs show parses with the installed CLIs: ``metalearn ...``
with metalearn's own parser, ``ray ...`` against ``ray <command> --help``. A recipe that
cannot run fails here, not on a user's cluster. ``kubectl`` lines need a Kubernetes
cluster and its CLI, which this machine has not: they are listed, not run.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import os
import re
import shlex
import shutil
import subprocess

import pytest

from metalearn.cli import COMMANDS, build_parser

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DOCS = ["README.md", "clusters/README.md", "experiments/README.md",
        *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
CLUSTER_FILES = sorted(os.path.relpath(p, ROOT)
                       for p in glob.glob(os.path.join(ROOT, "clusters", "**", "*.yaml"),
                                          recursive=True))
# Words that stand for a value the reader fills in (RUN_DIR, S, FILE.png, <provider>).
PLACEHOLDER = re.compile(r"^(<[^>]+>|[A-Z][A-Z0-9_.]*|[A-Z][A-Z0-9_]*\.[a-z]+)$")


def _shell_lines(path: str) -> list[str]:
    """Command lines of a doc: fenced and indented code, continuations joined; for a
    YAML file, its comment lines."""
    text = open(os.path.join(ROOT, path)).read()
    if path.endswith(".yaml"):
        raw = [line.lstrip("# ").rstrip() for line in text.splitlines()
               if line.lstrip().startswith("#")]
    else:
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        raw = [line for block in blocks for line in block.splitlines()]
        raw += re.findall(r"(?m)^    ((?:metalearn|ray|kubectl) .*)$", text)
    lines, pending = [], ""
    for line in raw:
        line = line.split("  #")[0].rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append((pending + line).strip())
        pending = ""
    return lines


def _commands(program: str) -> list[tuple[str, str]]:
    """(file, command) for every ``program ...`` in the docs, also inside ``ray exec``'s
    quoted command and after ``&&``."""
    found = []
    for path in DOCS + CLUSTER_FILES:
        for line in _shell_lines(path):
            for part in re.split(r"&&|'|\|", line):
                part = part.strip()
                if not part.startswith(program + " ") or "──>" in part:
                    continue
                # A YAML file's comments are prose too ("metalearn on AWS at ..."):
                # there, a command is one whose second word is a command or a flag.
                if path.endswith(".yaml") and program == "metalearn" and not (
                        part.split()[1] in COMMANDS or part.split()[1].startswith("-")):
                    continue
                found.append((path, part))
    return found


def _argv(command: str) -> list[str]:
    command = re.sub(r"\[([^\[\]]*)\]", r"\1", command)  # optional parts: check them too
    return [word for word in shlex.split(command.replace("...", ""))[1:] if word != "|"]


METALEARN = _commands("metalearn")
RAY = _commands("ray")


def test_the_docs_show_commands():
    assert len(METALEARN) > 30 and len(RAY) > 15


@pytest.mark.parametrize("path,command", METALEARN, ids=[c for _, c in METALEARN])
def test_metalearn_commands_parse(path, command):
    argv = _argv(command)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            build_parser(argv).parse_args(argv)
    except SystemExit as done:
        message = errors.getvalue().strip().splitlines()[-1] if errors.getvalue() else ""
        # A placeholder where a number goes (--seed S) is the reader's to fill in.
        typed = re.search(r"invalid (?:int|float) value: '([^']*)'", message)
        if done.code not in (0, None) and not (typed and PLACEHOLDER.match(typed[1])):
            pytest.fail(f"{path}: `{command}`: {message}")


@functools.lru_cache(maxsize=None)
def _ray_help(subcommand: tuple[str, ...]) -> str:
    ray = shutil.which("ray") or os.path.join(os.path.dirname(os.sys.executable), "ray")
    done = subprocess.run([ray, *subcommand, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"ray {' '.join(subcommand)} --help: {done.stderr[-500:]}"
    return done.stdout


@pytest.mark.parametrize("path,command", RAY, ids=[c for _, c in RAY])
def test_ray_commands_use_flags_ray_has(path, command):
    words = shlex.split(command)
    subcommand = tuple(words[1:3] if words[1] in ("job",) else words[1:2])
    usage = _ray_help(subcommand)
    for word in words[1 + len(subcommand):]:
        if word == "--":
            break  # what follows is the job's own command line
        if word.startswith("--"):
            flag = word.split("=")[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage), \
                f"{path}: `{command}`: ray {' '.join(subcommand)} has no {flag}"
    # `ray submit` uploads and runs a script file; a command after it is not one.
    if subcommand == ("submit",):
        script = [w for w in words[2:] if not w.startswith("-")][1:2]
        assert script and script[0].endswith(".py"), f"{path}: `{command}`: not a script"


def test_kubectl_lines_are_the_known_ones():
    # Checked by hand against kubectl's reference; they need a cluster to run.
    assert {c.split()[1] for _, c in _commands("kubectl")} <= {"apply", "cp",
                                                              "port-forward", "logs",
                                                              "get", "delete", "exec"}
