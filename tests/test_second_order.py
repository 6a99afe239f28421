"""Saddle-free Newton and stochastic cubic regularisation: closed forms, dense oracles, escapes."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsaddle import problems
from jaxsaddle.second_order import cubic_regularization
from jaxsaddle.second_order import saddle_free_newton

FULL = os.environ.get("JAXSADDLE_FULL") == "1"


def _classical_saddle(p):
  return 5 * p[0] ** 2 - p[1] ** 2


def _monkey_saddle(p):
  return p[0] ** 3 - 3 * p[0] * p[1] ** 2


def _step(tx, state, params, value_fn):
  updates, state = tx.update(jax.grad(value_fn)(params), state, params, value_fn=value_fn)
  return optax.apply_updates(params, updates), state


def _update(tx):
  return jax.jit(tx.update, static_argnames="value_fn")


def _jitted_step(tx, value_fn):
  return jax.jit(lambda state, params: _step(tx, state, params, value_fn))


def _dense_hessian(value_fn, params) -> np.ndarray:
  return np.asarray(jax.jit(jax.hessian(value_fn))(params), np.float64)


def _absolute_inverse(hessian: np.ndarray, damping: float) -> np.ndarray:
  eigenvalues, eigenvectors = np.linalg.eigh(hessian)
  return eigenvectors @ np.diag(1 / (np.abs(eigenvalues) + damping)) @ eigenvectors.T


# --- saddle-free Newton -----------------------------------------------------------------------


def test_sfn_leaves_the_classical_saddle_where_newton_lands_on_it():
  """Dauphin et al.'s Figure 2 saddle 5x^2 - y^2: H = diag(10, -2)."""
  start = jnp.array([0.125, 2.0**-6])  # dyadic, so that the dense Newton step is exact
  grads = jax.grad(_classical_saddle)(start)
  newton = np.asarray(start) - np.linalg.solve(_dense_hessian(_classical_saddle, start), grads)
  np.testing.assert_array_equal(newton, [0.0, 0.0])  # one step, onto the saddle

  # -|H|^{-1} g = (-x, +y): x is solved in one step, y doubles at every step.
  tx = saddle_free_newton(num_lanczos_steps=2, damping=0.0)
  step = _jitted_step(tx, _classical_saddle)
  params, state = start, tx.init(start)
  values = [float(_classical_saddle(params))]
  for n in range(1, 6):
    params, state = step(state, params)
    np.testing.assert_allclose(params, [0.0, 2.0 ** (n - 6)], rtol=1e-5, atol=3e-5 * 2.0 ** (n - 6))
    values.append(float(_classical_saddle(params)))
  assert np.all(np.diff(values) < 0)
  np.testing.assert_allclose(values[-1], -(0.5**2), rtol=1e-5)
  assert float(state.last_smallest_eigenvalue) == pytest.approx(-2.0, rel=1e-6)


def test_sfn_does_not_converge_to_the_monkey_saddle():
  """x^3 - 3xy^2 has a degenerate saddle at 0, where Newton's step halves the distance."""
  start = jnp.array([1e-2, 2e-3])
  tx = saddle_free_newton(num_lanczos_steps=2, damping=0.0)
  step = _jitted_step(tx, _monkey_saddle)
  params, state = start, tx.init(start)
  newton = np.asarray(start, np.float64)
  distances, values = [], [float(_monkey_saddle(params))]
  for _ in range(20):
    params, state = step(state, params)
    distances.append(float(jnp.linalg.norm(params)))
    values.append(float(_monkey_saddle(params)))
    x, y = newton
    gradient = np.array([3 * x**2 - 3 * y**2, -6 * x * y])
    hessian = np.array([[6 * x, -6 * y], [-6 * y, -6 * x]])
    newton = newton - np.linalg.solve(hessian, gradient)
  # f is homogeneous of degree 3, so H x = 2 g and Newton's iterate is x / 2: to the saddle.
  np.testing.assert_allclose(np.linalg.norm(newton), np.linalg.norm(start) / 2**20, rtol=1e-3)
  # |H| = 6 |x| I, so saddle-free Newton is normalised gradient descent with step |x| / 2; once
  # in a descent valley the distance grows by 3/2 per step and the loss falls like its cube.
  assert min(distances) > 0.5 * float(jnp.linalg.norm(start))
  assert distances[-1] > 10.0
  np.testing.assert_allclose(distances[-1] / distances[-2], 1.5, rtol=1e-3)
  assert np.all(np.diff(values) < 0)
  assert values[-1] < -1e3


