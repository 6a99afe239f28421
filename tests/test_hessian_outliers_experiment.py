"""``python -m experiments hessian-outliers --quick`` end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
from _experiment_runs import assert_is_figure
from _experiment_runs import assert_resume_recomputes_only
from _experiment_runs import closing_records
from _experiment_runs import read_metrics
from _experiment_runs import shared_quick_run

from experiments import _runner
from experiments import hessian_outliers

NUM_CLASSES = hessian_outliers.CLASSES


@pytest.fixture(scope="session", name="quick_run")
def _quick_run(tmp_path_factory) -> Path:
  return shared_quick_run("hessian-outliers", tmp_path_factory)


@pytest.fixture(scope="session", name="run")
def _run(quick_run) -> tuple[hessian_outliers.Config, dict[str, dict], list[dict]]:
  saved = json.loads((quick_run / "config.json").read_text())["config"]
  config = _runner.config_from_dict(hessian_outliers.Config, saved)
  records = [r for r in read_metrics(quick_run) if "seed" in r]
  return config, closing_records(read_metrics(quick_run)), records


def _unit_records(records, unit):
  return [r for r in records if r["unit"] == unit]


def test_every_unit_seed_and_checkpoint_is_recorded_consistently(run):
  config, units, records = run
  assert hessian_outliers.checkpoints(config) == [0, 1, 3, 6, 9, 15, 30, 60, 90, 180, 300]
  assert sorted(units) == sorted(hessian_outliers.unit_names(config))
  for unit, closing in units.items():
    rows = _unit_records(records, unit)
    assert sorted((r["seed"], r["step"]) for r in rows) == sorted(
      (seed, step) for seed in range(config.seeds) for step in hessian_outliers.checkpoints(config)
    )
    assert closing["random_share"] == pytest.approx(NUM_CLASSES / closing["num_params"])
    for r in rows:
      top = np.asarray(r["top_eigenvalues"])
      assert np.all(np.diff(top) <= 0) and top[-1] > 0
      # Converged pairs: the residuals are small against the eigenvalues they bound.
      assert np.max(np.asarray(r["top_residuals"])[:NUM_CLASSES]) < 1e-3 * top[0]
      share = np.asarray(r["gradient_share"])
      assert np.all(np.diff(share) >= -1e-7) and 0 <= share[0] and share[-1] <= 1 + 1e-5
      assert r["class_gap_ratio"] == pytest.approx(top[NUM_CLASSES - 1] / top[NUM_CLASSES])
      gap_index, gap_ratio = hessian_outliers.largest_gap(top)
      assert (r["largest_gap_index"], r["largest_gap_ratio"]) == (gap_index, gap_ratio)
      assert gap_ratio == pytest.approx(np.max(top[:-1] / top[1:]))


def test_largest_gap_counts_the_eigenvalues_above_it():
  assert hessian_outliers.largest_gap(np.array([9.0, 8.0, 1.0, 0.9, -1.0])) == (2, 8.0)
  assert hessian_outliers.largest_gap(np.array([4.0, np.nan, 2.0, 1.5])) == (1, 2.0)
  index, ratio = hessian_outliers.largest_gap(np.array([1.0, -2.0]))
  assert index == 0 and np.isnan(ratio)


def test_lanczos_agrees_with_the_dense_hessian(run):
  # The quick models are small enough for jax.hessian and eigh (float64) at seed 0's end.
  config, units, records = run
  for unit, closing in units.items():
    check = closing["dense_check"]
    last = max(hessian_outliers.checkpoints(config))
    final = next(r for r in _unit_records(records, unit) if r["seed"] == 0 and r["step"] == last)
    np.testing.assert_allclose(final["top_eigenvalues"], check["top_eigenvalues"], rtol=1e-4)
    np.testing.assert_allclose(
      final["gradient_share"][NUM_CLASSES - 1],
      check["gradient_share_at_classes"],
      rtol=0.05,
      atol=1e-9,
    )


def test_the_gradient_lies_among_the_top_eigenvectors_only_near_the_edge_of_stability(run):
  # Gur-Ari et al. find the gradient in the top-C eigenspace after early training. For full-batch
  # GD that holds while lr * lambda_1 is about 2 or more, where the step oscillates along the top
  # eigenvectors; below it GD damps their components by 1 - lr * lambda_i at every step, and
  # the gradient's share there falls far below a random subspace's C / n.
  config, units, records = run
  unstable, stable = [], []
  for r in records:
    if r["step"] < 30:
      continue
    rate = units[r["unit"]]["learning_rate"]
    share = r["gradient_share"][NUM_CLASSES - 1] / units[r["unit"]]["random_share"]
    sharpness = rate * r["top_eigenvalues"][0]
    if sharpness >= 1.8:
      unstable.append(share)
    elif sharpness < 1.2:
      stable.append(share)
  assert len(unstable) >= 3 and len(stable) >= 10
  # The edge of stability is chaotic, so its shares are held to their median.
  assert np.median(unstable) > 20
  assert max(stable) < 0.1
  # At the small learning rate GD stays stable throughout, and the share is gone by the end.
  for unit, closing in units.items():
    if closing["learning_rate"] == min(config.learning_rates):
      for r in _unit_records(records, unit):
        assert closing["learning_rate"] * r["top_eigenvalues"][0] < 1.2
        if r["step"] == max(hessian_outliers.checkpoints(config)):
          assert r["gradient_share"][NUM_CLASSES - 1] < 1e-4


def test_outliers_number_the_classes_without_batch_norm_and_not_with_it(run):
  # Trained gently (the small learning rate), the plain MLP's top eigenvalues stand C - 1 or
  # C - 2 above a gap; with BatchNorm a single eigenvalue does.
  config, units, records = run
  last = max(hessian_outliers.checkpoints(config))
  rate = min(config.learning_rates)
  for model, allowed in (("mlp", {NUM_CLASSES - 2, NUM_CLASSES - 1}), ("mlp-bn", {1})):
    unit = hessian_outliers.unit_name("digits", model, rate)
    final = [r for r in _unit_records(records, unit) if r["step"] == last]
    assert {r["largest_gap_index"] for r in final} <= allowed


def test_summary_and_figures(quick_run, run):
  config, units, records = run
  summary = (quick_run / "summary.md").read_text()
  last = max(hessian_outliers.checkpoints(config))
  for unit, closing in units.items():
    final = sorted(
      (r for r in _unit_records(records, unit) if r["step"] == last), key=lambda r: r["seed"]
    )
    gaps = ", ".join(str(r["largest_gap_index"]) for r in final)
    loss = np.median([r["loss"] for r in final])
    assert f"| {unit} | {closing['num_params']} | {loss:.3g} |" in summary
    assert f"| {gaps} |" in summary
  for name in ("gradient_share", "stability", "top_eigenvalues"):
    assert_is_figure(quick_run / "figures" / f"{name}.png", taller_than=200, wider_than=300)
    assert f"![figures/{name}.png](figures/{name}.png)" in summary


def test_resume_recomputes_only_the_missing_unit(quick_run, tmp_path):
  assert_resume_recomputes_only("hessian-outliers", quick_run, tmp_path, "digits/mlp-bn/lr=2")


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("datasets", ("cifar100",), "unknown datasets"),
    ("models", ("cnn",), "unknown models"),
    ("learning_rates", (0.3, 0.0), "learning_rates must be positive"),
    ("learning_rates", (), "learning_rates must be positive"),
    ("lanczos_steps", 10, "lanczos_steps"),
    ("top_k", 0, "top_k"),
    ("top_k", 10, "top_k must exceed the 10 classes"),
  ],
)
def test_bad_configs_are_refused_before_any_unit(field, value, message):
  config = hessian_outliers.Config(**{field: value})
  with pytest.raises(ValueError, match=message):
    hessian_outliers.check_config(config)
