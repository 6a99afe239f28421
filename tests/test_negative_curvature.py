"""Negative-curvature descent, Neon, Neon2 and PAGD: closed-form steps, escapes, vmap, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsaddle
from jaxsaddle import _random
from jaxsaddle import problems
from jaxsaddle.negative_curvature import _gradient_difference_search
from jaxsaddle.negative_curvature import negative_curvature_descent
from jaxsaddle.negative_curvature import neon
from jaxsaddle.negative_curvature import neon2
from jaxsaddle.negative_curvature import pagd

# --- a cubic saddle with a known Hessian-Lipschitz constant ----------------------------------
#
# f(x) = 1/2 sum_i c_i z_i^2 + (rho/6) |z_0|^3 with z = Q^T x. Its Hessian is
# Q diag(c_0 + rho |z_0|, c_1, ...) Q^T, and ||H(a) - H(b)|| = rho | |z_0(a)| - |z_0(b)| |
# <= rho ||a - b||, so rho is its Hessian-Lipschitz constant. The origin is a strict saddle
# with lambda_min = c_0 = -1; along q_0 the minimum is at |z_0| = 2 |c_0| / rho.

RHO = 2.0
CURVATURES = np.array([-1.0, 0.5, 1.0, 2.0, 3.0])
EPSILON = 1e-2


def _rotation():
  gaussian = np.random.default_rng(0).standard_normal((5, 5))
  return np.linalg.qr(gaussian)[0]


def _cubic_saddle(rotation):
  def value_fn(x):
    z = jnp.asarray(rotation, x.dtype).T @ x
    curvatures = jnp.asarray(CURVATURES, x.dtype)
    return 0.5 * jnp.sum(curvatures * z**2) + RHO / 6 * jnp.abs(z[0]) ** 3

  return value_fn


def _ncd(**overrides):
  kwargs = dict(
    learning_rate=0.2, hessian_lipschitz=RHO, epsilon=EPSILON, num_lanczos_steps=5, key=0
  )
  return negative_curvature_descent(**(kwargs | overrides))


def _step(tx, value_fn):
  @jax.jit
  def step(params, state):
    grads = jax.grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  return step


@functools.cache
def _cubic_saddle_step():
  """One jitted NCD step on the cubic saddle, shared so that it compiles once per dtype."""
  tx = _ncd()
  step = _step(tx, _cubic_saddle(_rotation()))
  return lambda params: step(params, tx.init(params))


def test_ncd_tie_break_on_a_nan_loss_gives_nan_updates():
  # At an exact saddle the sign comes from comparing the loss at +-step; NaN compares False,
  # which picked one side silently.
  saddle = _cubic_saddle(_rotation())
  value_fn = lambda x: saddle(x) + jnp.where(jnp.sum(x**2) > 0, jnp.nan, 0.0)  # noqa: E731
  params = jnp.zeros(5)
  tx = _ncd()
  updates, state = _step(tx, value_fn)(params, tx.init(params))
  assert int(state.num_curvature_steps) == 1
  assert np.isnan(updates).all()


def _run(tx, value_fn, params, num_steps):
  """``num_steps`` updates in a scan; returns the final params and state and the grad norms."""

  def body(carry, _):
    params, state = carry
    grads = jax.grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    return (optax.apply_updates(params, updates), state), optax.tree.norm(grads)

  (params, state), grad_norms = jax.lax.scan(body, (params, tx.init(params)), length=num_steps)
  return params, state, grad_norms


# --- negative_curvature_descent ----------------------------------------------------------------


def test_ncd_leaves_an_exact_saddle_in_one_curvature_step_with_the_guaranteed_decrease():
  with jax.enable_x64(True):
    rotation = _rotation()
    value_fn = _cubic_saddle(rotation)
    params = jnp.zeros(5)
    new_params, state = _cubic_saddle_step()(params)

    eigenvalue = float(state.last_smallest_eigenvalue)
    np.testing.assert_allclose(eigenvalue, CURVATURES[0], rtol=1e-10)
    assert int(state.num_lanczos_calls) == int(state.num_curvature_steps) == 1
    # The step is |lambda| / rho along the eigenvector +-q_0 (either sign: f is even in z_0).
    z = rotation.T @ np.asarray(new_params)
    np.testing.assert_allclose(abs(z[0]), abs(eigenvalue) / RHO, rtol=1e-10)
    np.testing.assert_allclose(z[1:], 0.0, atol=1e-10)
    decrease = float(value_fn(params) - value_fn(new_params))
    bound = abs(eigenvalue) ** 3 / (3 * RHO**2)
    # On this function the cubic bound is attained: -1/2 a^2 + rho/6 a^3 at a = 1/rho.
    np.testing.assert_allclose(decrease, 1 / (3 * RHO**2), rtol=1e-10)
    assert decrease >= bound * (1 - 1e-10)


@pytest.mark.parametrize("odd", [0.5, -0.5])
def test_ncd_at_an_exact_saddle_takes_the_side_with_the_lower_loss(odd):
  # A term (odd / 6) z_0^3 leaves the gradient (zero) and the Hessian at 0 unchanged but makes
  # the two candidates +-(|lambda| / rho) q_0 differ: the step must take the lower one.
  with jax.enable_x64(True):
    rotation = _rotation()
    even = _cubic_saddle(rotation)

    def value_fn(x):
      return even(x) + odd / 6 * (jnp.asarray(rotation, x.dtype).T @ x)[0] ** 3

    tx = _ncd()
    params = jnp.zeros(5)
    new_params, state = _step(tx, value_fn)(params, tx.init(params))
    z = rotation.T @ np.asarray(new_params)
    np.testing.assert_allclose(z[0], -np.sign(odd) / RHO, rtol=1e-10)
    decrease = float(value_fn(params) - value_fn(new_params))
    assert decrease >= 1 / (3 * RHO**2)


def test_ncd_decrease_bound_holds_for_a_rough_ritz_value():
  # Two Lanczos steps in five dimensions give a Ritz value above lambda_min = -1; the bound
  # |theta|^3 / (3 rho^2) holds for the estimate theta itself.
  with jax.enable_x64(True):
    value_fn = _cubic_saddle(_rotation())
    params = jnp.zeros(5)

    def run(key):
      tx = _ncd(num_lanczos_steps=2, key=key)
      new_params, state = _step(tx, value_fn)(params, tx.init(params))
      decrease = value_fn(params) - value_fn(new_params)
      return state.last_smallest_eigenvalue, state.num_curvature_steps, decrease

    theta, num_curvature_steps, decrease = map(np.asarray, jax.jit(jax.vmap(run))(jnp.arange(8)))
    stepped = num_curvature_steps == 1
    # Some starts see no curvature below the threshold in two steps: no curvature step.
    assert np.all(theta[~stepped] >= -np.sqrt(RHO * EPSILON))
    assert np.sum(theta[stepped] > CURVATURES[0] + 1e-3) >= 3
    np.testing.assert_array_less(
      abs(theta[stepped]) ** 3 / (3 * RHO**2) * (1 - 1e-10), decrease[stepped]
    )


@pytest.mark.parametrize("z0", [1e-3, -1e-3])
def test_ncd_steps_against_the_gradient_along_the_ritz_vector(z0):
  with jax.enable_x64(True):
    rotation = _rotation()
    value_fn = _cubic_saddle(rotation)
    start_z = np.array([z0, 2e-3, 0.0, 0.0, 0.0])
    params = jnp.asarray(rotation @ start_z)
    assert float(optax.tree.norm(jax.grad(value_fn)(params))) < EPSILON
    new_params, state = _cubic_saddle_step()(params)

    # Hessian at z: diag(c_0 + rho |z_0|, ...), so lambda_min = -1 + rho |z0|.
    expected_eigenvalue = CURVATURES[0] + RHO * abs(z0)
    np.testing.assert_allclose(
      float(state.last_smallest_eigenvalue), expected_eigenvalue, rtol=1e-9
    )
    # The gradient along q_0 is c_0 z0 + rho/2 z0 |z0|, of the sign of -z0: the step moves z_0
    # away from 0, whichever sign Lanczos gave the Ritz vector.
    step_length = abs(expected_eigenvalue) / RHO
    expected_z = start_z + np.array([np.sign(z0) * step_length, 0, 0, 0, 0])
    np.testing.assert_allclose(rotation.T @ np.asarray(new_params), expected_z, atol=1e-10)
    decrease = float(value_fn(params) - value_fn(new_params))
    assert decrease >= abs(expected_eigenvalue) ** 3 / (3 * RHO**2)
    wrong_way = jnp.asarray(rotation @ (start_z - (expected_z - start_z)))
    assert float(value_fn(wrong_way)) > float(value_fn(new_params))


@pytest.mark.parametrize(("epsilon", "steps"), [(0.1, True), (0.15, False)])
def test_ncd_curvature_threshold_is_sqrt_rho_epsilon(epsilon, steps):
  # At z = (0.25, 0, ...) lambda_min = -1 + rho * 0.25 = -0.5, between -sqrt(rho eps) = -0.447
  # (a curvature step) and -0.548 (none: the gradient step stands).
  with jax.enable_x64(True):
    rotation = _rotation()
    value_fn = _cubic_saddle(rotation)
    params = jnp.asarray(rotation @ np.array([0.25, 0.0, 0.0, 0.0, 0.0]))
    tx = _ncd(epsilon=epsilon, gradient_threshold=1.0)
    grads = jax.grad(value_fn)(params)
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=value_fn))(
      grads, tx.init(params), params
    )
    assert int(state.num_lanczos_calls) == 1
    assert int(state.num_curvature_steps) == int(steps)
    np.testing.assert_allclose(float(state.last_smallest_eigenvalue), -0.5, rtol=1e-9)
    if not steps:
      np.testing.assert_array_equal(updates, -0.2 * grads)


def test_ncd_step_sign_comes_from_value_fn_not_from_the_incoming_updates():
  with jax.enable_x64(True):
    rotation = _rotation()
    value_fn = _cubic_saddle(rotation)
    params = jnp.asarray(rotation @ np.array([1e-3, 2e-3, 0.0, 0.0, 0.0]))
    tx = _ncd()
    grads = jax.grad(value_fn)(params)
    # Incoming updates already transformed (here negated) must not flip the curvature step.
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=value_fn))(
      -grads, tx.init(params), params
    )
    assert int(state.num_curvature_steps) == 1
    step_length = abs(CURVATURES[0] + RHO * 1e-3) / RHO
    np.testing.assert_allclose(
      rotation.T @ np.asarray(updates), [step_length, 0, 0, 0, 0], atol=1e-10
    )


def test_ncd_with_a_large_gradient_is_gradient_descent_exactly():
  value_fn = _cubic_saddle(_rotation())
  schedule = optax.exponential_decay(0.2, transition_steps=1, decay_rate=0.9)
  tx = _ncd(learning_rate=schedule)
  sgd = optax.sgd(schedule)

  def run(params):
    def body(carry, _):
      params, state, sgd_state = carry
      grads = jax.grad(value_fn)(params)
      updates, state = tx.update(grads, state, params, value_fn=value_fn)
      sgd_updates, sgd_state = sgd.update(grads, sgd_state, params)
      carry = (optax.apply_updates(params, updates), state, sgd_state)
      return carry, (updates, sgd_updates, optax.tree.norm(grads))

    init = (params, tx.init(params), sgd.init(params))
    return jax.lax.scan(body, init, length=3)

  (_, state, _), (updates, sgd_updates, grad_norms) = jax.jit(run)(
    jnp.array([1.0, -0.5, 0.3, 0.2, -0.1])
  )
  assert float(jnp.min(grad_norms)) > EPSILON
  np.testing.assert_array_equal(updates, sgd_updates)
  assert int(state.count) == 3
  assert int(state.num_lanczos_calls) == int(state.num_curvature_steps) == 0
  assert np.isnan(float(state.last_smallest_eigenvalue))


def _primitives_outside_conds(jaxpr, outside=None) -> set[str]:
  """The primitives of ``jaxpr`` and its sub-jaxprs, except those inside a ``cond``'s branches."""
  outside = set() if outside is None else outside
  for equation in jaxpr.eqns:
    outside.add(equation.primitive.name)
    if equation.primitive.name == "cond":
      continue
    for param in equation.params.values():
      for sub in param if isinstance(param, tuple | list) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _primitives_outside_conds(sub.jaxpr, outside)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _primitives_outside_conds(sub, outside)
  return outside


