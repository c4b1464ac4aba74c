"""Every docstring example of the package runs and prints what it shows (``doctest``)."""
import doctest
import importlib
import pkgutil

import pytest

import timm_peft

MODULES = sorted(m.name for m in pkgutil.walk_packages(timm_peft.__path__, "timm_peft.")
                 if not m.name.endswith("__main__"))  # __main__ parses the command line


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
