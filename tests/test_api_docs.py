"""The API reference is rendered from the docstrings: every constructor argument must be documented there."""

from __future__ import annotations

import inspect
import re

import pytest

import famkd_losses

DOCUMENTED = [
    "FAMKDLoss",
    "ScaleAwareMaskedFeatureLoss",
    "MaskedLogitsLoss",
    "MGDLoss",
    "FGDLoss",
    "PKDLoss",
    "CWDLoss",
    "KDLoss",
]


def documented_args(cls: type) -> set[str]:
    """Names of the entries of the class docstring's Google-style ``Args:`` section."""
    doc = inspect.getdoc(cls) or ""
    if "\nArgs:\n" not in doc:
        return set()
    names: set[str] = set()
    for line in doc.split("\nArgs:\n", 1)[1].splitlines():
        if line and not line.startswith(" "):
            break  # the section ends at the next unindented line
        match = re.match(r"^ {4}(\w+(?:, \w+)*):(?:\s|$)", line)
        if match:
            names.update(name.strip() for name in match.group(1).split(","))
    return names


@pytest.mark.parametrize("name", DOCUMENTED)
def test_every_constructor_argument_is_documented(name):
    cls = getattr(famkd_losses, name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    missing = [p for p in params if p not in documented_args(cls)]
    assert not missing, f"{name}'s docstring does not document {missing}"


def test_famkd_docstring_names_the_ablation_defaults():
    doc = inspect.getdoc(famkd_losses.FAMKDLoss).replace('"', "'")  # compare with repr()
    signature = inspect.signature(famkd_losses.FAMKDLoss.__init__).parameters
    for key in famkd_losses.FULL_METHOD:
        assert f"{key}={signature[key].default!r}" in doc, key
