"""Behaviour of PGD, noisy GD and perturbed SGD: constants, step accounting, escapes."""

import logging
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsaddle
from jaxsaddle import problems

FULL = os.environ.get("JAXSADDLE_FULL") == "1"
EXACT = os.environ.get("JAXSADDLE_EXACT") == "1"


def _run(tx, value_fn, params, num_steps, *, pass_value=False):
  """Runs ``num_steps`` jitted steps in a scan; returns final params, state and losses."""

  def step(carry, _):
    params, state = carry
    value, grads = jax.value_and_grad(value_fn)(params)
    extra = {"value": value} if pass_value else {}
    updates, state = tx.update(grads, state, params, **extra)
    return (optax.apply_updates(params, updates), state), value

  (params, state), values = jax.lax.scan(step, (params, tx.init(params)), length=num_steps)
  return params, state, values


# --- Jin et al.'s constants ------------------------------------------------------------------


def test_pgd_hyperparameters_match_the_closed_forms():
  hp = jaxsaddle.pgd_hyperparameters(
    smoothness=1.0,
    hessian_lipschitz=1.0,
    epsilon=1e-2,
    failure_probability=0.1,
    loss_gap=10.0,
    dim=100,
    c=1.0,
  )
  chi = 3 * math.log(1e8)
  assert hp.chi == pytest.approx(chi, rel=1e-12)
  assert hp.chi == pytest.approx(55.26204, rel=1e-6)
  assert hp.learning_rate == 1.0
  assert hp.perturbation_radius == pytest.approx(1e-2 / chi**2, rel=1e-12)
  assert hp.gradient_threshold == pytest.approx(1e-2 / chi**2, rel=1e-12)
  assert hp.escape_threshold == pytest.approx(1e-3 / chi**3, rel=1e-12)
  assert hp.escape_steps == math.ceil(chi / math.sqrt(1e-2)) == 553
  assert set(hp.pgd_kwargs()) == {
    "learning_rate",
    "perturbation_radius",
    "gradient_threshold",
    "escape_threshold",
    "escape_steps",
  }
  jaxsaddle.pgd(**hp.pgd_kwargs(), key=0)


def test_pgd_hyperparameters_chi_floor_and_constant_c():
  hp = jaxsaddle.pgd_hyperparameters(
    smoothness=2.0,
    hessian_lipschitz=4.0,
    epsilon=1.0,
    failure_probability=0.5,
    loss_gap=1.0,
    dim=1,
    c=0.25,
  )
  assert hp.chi == 12.0  # ln(16) < 4, so the max picks 4
  assert hp.learning_rate == 0.125
  assert hp.perturbation_radius == pytest.approx(0.5 / 144 / 2)
  assert hp.escape_threshold == pytest.approx(0.25 / 12**3 * math.sqrt(1 / 4))
  assert hp.escape_steps == math.ceil(12 / 0.0625 * 2 / 2)


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"smoothness": -1.0}, "smoothness"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"failure_probability": 1.0}, "failure_probability"),
    ({"dim": 0}, "dim"),
    ({"dim": 2.5}, "dim"),
    ({"failure_probability": np.array([0.1, 0.2])}, "failure_probability"),
  ],
)
def test_pgd_hyperparameters_reject_bad_input(kwargs, name):
  base = dict(
    smoothness=1.0, hessian_lipschitz=1.0, epsilon=0.1, failure_probability=0.1, loss_gap=1.0, dim=3
  )
  with pytest.raises(ValueError, match=name):
    jaxsaddle.pgd_hyperparameters(**(base | kwargs))
  # dim enters a logarithm only: a model of 3e9 parameters is fine.
  large = jaxsaddle.pgd_hyperparameters(**(base | {"dim": 3_000_000_000}))
  small = jaxsaddle.pgd_hyperparameters(**base)
  assert large.escape_steps > small.escape_steps


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"perturbation_radius": -0.1}, "perturbation_radius"),
    ({"gradient_threshold": 0.0}, "gradient_threshold"),
    ({"gradient_threshold": -1e-3}, "gradient_threshold"),
    ({"escape_steps": 0}, "escape_steps"),
    ({"escape_steps": 2.5}, "escape_steps"),
    ({"escape_threshold": -1.0}, "escape_threshold"),
  ],
)
def test_pgd_rejects_bad_hyperparameters_naming_them(kwargs, name):
  base = dict(perturbation_radius=0.1, gradient_threshold=1e-3, escape_steps=10)
  # Each names the function the user called, not the transform the alias is built on.
  with pytest.raises(ValueError, match=f"^pgd: {name}"):
    jaxsaddle.pgd(0.1, **(base | kwargs))
  with pytest.raises(ValueError, match=f"^perturb_near_saddle: {name}"):
    jaxsaddle.perturb_near_saddle(optax.sgd(0.1), **(base | kwargs))