def test_sfn_with_a_full_krylov_space_is_newton_on_a_convex_quadratic():
  problem = problems.quadratic_saddle([0.5, 1.0, 2.0, 3.0, 5.0, 8.0], rotation_key=4)
  params = jax.random.normal(jax.random.key(1), problem.init_shape)
  hessian = _dense_hessian(problem.value_fn, params)
  grads = jax.grad(problem.value_fn)(params)
  newton_step = -np.linalg.solve(hessian, np.asarray(grads, np.float64))
  np.testing.assert_allclose(np.asarray(params) + newton_step, 0.0, atol=1e-5)
  tx = saddle_free_newton(num_lanczos_steps=6, damping=0.0)
  updates, state = _update(tx)(grads, tx.init(params), params, value_fn=problem.value_fn)
  np.testing.assert_allclose(updates, newton_step, rtol=1e-4, atol=1e-5)
  assert int(state.krylov_dimension) == 6
  assert float(state.last_smallest_eigenvalue) == pytest.approx(0.5, rel=1e-4)


def test_sfn_with_a_full_krylov_space_is_the_damped_absolute_inverse():
  eigenvalues = [-3.0, -1.0, -0.25, 0.5, 2.0, 4.0]
  problem = problems.quadratic_saddle(eigenvalues, rotation_key=2)
  params = jax.random.normal(jax.random.key(3), problem.init_shape)
  hessian = _dense_hessian(problem.value_fn, params)
  grads = jax.grad(problem.value_fn)(params)
  expected = -0.5 * _absolute_inverse(hessian, 0.3) @ np.asarray(grads, np.float64)
  tx = saddle_free_newton(0.5, num_lanczos_steps=6, damping=0.3)
  updates, state = _update(tx)(grads, tx.init(params), params, value_fn=problem.value_fn)
  np.testing.assert_allclose(updates, expected, rtol=1e-4, atol=1e-5)
  assert float(state.last_smallest_eigenvalue) == pytest.approx(-3.0, rel=1e-4)
  # Newton's step would climb along the three negative directions; this one descends.
  assert float(jnp.vdot(updates, grads)) < 0


def test_sfn_uses_only_the_valid_krylov_vectors_after_a_breakdown():
  """Three distinct eigenvalues: the Krylov space of any g is at most 3-dimensional."""
  problem = problems.quadratic_saddle([-2.0, -2.0, 1.0, 1.0, 1.0, 3.0], rotation_key=5)
  params = jax.random.normal(jax.random.key(6), problem.init_shape)
  grads = jax.grad(problem.value_fn)(params)
  hessian = _dense_hessian(problem.value_fn, params)
  tx = saddle_free_newton(num_lanczos_steps=6, damping=0.1)
  updates, state = _update(tx)(grads, tx.init(params), params, value_fn=problem.value_fn)
  assert int(state.krylov_dimension) == 3
  expected = -_absolute_inverse(hessian, 0.1) @ np.asarray(grads, np.float64)
  np.testing.assert_allclose(updates, expected, rtol=1e-4, atol=1e-5)


