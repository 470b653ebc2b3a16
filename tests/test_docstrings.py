"""Every ``>>>`` example in the package's docstrings runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import margins

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(margins.__path__, prefix="margins."))


def test_every_module_is_collected():
  assert {"margins.parallel", "margins.losses.margin", "margins.losses.classification"} <= set(
      MODULES)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
  module = importlib.import_module(module_name)
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  result = doctest.testmod(module, optionflags=flags, report=True)
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"
