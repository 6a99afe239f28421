"""Laplacian smoothing and LSGD: exactness against dense float64 solves, properties, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsaddle
from jaxsaddle import smoothing

LENGTHS = [3, 4, 7, 16, 97, 256, 1031]  # tiny, odd, even, primes
SIGMAS = [0.0, 0.05, 1.0, 10.0]
ORDERS = [1, 2, 3]


def _laplacian(n: int) -> np.ndarray:
  eye = np.eye(n)
  return -2 * eye + np.roll(eye, 1, axis=1) + np.roll(eye, -1, axis=1)


def _operator(n: int, sigma: float, order: int) -> np.ndarray:
  """I + (-1)^p sigma L^p, built densely in float64."""
  return np.eye(n) + (-1) ** order * sigma * np.linalg.matrix_power(_laplacian(n), order)


def _eigenvalues(n: int, sigma: float, order: int) -> np.ndarray:
  return 1 + sigma * (2 - 2 * np.cos(2 * np.pi * np.arange(n) / n)) ** order


def _dense_smooth(g: np.ndarray, sigma: float, order: int) -> np.ndarray:
  """Solves A x = g along the last axis of ``g`` with a dense float64 LU."""
  g = np.asarray(g, np.float64)
  return np.linalg.solve(
    _operator(g.shape[-1], sigma, order), g.reshape(-1, g.shape[-1]).T
  ).T.reshape(g.shape)


def _tolerance(n: int, sigma: float, order: int) -> float:
  """Float64 agreement expected with a dense LU solve: a few eps times the condition number."""
  condition = _eigenvalues(n, sigma, order).max()  # the smallest eigenvalue is 1
  return 50 * np.finfo(np.float64).eps * condition


def _methods(order: int) -> list[str]:
  return ["recursive", "direct", "fft"] if order == 1 else ["direct", "fft"]


def _update(tx, updates, *, jit=True):
  update = jax.jit(tx.update) if jit else tx.update
  smoothed, _ = update(updates, tx.init(updates))
  return smoothed


# Jitted: run op by op, the direct solver's hundreds of slices take seconds.
_smooth = jax.jit(smoothing.smooth_last_axis, static_argnames=("sigma", "order", "method"))


# --- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("order", ORDERS)
def test_every_solver_equals_a_dense_float64_solve(n, order):
  rng = np.random.default_rng(n + 100 * order)
  g = rng.normal(size=(2, n))
  with jax.enable_x64(True):
    for sigma in SIGMAS[1:]:
      expected = _dense_smooth(g, sigma, order)
      for method in [None, *_methods(order)]:
        actual = np.asarray(_smooth(jnp.asarray(g), sigma=sigma, order=order, method=method))
        assert actual.dtype == np.float64
        error = np.max(np.abs(actual - expected)) / np.max(np.abs(g))
        assert error <= _tolerance(n, sigma, order), (sigma, method, error)


def test_convolution_solvers_stay_exact_at_very_large_sigma():
  # The order-1 pole came from a^2 - 4 with a = 2 + 1/sigma, which cancels: at sigma = 1e6 the
  # direct and recursive solvers erred by 3.6e-11 (the FFT, exact, by 1e-16), against 2e-14
  # written as (4 + 1/sigma) / sigma.
  g = np.random.default_rng(1).normal(size=5)
  with jax.enable_x64(True):
    expected = np.asarray(smoothing.smooth_last_axis(jnp.asarray(g), 1e6, 1, "fft"))
    for method in ("direct", "recursive"):
      actual = np.asarray(smoothing.smooth_last_axis(jnp.asarray(g), 1e6, 1, method))
      assert np.max(np.abs(actual - expected)) < 1e-13, method


def test_smooth_last_axis_refuses_a_solver_that_cannot_do_the_order():
  # "recursive" solved order 1 whatever the order asked; an unknown name ran "direct".
  with pytest.raises(ValueError, match="recursive solver is for order 1"):
    smoothing.smooth_last_axis(jnp.ones(8), 1.0, order=2, method="recursive")
  with pytest.raises(ValueError, match="method must be"):
    smoothing.smooth_last_axis(jnp.ones(8), 1.0, method="spectral")


@pytest.mark.parametrize("mode", smoothing.MODES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_every_mode_equals_a_dense_float64_solve(mode, order, sigma):
  rng = np.random.default_rng(7)
  # Leaf sizes from 1 to 280 and a (5, 13) matrix: in global mode the ends of a leaf
  # come from several neighbours, and the two scalars sit inside the vector.
  shapes = {"a": (5, 13), "b": (3,), "c": (), "d": (280,), "e": (2, 7), "f": ()}
  tree = {name: rng.normal(size=shape) for name, shape in shapes.items()}
  with jax.enable_x64(True):
    smoothed = _update(
      jaxsaddle.laplacian_smoothing(sigma, order=order, mode=mode),
      jax.tree.map(jnp.asarray, tree),
    )
  leaves, treedef = jax.tree.flatten(tree)
  if mode == "global":
    whole = np.concatenate([leaf.reshape(-1) for leaf in leaves])
    parts = np.split(_dense_smooth(whole, sigma, order), np.cumsum([x.size for x in leaves])[:-1])
    expected = treedef.unflatten([p.reshape(x.shape) for p, x in zip(parts, leaves, strict=True)])
    n = whole.size
  elif mode == "leaf":
    expected = jax.tree.map(
      lambda x: x if x.size < 3 else _dense_smooth(x.reshape(-1), sigma, order).reshape(x.shape),
      tree,
    )
    n = max(x.size for x in leaves)
  else:
    expected = jax.tree.map(
      lambda x: x if x.ndim == 0 or x.shape[-1] < 3 else _dense_smooth(x, sigma, order), tree
    )
    n = max(x.shape[-1] for x in leaves if x.ndim)
  scale = max(np.max(np.abs(x)) for x in leaves)
  for name in shapes:
    np.testing.assert_allclose(
      smoothed[name], expected[name], rtol=0, atol=_tolerance(n, sigma, order) * scale, err_msg=name
    )


def test_each_solver_is_chosen_somewhere_and_the_choice_is_the_cheapest_in_its_model():
  n = 401_408
  assert smoothing.choose_method(n, 1.0, 1, jnp.float32) == "recursive"
  assert smoothing.choose_method(n, 0.05, 1, jnp.float32) == "direct"
  assert smoothing.choose_method(n, 1.0, 2, jnp.float32) == "direct"
  assert smoothing.choose_method(n, 1e4, 2, jnp.float32) == "fft"
  # A short row whose recursive padding would be many periods long is convolved directly.
  assert smoothing.choose_method(5, 1e3, 1, jnp.float32) == "direct"


def test_float32_solvers_are_exact_to_float32_precision():
  rng = np.random.default_rng(3)
  g = rng.normal(size=100_000)
  for sigma, order in [(0.05, 1), (1.0, 1), (10.0, 1), (1.0, 2), (10.0, 3)]:
    k = np.arange(g.size // 2 + 1)
    denominator = 1 + sigma * (2 - 2 * np.cos(2 * np.pi * k / g.size)) ** order
    expected = np.fft.irfft(np.fft.rfft(g) / denominator, n=g.size)
    for method in _methods(order):
      actual = _smooth(jnp.asarray(g, jnp.float32), sigma=sigma, order=order, method=method)
      error = np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(g))
      assert error < 2e-6, (sigma, order, method, error)


# --- properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n", [3, 4, 97, 1000])
def test_mean_is_preserved(order, n):
  g = np.random.default_rng(n).normal(loc=0.7, size=n)
  with jax.enable_x64(True):
    for sigma in [0.05, 1.0, 10.0]:
      smoothed = np.asarray(_update(jaxsaddle.laplacian_smoothing(sigma, order=order), g))
      assert smoothed.mean() == pytest.approx(g.mean(), abs=1e-13)
      # Not the identity: something was smoothed.
      assert np.max(np.abs(smoothed - g)) > 1e-3


@pytest.mark.parametrize("n", [3, 4, 31, 200])
def test_order_one_output_lies_between_the_input_extremes(n):
  rng = np.random.default_rng(n)
  for sigma in [0.05, 1.0, 10.0, 1e3]:
    g = rng.standard_cauchy(size=n)  # heavy tails: a few spikes
    smoothed = np.asarray(_update(jaxsaddle.laplacian_smoothing(sigma), jnp.asarray(g)), np.float64)
    slack = 1e-6 * np.max(np.abs(g))  # float32 rounding
    assert smoothed.max() <= g.max() + slack
    assert smoothed.min() >= g.min() - slack
    assert smoothed.max() - smoothed.min() < g.max() - g.min()


@pytest.mark.parametrize("n", [3, 4, 7, 16, 33])
@pytest.mark.parametrize("order", ORDERS)
def test_spectrum_and_division_of_fourier_modes(n, order):
  sigma = 1.5
  eigenvalues = _eigenvalues(n, sigma, order)
  np.testing.assert_allclose(
    np.sort(np.linalg.eigvalsh(_operator(n, sigma, order))), np.sort(eigenvalues), rtol=1e-12
  )
  if order == 1:
    np.testing.assert_allclose(
      eigenvalues, 1 + 2 * sigma - 2 * sigma * np.cos(2 * np.pi * np.arange(n) / n), rtol=1e-14
    )
  positions = np.arange(n)
  with jax.enable_x64(True):
    for k in range(n):
      for mode in [np.cos(2 * np.pi * k * positions / n), np.sin(2 * np.pi * k * positions / n)]:
        if not np.any(np.abs(mode) > 1e-12):
          continue  # sin of k = 0 and k = n/2
        for method in _methods(order):
          smoothed = np.asarray(_smooth(jnp.asarray(mode), sigma=sigma, order=order, method=method))
          np.testing.assert_allclose(smoothed, mode / eigenvalues[k], rtol=0, atol=1e-13)


def test_sigma_zero_is_the_identity():
  g = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.arange(5.0)}
  for mode in smoothing.MODES:
    smoothed = _update(jaxsaddle.laplacian_smoothing(0.0, mode=mode), g)
    jax.tree.map(np.testing.assert_array_equal, smoothed, g)


# --- modes --------------------------------------------------------------------------------------


def test_global_equals_leaf_on_a_single_leaf_and_the_concatenated_vector():
  rng = np.random.default_rng(0)
  single = jnp.asarray(rng.normal(size=(6, 9)), jnp.float32)
  for sigma, order in [(1.0, 1), (0.05, 1), (2.0, 2)]:
    as_leaf = _update(jaxsaddle.laplacian_smoothing(sigma, order=order, mode="leaf"), single)
    as_global = _update(jaxsaddle.laplacian_smoothing(sigma, order=order, mode="global"), [single])
    np.testing.assert_allclose(as_global[0], as_leaf, rtol=0, atol=1e-6)

    tree = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(40, 3), (7,), (300,)]]
    smoothed = _update(jaxsaddle.laplacian_smoothing(sigma, order=order, mode="global"), tree)
    whole = jnp.concatenate([leaf.reshape(-1) for leaf in tree])
    expected = _update(jaxsaddle.laplacian_smoothing(sigma, order=order), whole)
    np.testing.assert_allclose(
      jnp.concatenate([leaf.reshape(-1) for leaf in smoothed]), expected, rtol=0, atol=1e-6
    )
    # The leaves are coupled: smoothing them one by one gives something else.
    by_leaf = _update(jaxsaddle.laplacian_smoothing(sigma, order=order, mode="leaf"), tree)
    assert np.max(np.abs(np.asarray(by_leaf[1]) - np.asarray(smoothed[1]))) > 1e-3


def test_axis_mode_smooths_each_row_independently():
  rng = np.random.default_rng(1)
  g = jnp.asarray(rng.normal(size=(3, 4, 50)), jnp.float32)
  tx = jaxsaddle.laplacian_smoothing(1.0, mode="axis")
  smoothed = _update(tx, g)
  rows = [_update(jaxsaddle.laplacian_smoothing(1.0), row) for row in g.reshape(-1, 50)]
  np.testing.assert_allclose(smoothed.reshape(-1, 50), jnp.stack(rows), rtol=0, atol=1e-6)
  changed = _update(tx, g.at[1, 2].set(100.0))
  unchanged_rows = np.ones((3, 4), bool)
  unchanged_rows[1, 2] = False
  np.testing.assert_array_equal(changed[unchanged_rows], smoothed[unchanged_rows])
  # Along a last axis shorter than 3 nothing is smoothed.
  narrow = jnp.asarray(rng.normal(size=(50, 2)), jnp.float32)
  np.testing.assert_array_equal(_update(tx, narrow), narrow)


# --- dtypes, short leaves, transformations -----------------------------------------------------


@pytest.mark.parametrize("mode", smoothing.MODES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_are_kept_and_half_precision_matches_float32(mode, dtype):
  rng = np.random.default_rng(2)
  # Random leaves only: smoothing fixes a constant vector for every sigma.
  g32 = {
    name: jnp.asarray(rng.normal(size=shape), jnp.float32)
    for name, shape in [("w", (8, 16)), ("b", (16,))]
  }
  g = jax.tree.map(lambda x: x.astype(dtype), g32)
  tx = jaxsaddle.laplacian_smoothing(1.0, mode=mode)
  smooth = jax.jit(lambda u: _update(tx, u))
  smoothed = smooth(g)
  reference = smooth(jax.tree.map(lambda x: x.astype(jnp.float32), g))
  for name in g:
    assert smoothed[name].dtype == dtype
    # The half-precision result is the float32 result rounded once: within half an ulp,
    # or one where XLA's fusion rounded the float32 result differently.
    ulp = float(jnp.finfo(dtype).eps) * float(jnp.abs(reference[name]).max())
    np.testing.assert_allclose(
      np.asarray(smoothed[name], np.float32), reference[name], rtol=0, atol=ulp
    )


def test_scalars_and_leaves_shorter_than_three_are_unchanged():
  tree = {"scalar": jnp.array(3.0), "one": jnp.array([2.0]), "two": jnp.array([1.0, -4.0])}
  for mode in ["leaf", "axis"]:
    smoothed = _update(jaxsaddle.laplacian_smoothing(5.0, mode=mode), tree)
    jax.tree.map(np.testing.assert_array_equal, smoothed, tree)
  small = {"scalar": jnp.array(3.0), "one": jnp.array([2.0])}
  smoothed = _update(jaxsaddle.laplacian_smoothing(5.0, mode="global"), small)
  jax.tree.map(np.testing.assert_array_equal, smoothed, small)
  # In global mode the same leaves form a vector of length 4 and are smoothed.
  smoothed = _update(jaxsaddle.laplacian_smoothing(5.0, mode="global"), tree)
  assert float(jnp.abs(smoothed["two"] - tree["two"]).max()) > 0.1


def test_jit_and_vmap_match_eager_and_a_loop():
  rng = np.random.default_rng(4)
  batch = {
    "w": jnp.asarray(rng.normal(size=(5, 6, 30)), jnp.float32),
    "s": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
  }
  for mode in smoothing.MODES:
    tx = jaxsaddle.laplacian_smoothing(2.0, mode=mode)
    vmapped = jax.vmap(jax.jit(lambda u, tx=tx: _update(tx, u)))(batch)
    for i in range(5):
      single = jax.tree.map(lambda x, i=i: x[i], batch)
      eager = _update(tx, single, jit=False)
      np.testing.assert_allclose(vmapped["w"][i], eager["w"], rtol=0, atol=1e-6)
      np.testing.assert_allclose(vmapped["s"][i], eager["s"], rtol=0, atol=1e-6)


def test_traced_sigma_uses_the_fft_solver_and_matches_a_concrete_sigma():
  rng = np.random.default_rng(5)
  g = {
    "w": jnp.asarray(rng.normal(size=(10, 20)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=7), jnp.float32),
  }
  sigmas = jnp.array([0.0, 0.5, 3.0])
  for mode in smoothing.MODES:
    for order in [1, 2]:
      smooth = lambda s, mode=mode, order=order: _update(
        jaxsaddle.laplacian_smoothing(s, order=order, mode=mode), g
      )
      batched = jax.jit(jax.vmap(smooth))(sigmas)
      for i, sigma in enumerate([0.0, 0.5, 3.0]):
        expected = smooth(sigma)
        np.testing.assert_allclose(batched["w"][i], expected["w"], rtol=0, atol=2e-6)
        np.testing.assert_allclose(batched["b"][i], expected["b"], rtol=0, atol=2e-6)


def test_init_on_shape_dtype_structs_and_integer_leaves_rejected():
  tx = jaxsaddle.laplacian_smoothing()
  assert tx.init(jax.ShapeDtypeStruct((3, 4), jnp.bfloat16)) == optax.EmptyState()
  with pytest.raises(TypeError, match=r"\['steps'\].*int32"):
    tx.init({"steps": jnp.zeros(3, jnp.int32)})


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    (dict(sigma=-0.1), "sigma"),
    (dict(order=0), "order"),
    (dict(order=1.5), "order"),
    (dict(order=True), "order"),
    (dict(mode="rows"), "mode"),
  ],
)
def test_bad_hyperparameters_raise_value_errors_naming_them(kwargs, name):
  with pytest.raises(ValueError, match=f"laplacian_smoothing: {name} must"):
    jaxsaddle.laplacian_smoothing(**kwargs)
  # The alias's errors name the alias, not the transform it is built on.
  with pytest.raises(ValueError, match=f"lsgd: {name} must"):
    jaxsaddle.lsgd(0.1, **kwargs)


def test_injecting_the_default_order_names_the_static_argument():
  # inject_hyperparams injects defaults too, so order must be listed even when not passed.
  tx = optax.inject_hyperparams(jaxsaddle.lsgd)(0.1)
  with pytest.raises(ValueError, match=r"static_args=\('order',\)"):
    tx.init(jnp.ones(4))


def test_lsgd_momentum_checks_and_a_negative_traced_sigma_gives_nan():
  for momentum in (-0.1, 1.0, float("nan")):
    with pytest.raises(ValueError, match="lsgd: momentum"):
      jaxsaddle.lsgd(0.1, momentum=momentum)
  with pytest.raises(ValueError, match="nesterov=True needs a momentum"):
    jaxsaddle.lsgd(0.1, nesterov=True)
  # A traced sigma (inject_hyperparams) escapes the factory's check; a negative one amplified.
  update = jax.jit(
    lambda sigma: jaxsaddle.laplacian_smoothing(sigma).update(
      jnp.array([0.0, 0.0, 3.0, 0.0, 1.0]), optax.EmptyState()
    )[0]
  )
  assert bool(jnp.all(jnp.isnan(update(-0.3))))
  assert bool(jnp.all(jnp.isfinite(update(0.3))))


# --- LSGD -------------------------------------------------------------------------------------


def test_lsgd_with_momentum_is_smoothing_then_heavy_ball():
  n, sigma, momentum, learning_rate = 17, 2.0, 0.9, 0.1
  inverse = np.linalg.inv(_operator(n, sigma, 1))
  rng = np.random.default_rng(6)
  gradients = rng.normal(size=(4, n))
  for nesterov in [False, True]:
    with jax.enable_x64(True):
      tx = jaxsaddle.lsgd(learning_rate, sigma=sigma, momentum=momentum, nesterov=nesterov)
      params = jnp.zeros(n)
      state = tx.init(params)
      trace = np.zeros(n)
      for g in gradients:
        updates, state = tx.update(jnp.asarray(g), state, params)
        smoothed = inverse @ g
        trace = momentum * trace + smoothed
        direction = momentum * trace + smoothed if nesterov else trace
        np.testing.assert_allclose(updates, -learning_rate * direction, rtol=1e-12, atol=1e-14)


def _laplacian_quadratic(n: int):
  """f(x) = x^T (-L + 0.01 I) x / 2: curvatures 0.01 to 4.01, the largest on the highest mode."""
  hessian = -_laplacian(n) + 0.01 * np.eye(n)
  return jnp.asarray(hessian, jnp.float32), lambda x: 0.5 * x @ (hessian.astype(np.float32) @ x)


def _train(tx, value_fn, params, num_steps, noise_scale=0.0, key=0):
  def step(carry, step_key):
    params, state = carry
    grads = jax.grad(value_fn)(params)
    grads = grads + noise_scale * jax.random.normal(step_key, params.shape)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), value_fn(params)

  keys = jax.random.split(jax.random.key(key), num_steps)
  (params, _), values = jax.lax.scan(step, (params, tx.init(params)), keys)
  return params, values


def test_lsgd_is_stable_at_a_step_where_gradient_descent_diverges():
  n = 64
  _, value_fn = _laplacian_quadratic(n)
  x0 = jnp.asarray(np.random.default_rng(8).normal(size=n), jnp.float32)
  # GD is stable only for learning_rate < 2 / 4.01; LSGD's preconditioned curvatures
  # lambda / (1 + sigma lambda) stay below 1 / sigma + 0.01, so it is stable up to ~2 sigma.
  learning_rate, num_steps = 1.0, 300
  _, gd_values = _train(optax.sgd(learning_rate), value_fn, x0, num_steps)
  _, lsgd_values = _train(jaxsaddle.lsgd(learning_rate, sigma=1.0), value_fn, x0, num_steps)
  assert not np.isfinite(gd_values[-1]) or gd_values[-1] > 1e6 * value_fn(x0)
  assert lsgd_values[-1] < 1e-3 * value_fn(x0)


def test_lsgd_has_lower_stationary_loss_than_sgd_under_gradient_noise():
  # Same step, same noise: smoothing divides the noise of mode k by 1 + sigma lambda_k, and
  # mode k's stationary variance is (eta/a_k) s^2 / (lambda_k (2 - eta lambda_k / a_k)).
  n, sigma, learning_rate, noise = 64, 1.0, 0.2, 0.5
  _, value_fn = _laplacian_quadratic(n)
  x0 = jnp.zeros(n)
  curvatures = _eigenvalues(n, 1.0, 1) - 1 + 0.01

  def stationary_loss(a):
    step = learning_rate / a
    variance = step * noise**2 / (curvatures * (2 - step * curvatures))
    return 0.5 * np.sum(curvatures * variance)

  num_steps = 20_000
  _, sgd_values = _train(optax.sgd(learning_rate), value_fn, x0, num_steps, noise)
  _, lsgd_values = _train(
    jaxsaddle.lsgd(learning_rate, sigma=sigma), value_fn, x0, num_steps, noise
  )
  # The mean mode (curvature 0.01) needs ~1/(0.2 * 0.01) = 500 steps to equilibrate.
  sgd_mean = float(np.mean(sgd_values[num_steps // 4 :]))
  lsgd_mean = float(np.mean(lsgd_values[num_steps // 4 :]))
  expected_sgd = stationary_loss(np.ones(n))
  expected_lsgd = stationary_loss(1 + sigma * (curvatures - 0.01))
  assert sgd_mean == pytest.approx(expected_sgd, rel=0.15)
  assert lsgd_mean == pytest.approx(expected_lsgd, rel=0.15)
  assert lsgd_mean < 0.7 * sgd_mean


def test_lsgd_on_the_reference_quadratic():
  # The reference code's quadratic (Quadratic-Function/LSGD.py) at n = 20:
  # f(x) = sum(((x_i - 2) / c_i)^2), c_i
  # alternating 10 and 1 (curvatures 0.02 and 2), gradient noise 0.1 N(0, 1), sigma = 10,
  # x0 = -1. GD is stable for learning rates below 1; LSGD's preconditioned curvatures stay
  # below 1.04, so it is stable up to about 1.9.
  n, sigma, noise, num_steps = 20, 10.0, 0.1, 20_000
  c = np.where(np.arange(n) % 2 == 0, 10.0, 1.0).astype(np.float32)
  value_fn = lambda x: jnp.sum(((x - 2) / c) ** 2)
  x0 = -jnp.ones(n)
  initial = float(value_fn(x0))

  def run(tx):
    return _train(tx, value_fn, x0, num_steps, noise_scale=noise)[1]

  # A small step: both converge to 2.
  for tx in [optax.sgd(1e-2), jaxsaddle.lsgd(1e-2, sigma=sigma)]:
    assert float(np.mean(run(tx)[-5000:])) < 1e-4 * initial
  # Near GD's limit: GD's fast coordinates amplify the noise, LSGD's smoothing damps it.
  sgd_loss = float(np.mean(run(optax.sgd(0.9))[-5000:]))
  lsgd_loss = float(np.mean(run(jaxsaddle.lsgd(0.9, sigma=sigma))[-5000:]))
  assert lsgd_loss < 0.2 * sgd_loss
  # Past GD's limit: GD diverges, LSGD converges.
  sgd_values = run(optax.sgd(1.5))
  assert not np.isfinite(sgd_values[-1]) or sgd_values[-1] > 1e6 * initial
  assert float(np.mean(run(jaxsaddle.lsgd(1.5, sigma=sigma))[-5000:])) < 1e-3 * initial


def test_extreme_sigmas_keep_the_mean_and_tiny_ones_are_the_identity():
  # Order 1's poles cancel as rho nears 1: sigma = 1e30 gave 0.811 for the mean 1 of [0, 1, 2],
  # and float64 lost digits from sigma ~ 1e6. Below ~1e-154 the poles' formulas raised.
  for sigma in (1e10, 1e30, 1e32):
    for n in (3, 10):
      g = jnp.arange(float(n))
      smoothed = jaxsaddle.laplacian_smoothing(sigma).update(g, None)[0]
      np.testing.assert_allclose(smoothed, np.full(n, (n - 1) / 2), rtol=1e-6)
  with jax.enable_x64(True):
    g = jnp.asarray([0.0, 1.0, 5.0])
    smoothed = jaxsaddle.laplacian_smoothing(1e10).update(g, None)[0]
    # For n = 3 the periodic Laplacian's nonzero eigenvalues are both -3: A^-1 g is the mean
    # plus the rest over 1 + 3 sigma, in closed form (a dense solve loses cond * eps).
    mean = np.mean(np.asarray(g))
    exact = mean + (np.asarray(g) - mean) / (1 + 3e10)
    np.testing.assert_allclose(smoothed, exact, rtol=1e-14)
  for sigma in (1e-200, 5e-324):
    g = jnp.arange(5.0)
    for mode in ("leaf", "global", "axis"):
      smoothed = jaxsaddle.laplacian_smoothing(sigma, mode=mode).update(g, None)[0]
      np.testing.assert_array_equal(smoothed, g)


def test_integer_gradients_are_refused_not_truncated():
  with pytest.raises(TypeError, match=r"the update at <root> has dtype int32.*truncated"):
    jaxsaddle.laplacian_smoothing(1.0).update(jnp.array([0, 4, 0, 0]), None)
  with pytest.raises(TypeError, match="^lsgd: the update"):
    tx = jaxsaddle.lsgd(0.1)
    tx.update(jnp.array([0, 4, 0, 0]), tx.init(jnp.zeros(4)))