def test_sfn_learning_rate_gradient_through_a_breakdown_matches_finite_differences():
  # Two distinct curvatures: five Lanczos steps break down after two, leaving three empty slots
  # whose equal padding made the derivative NaN.
  curvatures = jnp.array([2.0, 2.0, 2.0, -1.0, -1.0])
  loss = lambda p: 0.5 * jnp.sum(curvatures * p**2)  # noqa: E731

  def final_loss(learning_rate):
    tx = saddle_free_newton(learning_rate, num_lanczos_steps=5, damping=0.1)
    params = jnp.full(5, 0.3)
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
      params = optax.apply_updates(params, updates)
    return loss(params)

  with jax.enable_x64(True):
    gradient = jax.jit(jax.grad(final_loss))(0.5)
    run = jax.jit(final_loss)
    difference = (run(0.5 + 1e-6) - run(0.5 - 1e-6)) / 2e-6
  np.testing.assert_allclose(gradient, difference, rtol=1e-6)


def test_sfn_zero_gradient_gives_a_zero_update_and_nan_stays_nan():
  tx = saddle_free_newton(num_lanczos_steps=3, damping=0.0)
  params = jnp.zeros(3)
  value_fn = lambda p: jnp.sum(p**2) - p[0] ** 2 * 3
  updates, state = _update(tx)(jnp.zeros(3), tx.init(params), params, value_fn=value_fn)
  np.testing.assert_array_equal(updates, 0.0)
  assert np.isnan(state.last_smallest_eigenvalue) and int(state.krylov_dimension) == 0
  nan_grads = jnp.array([0.0, jnp.nan, 1.0])
  updates, _ = _update(tx)(nan_grads, tx.init(params), params, value_fn=value_fn)
  assert np.all(np.isnan(updates))


def test_sfn_on_a_pytree_matches_the_flat_vector_and_its_state_is_readable_in_a_chain():
  problem = problems.quadratic_saddle([-1.0, 0.5, 2.0, 4.0, 6.0], rotation_key=7)
  flat = jax.random.normal(jax.random.key(8), problem.init_shape)
  tree = {"a": flat[:2], "b": flat[2:].reshape(3, 1)}
  tree_value_fn = lambda t: problem.value_fn(jnp.concatenate([t["a"], t["b"].ravel()]))
  tx = optax.chain(optax.identity(), saddle_free_newton(num_lanczos_steps=4, damping=0.2))
  flat_updates, flat_state = _update(tx)(
    jax.grad(problem.value_fn)(flat), tx.init(flat), flat, value_fn=problem.value_fn
  )
  tree_updates, tree_state = _update(tx)(
    jax.grad(tree_value_fn)(tree), tx.init(tree), tree, value_fn=tree_value_fn
  )
  np.testing.assert_allclose(tree_updates["a"], flat_updates[:2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tree_updates["b"].ravel(), flat_updates[2:], rtol=1e-5, atol=1e-6)
  assert float(optax.tree.get(tree_state, "last_smallest_eigenvalue")) == pytest.approx(
    float(optax.tree.get(flat_state, "last_smallest_eigenvalue")), rel=1e-5
  )


# --- cubic regularisation: the subproblem -----------------------------------------------------


def _cubic_model(g, hessian, rho, step) -> float:
  return float(g @ step + 0.5 * step @ hessian @ step + rho / 6 * np.linalg.norm(step) ** 3)


def _cubic_model_minimizer(g, hessian, rho) -> np.ndarray:
  """The global minimiser: (H + r I) s = -g with r = rho ||s|| / 2 and H + r I >= 0."""
  lowest = np.linalg.eigvalsh(hessian)[0]
  low, high = max(0.0, -lowest) + 1e-12, max(0.0, -lowest) + 1e3
  for _ in range(200):  # bisection on the monotone ||(H + r I)^{-1} g|| - 2 r / rho
    r = (low + high) / 2
    step = -np.linalg.solve(hessian + r * np.eye(len(g)), g)
    low, high = (r, high) if np.linalg.norm(step) > 2 * r / rho else (low, r)
  return step


def _quadratic(hessian: np.ndarray, linear: np.ndarray):
  hessian, linear = jnp.asarray(hessian, jnp.float32), jnp.asarray(linear, jnp.float32)
  return lambda p: 0.5 * p @ hessian @ p + linear @ p


def _rotated_hessian(eigenvalues, key) -> np.ndarray:
  rotation, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(key), (4, 4))))
  return rotation @ np.diag(eigenvalues) @ rotation.T


