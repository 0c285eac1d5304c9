"""What ``pip install famkd-losses`` sees, checked from the files (the build itself, twine's
metadata check and the wheel in a fresh venv run in CI): the licence, the licence metadata, the
README as the long description, the tests shipped whole in the sdist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_licence_file_and_spdx_metadata() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a notice
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))  # setuptools refuses both


def test_readme_links_work_as_a_long_description() -> None:
    """The README is the package index's description page, where relative link targets (files
    of the repository, in-page anchors) lead nowhere: every link target is absolute."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)", readme)  # [text](target) and ![alt](target)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", readme, flags=re.M)  # [label]: target
    targets += re.findall(r"""(?:href|src)=["']([^"']+)""", readme)
    relative = [t for t in targets if not re.match(r"(https?|mailto):", t)]
    assert not relative, f"relative link targets in README.md: {relative}"


def test_sdist_ships_the_tests_whole() -> None:
    """MANIFEST.in grafts tests/ (conftest.py, _literal.py, tests/kernels/) and the examples
    and benchmark scripts some tests run; the wheel holds the package only."""
    rules = (ROOT / "MANIFEST.in").read_text().splitlines()
    assert "graft tests" in rules and "graft examples" in rules
    assert any(r.startswith("recursive-include benchmarks") and "*.py" in r for r in rules)
    for needed in ("tests/conftest.py", "tests/_literal.py", "tests/kernels", "examples/quickstart.py"):
        assert (ROOT / needed).exists(), needed
    assert _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"] == ["famkd_losses*"]


def test_dev_extra_has_the_packaging_tools() -> None:
    dev = _pyproject()["project"]["optional-dependencies"]["dev"]
    names = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0] for d in dev}
    assert {"build", "twine"} <= names
