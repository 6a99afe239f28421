"""``python -m experiments escape-toy --quick`` end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from _experiment_runs import assert_is_figure
from _experiment_runs import assert_resume_recomputes_only
from _experiment_runs import closing_records
from _experiment_runs import read_metrics
from _experiment_runs import shared_quick_run

from experiments import _oracle
from experiments import _runner
from experiments import escape_toy


@pytest.fixture(scope="session", name="quick_run")
def _quick_run(tmp_path_factory) -> Path:
  return shared_quick_run("escape-toy", tmp_path_factory)


@pytest.fixture(scope="session", name="closing")
def _closing(quick_run) -> tuple[escape_toy.Config, dict[str, dict]]:
  saved = json.loads((quick_run / "config.json").read_text())["config"]
  config = _runner.config_from_dict(escape_toy.Config, saved)
  return config, closing_records(read_metrics(quick_run))


def test_every_method_problem_and_dimension_is_recorded(closing):
  config, units = closing
  assert sorted(units) == sorted(escape_toy.unit_names(config))
  assert set(config.methods) == set(escape_toy.METHODS)
  for record in units.values():
    steps = record["escape_step"]
    assert len(steps) == config.seeds
    escaped = [s for s in steps if s is not None]
    assert record["escaped_fraction"] == len(escaped) / config.seeds
    assert all(0 <= s <= config.steps for s in escaped)
    median = np.median([math.inf if s is None else s for s in steps])
    assert record["median_escape_step"] == (None if math.isinf(median) else median)
    # Per seed: one gradient a step up to the escape (all steps if censored), plus whole
    # curvature calls: SFN a Lanczos call a step, NC descent some, neon and neon2 some
    # gradient-difference searches, the gradient methods none.
    taken = np.asarray([config.steps if s is None else s for s in steps], np.float64)
    dim, method = record["dim"], record["method"]
    call_cost = dim + 3 if method in ("neon", "neon2") else _oracle.lanczos_call_cost(dim)
    calls = (np.asarray(record["oracle_calls"]) - taken) / call_cost
    np.testing.assert_allclose(calls, np.round(calls), atol=1e-9)
    if method == "sfn":
      np.testing.assert_allclose(calls, taken)
    elif method in ("ncd", "neon", "neon2"):
      assert np.all((calls >= 0) & (calls <= taken))
    else:
      np.testing.assert_array_equal(calls, 0)


def test_metrics_hold_one_line_per_seed(quick_run, closing):
  config, units = closing
  records = read_metrics(quick_run)
  for unit, record in units.items():
    seeds = sorted(
      (r["seed"], r["escape_step"]) for r in records if r["unit"] == unit and "seed" in r
    )
    assert seeds == list(enumerate(record["escape_step"]))
    assert len(seeds) == config.seeds


@pytest.mark.parametrize("method", ["ncd", "neon", "neon2"])
def test_curvature_methods_escape_the_quadratic_saddle_at_once(closing, method):
  config, units = closing
  for dim in config.dims:
    curvature = units[f"quadratic/{dim}/{method}"]
    gd = units[f"quadratic/{dim}/gd"]
    # On diag(-1, 1, ..., 1) one Lanczos step, one power step on I - H (which annihilates the
    # curvature 1) or two Chebyshev steps find the negative direction; GD must amplify a 1e-6
    # start.
    assert curvature["escaped_fraction"] == 1 and curvature["median_escape_step"] <= 2
    assert gd["median_escape_step"] > 10 * curvature["median_escape_step"]


def test_octopus_gd_slows_down_with_dimension_faster_than_pgd(closing):
  config, units = closing
  low, high = config.dims[0], config.dims[-1]

  def median(method, dim):
    value = units[f"octopus/{dim}/{method}"]["median_escape_step"]
    return config.steps if value is None else value

  gd_growth = median("gd", high) / median("gd", low)
  pgd_growth = median("pgd", high) / median("pgd", low)
  assert gd_growth > 3 * pgd_growth


def test_summary_and_figure(quick_run, closing):
  summary = (quick_run / "summary.md").read_text()
  assert "| problem | method | d=2 |" in summary
  assert "log-escape-time slope" in summary
  # Its numbers are the closing records': each cell, and each uncensored slope of
  # log(median escape step) against d (the quick run has two dimensions).
  config, units = closing
  for problem in config.problems:
    for method in config.methods:
      records = [units[f"{problem}/{dim}/{method}"] for dim in config.dims]
      cells = [
        f"{record['median_escape_step']:.0f} "
        f"({round(record['escaped_fraction'] * config.seeds)}/{config.seeds})"
        for record in records
      ]
      assert f"| {problem} | {method} | {' | '.join(cells)} |" in summary
      # Oracle calls: the median over seeds (all escape in the quick run).
      calls = [f"{np.median(record['oracle_calls']):g}" for record in records]
      assert f"| {problem} | {method} | {' | '.join(calls)} |" in summary
      # LSGD at d = 2 is GD (no vector shorter than 3 is smoothed): no slope through it.
      fitted = escape_toy.fitted_dims(config, method)
      medians = [units[f"{problem}/{dim}/{method}"]["median_escape_step"] for dim in fitted]
      if len(fitted) < 2:
        assert f"- {problem}, {method}: log-escape-time slope n/a" in summary
      elif None not in medians:
        slope = math.log(medians[-1] / medians[0]) / (fitted[-1] - fitted[0])
        assert f"- {problem}, {method}: log-escape-time slope {slope:+.2f}" in summary
  for figure in ("escape_time.png", "escape_oracle_calls.png"):
    assert_is_figure(quick_run / "figures" / figure, taller_than=200, wider_than=300)
    assert f"![figures/{figure}](figures/{figure})" in summary


def test_resume_recomputes_only_the_missing_unit(quick_run, tmp_path):
  # The cheapest unit: two dimensions, no noise, no Lanczos.
  assert_resume_recomputes_only("escape-toy", quick_run, tmp_path, "quadratic/2/lsgd")
