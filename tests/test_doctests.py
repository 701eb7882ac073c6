"""The docstring examples (>>>) of every sam_optax module run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import sam_optax

MODULES = sorted(
    ["sam_optax"]
    + [info.name for info in pkgutil.walk_packages(sam_optax.__path__, prefix="sam_optax.")]
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False
    )
    report = []
    for test in finder.find(module, name, module=module):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