def test_noise_aliases_name_themselves_in_errors():
  with pytest.raises(ValueError, match="^noisy_gd: noise_scale"):
    jaxsaddle.noisy_gd(0.1, noise_scale=-1.0)
  with pytest.raises(ValueError, match="^perturbed_sgd: noise_scale"):
    jaxsaddle.perturbed_sgd(0.1, noise_scale=-1.0)
  with pytest.raises(TypeError, match=r"^pgd: the parameter at \['n'\] has dtype int32"):
    tx = jaxsaddle.pgd(0.1, perturbation_radius=0.1, gradient_threshold=1e-3, escape_steps=3)
    tx.init({"n": jnp.zeros(2, jnp.int32)})
  with pytest.raises(ValueError, match="^pgd: value must be the scalar loss"):
    tx = jaxsaddle.pgd(0.1, perturbation_radius=0.1, gradient_threshold=1e-3, escape_steps=3)
    params = jnp.zeros(2)
    tx.update(params, tx.init(params), params, value=jnp.zeros(2))


@pytest.mark.parametrize("learning_rate", [-0.1, float("nan"), float("inf")])
def test_aliases_reject_bad_learning_rates(learning_rate):
  with pytest.raises(ValueError, match="pgd: learning_rate"):
    jaxsaddle.pgd(learning_rate, perturbation_radius=0.1, gradient_threshold=1e-3, escape_steps=3)
  with pytest.raises(ValueError, match="noisy_gd: learning_rate"):
    jaxsaddle.noisy_gd(learning_rate, noise_scale=0.1)
  with pytest.raises(ValueError, match="perturbed_sgd: learning_rate"):
    jaxsaddle.perturbed_sgd(learning_rate, noise_scale=0.1)
  with pytest.raises(ValueError, match="lsgd: learning_rate"):
    jaxsaddle.lsgd(learning_rate)


def test_a_schedule_where_a_number_is_expected_says_how_to_schedule_it():
  with pytest.raises(TypeError, match="noise_scale must be a number.*inject_hyperparams"):
    jaxsaddle.perturbed_sgd(0.1, noise_scale=optax.constant_schedule(0.1))
  # The supported route: a schedule through inject_hyperparams.
  tx = optax.inject_hyperparams(jaxsaddle.perturbed_sgd)(
    learning_rate=0.1, noise_scale=optax.constant_schedule(0.1)
  )
  updates, _ = tx.update(jnp.zeros(3), tx.init(jnp.zeros(3)))
  assert float(jnp.linalg.norm(updates)) > 0


def test_a_numeric_string_is_not_taken_for_a_number():
  with pytest.raises(TypeError, match="noise_scale must be a number, got the string '0.1'"):
    jaxsaddle.perturbed_sgd(0.1, noise_scale="0.1")
  with pytest.raises(TypeError, match="escape_steps must be a number"):
    jaxsaddle.pgd(0.1, perturbation_radius=0.1, gradient_threshold=1e-3, escape_steps="3")


def test_pgd_rejects_integer_parameters_with_their_path():
  tx = jaxsaddle.pgd(0.1, perturbation_radius=0.1, gradient_threshold=1e-3, escape_steps=10)
  with pytest.raises(TypeError, match=r"\['layer'\]\['count'\].*int32"):
    tx.init({"layer": {"w": jnp.zeros(3), "count": jnp.zeros((), jnp.int32)}})


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nan_or_inf_gradients_never_trigger_a_perturbation(bad):
  tx = jaxsaddle.pgd(0.1, perturbation_radius=1.0, gradient_threshold=1e3, escape_steps=1)
  params = jnp.zeros(4)
  grads = jnp.array([0.0, bad, 0.0, 0.0])
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert int(state.num_perturbations) == 0
  assert not np.isfinite(np.asarray(updates)[1])
  np.testing.assert_array_equal(np.asarray(updates)[[0, 2, 3]], 0.0)