def test_cubic_takes_the_cauchy_step_when_the_gradient_is_large():
  hessian = _rotated_hessian([-1.0, 0.5, 2.0, 3.0], key=11)
  linear = np.array([4.0, -3.0, 2.0, 1.0])
  value_fn = _quadratic(hessian, linear)
  params = jnp.zeros(4)
  g = np.asarray(jax.grad(value_fn)(params), np.float64)  # = linear, ||g|| = 5.5 >= 2^2 / 1
  # The update is the learning rate times the model's step Delta.
  tx = cubic_regularization(
    0.5, hessian_lipschitz=1.0, smoothness=2.0, epsilon=1e-3, subsolver_steps=7, key=0
  )
  updates, state = _update(tx)(
    jnp.asarray(g, jnp.float32), tx.init(params), params, value_fn=value_fn
  )
  norm, rho = np.linalg.norm(g), 1.0
  kappa = g @ hessian @ g / (rho * norm**2)
  radius = -kappa + math.sqrt(kappa**2 + 2 * norm / rho)
  expected = -radius * g / norm
  np.testing.assert_allclose(updates, 0.5 * expected, rtol=1e-5)
  # The Cauchy radius minimises the model along -g.
  for other in [0.99 * radius, 1.01 * radius]:
    assert _cubic_model(g, hessian, rho, expected) < _cubic_model(
      g, hessian, rho, -other * g / norm
    )
  assert int(state.num_hvps) == 1 and int(state.count) == 1
  assert float(state.model_decrease) == pytest.approx(
    -_cubic_model(g, hessian, rho, expected), rel=1e-5
  )


def test_sfn_and_the_cauchy_step_are_scale_free_over_float32_s_range():
  # ||g||^2 underflowed at 1e-18 (a zero update) and overflowed for a gradient of 1e20 (NaN).
  params = jnp.array([1e-2, 1e-3])
  for scale in [1e-18, 1.0, 1e20]:
    value_fn = lambda p, c=scale: c * (5 * p[0] ** 2 - p[1] ** 2)  # noqa: E731
    tx = saddle_free_newton(num_lanczos_steps=2, damping=0.0)
    updates, _ = _update(tx)(jax.grad(value_fn)(params), tx.init(params), params, value_fn=value_fn)
    # |H|^-1 g = params componentwise, and the step is minus that.
    np.testing.assert_allclose(updates / params, [-1.0, 1.0], rtol=1e-5)
  hessian = np.diag([1.0, 2.0])
  gradient = np.array([1e20, 0.0])
  tx = cubic_regularization(
    1.0, hessian_lipschitz=1.0, smoothness=2.0, epsilon=1e-3, subsolver_steps=3, key=0
  )
  params = jnp.zeros(2)
  updates, _ = _update(tx)(
    jnp.asarray(gradient, jnp.float32),
    tx.init(params),
    params,
    value_fn=_quadratic(hessian, np.zeros(2)),
  )
  # kappa = g'Hg / (rho ||g||^2) = 1, radius = -1 + sqrt(1 + 2e20) along -g.
  np.testing.assert_allclose(updates, [-(math.sqrt(1 + 2e20) - 1), 0.0], rtol=1e-5)


def test_cubic_derived_thresholds_of_float16_injected_hyperparameters_are_formed_in_float32():
  # sqrt(epsilon rho) / ell and epsilon^3 had been formed in float16 under inject_hyperparams:
  # 0, so at an exact saddle the subsolver never perturbed and the update was 0.
  def value_fn(p):
    p = p.astype(jnp.float32)
    return 0.5 * p[0] ** 2 - 0.5 * p[1] ** 2 + 0.25 * p[1] ** 4

  kwargs = dict(
    hessian_lipschitz=1e-4,
    smoothness=2.0,
    epsilon=1e-4,
    subsolver_steps=20,
    subsolver_learning_rate=0.1,
  )
  params = jnp.zeros(2, jnp.float16)
  grads = jax.grad(value_fn)(params)
  plain = cubic_regularization(**kwargs)
  expected, _ = _update(plain)(grads, plain.init(params), params, value_fn=value_fn)
  assert float(jnp.abs(expected[1])) > 1e-4
  injected = optax.inject_hyperparams(cubic_regularization, static_args=("subsolver_steps",))(
    **kwargs
  )
  update = jax.jit(lambda g, s, p: injected.update(g, s, p, value_fn=value_fn))
  updates, _ = update(grads, injected.init(params), params)
  np.testing.assert_allclose(updates, expected, rtol=1e-2)