@pytest.mark.parametrize(
  "make_tx",
  [
    lambda: _ncd(),
    lambda: _neon(num_search_steps=5),
    lambda: _neon(neon2, num_search_steps=5),
    lambda: jaxsaddle.monitor_curvature(every=10, num_lanczos_steps=5),
  ],
  ids=["ncd", "neon", "neon2", "monitor"],
)
def test_the_loss_is_read_only_in_the_branch_that_searches(make_tx):
  # lax.cond, so that a step that does not search costs a gradient step under jit: the loss's
  # own primitive (cos) appears only inside a cond's branches, none of its products outside.
  value_fn = lambda x: jnp.sum(jnp.cos(x)) + 0.5 * jnp.sum(x**2)  # noqa: E731
  tx = make_tx()
  params = jnp.linspace(-1.0, 1.0, 5)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, value_fn=value_fn))(
    params, state, params
  )
  all_primitives = {eqn.primitive.name for eqn in jax.make_jaxpr(value_fn)(params).eqns}
  assert "cos" in all_primitives
  outside = _primitives_outside_conds(jaxpr.jaxpr)
  assert "cond" in outside and "cos" not in outside and "sin" not in outside


def test_ncd_counters_over_an_escape_to_the_minimum():
  rotation = _rotation()
  value_fn = _cubic_saddle(rotation)
  tx = _ncd()
  params, state, grad_norms = jax.jit(lambda p: _run(tx, value_fn, p, 80))(jnp.zeros(5))

  # One curvature step at the saddle, then gradient descent to z = (+-2 |c_0| / rho, 0, ...).
  assert int(state.count) == 80
  assert int(state.num_curvature_steps) == 1
  small = np.asarray(grad_norms) <= EPSILON
  assert small[0] and not small[1:10].any() and small[-1]
  assert int(state.num_lanczos_calls) == int(small.sum())
  z = rotation.T @ np.asarray(params)
  np.testing.assert_allclose(np.abs(z), [2 * abs(CURVATURES[0]) / RHO, 0, 0, 0, 0], atol=1e-3)
  # There the Hessian is diag(-1 + rho * 1, 0.5, 1, 2, 3): the last estimate is its minimum.
  np.testing.assert_allclose(float(state.last_smallest_eigenvalue), 0.5, rtol=1e-4)


