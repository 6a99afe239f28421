"""Every example in jaxsaddle's docstrings runs: the ``Example::`` blocks and the doctests.

An ``Example::`` block must be self-contained (its own imports); doctests must print what they
show. A broken example is a broken promise to the reader who copies it.
"""

import ast
import doctest
import importlib
import pkgutil
import re
import textwrap

import pytest

import jaxsaddle

MODULES = sorted(
  module.name.removeprefix("jaxsaddle.")
  for module in pkgutil.walk_packages(jaxsaddle.__path__, prefix="jaxsaddle.")
)
EXAMPLE_BLOCK = re.compile(r"Example::\n\n((?:[ ]+.*\n|\n)+)")


def _example_blocks(module) -> list[tuple[str, str]]:
  """``(owner, code)`` of every ``Example::`` block in the module's docstrings."""
  with open(module.__file__) as f:
    tree = ast.parse(f.read())
  blocks = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
      docstring = ast.get_docstring(node, clean=True) or ""
      for match in EXAMPLE_BLOCK.finditer(docstring + "\n"):
        blocks.append((getattr(node, "name", "<module>"), textwrap.dedent(match.group(1))))
  return blocks


def test_the_block_reader_finds_the_examples():
  # Guards against a pattern that finds nothing, which would make every test below vacuous.
  owners = {
    f"{name}.{owner}"
    for name in MODULES
    for owner, _ in _example_blocks(importlib.import_module(f"jaxsaddle.{name}"))
  }
  assert {
    "alias.<module>",
    "negative_curvature.pagd",
    "spectrum._monitor.monitor_curvature",
  } <= owners


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, capsys):
  module = importlib.import_module(f"jaxsaddle.{name}")
  for owner, code in _example_blocks(module):
    exec(compile(code, f"{name}.{owner} example", "exec"), {})
  results = doctest.testmod(
    module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False
  )
  assert results.failed == 0, capsys.readouterr().out