def test_cubic_subsolver_finds_the_global_minimiser_of_an_indefinite_model():
  hessian = _rotated_hessian([-1.5, -0.5, 1.0, 2.0], key=12)
  linear = np.array([0.3, -0.2, 0.1, 0.25])
  value_fn = _quadratic(hessian, linear)
  rho = 2.0
  tx = cubic_regularization(
    hessian_lipschitz=rho,
    smoothness=2.0,
    epsilon=1e-3,
    subsolver_steps=2000,
    subsolver_learning_rate=0.1,
    perturbation_scale=0.0,
  )
  params = jnp.zeros(4)
  updates, state = _update(tx)(
    jnp.asarray(linear, jnp.float32), tx.init(params), params, value_fn=value_fn
  )
  expected = _cubic_model_minimizer(linear, hessian, rho)
  np.testing.assert_allclose(updates, expected, rtol=1e-4, atol=1e-5)
  assert int(state.num_hvps) == 2000
  assert float(state.model_decrease) == pytest.approx(
    -_cubic_model(linear, hessian, rho, expected), rel=1e-4
  )
  assert not bool(state.second_order_stationary)


def test_cubic_escapes_an_exact_saddle_only_through_its_perturbation():
  """g = 0: the model is minimised at +-(2 gamma / rho) v_min, a decrease of 2 gamma^3 / 3 rho^2."""
  problem = problems.quadratic_saddle([-0.5, 1.0, 2.0], rotation_key=13)
  params = jnp.zeros(problem.init_shape)
  hessian = _dense_hessian(problem.value_fn, params)
  v_min = np.linalg.eigh(hessian)[1][:, 0]
  rho, gamma = 0.5, 0.5
  kwargs = dict(
    hessian_lipschitz=rho,
    smoothness=2.0,
    epsilon=1e-4,
    subsolver_steps=300,
    subsolver_learning_rate=0.4,
  )
  grads = jnp.zeros(problem.init_shape)

  tx = cubic_regularization(perturbation_scale=0.0, **kwargs)
  updates, state = _update(tx)(grads, tx.init(params), params, value_fn=problem.value_fn)
  np.testing.assert_array_equal(updates, 0.0)
  assert bool(state.second_order_stationary)  # without noise it cannot tell a saddle

  tx = cubic_regularization(**kwargs, key=3)  # sigma = sqrt(eps rho) / ell = 3.5e-3
  updates, state = _update(tx)(grads, tx.init(params), params, value_fn=problem.value_fn)
  # That default, and no other scale, draws this perturbation.
  sigma = (kwargs["epsilon"] * rho) ** 0.5 / kwargs["smoothness"]
  for scale, same in [(sigma, True), (0.1 * sigma, False)]:
    explicit = cubic_regularization(**kwargs, perturbation_scale=scale, key=3)
    other, _ = _update(explicit)(grads, explicit.init(params), params, value_fn=problem.value_fn)
    assert np.array_equal(np.asarray(other), np.asarray(updates)) == same
  step = np.asarray(updates, np.float64)
  assert np.linalg.norm(step) == pytest.approx(2 * gamma / rho, rel=1e-2)
  assert abs(step @ v_min) / np.linalg.norm(step) > 0.999
  assert float(state.model_decrease) == pytest.approx(2 * gamma**3 / (3 * rho**2), rel=2e-2)
  assert not bool(state.second_order_stationary)
  assert float(problem.value_fn(updates)) < -0.2