@pytest.mark.parametrize(
  "make",
  [
    # Two Lanczos steps, or five power steps, in five dimensions: the direction depends on the
    # random start.
    lambda key: _ncd(num_lanczos_steps=2, key=key),
    lambda key: _neon(num_search_steps=5, key=key),
    lambda key: _neon(neon2, num_search_steps=5, key=key),
  ],
  ids=["negative_curvature_descent", "neon", "neon2"],
)
def test_vmap_over_8_keys_equals_a_python_loop(make):
  value_fn = _cubic_saddle(_rotation())

  def run(key):
    params, state, _ = _run(make(key), value_fn, jnp.zeros(5), 6)
    return params, state.last_smallest_eigenvalue, state.num_curvature_steps

  keys = jax.random.split(jax.random.key(1), 8)
  batched = jax.jit(jax.vmap(run))(keys)
  single = jax.jit(run)
  for i, key in enumerate(keys):
    for b, s in zip(batched, single(key), strict=True):
      np.testing.assert_allclose(b[i], s, rtol=1e-5, atol=1e-6)
  assert len({tuple(row) for row in np.asarray(batched[0]).round(5)}) == 8


def test_ncd_under_inject_hyperparams_matches_the_plain_transform():
  value_fn = _cubic_saddle(_rotation())
  kwargs = dict(learning_rate=0.2, hessian_lipschitz=RHO, epsilon=EPSILON, num_lanczos_steps=5)
  plain = negative_curvature_descent(**kwargs)
  injected = optax.inject_hyperparams(
    negative_curvature_descent, static_args=("num_lanczos_steps",)
  )(**kwargs)
  params = jnp.asarray(_rotation() @ np.array([1e-3, 2e-3, 0, 0, 0]), jnp.float32)
  grads = jax.grad(value_fn)(params)
  updates, _ = jax.jit(lambda g, s, p: plain.update(g, s, p, value_fn=value_fn))(
    grads, plain.init(params), params
  )
  update = jax.jit(lambda g, s, p: injected.update(g, s, p, value_fn=value_fn))
  injected_updates, injected_state = update(grads, injected.init(params), params)
  np.testing.assert_allclose(injected_updates, updates, rtol=1e-5, atol=1e-7)
  assert int(injected_state.inner_state.num_curvature_steps) == 1

  traced_steps = optax.inject_hyperparams(negative_curvature_descent)(**kwargs)
  with pytest.raises(TypeError, match="static_args"):
    traced_steps.init(params)


def test_ncd_threshold_of_float16_injected_hyperparameters_is_formed_in_float32():
  # Curvature -5e-5 against a threshold sqrt(rho epsilon) = 1e-4: no curvature step. In float16
  # (inject_hyperparams casts to the params' dtype) rho * epsilon = 1e-8 had flushed to 0, and
  # the search stepped along the -5e-5 direction.
  def value_fn(p):
    p = p.astype(jnp.float32)
    return 0.5 * p[0] ** 2 - 2.5e-5 * p[1] ** 2 + 1e-4 * p[1] ** 3

  kwargs = dict(learning_rate=0.1, hessian_lipschitz=1e-3, epsilon=1e-5, num_lanczos_steps=2)
  injected = optax.inject_hyperparams(
    negative_curvature_descent, static_args=("num_lanczos_steps",)
  )(**kwargs)
  params = jnp.zeros(2, jnp.float16)
  update = jax.jit(lambda g, s, p: injected.update(g, s, p, value_fn=value_fn))
  updates, state = update(jax.grad(value_fn)(params), injected.init(params), params)
  np.testing.assert_array_equal(updates, 0)
  assert int(state.inner_state.num_curvature_steps) == 0
  assert float(state.inner_state.last_smallest_eigenvalue) == pytest.approx(-5e-5, rel=1e-2)


# --- neon ----------------------------------------------------------------------------------------

# The cubic saddle's largest curvature is 3, plus rho |z_0| near the origin.
SMOOTHNESS = 4.0


def _neon(transform=neon, **overrides):
  kwargs = dict(
    learning_rate=0.2,
    hessian_lipschitz=RHO,
    epsilon=EPSILON,
    smoothness=SMOOTHNESS,
    num_search_steps=60,
    key=0,
  )
  return transform(**(kwargs | overrides))


def _power(curvatures, smoothness, num_steps):
  return (1 - curvatures / smoothness) ** num_steps


def _chebyshev(curvatures, smoothness, num_steps):
  return np.polynomial.chebyshev.chebval(1 - 2 * curvatures / smoothness, [0] * num_steps + [1])