@pytest.mark.parametrize(
  "tx",
  [
    jaxsaddle.pgd(0.1, perturbation_radius=0.1, gradient_threshold=1.0, escape_steps=2),
    jaxsaddle.noisy_gd(0.1, noise_scale=0.1),
    jaxsaddle.perturbed_sgd(0.1, noise_scale=0.1),
  ],
  ids=["pgd", "noisy_gd", "perturbed_sgd"],
)
def test_an_empty_optimized_tree_is_fine(tx):
  """optax.masked with an all-False mask hands the transform an empty tree."""
  masked = optax.masked(tx, {"a": False, "b": False})
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  updates, _ = jax.jit(masked.update)(params, masked.init(params), params)
  np.testing.assert_array_equal(updates["a"], params["a"])


def test_a_non_scalar_value_is_rejected():
  tx = jaxsaddle.pgd(0.1, perturbation_radius=0.1, gradient_threshold=1.0, escape_steps=2)
  params = jnp.zeros(3)
  with pytest.raises(ValueError, match="scalar loss"):
    tx.update(params, tx.init(params), params, value=jnp.ones(4))


@pytest.mark.parametrize(
  ("kwargs", "name", "error"),
  [
    ({"escape_steps": True}, "escape_steps", TypeError),
    ({"escape_steps": 2**31}, "escape_steps", ValueError),
    ({"gradient_threshold": float("inf")}, "gradient_threshold", ValueError),
    ({"perturbation_radius": jnp.ones(2)}, "perturbation_radius", ValueError),
  ],
)
def test_pgd_rejects_unusable_values_naming_them(kwargs, name, error):
  base = dict(perturbation_radius=0.1, gradient_threshold=1e-3, escape_steps=10)
  with pytest.raises(error, match=name):
    jaxsaddle.pgd(0.1, **(base | kwargs))


def test_escape_check_never_uses_the_loss_of_an_older_perturbation():
  tx = jaxsaddle.pgd(
    0.1, perturbation_radius=1e-3, gradient_threshold=1.0, escape_steps=1, escape_threshold=0.5
  )
  params = jnp.zeros(2)
  state = tx.init(params)
  grads = jnp.zeros(2)
  _, state = tx.update(grads, state, params, value=5.0)  # perturbs, baseline 5
  _, state = tx.update(grads, state, params, value=5.0)
  _, state = tx.update(grads, state, params, value=4.0)  # the check: it fell by 1 > 0.5
  assert not bool(state.second_order_stationary)
  _, state = tx.update(grads, state, params, value=5.0)  # perturbs, baseline 5
  _, state = tx.update(grads, state, params, value=5.0)
  _, state = tx.update(grads, state, params, value=5.0)  # the check: no decrease
  assert bool(state.second_order_stationary)
  _, state = tx.update(grads, state, params, value=jnp.nan)  # perturbs at a NaN loss: unknown
  assert int(state.num_perturbations) == 3 and np.isnan(state.value_at_perturbation)
  _, state = tx.update(grads, state, params, value=100.0)
  _, state = tx.update(grads, state, params, value=100.0)  # the check: no baseline, no verdict
  # The verdict of the last check stands: compared with the stale baseline 5 (or with NaN,
  # read as a decrease) it would have turned.
  assert bool(state.second_order_stationary)


def test_the_escape_check_refuses_a_step_without_the_loss():
  # Without the loss the check never ran, and second_order_stationary stayed False silently.
  tx = jaxsaddle.pgd(
    0.1, perturbation_radius=1e-3, gradient_threshold=1.0, escape_steps=1, escape_threshold=0.5
  )
  params = jnp.zeros(2)
  with pytest.raises(ValueError, match="escape_threshold is set.*value=loss"):
    tx.update(jnp.zeros(2), tx.init(params), params)
  unchecked = jaxsaddle.pgd(0.1, perturbation_radius=1e-3, gradient_threshold=1.0, escape_steps=1)
  unchecked.update(jnp.zeros(2), unchecked.init(params), params)  # no check, no loss needed