def test_cubic_flags_a_second_order_stationary_point_at_a_minimum():
  problem = problems.quadratic_saddle([0.5, 1.0, 2.0], rotation_key=14)
  params = jnp.zeros(problem.init_shape)
  tx = cubic_regularization(
    hessian_lipschitz=1.0, smoothness=2.0, epsilon=1e-2, subsolver_steps=50, key=1
  )
  grads = jnp.full(problem.init_shape, 1e-4)
  _, state = _update(tx)(grads, tx.init(params), params, value_fn=problem.value_fn)
  # The model is evaluated with the true gradient, so the step taken for the perturbed one
  # raises it: no decrease, below the paper's sqrt(eps^3 / rho) / 100 = 1e-5.
  assert float(state.model_decrease) < 1e-5
  assert bool(state.second_order_stationary)


@pytest.mark.parametrize(("gradient_norm", "stationary"), [(4e-3, True), (5e-3, False)])
def test_cubic_stationarity_threshold_is_the_papers(gradient_norm, stationary):
  # H = I, rho = 1, ell = 1e-3: the Cauchy step, whose model decrease is about |g|^2 / 2 (8.0e-6
  # and 1.25e-5 here), against sqrt(eps^3 / rho) / 100 = 1e-5 for eps = 1e-2.
  value_fn = _quadratic(np.eye(4), np.zeros(4))
  params = jnp.zeros(4)
  tx = cubic_regularization(
    hessian_lipschitz=1.0,
    smoothness=1e-3,
    epsilon=1e-2,
    subsolver_steps=5,
    perturbation_scale=0.0,
  )
  grads = jnp.full(4, gradient_norm / 2)
  _, state = _update(tx)(grads, tx.init(params), params, value_fn=value_fn)
  radius = -1 + math.sqrt(1 + 2 * gradient_norm)
  decrease = radius * gradient_norm - radius**2 / 2 - radius**3 / 6
  assert float(state.model_decrease) == pytest.approx(decrease, rel=1e-4)
  assert bool(state.second_order_stationary) == stationary


# --- cubic regularisation against SGD on a noisy saddle ---------------------------------------

# Tripuraneni et al.'s synthetic saddle has Hessian eigenvalues 20 and -0.2; here the strict
# saddle 10 x^2 + 0.2 (y^4 / 4 - y^2 / 2) has them too, with minima (0, +-1) of value
# -0.05. Every gradient and every Hessian-vector product is noisy: gradients get N(0, sigma^2 I)
# and each step's Hessian gets a symmetric Gaussian matrix E (entries of variance sigma^2 off
# the diagonal, 2 sigma^2 on it), as a minibatch Hessian would.
_SMOOTHNESS, _NEGATIVE_CURVATURE, _NOISE = 20.0, 0.2, 0.1
_THRESHOLD = 0.8 * -_NEGATIVE_CURVATURE / 4  # f < -0.04: in a minimum's basin, past the ridge


def _stretched_saddle(p):
  return _SMOOTHNESS / 2 * p[0] ** 2 + _NEGATIVE_CURVATURE * (p[1] ** 4 / 4 - p[1] ** 2 / 2)


def _first_hits(below, calls):
  """Oracle calls when the loss first fell below the threshold; inf if it never did."""
  hit = jnp.argmax(below, axis=-1)
  found = jnp.any(below, axis=-1)
  return np.where(found, np.asarray(jnp.take_along_axis(calls, hit[..., None], -1)[..., 0]), np.inf)


def _sgd_calls(learning_rates: np.ndarray, seeds: int, num_steps: int) -> np.ndarray:
  """Oracle calls of SGD, shape (len(learning_rates), seeds), all in one compiled program."""

  def run(learning_rate, key):
    def step(params, step_key):
      grads = jax.grad(_stretched_saddle)(params) + _NOISE * jax.random.normal(step_key, (2,))
      params = params - learning_rate * grads
      return params, _stretched_saddle(params) < _THRESHOLD

    _, below = jax.lax.scan(step, jnp.zeros(2), jax.random.split(key, num_steps))
    return below

  keys = jax.random.split(jax.random.key(100), seeds)
  below = jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None)))(jnp.asarray(learning_rates), keys)
  return _first_hits(below, jnp.broadcast_to(jnp.arange(1, num_steps + 1), below.shape))