@pytest.mark.parametrize(
  ("accelerated", "polynomial", "reached"),
  # On this spectrum's two lowest curvatures, -2 and -1.58: forty power steps of ratio
  # (1 + 2/8) / (1 + 1.58/8) = 1.04, and T_40(1.5) / T_40(1.39) = 56.
  [(False, _power, -1.8), (True, _chebyshev, -1.99)],
  ids=["neon", "neon2"],
)
def test_search_on_a_quadratic_is_its_polynomial_of_the_hessian(accelerated, polynomial, reached):
  # Gradient differences of a quadratic are exactly H u: the direction is the polynomial of H
  # applied to the start, (I - H / ell)^K u_0 for the power method and T_K(I - 2H / ell) u_0 for
  # Chebyshev's recurrence, normalised, whatever the rescaling along the way; the curvature is
  # its Rayleigh quotient plus rho r / 2.
  with jax.enable_x64(True):
    eigenvalues = np.linspace(-2.0, 6.0, 20)
    rotation = np.linalg.qr(np.random.default_rng(3).standard_normal((20, 20)))[0]
    matrix = (rotation * eigenvalues) @ rotation.T
    value_fn = lambda x: 0.5 * x @ jnp.asarray(matrix) @ x  # noqa: E731
    params = jnp.zeros(20)
    key, radius, smoothness, rho = jax.random.key(4), 1e-3, 8.0, 0.5
    start = np.asarray(_random.sample_isotropic(key, params, radius, "sphere"))
    for num_steps in (1, 2, 5, 40):
      grad, curvature, direction = _gradient_difference_search(
        value_fn,
        params,
        key,
        jnp.float64,
        num_steps=num_steps,
        smoothness=smoothness,
        radius=radius,
        rho=rho,
        accelerated=accelerated,
      )
      vector = rotation @ (polynomial(eigenvalues, smoothness, num_steps) * (rotation.T @ start))
      vector = vector / np.linalg.norm(vector)
      np.testing.assert_allclose(direction, vector, atol=1e-9)
      np.testing.assert_allclose(grad, 0.0)
      np.testing.assert_allclose(curvature, vector @ matrix @ vector + rho * radius / 2, rtol=1e-9)
    assert float(curvature) < reached


def test_neon2_search_passes_through_the_roots_of_its_polynomial():
  # H = ell I / 2 maps to z = 0, a root of T_1 and T_3: the vector after such a step is exactly
  # zero, and rescaling it to radius r had zeroed the recurrence for good (a NaN bound at K = 2,
  # where T_2(0) y_0 = -y_0). The direction is then the previous vector, and the bound exact.
  with jax.enable_x64(True):
    params = jnp.zeros(8)
    key, radius, rho = jax.random.key(0), 1e-3, 0.5
    start = np.asarray(_random.sample_isotropic(key, params, radius, "sphere"))
    for num_steps in (1, 2, 3, 4):
      _, curvature, direction = _gradient_difference_search(
        lambda x: 0.25 * x @ x,
        params,
        key,
        jnp.float64,
        num_steps=num_steps,
        smoothness=1.0,
        radius=radius,
        rho=rho,
        accelerated=True,
      )
      np.testing.assert_allclose(curvature, 0.5 + rho * radius / 2, rtol=1e-12)
      np.testing.assert_allclose(np.abs(direction), np.abs(start) / radius, rtol=1e-12)


def test_neon2_finds_curvature_the_power_method_misses_with_as_many_gradients():
  # diag(-gamma, 0 .. 1) rotated, n = 50, gamma = 0.02, ell = 1: twenty power steps raise the
  # negative direction by (1 + gamma)^20 = 1.5 against the curvature near 0, twenty Chebyshev
  # steps by T_20(1 + 2 gamma) = 140. The threshold sqrt(rho eps) is 0.8 gamma.
  gamma = 0.02
  eigenvalues = np.concatenate([[-gamma], np.linspace(0.0, 1.0, 49)])
  rotations = np.stack(
    [np.linalg.qr(np.random.default_rng(seed).standard_normal((50, 50)))[0] for seed in range(4)]
  )
  matrices = jnp.asarray(
    np.einsum("sij,j,skj->sik", rotations, eigenvalues, rotations), jnp.float32
  )
  negatives = jnp.asarray(rotations[:, :, 0], jnp.float32)
  kwargs = dict(hessian_lipschitz=1.0, epsilon=(0.8 * gamma) ** 2, smoothness=1.0)

  def search(transform):
    def one(matrix, negative, seed):
      # f = 1/2 x'Hx + z_0^4 / 24: a Hessian 1-Lipschitz for |z_0| <= 1/2.
      value_fn = lambda x: 0.5 * x @ matrix @ x + (negative @ x) ** 4 / 24  # noqa: E731
      tx = _neon(transform, num_search_steps=20, key=seed, **kwargs)
      params = jnp.zeros(50)
      new_params, state = _step(tx, value_fn)(params, tx.init(params))
      return new_params, state, value_fn(params) - value_fn(new_params)

    return jax.jit(jax.vmap(one))(matrices, negatives, jnp.arange(4))

  steps, state, decrease = search(neon2)
  np.testing.assert_array_equal(state.num_curvature_steps, 1)
  bounds = np.asarray(state.last_smallest_eigenvalue)
  assert np.all(bounds < -0.85 * gamma)
  alignment = np.abs(np.sum(np.asarray(negatives) * steps, axis=1)) / np.linalg.norm(steps, axis=1)
  assert np.all(alignment > 0.99)
  assert np.all(np.asarray(decrease) >= np.abs(bounds) ** 3 / 3)

  _, state, _ = search(neon)
  np.testing.assert_array_equal(state.num_curvature_steps, 0)
  assert np.all(np.asarray(state.last_smallest_eigenvalue) > -0.8 * gamma)


@pytest.mark.parametrize(
  ("transform", "num_steps"),
  # Sixty power steps of ratio (1 + 1/4) / (1 + 1/8) on I - H / 4, or five Chebyshev steps:
  # T_5(1.5) = 62 against at most 1 for the rest of the spectrum (five power steps give 1.7,
  # and a bound of -0.93).
  [(neon, 60), (neon2, 5)],
  ids=["neon", "neon2"],
)
def test_neon_leaves_an_exact_saddle_with_the_guaranteed_decrease(transform, num_steps):
  with jax.enable_x64(True):
    rotation = _rotation()
    value_fn = _cubic_saddle(rotation)
    params = jnp.zeros(5)
    tx = _neon(transform, num_search_steps=num_steps)
    new_params, state = _step(tx, value_fn)(params, tx.init(params))
    bound = float(state.last_smallest_eigenvalue)
    assert int(state.num_searches) == int(state.num_curvature_steps) == 1
    # The bound is the curvature along the direction plus rho r / 2, r = 0.1 sqrt(eps / rho):
    # here within 3% of lambda_min = -1.
    radius = 0.1 * np.sqrt(EPSILON / RHO)
    assert CURVATURES[0] <= bound - RHO * radius / 2 * (1 - 1e-9) < 0.97 * CURVATURES[0]
    z = rotation.T @ np.asarray(new_params)
    np.testing.assert_allclose(np.linalg.norm(z), abs(bound) / RHO, rtol=1e-9)
    decrease = float(value_fn(params) - value_fn(new_params))
    assert decrease >= abs(bound) ** 3 / (3 * RHO**2)


