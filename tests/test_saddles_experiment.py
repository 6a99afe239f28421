"""``python -m experiments saddles-good-enough --quick`` end to end."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _experiment_runs import assert_is_figure
from _experiment_runs import assert_resume_recomputes_only
from _experiment_runs import closing_records
from _experiment_runs import read_metrics
from _experiment_runs import shared_quick_run

import jaxsaddle
from experiments import _oracle
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


def test_classifications_follow_from_the_recorded_numbers(closing):
  # classify_critical_point's rules, recomputed from each seed's record: "not critical" above
  # the gradient tolerance; below it, a strict saddle exactly when the smallest eigenvalue is
  # below -relative_tol * lambda_max, undetermined when it is not but its residual reaches
  # below, and otherwise a minimum whenever it is above +relative_tol * lambda_max.
  config, units = closing
  for record in units.values():
    rows = zip(
      record["classification"],
      record["gradient_norm"],
      record["smallest_eigenvalue"],
      record["smallest_residual"],
      record["top_eigenvalues"],
      strict=True,
    )
    for kind, gradient_norm, smallest, residual, top in rows:
      tolerance = config.relative_tol * np.nanmax(top)
      if not gradient_norm <= config.gradient_tol:
        assert kind == "not critical"
        continue
      assert (kind == "strict saddle") == (smallest < -tolerance)
      unresolved = smallest >= -tolerance and smallest - residual < -tolerance
      assert (kind == "undetermined") == unresolved
      if smallest > tolerance and not unresolved:
        assert kind == "minimum"


def test_lanczos_matches_the_dense_hessian(closing):
  _, units = closing
  for record in units.values():
    check = record["dense_check"]
    scale = abs(check["largest"])
    assert check["lanczos_largest"] == pytest.approx(check["largest"], rel=1e-3)
    assert abs(check["lanczos_smallest"] - check["smallest"]) <= 1e-3 * scale


def test_summary_and_figures(quick_run, closing):
  summary = (quick_run / "summary.md").read_text()
  assert "| dataset | method | lr | final loss |" in summary
  assert "## What the numbers say" in summary
  # Its counts are the records': critical seeds, saddles and degenerate saddles per unit.
  config, units = closing
  for unit, record in units.items():
    dataset, method = unit.split("/")
    kinds = record["classification"]
    critical = sum(kind != "not critical" for kind in kinds)
    saddles = sum(kind.endswith("saddle") for kind in kinds)
    degenerate = kinds.count("degenerate saddle")
    assert (
      f"- {dataset}, {method}: {critical}/{len(kinds)} seeds end within the gradient tolerance "
      f"{config.gradient_tol:g}; {saddles}/{len(kinds)} are classified saddles ({degenerate} "
      "degenerate)"
    ) in summary
    undetermined = kinds.count("undetermined")
    if undetermined:
      assert f"({degenerate} degenerate) and {undetermined} undetermined" in summary
  # The escape methods are credited with their endpoints only when their escape steps fired.
  escape_steps = sum(
    sum(record["num_perturbations"]) + sum(record["num_curvature_steps"])
    for unit, record in units.items()
    if unit.split("/")[1] in ("pgd", "ncd")
  )
  assert ("whose escape steps never fired in this run" in summary) == (escape_steps == 0)
  assert "## Dense check" in summary
  assert_is_figure(quick_run / "figures" / "digits-spectrum.png", taller_than=200, wider_than=300)
  assert_is_figure(quick_run / "figures" / "digits-loss.png", taller_than=200, wider_than=300)


def test_every_method_has_the_same_oracle_budget_and_ncd_stops_within_it(quick_run, closing):
  config, units = closing
  records = read_metrics(quick_run)
  budget = float(config.steps)  # GD's: one full-batch gradient per step
  lanczos_cost = _oracle.lanczos_call_cost(config.ncd_lanczos_steps)
  for unit, c in units.items():
    assert c["oracle_budget"] == budget, unit
    assert all(calls <= budget for calls in c["oracle_calls"]), unit
    # Spent: the steps taken, each with its gradient, and the Lanczos calls, plus the gradient
    # of the refused step that stopped the method, if it had one (float32 sums: a tolerance).
    for calls, taken, lanczos in zip(
      c["oracle_calls"], c["num_steps_taken"], c["num_lanczos_calls"], strict=True
    ):
      refused = calls - taken * c["gradient_cost"] - lanczos * lanczos_cost
      assert min(abs(refused), abs(refused - c["gradient_cost"])) <= 1e-4 * budget, unit
  for method in ("gd", "pgd"):
    assert units[f"digits/{method}"]["oracle_calls"] == [budget] * config.seeds
    assert units[f"digits/{method}"]["num_steps_taken"] == [config.steps] * config.seeds
  # SGD takes a step per whole mini-batch in the training set for each gradient of the budget,
  # so it spends the budget up to that remainder and logs at the same oracle calls.
  sgd = units["digits/sgd"]
  repeats = int(1 / sgd["gradient_cost"])
  assert repeats > 1 and sgd["steps"] == config.steps * repeats
  assert sgd["num_steps_taken"] == [sgd["steps"]] * config.seeds
  for calls in sgd["oracle_calls"]:
    assert calls == pytest.approx(sgd["steps"] * sgd["gradient_cost"], rel=1e-5)
    assert budget - sgd["gradient_cost"] * config.steps < calls <= budget

  # Each SGD log comes at GD's oracle calls at the same log, less the remainder per gradient.
  def logged_calls(method):
    rows = sorted(
      (r["step"], r["oracle_calls"])
      for r in records
      if r["unit"] == f"digits/{method}"
      and "step" in r
      and r["learning_rate"] == units[f"digits/{method}"]["learning_rate"]
    )
    return np.asarray([calls for _, calls in rows], np.float64)

  gd_calls, sgd_calls = logged_calls("gd"), logged_calls("sgd")
  assert gd_calls.shape == sgd_calls.shape and gd_calls[-1, 0] == budget
  remainder = 1 - repeats * sgd["gradient_cost"]
  assert np.all(sgd_calls <= gd_calls * (1 + 1e-6))
  assert np.all(sgd_calls >= gd_calls * (1 - remainder) - 1e-4)
  ncd = units["digits/ncd"]
  # The quick run's threshold makes NC descent run Lanczos, which uses up its budget early.
  assert all(calls > 0 for calls in ncd["num_lanczos_calls"])
  assert all(taken < config.steps for taken in ncd["num_steps_taken"])
  # Once stopped, the parameters stay where they were: every later logged loss is the final one.
  logs = sorted(
    (r["step"], r["loss"], r["num_steps_taken"])
    for r in records
    if r["unit"] == "digits/ncd" and "step" in r and r["learning_rate"] == ncd["learning_rate"]
  )
  for seed, taken in enumerate(ncd["num_steps_taken"]):
    after = [loss[seed] for step, loss, _ in logs if step > taken]
    assert after and all(loss == ncd["final_loss"][seed] for loss in after)
    assert [steps[seed] for step, _, steps in logs] == [min(step, taken) for step, _, _ in logs]
  summary = (quick_run / "summary.md").read_text()
  assert "| oracle calls / budget (steps taken) |" in summary
  assert f"digits, ncd: the oracle budget ran out on {config.seeds}/{config.seeds} seeds" in summary


def test_oracle_budget_stops_a_method_exactly_when_the_next_step_would_exceed_it():
  """Every step runs Lanczos: a gradient and a call of 3 steps, 1 + 4 gradients in all."""

  def value_fn(p):
    return 0.5 * p[0] ** 2 + 0.25 * p[1] ** 4 - 0.5 * p[1] ** 2

  lanczos_cost = _oracle.lanczos_call_cost(3)
  assert lanczos_cost == 4 * _oracle.HVP_COST

  def run(seed):
    ncd = jaxsaddle.negative_curvature_descent(
      0.1,
      hessian_lipschitz=6.0,
      epsilon=1e-3,
      num_lanczos_steps=3,
      gradient_threshold=1e3,
      key=seed,
    )
    tx = _oracle.with_oracle_budget(ncd, budget=24.0, gradient_cost=1.0, lanczos_cost=lanczos_cost)
    params = jax.random.normal(jax.random.key(seed), (2,))

    def step(carry, _):
      params, state = carry
      grads = jax.grad(value_fn)(params)
      updates, state = tx.update(grads, state, params, value_fn=value_fn)
      params = optax.apply_updates(params, updates)
      return (params, state), params

    (_, state), trajectory = jax.lax.scan(step, (params, tx.init(params)), length=10)
    return state, trajectory

  state, trajectory = jax.jit(jax.vmap(run))(jnp.arange(3))
  np.testing.assert_array_equal(optax.tree.get(state, "num_steps_taken"), [4, 4, 4])
  np.testing.assert_array_equal(optax.tree.get(state, "num_lanczos_calls"), [4, 4, 4])
  # 4 steps of 5 spend 20; a fifth would reach 25 > 24, so the method stops, having paid the
  # gradient that showed Lanczos would run, and spends nothing after that.
  np.testing.assert_array_equal(optax.tree.get(state, "oracle_calls"), [21.0, 21.0, 21.0])
  assert np.all(optax.tree.get(state, "stopped"))
  moved = np.abs(np.diff(np.asarray(trajectory), axis=1)).max(axis=-1)
  assert np.all(moved[:, :3] > 0) and np.all(moved[:, 3:] == 0)


@pytest.mark.parametrize("num_examples", [960, 1000])
def test_oracle_budget_lets_a_budget_that_float32_overshoots_be_spent_exactly(num_examples):
  # 64 / 960 rounds up in float32, so 3,000 steps of it cost 200.00002 > 200.
  gradient_cost, budget = 64 / num_examples, 200.0
  num_steps = int(budget * num_examples) // 64
  tx = _oracle.with_oracle_budget(
    optax.sgd(0.1), budget=budget, gradient_cost=gradient_cost, lanczos_cost=1.0
  )

  def step(state, _):
    _, state = tx.update(jnp.ones(2), state, jnp.zeros(2))
    return state, None

  state, _ = jax.lax.scan(step, tx.init(jnp.zeros(2)), length=num_steps + 1)
  assert int(optax.tree.get(state, "num_steps_taken")) == num_steps
  assert bool(optax.tree.get(state, "stopped"))  # the extra step does not fit
  calls = float(optax.tree.get(state, "oracle_calls"))
  assert calls <= budget and calls == pytest.approx(num_steps * gradient_cost, rel=1e-6)


@pytest.mark.parametrize(
  "change", [dict(max_train_examples=0), dict(max_train_examples=-5), dict(batch_size=0)]
)
def test_bad_sizes_are_rejected(change):
  (name,) = change
  with pytest.raises(ValueError, match=name):
    saddles_good_enough.check_config(dataclasses.replace(saddles_good_enough.Config(), **change))


@pytest.mark.parametrize("name", ["budget", "gradient_cost", "lanczos_cost"])
def test_oracle_budget_rejects_negative_settings(name):
  settings = {"budget": 1.0, "gradient_cost": 1.0, "lanczos_cost": 1.0, name: -1.0}
  with pytest.raises(ValueError, match=name):
    _oracle.with_oracle_budget(optax.sgd(0.1), **settings)


def test_resume_recomputes_only_the_missing_unit(quick_run, tmp_path):
  # The cheapest unit to train; every unit compiles the spectrum.
  assert_resume_recomputes_only("saddles-good-enough", quick_run, tmp_path, "digits/sgd")