def _cubic_calls(seeds: int, num_steps: int, subsolver_steps: int) -> np.ndarray:
  def run(key):
    noise_key, tx_key = jax.random.split(key)
    tx = cubic_regularization(
      hessian_lipschitz=0.4,
      smoothness=_SMOOTHNESS,
      epsilon=1e-3,
      subsolver_steps=subsolver_steps,
      subsolver_learning_rate=1.9 / _SMOOTHNESS,
      key=tx_key,
    )

    def step(carry, step_key):
      params, state = carry
      gradient_key, hessian_key = jax.random.split(step_key)
      grads = jax.grad(_stretched_saddle)(params) + _NOISE * jax.random.normal(gradient_key, (2,))
      noise = _NOISE * jax.random.normal(hessian_key, (2, 2))
      noise = (noise + noise.T) / math.sqrt(2)
      value_fn = lambda q: _stretched_saddle(q) + 0.5 * q @ noise @ q
      updates, state = tx.update(grads, state, params, value_fn=value_fn)
      params = optax.apply_updates(params, updates)
      # One gradient, one linearisation of the gradient (counted as another) and the products.
      calls = 2 * state.count + state.num_hvps
      return (params, state), (_stretched_saddle(params) < _THRESHOLD, calls)

    params = jnp.zeros(2)
    _, (below, calls) = jax.lax.scan(
      step, (params, tx.init(params)), jax.random.split(noise_key, num_steps)
    )
    return below, calls

  below, calls = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(200), seeds))
  return _first_hits(below, calls)


def test_cubic_escapes_a_noisy_saddle_with_fewer_oracle_calls_than_tuned_sgd():
  seeds = 256 if FULL else 64
  # Gradient descent is stable for learning rates below 2 / L = 0.1; the best is near the edge.
  grid = np.array([0.5, 1.0, 1.5, 1.8, 1.9, 1.95])
  sgd_medians = np.median(_sgd_calls(grid / _SMOOTHNESS, seeds, num_steps=1500), axis=1)
  cubic = _cubic_calls(seeds, num_steps=12, subsolver_steps=40)
  cubic_median = float(np.median(cubic))
  print(
    f"\noracle calls to f < {_THRESHOLD:.3f} from the saddle, median over {seeds} seeds: "
    f"cubic regularisation {cubic_median:.0f} (gradients + linearisations + HVPs); SGD "
    + ", ".join(f"lr {lr}/L: {median:.0f}" for lr, median in zip(grid, sgd_medians, strict=True))
  )
  assert np.mean(np.isfinite(cubic)) >= 0.9
  assert np.argmin(sgd_medians) > 0  # the grid brackets the tuned rate from below
  assert cubic_median < 0.8 * np.min(sgd_medians)


# --- randomness, jit and input checks ---------------------------------------------------------


def _cubic_run_from_the_saddle(key):
  value_fn = problems.strict_saddle().value_fn
  tx = cubic_regularization(
    hessian_lipschitz=1.0,
    smoothness=2.0,
    epsilon=1e-3,
    subsolver_steps=20,
    subsolver_learning_rate=0.25,
    key=key,
  )

  def step(carry, _):
    params, state = carry
    params, state = _step(tx, state, params, value_fn)
    return (params, state), None

  params = jnp.zeros(2)
  (params, state), _ = jax.lax.scan(step, (params, tx.init(params)), length=4)
  return params, state