def test_pgd_perturbation_is_uniform_in_the_ball():
  # |x| / r of a uniform draw in the 5-ball has P(<= t) = t^5: mean 5/6, P(< 1/2) = 1/32.
  dim, radius = 5, 0.1

  def displacement(key):
    tx = jaxsaddle.pgd(
      1.0, perturbation_radius=radius, gradient_threshold=1e-3, escape_steps=5, key=key
    )
    params = jnp.zeros(dim)
    return tx.update(jnp.zeros(dim), tx.init(params), params)[0]

  keys = jax.random.split(jax.random.key(0), 4000)
  draws = np.asarray(jax.jit(jax.vmap(displacement))(keys), np.float64)
  norms = np.linalg.norm(draws, axis=1) / radius
  assert norms.max() <= 1 + 1e-6 and norms.max() > 0.99
  assert abs(norms.mean() - 5 / 6) < 0.01
  assert abs(np.mean(norms < 0.5) - 1 / 32) < 0.01


# --- step accounting --------------------------------------------------------------------------


def test_perturbations_follow_the_papers_schedule_and_land_exactly():
  """Zero gradients: a perturbation, t_thres + 1 gradient steps, the next perturbation."""
  escape_steps, radius, learning_rate = 3, 0.5, 0.1
  tx = jaxsaddle.pgd(
    learning_rate,
    perturbation_radius=radius,
    gradient_threshold=1.0,
    escape_steps=escape_steps,
    key=1,
  )
  value_fn = lambda x: 1e-6 * jnp.sum(x**2)  # gradient far below the threshold
  params = jnp.zeros(5)
  state = tx.init(params)
  update = jax.jit(tx.update)
  perturbed_at = []
  for call in range(12):
    grads = jax.grad(value_fn)(params)
    updates, state = update(grads, state, params)
    if int(state.last_perturbation_step) == call:
      perturbed_at.append(call)
      assert 0 < np.linalg.norm(updates) <= radius
      assert int(state.steps_since_perturbation) == 0
    else:
      # A gradient step taken at the point the displacement moved to.
      np.testing.assert_allclose(updates, -learning_rate * grads, rtol=1e-6)
    params = optax.apply_updates(params, updates)
  assert perturbed_at == [0, 5, 10]
  assert int(state.num_perturbations) == 3
  assert int(state.count) == 12


def test_inner_state_does_not_advance_on_a_perturbing_call():
  tx = jaxsaddle.perturb_near_saddle(
    optax.adam(0.1), perturbation_radius=0.1, gradient_threshold=1.0, escape_steps=2, key=0
  )
  params = jnp.ones(3)
  state = tx.init(params)
  _, state = tx.update(jnp.full(3, 1e-3), state, params)  # perturbs
  assert int(state.num_perturbations) == 1
  assert int(optax.tree.get(state.inner_state, "count")) == 0
  _, state = tx.update(jnp.full(3, 1e-3), state, params)  # a gradient step
  assert int(optax.tree.get(state.inner_state, "count")) == 1


def _escape_check_flag(start, *, key=0):
  problem = problems.strict_saddle()
  tx = jaxsaddle.pgd(
    0.1,
    perturbation_radius=0.05,
    gradient_threshold=1e-3,
    escape_steps=60,
    escape_threshold=1e-4,
    key=key,
  )
  params, state, values = _run(tx, problem.value_fn, jnp.asarray(start), 62, pass_value=True)
  return params, state, values


def test_escape_check_is_false_after_escaping_and_true_at_a_minimum():
  # From the saddle the perturbation leads to a decrease far larger than f_thres.
  _, state, values = _escape_check_flag([0.0, 0.0])
  assert int(state.num_perturbations) == 1
  assert float(state.value_at_perturbation) == 0.0
  assert float(values[-1]) < -0.1
  assert not bool(state.second_order_stationary)
  # At a minimum the loss only comes back to where it was: an approximate SOSP.
  _, state, _ = _escape_check_flag([0.0, 1.0])
  assert int(state.num_perturbations) == 1
  assert float(state.value_at_perturbation) == -0.25
  assert bool(state.second_order_stationary)