@pytest.mark.parametrize("seed", range(4))
def test_neon_escapes_a_rotated_strict_saddle(seed):
  # diag(-gamma, 0.1 .. 1) rotated, n = 50, at x = 0 of f = 1/2 x'Hx + z_0^4 / 24 (Hessian
  # 1-Lipschitz for |z_0| <= 1/2): a curvature step takes it along the negative direction by
  # at least the guaranteed decrease. With ell = 1 the power method's ratio is 1.5 / 0.9.
  gamma = 0.5
  eigenvalues = np.concatenate([[-gamma], np.linspace(0.1, 1.0, 49)])
  rotation = np.linalg.qr(np.random.default_rng(seed).standard_normal((50, 50)))[0]
  matrix = jnp.asarray((rotation * eigenvalues) @ rotation.T, jnp.float32)
  negative = jnp.asarray(rotation[:, 0], jnp.float32)
  value_fn = lambda x: 0.5 * x @ matrix @ x + (negative @ x) ** 4 / 24  # noqa: E731
  tx = _neon(hessian_lipschitz=1.0, epsilon=1e-3, smoothness=1.0, num_search_steps=120, key=seed)
  params = jnp.zeros(50)
  new_params, state = _step(tx, value_fn)(params, tx.init(params))
  assert int(state.num_curvature_steps) == 1
  step = np.asarray(new_params)
  assert abs(float(negative @ step)) / np.linalg.norm(step) > 0.999
  bound = float(state.last_smallest_eigenvalue)
  assert bound < -0.45
  assert float(value_fn(params) - value_fn(new_params)) >= abs(bound) ** 3 / 3


def test_neon_with_a_large_gradient_is_gradient_descent_and_never_searches():
  value_fn = _cubic_saddle(_rotation())
  tx = _neon()
  params = jnp.asarray(_rotation() @ np.array([0.0, 1.0, 0.5, 0.0, 0.0]), jnp.float32)
  grads = jax.grad(value_fn)(params)
  updates, state = tx.update(grads, tx.init(params), params, value_fn=value_fn)
  np.testing.assert_allclose(updates, -0.2 * grads, rtol=1e-6)
  assert int(state.num_searches) == 0 and np.isnan(float(state.last_smallest_eigenvalue))


@pytest.mark.parametrize("accelerated", [False, True], ids=["neon", "neon2"])
def test_neon_bound_holds_for_bfloat16_params_under_jit(accelerated):
  # Inside one XLA program bfloat16 sums are kept wider: the displacement read back was not the
  # one the gradient saw, and the bound read -0.3 where the curvature was +1.6.
  def value_fn(p):  # Hessian diag(2, -1) at (1, 0); the x term in bfloat16, as a model's
    y = p[1].astype(jnp.float32)
    return ((p[0] - 1) ** 2).astype(jnp.float32) - 0.5 * y**2 + 0.25 * y**4

  params = jnp.array([1.0, 0.0], jnp.bfloat16)
  hessian = np.diag([2.0, -1.0])
  search = jax.jit(
    lambda key: _gradient_difference_search(
      value_fn,
      params,
      key,
      jnp.float32,
      num_steps=1 + accelerated,
      smoothness=4.0,
      radius=1e-3,
      rho=6.0,
      accelerated=accelerated,
    )
  )
  for key in range(8):
    _, bound, direction = search(jax.random.key(key))
    direction = np.asarray(direction, np.float64)
    assert float(bound) >= direction @ hessian @ direction - 1e-3


def test_neon_reports_a_radius_the_params_round_away_as_nan_and_takes_gradient_steps():
  # At |params| = 1e5 float32's spacing is 8e-3: the default radius, 3e-3 over 20 coordinates,
  # rounds to nothing, which used to read as curvature 0 at a strict saddle.
  rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((20, 20)))[0]
  matrix = jnp.asarray((rotation * np.linspace(-1.0, 1.0, 20)) @ rotation.T, jnp.float32)
  center = jnp.full(20, 1e5)
  value_fn = lambda x: 0.5 * (x - center) @ matrix @ (x - center)  # noqa: E731
  tx = _neon(hessian_lipschitz=1.0, epsilon=1e-3, smoothness=1.0)
  grads = jax.grad(value_fn)(center)
  updates, state = tx.update(grads, tx.init(center), center, value_fn=value_fn)
  assert int(state.num_searches) == 1 and int(state.num_curvature_steps) == 0
  assert np.isnan(float(state.last_smallest_eigenvalue))
  np.testing.assert_array_equal(updates, 0.0)
  # A radius of a few units of the last place finds the curvature.
  tx = _neon(hessian_lipschitz=1.0, epsilon=1e-3, smoothness=1.0, difference_radius=0.1)
  _, state = tx.update(grads, tx.init(center), center, value_fn=value_fn)
  assert int(state.num_curvature_steps) == 1 and float(state.last_smallest_eigenvalue) < -0.5


@pytest.mark.parametrize("transform", [neon, neon2], ids=["neon", "neon2"])
def test_neon_rounding_of_cancelling_gradients_fakes_no_negative_curvature(transform):
  # A float32 mean of 512 large terms of alternating sign: a convex quadratic of curvature
  # 1e-3, whose gradient differences at small radii are mostly rounding. Without the mismatch
  # of the two differences in the bound, 3 of 20 keys read -6e-3 and stepped uphill.
  centers = jax.random.normal(jax.random.key(1), (512, 4)) * 100.0
  weights = jnp.where(jnp.arange(512) % 2 == 0, 1.0, -1.0).at[0].add(0.512)
  value_fn = lambda p: 0.5 * jnp.mean(weights * jnp.sum((p - centers) ** 2, axis=1))  # noqa: E731
  minimum = jnp.sum(weights[:, None] * centers, axis=0) / jnp.sum(weights)
  grads = jax.grad(value_fn)(minimum)
  tx = _neon(
    transform,
    hessian_lipschitz=1.0,
    epsilon=1e-6,
    smoothness=1.0,
    num_search_steps=10,
    gradient_threshold=1.0,  # the gradient at the minimum is rounding too, 6e-6
  )
  update = jax.jit(lambda state: tx.update(grads, state, minimum, value_fn=value_fn))
  for key in range(20):
    _, state = update(tx.init(minimum)._replace(rng_key=jax.random.key(key)))
    assert int(state.num_searches) == 1 and int(state.num_curvature_steps) == 0