def test_cubic_vmap_over_keys_equals_a_python_loop():
  keys = jax.random.split(jax.random.key(0), 8)
  batched = optax.tree.unwrap_random_key_data(jax.jit(jax.vmap(_cubic_run_from_the_saddle))(keys))
  single = jax.jit(_cubic_run_from_the_saddle)
  for i, key in enumerate(keys):
    expected = optax.tree.unwrap_random_key_data(single(key))
    jax.tree.map(
      lambda b, s, i=i: np.testing.assert_allclose(b[i], s, rtol=1e-5, atol=1e-7),
      batched,
      expected,
    )
  final = np.asarray(batched[0])
  values = jax.vmap(problems.strict_saddle().value_fn)(final)
  assert np.all(values < -0.2)  # every seed left the saddle (0) for a minimum (-0.25)
  assert len(set(np.sign(final[:, 1]))) == 2  # to both minima: the keys took their own paths


def test_cubic_jitted_update_equals_eager():
  tx = cubic_regularization(
    hessian_lipschitz=1.0, smoothness=2.0, epsilon=1e-3, subsolver_steps=5, key=2
  )
  value_fn = problems.strict_saddle().value_fn
  params = jnp.array([0.3, 0.2])
  grads = jax.grad(value_fn)(params)
  state = tx.init(params)
  eager = tx.update(grads, state, params, value_fn=value_fn)
  jitted = _update(tx)(grads, state, params, value_fn=value_fn)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    optax.tree.unwrap_random_key_data(eager),
    optax.tree.unwrap_random_key_data(jitted),
  )
  assert float(value_fn(params + eager[0])) < float(value_fn(params))


@pytest.mark.parametrize(
  "tx",
  [
    saddle_free_newton(num_lanczos_steps=2, damping=0.1),
    cubic_regularization(hessian_lipschitz=1.0, smoothness=1.0, epsilon=1e-3, subsolver_steps=3),
  ],
  ids=["saddle_free_newton", "cubic_regularization"],
)
def test_a_missing_value_fn_or_params_is_explained(tx):
  params = jnp.array([0.3, 0.2])
  with pytest.raises(ValueError, match=r"value_fn=loss_fn"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="parameters"):
    tx.update(params, tx.init(params), None, value_fn=lambda p: jnp.sum(p**2))


@pytest.mark.parametrize(
  ("kwargs", "name", "error"),
  [
    ({"damping": -0.1}, "damping", ValueError),
    ({"num_lanczos_steps": 0}, "num_lanczos_steps", ValueError),
    # A loop length cannot be a float (or traced): static_args under inject_hyperparams.
    ({"num_lanczos_steps": 2.5}, "num_lanczos_steps.*static_args", TypeError),
    ({"learning_rate": float("nan")}, "learning_rate", ValueError),
  ],
)
def test_sfn_rejects_bad_hyperparameters_naming_them(kwargs, name, error):
  with pytest.raises(error, match=name):
    saddle_free_newton(**(dict(num_lanczos_steps=3, damping=0.0) | kwargs))


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"hessian_lipschitz": 0.0}, "hessian_lipschitz"),
    ({"hessian_lipschitz": -1.0}, "hessian_lipschitz"),
    ({"smoothness": 0.0}, "smoothness"),
    ({"epsilon": -1e-3}, "epsilon"),
    ({"subsolver_steps": 0}, "subsolver_steps"),
    ({"subsolver_steps": 2.0}, "subsolver_steps"),
    ({"subsolver_learning_rate": 0.0}, "subsolver_learning_rate"),
    ({"perturbation_scale": -1.0}, "perturbation_scale"),
    ({"learning_rate": -1.0}, "learning_rate"),
  ],
)
def test_cubic_rejects_bad_hyperparameters_naming_them(kwargs, name):
  base = dict(hessian_lipschitz=1.0, smoothness=1.0, epsilon=1e-3, subsolver_steps=3)
  with pytest.raises((ValueError, TypeError), match=name):
    cubic_regularization(**(base | kwargs))


def test_cubic_nan_gradients_give_nan_updates():
  tx = cubic_regularization(hessian_lipschitz=1.0, smoothness=1.0, epsilon=1e-3, subsolver_steps=3)
  params = jnp.zeros(3)
  grads = jnp.array([0.0, jnp.nan, 0.0])
  updates, _ = _update(tx)(grads, tx.init(params), params, value_fn=lambda p: jnp.sum(p**2))
  assert np.all(np.isnan(updates))