# --- escapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [[0.0, 0.0], [1.0, 0.0]], ids=["at_saddle", "stable_manifold"])
def test_gd_stays_on_the_stable_manifold_and_every_noisy_method_escapes(start):
  problem = problems.strict_saddle()
  minimum = -0.25
  params, _, _ = _run(optax.sgd(0.1), problem.value_fn, jnp.asarray(start), 500)
  np.testing.assert_allclose(params, [0.0, 0.0], atol=1e-8)
  for tx in [
    jaxsaddle.pgd(0.1, perturbation_radius=0.01, gradient_threshold=1e-3, escape_steps=20),
    jaxsaddle.noisy_gd(0.1, noise_scale=0.01),
    jaxsaddle.perturbed_sgd(0.1, noise_scale=0.01),
  ]:
    params, _, _ = _run(tx, problem.value_fn, jnp.asarray(start), 500)
    assert float(problem.value_fn(params)) == pytest.approx(minimum, abs=1e-3)
    assert abs(float(params[1])) == pytest.approx(1.0, abs=0.05)


def test_pgd_escapes_a_rotated_high_dimensional_saddle_that_gd_cannot():
  eigenvalues = np.concatenate([[-1.0, -0.5], np.linspace(0.1, 2.0, 48)])
  problem = problems.quadratic_saddle(eigenvalues, rotation_key=3)
  start = jnp.zeros(problem.init_shape)
  _, _, gd_values = _run(optax.sgd(0.2), problem.value_fn, start, 300)
  assert float(jnp.max(jnp.abs(gd_values))) == 0.0
  tx = jaxsaddle.pgd(0.2, perturbation_radius=1e-3, gradient_threshold=1e-4, escape_steps=50)
  _, state, values = _run(tx, problem.value_fn, start, 300)
  # Along the most negative eigenvector the loss falls like -(1 + eta)^(2t).
  assert float(values[-1]) < -1e3
  assert int(state.num_perturbations) == 1


def _seeded_run(key):
  # A separable quadratic: XLA compiles its gradient to the same arithmetic with and without
  # vmap (a reduction or a cube can be vectorised differently and move the last bit).
  curvatures = jnp.array([-1.0, 0.5, 1.0, 2.0])
  value_fn = lambda x: jnp.sum(0.5 * curvatures * x**2)
  tx = jaxsaddle.pgd(0.1, perturbation_radius=0.1, gradient_threshold=1e-3, escape_steps=5, key=key)
  params, state, _ = _run(tx, value_fn, jnp.zeros(4), 30)
  return params, state


@pytest.mark.parametrize(
  "factory",
  [
    _seeded_run,
    lambda key: _run(
      jaxsaddle.noisy_gd(0.1, noise_scale=0.1, key=key),
      problems.strict_saddle().value_fn,
      jnp.zeros(2),
      30,
    )[:2],
    lambda key: _run(
      jaxsaddle.perturbed_sgd(0.1, noise_scale=0.1, key=key),
      problems.strict_saddle().value_fn,
      jnp.zeros(2),
      30,
    )[:2],
  ],
  ids=["pgd", "noisy_gd", "perturbed_sgd"],
)
def test_vmap_over_16_keys_equals_a_python_loop(factory):
  keys = jax.random.split(jax.random.key(0), 16)
  batched = optax.tree.unwrap_random_key_data(jax.jit(jax.vmap(factory))(keys))
  single = jax.jit(factory)
  for i, key in enumerate(keys):
    jax.tree.map(
      lambda b, s, i=i: _assert_same(b[i], np.asarray(s)),
      batched,
      optax.tree.unwrap_random_key_data(single(key)),
    )
  final = np.asarray(batched[0])
  assert len({tuple(row) for row in final.round(6)}) == 16  # every key took its own path


