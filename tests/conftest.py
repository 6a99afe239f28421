"""Shared test setup.

Most of the suite's time is XLA compiling programs that then run for milliseconds. On a machine
whose only backend is the CPU, the suite compiles with XLA's backend optimisations off
(:data:`experiments._runner.FAST_COMPILE_XLA_FLAGS`, set here before JAX starts its backend):
about half the time, and results that differ only by rounding, which every numeric test allows.
``JAXSADDLE_FULL=1`` compiles as a user's run does, and so does a machine with a GPU or TPU
plugin, where the flags would slow the accelerator's kernels instead. XLA's concurrency-optimised
CPU scheduler is turned off in either case, as the experiments' command line does
(:data:`experiments._runner.CPU_SCHEDULER_XLA_FLAGS`: it left a program hanging).
"""

import importlib.util
import os

import pytest

from experiments import _runner
from jaxsaddle import _backend

_runner.avoid_cpu_scheduler_hang()
if os.environ.get("JAXSADDLE_FULL") != "1" and not any(
  importlib.util.find_spec(plugin) for plugin in ("jax_plugins", "libtpu")
):
  _runner.use_fast_compile()

# The experiment helpers assert on run outputs; rewriting their asserts makes
# a failure show the values compared, as in a test module.
pytest.register_assert_rewrite("_experiment_runs")


@pytest.fixture(autouse=True)
def cpu_forms(monkeypatch):
  """Every test runs the forms the CPU chooses, on whatever backend it runs: the tests of a
  GPU's forms patch them in, and compare them with these."""
  monkeypatch.setattr(_backend, "branches_wait_on_host", lambda: False)
  monkeypatch.setattr(_backend, "loops_slow_down_convolutions", lambda: True)
