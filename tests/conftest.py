"""Shared test setup."""

import pytest

# The experiment helpers assert on run outputs; rewriting their asserts makes
# a failure show the values compared, as in a test module.
pytest.register_assert_rewrite("_experiment_runs")