@pytest.mark.parametrize(
  ("kwargs", "name", "error"),
  [
    ({"smoothness": 0.0}, "smoothness", ValueError),
    ({"smoothness": float("nan")}, "smoothness", ValueError),
    ({"difference_radius": -1e-3}, "difference_radius", ValueError),
    ({"num_search_steps": 0}, "num_search_steps", ValueError),
    ({"num_search_steps": 2.5}, "num_search_steps", TypeError),
    ({"hessian_lipschitz": 0.0}, "hessian_lipschitz", ValueError),
    ({"epsilon": -1.0}, "epsilon", ValueError),
    ({"learning_rate": -0.1}, "learning_rate", ValueError),
  ],
)
@pytest.mark.parametrize("transform", [neon, neon2], ids=["neon", "neon2"])
def test_neon_rejects_bad_hyperparameters_naming_them(kwargs, name, error, transform):
  owner = transform.__name__
  with pytest.raises(error, match=f"{owner}: {name}|{owner}.*{name}"):
    _neon(transform, **kwargs)


# --- pagd ----------------------------------------------------------------------------------------

_PAGD = dict(
  momentum=0.9,
  perturbation_radius=1e-2,
  gradient_threshold=1e-3,
  escape_steps=20,
  exploitation_radius=0.05,
)


def test_pagd_away_from_saddles_is_nesterov_momentum():
  # A convex quadratic: the nonconvexity test never fires, and the gradient stays large.
  curvatures = jnp.array([1.0, 3.0, 10.0])
  value_fn = lambda x: 0.5 * jnp.sum(curvatures * x**2)
  tx = pagd(0.05, **(_PAGD | dict(momentum=0.8, gradient_threshold=1e-9)))
  reference = optax.sgd(0.05, momentum=0.8, nesterov=True)
  params = ref_params = jnp.array([1.0, -2.0, 0.5])
  state, ref_state = tx.init(params), reference.init(params)
  step = _step(tx, value_fn)
  for _ in range(40):
    params, state = step(params, state)
    grads = jax.grad(value_fn)(ref_params)
    updates, ref_state = reference.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  np.testing.assert_allclose(params, ref_params, rtol=1e-5, atol=1e-7)
  assert float(optax.tree.norm(ref_params)) < 0.1  # it really moved
  assert int(state.num_exploitations) == int(state.num_perturbations) == 0


def _indefinite_quadratic(p):
  return 0.5 * p[0] ** 2 - 0.5 * p[1] ** 2 + 0.3 * p[1]


_NCE = dict(learning_rate=0.1, momentum=0.9, exploitation_radius=0.5)


@functools.cache
def _nce_step(default_threshold: bool):
  """One PAGD call at y = (0.4, 0.2) from a given velocity, compiled once per threshold kind."""

  def step(velocity, curvature_threshold):
    if default_threshold:
      curvature_threshold = None  # theta^2 / eta = 0.01 / 0.1
    tx = pagd(**(_PAGD | _NCE | dict(curvature_threshold=curvature_threshold)))
    params = jnp.array([0.4, 0.2])
    state = tx.init(params)._replace(velocity=velocity)
    grads = jax.grad(_indefinite_quadratic)(params)
    return tx.update(grads, state, params, value_fn=_indefinite_quadratic)

  return jax.jit(step)


@pytest.mark.parametrize(
  ("velocity", "curvature_threshold", "fires"),
  [
    ((0.0, 0.2), None, True),  # along the -1 direction, shorter than s: move by s
    ((0.0, 0.8), None, True),  # longer than s: back to x_t
    ((0.2, 0.0), None, False),  # along the +1 direction
    ((0.2, 0.2), None, False),  # Rayleigh quotient 0 > -gamma
    # Either side of the default gamma = theta^2 / eta = 0.1:
    ((0.2 * 0.475**0.5, 0.2 * 0.525**0.5), None, False),  # Rayleigh quotient -0.05 > -gamma
    ((0.2 * 0.425**0.5, 0.2 * 0.575**0.5), None, True),  # Rayleigh quotient -0.15 < -gamma
    ((0.0, 0.2), 0.9, True),  # curvature -1 <= -gamma
    ((0.0, 0.2), 1.1, False),  # curvature -1 > -gamma
  ],
)
def test_pagd_negative_curvature_exploitation_moves_as_specified(
  velocity, curvature_threshold, fires
):
  learning_rate, momentum, radius = (_NCE[k] for k in _NCE)
  step = _nce_step(curvature_threshold is None)
  v = np.array(velocity)
  updates, state = step(jnp.asarray(v, jnp.float32), jnp.float32(curvature_threshold or 0.0))

  y = np.array([0.4, 0.2])
  g = np.array([y[0], -y[1] + 0.3])
  x = y - momentum * v
  if fires:
    if np.linalg.norm(v) >= radius:
      x_next = x
    else:
      delta = radius * v / np.linalg.norm(v)
      x_next = min([x + delta, x - delta], key=_indefinite_quadratic)
    expected_update, expected_velocity = x_next - y, np.zeros(2)
  else:
    expected_velocity = momentum * v - learning_rate * g
    expected_update = momentum * expected_velocity - learning_rate * g
  np.testing.assert_allclose(updates, expected_update, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state.velocity, expected_velocity, rtol=1e-6, atol=1e-7)
  assert int(state.num_exploitations) == int(fires)
  assert int(state.num_perturbations) == 0


@pytest.mark.parametrize("nan_where", ["everywhere", "beyond the exploitation radius"])
def test_pagd_gives_nan_updates_where_it_reads_a_nan_loss(nan_where):
  # Read as a loss, NaN made the convexity test False (NCE silently off) or picked NCE's side.
  def value_fn(p):
    poisoned = True if nan_where == "everywhere" else jnp.abs(p[1]) > 0.3
    return _indefinite_quadratic(p) + jnp.where(poisoned, jnp.nan, 0.0)

  tx = pagd(**(_PAGD | _NCE))
  params = jnp.array([0.4, 0.2])
  # A velocity along the -1 direction, shorter than s: NCE fires and compares x +- delta, the
  # only points beyond |p_1| = 0.3 (the test itself reads x_1 = 0.02 and y_1 = 0.2).
  state = tx.init(params)._replace(velocity=jnp.array([0.0, 0.2]))
  grads = jax.grad(_indefinite_quadratic)(params)
  updates, _ = jax.jit(functools.partial(tx.update, value_fn=value_fn))(grads, state, params)
  assert np.isnan(updates).all()


