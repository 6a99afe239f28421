"""``python -m experiments curvature-search --quick`` end to end."""

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

from experiments import _runner
from experiments import curvature_search


@pytest.fixture(scope="session", name="quick_run")
def _quick_run(tmp_path_factory) -> Path:
  return shared_quick_run("curvature-search", tmp_path_factory)


@pytest.fixture(scope="session", name="closing")
def _closing(quick_run) -> tuple[curvature_search.Config, dict[str, dict], list[dict]]:
  saved = json.loads((quick_run / "config.json").read_text())["config"]
  config = _runner.config_from_dict(curvature_search.Config, saved)
  records = read_metrics(quick_run)
  return config, closing_records(records), records


def _seed_records(records: list[dict], unit: str) -> list[dict]:
  return [r for r in records if r["unit"] == unit and "seed" in r]


def test_every_unit_seed_and_step_count_is_recorded_with_its_cost(closing):
  config, units, records = closing
  assert sorted(units) == sorted(curvature_search.unit_names(config))
  assert curvature_search.search_labels(config) == [
    "ncd",
    *(f"{m}@{s:g}" for m in ("neon", "neon2") for s in config.smoothness_scales),
  ]
  for point in config.points:
    for label in curvature_search.search_labels(config):
      unit = f"{point}/{label}"
      method = label.partition("@")[0]
      rows = _seed_records(records, unit)
      assert sorted((r["seed"], r["search_steps"]) for r in rows) == sorted(
        (seed, k) for seed in range(config.seeds) for k in config.search_steps
      )
      medians = [
        np.median([r["found_fraction"] for r in rows if r["search_steps"] == k])
        for k in config.search_steps
      ]
      np.testing.assert_allclose(units[unit]["median_found_fraction"], medians)
      # Lanczos: one linearisation and K products; a gradient-difference search: K steps, the
      # gradient at the point and the two differences of its bound.
      extra = 1 if method == "ncd" else 3
      assert units[unit]["oracle_calls"] == [k + extra for k in config.search_steps]


def test_the_points_are_what_the_experiment_says(closing):
  config, units, _ = closing
  near_origin = units[f"near-origin/{curvature_search.SPECTRUM}"]
  trained = units[f"trained/{curvature_search.SPECTRUM}"]
  # Near the origin the logits are about 0: the loss is log(10), whatever the labels.
  assert abs(near_origin["loss"] - math.log(10)) < 0.01
  ratio = -near_origin["smallest_eigenvalue"] / near_origin["largest_eigenvalue"]
  assert 0.5 < ratio < 2
  # Trained, the loss has dropped and the negative curvature is tiny against the positive.
  assert trained["loss"] < 0.5 * near_origin["loss"]
  assert 0 < -trained["smallest_eigenvalue"] < 0.05 * trained["largest_eigenvalue"]
  assert (
    near_origin["num_params"] == trained["num_params"] == 64 * config.width + 11 * config.width + 10
  )


def test_reported_curvature_is_the_ritz_value_or_an_upper_bound_on_the_direction(closing):
  # The found fraction is v'Hv / lambda_min with v read from the update: Lanczos reports v's
  # Rayleigh quotient itself, and neon and neon2 an upper bound on it.
  config, units, records = closing
  for point in config.points:
    smallest = units[f"{point}/{curvature_search.SPECTRUM}"]["smallest_eigenvalue"]
    for label in curvature_search.search_labels(config):
      for r in _seed_records(records, f"{point}/{label}"):
        if not r["stepped"]:
          continue
        curvature = r["found_fraction"] * smallest
        if label == "ncd":
          np.testing.assert_allclose(r["reported_curvature"], curvature, rtol=1e-6, atol=1e-12)
        else:
          assert r["reported_curvature"] >= curvature - 1e-12


def test_chebyshev_and_lanczos_find_the_small_curvature_the_power_method_misses(closing):
  # At the trained point gamma / ell = 4e-3: 64 steps are about sqrt(ell / gamma) log(n) for
  # Lanczos and Chebyshev, a fraction of the power method's (ell / gamma) log(n).
  config, units, _ = closing
  last = config.search_steps.index(max(config.search_steps))

  def found(point, label):
    return units[f"{point}/{label}"]["median_found_fraction"][last]

  assert found("trained", "ncd") > 0.9
  assert found("trained", "neon2@1") > 0.5
  assert found("trained", "neon@1") < 0.1
  # With a smoothness 3% below the largest eigenvalue, that curvature outgrows the negative
  # one in neon2's polynomial: the search finds none.
  assert found("trained", "neon2@0.97") < 0.1
  # Near the origin, where the negative curvature is as large as the positive, all find it.
  for label in curvature_search.search_labels(config):
    assert found("near-origin", label) > 0.9


def test_summary_and_figure(quick_run, closing):
  config, units, _ = closing
  summary = (quick_run / "summary.md").read_text()
  for point in config.points:
    for label in curvature_search.search_labels(config):
      cells = [f"{f:.2f}" for f in units[f"{point}/{label}"]["median_found_fraction"]]
      assert f"| {point} | {label} | {' | '.join(cells)} |" in summary
  assert "- trained: ncd 64, neon@0.97 > 64, neon@1 > 64, neon2@0.97 > 64, neon2@1 64." in summary
  assert_is_figure(quick_run / "figures" / "found_fraction.png", taller_than=200, wider_than=300)
  assert "![figures/found_fraction.png](figures/found_fraction.png)" in summary


def test_resume_recomputes_only_the_missing_unit(quick_run, tmp_path):
  assert_resume_recomputes_only("curvature-search", quick_run, tmp_path, "trained/neon2@1")


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("points", ("saddle",), "unknown points"),
    ("methods", ("lanczos",), "unknown methods"),
    ("search_steps", (0, 4), "search_steps"),
    ("search_steps", (), "search_steps"),
    ("smoothness_scales", (0.0, 1.0), "smoothness_scales"),
    ("smoothness_scales", (), "smoothness_scales"),
  ],
)
def test_bad_configs_are_refused_before_any_unit(field, value, message):
  config = curvature_search.Config(**{field: value})
  with pytest.raises(ValueError, match=message):
    curvature_search.check_config(config)
