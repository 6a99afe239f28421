"""Shared test setup."""

import pytest

from jaxsaddle import _backend

# The experiment helpers assert on run outputs; rewriting their asserts makes
# a failure show the values compared, as in a test module.
pytest.register_assert_rewrite("_experiment_runs")


@pytest.fixture(autouse=True)
def cpu_forms(monkeypatch):
  """Every test runs the forms the CPU chooses, on whatever backend it runs: the tests of a
  GPU's forms patch them in, and compare them with these."""
  monkeypatch.setattr(_backend, "branches_wait_on_host", lambda: False)
  monkeypatch.setattr(_backend, "loops_slow_down_convolutions", lambda: True)