def test_pagd_follows_a_learning_rate_schedule():
  # Away from saddles on a convex quadratic (no perturbation, no exploitation), PAGD is the
  # accelerated recursion v <- m v - eta_t g_t, u_t = m v - eta_t g_t with eta_t decaying.
  curvatures = np.array([1.0, 3.0])
  value_fn = lambda x: 0.5 * jnp.sum(jnp.asarray(curvatures, x.dtype) * x**2)  # noqa: E731
  schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.8)
  tx = pagd(schedule, **(_PAGD | dict(momentum=0.5, gradient_threshold=1e-6)))
  params, state, _ = jax.jit(lambda p: _run(tx, value_fn, p, 6))(jnp.array([1.0, -2.0]))
  y, v = np.array([1.0, -2.0]), np.zeros(2)
  for t in range(6):
    g = curvatures * y
    v = 0.5 * v - 0.1 * 0.8**t * g
    y = y + 0.5 * v - 0.1 * 0.8**t * g
  np.testing.assert_allclose(params, y, rtol=1e-5)
  np.testing.assert_allclose(state.velocity, v, rtol=1e-5)
  assert int(state.num_perturbations) == int(state.num_exploitations) == 0


def test_pagd_round_off_in_the_loss_never_triggers_exploitation():
  # Near the minimum of a convex loss far from zero, f(x_t) and its linearisation agree to
  # round-off; a test decided by round-off would throw the iterate a distance s (it did,
  # 28 times in this run, before the test demanded more than the rounding error).
  curvatures = jnp.array([1.0, 3.0, 10.0])
  value_fn = lambda x: 100.0 + 0.5 * jnp.sum(curvatures * x**2)
  tx = pagd(0.05, **(_PAGD | dict(momentum=0.8, perturbation_radius=1e-3, exploitation_radius=0.1)))
  params, state, _ = jax.jit(lambda p: _run(tx, value_fn, p, 400))(jnp.array([1.0, -2.0, 0.5]))
  assert int(state.num_exploitations) == 0
  assert int(state.num_perturbations) > 0  # it reached the small-gradient region
  assert float(optax.tree.norm(params)) < 1e-3


@pytest.mark.parametrize(("dtype", "num_steps"), [(jnp.float32, 600), (jnp.float16, 300)])
def test_pagd_rounding_of_x_near_a_minimum_never_triggers_exploitation(dtype, num_steps):
  # Near a minimum away from the origin, rounding x_t = y_t - m v_t to the params' dtype
  # moves f(x_t) by more than the test's other terms: the iterate was thrown a distance s
  # every 89 steps in float32 (127 times in 300 float16 steps) before the test read the
  # difference of the rounded points.
  value_fn = lambda p: 0.5 * jnp.sum((p.astype(jnp.float32) - 3.0) ** 2)  # noqa: E731
  tx = pagd(
    0.05,
    momentum=0.5,
    perturbation_radius=1e-3,
    gradient_threshold=1e-9,
    escape_steps=10**6,
    exploitation_radius=0.5,
  )
  params, state, _ = jax.jit(lambda p: _run(tx, value_fn, p, num_steps))(jnp.zeros(8, dtype))
  assert int(state.num_exploitations) == 0
  np.testing.assert_allclose(
    params.astype(jnp.float32), 3.0, atol=4 * float(jnp.finfo(dtype).eps) * 3
  )


def test_pagd_convexity_test_sees_the_bfloat16_point_the_loss_sees():
  # XLA may keep x_t in float32 inside the test (excess precision, allowed for bfloat16) while
  # the loss reads it rounded: 9 exploitations in 200 steps on this convex loss, stuck at 3e-4.
  value_fn = lambda z: 0.5 * jnp.sum(jnp.array([1.0, 3.0], z.dtype) * (z - 1.0) ** 2)  # noqa: E731
  tx = pagd(
    0.05,
    momentum=0.9,
    perturbation_radius=1e-2,
    gradient_threshold=1e-3,
    escape_steps=20,
    exploitation_radius=0.1,
  )
  start = jnp.array([1.3, 0.8], jnp.bfloat16)
  params, state, _ = jax.jit(lambda p: _run(tx, value_fn, p, 200))(start)
  assert int(state.num_exploitations) == 0
  assert float(value_fn(params)) < 2e-5


def test_pagd_perturbs_on_the_papers_schedule():
  problem = problems.strict_saddle()
  escape_steps = 3
  # A large gamma keeps NCE from throwing the iterate out of the small-gradient region.
  overrides = dict(perturbation_radius=1e-6, escape_steps=escape_steps, curvature_threshold=10.0)
  tx = pagd(0.1, **(_PAGD | overrides))

  def body(carry, _):
    params, state = carry
    grads = jax.grad(problem.value_fn)(params)
    updates, new_state = tx.update(grads, state, params, value_fn=problem.value_fn)
    perturbed = new_state.num_perturbations > state.num_perturbations
    moved = optax.tree.norm(updates)
    velocities = (state.velocity, new_state.velocity)
    return (optax.apply_updates(params, updates), new_state), (perturbed, moved, grads, velocities)

  params = jnp.zeros(2)
  (_, state), (perturbed, moved, grads, (before, after)) = jax.jit(
    lambda p: jax.lax.scan(body, (p, tx.init(p)), length=12)
  )(params)
  assert float(jnp.max(jnp.abs(grads))) < 1e-3  # the gradient stayed below the threshold
  # More than escape_steps accelerated steps between perturbations: calls 0, 5, 10.
  np.testing.assert_array_equal(np.flatnonzero(perturbed), [0, 5, 10])
  assert float(moved[0]) <= 1e-6  # the first call is the draw from the ball, nothing else
  # A perturbation call moves by the draw alone and keeps the velocity: Algorithm 2 of Jin,
  # Netrapalli and Jordan (2018) perturbs x_t and leaves v_t alone.
  for call in (5, 10):
    assert np.any(np.asarray(before[call]) != 0)
    np.testing.assert_array_equal(after[call], before[call])
    assert 0 < float(moved[call]) <= 1e-6
  assert int(state.num_perturbations) == 3


def test_pagd_escapes_an_exact_saddle_where_nesterov_momentum_stays():
  problem = problems.strict_saddle()
  saddle = jnp.asarray(problem.critical_points[0].point, jnp.float32)
  agd = optax.sgd(0.1, momentum=0.9, nesterov=True)
  agd_params, _, _ = jax.jit(lambda p: _run_plain(agd, problem.value_fn, p, 300))(saddle)
  np.testing.assert_array_equal(agd_params, saddle)

  tx = pagd(0.1, **_PAGD)
  params, state, _ = jax.jit(lambda p: _run(tx, problem.value_fn, p, 300))(saddle)
  assert float(problem.value_fn(params)) < problem.minimum_value + 1e-4
  np.testing.assert_allclose(np.abs(np.asarray(params)), [0.0, 1.0], atol=1e-2)
  assert int(state.num_perturbations) >= 1


