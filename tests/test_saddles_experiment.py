"""``python -m experiments saddles-good-enough --quick`` end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
from _experiment_runs import assert_is_figure
from _experiment_runs import closing_records
from _experiment_runs import read_metrics
from _experiment_runs import shared_quick_run

from experiments import _runner
from experiments import saddles_good_enough
from jaxsaddle import spectrum


@pytest.fixture(scope="session", name="quick_run")
def _quick_run(tmp_path_factory) -> Path:
  return shared_quick_run("saddles-good-enough", tmp_path_factory)


@pytest.fixture(scope="session", name="closing")
def _closing(quick_run):
  saved = json.loads((quick_run / "config.json").read_text())["config"]
  config = _runner.config_from_dict(saddles_good_enough.Config, saved)
  return config, closing_records(read_metrics(quick_run))


def test_every_method_gets_a_spectrum_per_seed(closing):
  config, units = closing
  assert sorted(units) == sorted(saddles_good_enough.unit_names(config))
  for record in units.values():
    assert len(record["classification"]) == config.seeds
    assert set(record["classification"]) <= set(spectrum.CRITICAL_POINT_KINDS)
    for density in record["density"]:
      grid, values = np.asarray(density["grid"]), np.asarray(density["density"])
      # The broadened SLQ density is a probability density on its grid.
      assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=0.02)
    for near_zero, negative in zip(record["near_zero_mass"], record["negative_mass"], strict=True):
      assert 0 <= negative <= 1 - near_zero + 1e-6
    for top, smallest in zip(record["top_eigenvalues"], record["smallest_eigenvalue"], strict=True):
      assert np.all(np.diff(np.asarray(top)[np.isfinite(top)]) != 0) or len(top) == 1
      assert smallest <= np.nanmax(top)


def test_lanczos_matches_the_dense_hessian(closing):
  _, units = closing
  for record in units.values():
    check = record["dense_check"]
    scale = abs(check["largest"])
    assert check["lanczos_largest"] == pytest.approx(check["largest"], rel=1e-3)
    assert abs(check["lanczos_smallest"] - check["smallest"]) <= 1e-3 * scale


def test_summary_and_figures(quick_run):
  summary = (quick_run / "summary.md").read_text()
  assert "| dataset | method | lr | final loss |" in summary
  assert "## What the numbers say" in summary
  assert "## Dense check" in summary
  assert_is_figure(quick_run / "figures" / "digits-spectrum.png", taller_than=200, wider_than=300)
  assert_is_figure(quick_run / "figures" / "digits-loss.png", taller_than=200, wider_than=300)