def _assert_same(batched, single):
  if EXACT or not np.issubdtype(single.dtype, np.floating):
    np.testing.assert_array_equal(batched, single)
  else:
    # With FMA, XLA may contract a multiply-add inside one program and not the other.
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(EXACT, reason="this is the launcher of the exact run")
def test_vmap_equals_a_loop_bitwise_without_fma_contraction():
  """Bitwise equality, in a process whose XLA emits no fused multiply-adds."""
  env = os.environ | {"JAXSADDLE_EXACT": "1", "XLA_FLAGS": "--xla_cpu_max_isa=AVX"}
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-p",
      "no:xdist",
      "-p",
      "no:cacheprovider",
      f"{__file__}::test_vmap_over_16_keys_equals_a_python_loop",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "3 passed" in result.stdout


# --- octopus: exponential-time GD against PGD -------------------------------------------------


def _steps_to_minimum(tx, problem, start, max_steps):
  """Steps until every |x_j| is within 0.1 of 4 tau (the octopus minimum), in float64."""
  minimum = jnp.asarray(problem.critical_points[-1].point)
  value_and_grad = jax.value_and_grad(problem.value_fn)

  def unfinished(carry):
    params, _, step = carry
    return (jnp.max(jnp.abs(jnp.abs(params) - minimum)) > 0.1) & (step < max_steps)

  def step(carry):
    params, state, count = carry
    _, grads = value_and_grad(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, count + 1

  _, _, steps = jax.lax.while_loop(unfinished, step, (start, tx.init(start), 0))
  return int(steps)


def test_octopus_gd_escape_time_grows_much_faster_with_dimension_than_pgds():
  # From d = 6 on, GD's trailing coordinates underflow float64 before it escapes, so its
  # stall there would be a rounding artefact, not the exponential-time mechanism.
  dims = range(3, 6)
  seeds = range(5) if FULL else range(2)
  max_steps = 400_000
  gd_steps, pgd_steps = [], []
  with jax.enable_x64(True):
    for dim in dims:
      problem = problems.octopus(dim)
      smoothness = 2 * problem.critical_points[0].hessian_eigenvalues.max()
      learning_rate = 1 / (4 * smoothness)  # a mild contraction keeps float64 from underflowing
      gd, pgd = [], []
      for seed in seeds:
        start = jax.random.uniform(jax.random.key(seed), (dim,), jnp.float64, -1.0, 1.0)
        gd.append(_steps_to_minimum(optax.sgd(learning_rate), problem, start, max_steps))
        tx = jaxsaddle.pgd(
          learning_rate,
          perturbation_radius=0.1 * math.e,
          gradient_threshold=math.e / 100,
          escape_steps=int(10 / learning_rate),
          key=seed,
        )
        pgd.append(_steps_to_minimum(tx, problem, start, max_steps))
      gd_steps.append(np.median(gd))
      pgd_steps.append(np.median(pgd))
  gd_steps, pgd_steps = np.array(gd_steps), np.array(pgd_steps)
  assert np.all(gd_steps < max_steps) and np.all(pgd_steps < max_steps)
  gd_growth = gd_steps[1:] / gd_steps[:-1]
  pgd_growth = pgd_steps[1:] / pgd_steps[:-1]
  # Exponential in d for GD, roughly linear for PGD.
  assert np.all(gd_growth > 3), gd_steps
  assert np.all(pgd_growth < 2), pgd_steps
  assert gd_steps[-1] > 5 * pgd_steps[-1]
  per_dim = pgd_steps / np.array(list(dims))
  assert per_dim.max() < 3 * per_dim.min()


def test_eager_updates_compile_once(caplog):
  # Eagerly, the escape test's lax.cond compiled its branches at every call (0.25 s a step):
  # public_transform runs one jitted update instead.
  value_fn = lambda p: 0.5 * p[0] ** 2 + 0.25 * p[1] ** 4 - 0.5 * p[1] ** 2  # noqa: E731
  tx = jaxsaddle.pgd(0.1, perturbation_radius=0.1, gradient_threshold=1e-3, escape_steps=5)
  params = jnp.zeros(2)
  state = tx.init(params)

  def step(params, state):
    value, grads = jax.value_and_grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  params, state = step(params, state)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
    for _ in range(3):
      params, state = step(params, state)
  assert not [r for r in caplog.records if r.getMessage().startswith("Compiling")]
  assert int(state.num_perturbations) == 1
