"""Every ``>>>`` example in the package's docstrings runs and prints what it says."""

import doctest
import importlib
import inspect
import pkgutil
import subprocess
import sys

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


def test_public_api_is_all_and_every_function_has_an_example():
  """``margins.__all__`` is what ``margins/__init__.py`` imports, and each function and margin of
  it carries a runnable example (run above); each function that is a paper's formula, a References
  line."""
  imported = {name for name, value in vars(margins).items()
              if not name.startswith("_") and not inspect.ismodule(value)}
  assert sorted(margins.__all__) == sorted(imported)
  helpers = {"dense", "chunked", "padded_num_classes", "similarity", "margin_dataclass",
             "margin_softmax_loss"}  # No paper of their own.
  functions = [name for name in margins.__all__ if inspect.isfunction(getattr(margins, name))]
  assert "arcface_loss" in functions and "sharded" in functions
  margin_classes = [  # The base class's example is margin_dataclass's.
      name for name in margins.__all__ if inspect.isclass(getattr(margins, name))
      and issubclass(getattr(margins, name), margins.Margin) and name != "Margin"]
  assert "ArcFace" in margin_classes
  without_example = [name for name in functions + margin_classes
                     if ">>>" not in getattr(margins, name).__doc__]
  assert not without_example, f"no >>> example in {without_example}"
  without_reference = [name for name in (set(functions) - helpers) | set(margin_classes)
                       if "References:" not in getattr(margins, name).__doc__]
  assert not without_reference, f"no References line in {sorted(without_reference)}"


def test_subpackages_are_imported_on_first_use():
  # The README's margins.models.create, margins.evaluation ... raised AttributeError after a plain
  # `import margins`; the losses alone import no Flax, grain or Pillow.
  code = ("import sys, margins; heavy = {'flax', 'grain', 'PIL'} & set(sys.modules); "
          "print(sorted(heavy), margins.models.create.__name__, margins.data.write_bin.__name__, "
          "'evaluate' in dir(margins)); margins.nothing")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
  # dir() lists only what is imported: help() or a completion walking it would otherwise import
  # the command-line tools, whose absl flags clash with a program's own (--workdir).
  assert result.stdout.split() == ["[]", "create", "write_bin", "False"], result.stderr
  assert "AttributeError: module 'margins' has no attribute 'nothing'" in result.stderr


@pytest.mark.parametrize("package", ["margins.evaluation", "margins.data"])
def test_every_function_a_subpackage_exports_has_an_example(package):
  module = importlib.import_module(package)
  functions = [name for name, value in vars(module).items()
               if not name.startswith("_") and inspect.isfunction(value)]
  assert functions
  without_example = [name for name in functions if ">>>" not in getattr(module, name).__doc__]
  assert not without_example, f"no >>> example in {package}: {without_example}"