def _run_plain(tx, value_fn, params, num_steps):
  def body(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(value_fn)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.lax.scan(body, (params, tx.init(params)), length=num_steps)
  return params, state, None


def test_pagd_vmap_over_8_keys_equals_a_python_loop():
  value_fn = problems.strict_saddle().value_fn

  def run(key):
    params, state, _ = _run(pagd(0.1, **_PAGD, key=key), value_fn, jnp.zeros(2), 60)
    return params, state.velocity, state.num_perturbations, state.num_exploitations

  keys = jax.random.split(jax.random.key(2), 8)
  batched = jax.jit(jax.vmap(run))(keys)
  single = jax.jit(run)
  for i, key in enumerate(keys):
    for b, s in zip(batched, single(key), strict=True):
      np.testing.assert_allclose(b[i], s, rtol=1e-5, atol=1e-6)
  assert len({tuple(row) for row in np.asarray(batched[0]).round(5)}) == 8


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("tx", "use"),
  [
    (_ncd(), "takes Hessian-vector products of the loss"),
    (_neon(), "takes gradients of the loss away from the current parameters"),
    (_neon(neon2), "takes gradients of the loss away from the current parameters"),
    # PAGD takes no products: its message must not send the user sizing memory for them.
    (pagd(0.1, **_PAGD), "evaluates the loss away from the current parameters"),
  ],
  ids=["negative_curvature_descent", "neon", "neon2", "pagd"],
)
def test_a_missing_value_fn_or_params_raises_saying_how_to_pass_it(tx, use):
  params = jnp.zeros(5)
  state = tx.init(params)
  with pytest.raises(ValueError, match=f"{use} .*value_fn=loss_fn"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="value_fn"):
    jax.jit(lambda g, s, p: tx.update(g, s, p))(params, state, params)
  with pytest.raises(ValueError, match="current parameters"):
    tx.update(params, state, value_fn=lambda p: jnp.sum(p**2))


def test_a_non_scalar_value_fn_is_rejected():
  tx = pagd(0.1, **_PAGD)
  params = jnp.ones(3)
  with pytest.raises(ValueError, match="scalar"):
    tx.update(params, tx.init(params), params, value_fn=lambda p: p**2)


@pytest.mark.parametrize(
  ("kwargs", "name", "error"),
  [
    ({"hessian_lipschitz": 0.0}, "hessian_lipschitz", ValueError),
    ({"hessian_lipschitz": -1.0}, "hessian_lipschitz", ValueError),
    ({"epsilon": 0.0}, "epsilon", ValueError),
    ({"epsilon": float("nan")}, "epsilon", ValueError),
    ({"gradient_threshold": -1e-3}, "gradient_threshold", ValueError),
    ({"num_lanczos_steps": 0}, "num_lanczos_steps", ValueError),
    ({"num_lanczos_steps": 2.5}, "num_lanczos_steps", TypeError),
    ({"num_lanczos_steps": jnp.array(3)}, "num_lanczos_steps", TypeError),
    ({"learning_rate": -0.1}, "learning_rate", ValueError),
    ({"learning_rate": float("nan")}, "learning_rate", ValueError),
  ],
)
def test_ncd_rejects_bad_hyperparameters_naming_them(kwargs, name, error):
  with pytest.raises(error, match=name):
    _ncd(**kwargs)


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"perturbation_radius": -1e-2}, "perturbation_radius"),
    ({"gradient_threshold": 0.0}, "gradient_threshold"),
    ({"escape_steps": 0}, "escape_steps"),
    ({"exploitation_radius": 0.0}, "exploitation_radius"),
    ({"curvature_threshold": -1.0}, "curvature_threshold"),
  ],
)
def test_pagd_rejects_bad_hyperparameters_naming_them(kwargs, name):
  with pytest.raises(ValueError, match=name):
    pagd(0.1, **(_PAGD | kwargs))
  for learning_rate in (-0.1, float("inf")):
    with pytest.raises(ValueError, match="learning_rate"):
      pagd(learning_rate, **_PAGD)


def test_pagd_edge_cases_stay_finite_and_convex_losses_never_exploit():
  # Momentum 0 makes x_t = y_t: the gap is exactly 0, and at a loss of exactly 0 the rounding
  # allowance is 0 too; NCE must not fire (it threw the iterate from the minimum).
  value_fn = lambda p: 0.5 * jnp.sum((p - 1.0) ** 2) - 0.5  # noqa: E731
  tx = pagd(
    0.5,
    momentum=0.0,
    perturbation_radius=1e-2,
    gradient_threshold=1e-6,
    escape_steps=5,
    exploitation_radius=2.0,
  )
  params, state, _ = jax.jit(lambda p: _run(tx, value_fn, p, 12))(jnp.array([-1.0]))
  assert int(state.num_exploitations) == 0
  np.testing.assert_allclose(params, [1.0], atol=1e-3)  # the error halves at each step
  # float16 params with a velocity so small that s / ||v|| overflows float16.
  concave = lambda p: -0.5 * jnp.sum(p.astype(jnp.float32) ** 2)  # noqa: E731
  tx = pagd(0.1, **(_PAGD | dict(gradient_threshold=1e-9, exploitation_radius=0.5)))
  params, state, _ = jax.jit(lambda p: _run(tx, concave, p, 2))(jnp.array([1e-5, 0.0], jnp.float16))
  assert int(state.num_exploitations) == 1
  assert bool(jnp.all(jnp.isfinite(params)))
  np.testing.assert_allclose(abs(float(params[0])), 0.5, rtol=1e-2)
  # A learning rate of 0 (a warm-up's first step) makes the default gamma infinite: no NCE.
  frozen = pagd(0.0, **_PAGD)
  params = jnp.array([0.3, -0.2])
  grads = jax.grad(_indefinite_quadratic)(params)
  updates, state = frozen.update(grads, frozen.init(params), params, value_fn=_indefinite_quadratic)
  np.testing.assert_array_equal(updates, 0.0)
  assert int(state.num_exploitations) == 0
  # Python floats are parameters optax accepts.
  assert _ncd().init({"a": 1.0}).count == 0


@pytest.mark.parametrize(
  "tx", [_ncd(), pagd(0.1, **_PAGD)], ids=["negative_curvature_descent", "pagd"]
)
def test_integer_parameters_are_rejected_with_their_path(tx):
  with pytest.raises(TypeError, match=r"\['count'\].*int32"):
    tx.init({"w": jnp.zeros(3), "count": jnp.zeros((), jnp.int32)})
