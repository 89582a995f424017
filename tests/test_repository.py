"""The README's Quickstart is what CI runs, the pinned requirements agree with pyproject.toml and
with what the scripts import, and the code is formatted and linted as pyproject.toml configures."""

import ast
import os
import re
import subprocess
import sys
import tomllib

from helpers import ROOT


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def quickstart_commands():
    section = read("README.md").split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S)[1]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    train, test = quickstart_commands()
    assert "python pqn.py" in train and "requirements/" in train
    assert "pytest" in test and "requirements/test.txt" in test
    ci_lines = [line.strip() for line in read(".ci/run").splitlines()]
    assert test in ci_lines


def pinned(path):
    """The package names a requirements file pins, with the files it includes (-r)."""
    names = set()
    for line in read(path).splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= pinned(os.path.join(os.path.dirname(path), line[3:]))
        elif line:
            assert "==" in line, f"{path}: {line} is not pinned"
            names.add(line.split("==")[0].lower())
    return names


def test_pinned_requirements_cover_pyproject_dependencies():
    project = tomllib.loads(read("pyproject.toml"))["project"]

    def names(deps):
        return {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in deps}

    assert names(project["dependencies"]) <= pinned("requirements/base.txt")
    for extra, deps in project["optional-dependencies"].items():
        assert names(deps) <= pinned(f"requirements/{extra}.txt"), extra


def test_quickstart_requirements_cover_what_pqn_py_imports():
    # The Quickstart installs requirements/base.txt and runs pqn.py: every package pqn.py imports at
    # its top must be pinned there (these packages' import names are their distribution names).
    tree = ast.parse(read("pqn.py"))
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names)
    assert {"torch", "gymnasium", "envpool"} <= third_party
    assert third_party <= pinned("requirements/base.txt")


def test_code_is_formatted_and_linted():
    for command in (["format", "--check"], ["check"]):
        result = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, (
            f"ruff {' '.join(command)}: run `ruff format . && ruff check --fix .`\n{result.stdout}{result.stderr}"
        )
