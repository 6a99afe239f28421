"""The test objectives: closed-form critical points, octopus geometry, and jit/vmap/dtype."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsaddle import problems

E = math.e
# Acceptance check 4: L = e, gamma = 1, tau = e.
NU = 13 / 6 * E**2 + 37 / 6 * E**3

PROBLEMS = {
  "strict_saddle": problems.strict_saddle,
  "quadratic_rotated": lambda: problems.quadratic_saddle([3.0, -1.0, 0.5, -2.0], rotation_key=1),
  "quadratic_psd_degenerate": lambda: problems.quadratic_saddle([0.0, 2.0, 1.0], rotation_key=2),
  "octopus_3": lambda: problems.octopus(3),
  "octopus_5_other_constants": lambda: problems.octopus(
    5, positive_curvature=0.3, negative_curvature=4.0, length_scale=0.7
  ),
  "matrix_factorization_5x2": lambda: problems.matrix_factorization(5, 2, key=0),
  "matrix_factorization_4x4": lambda: problems.matrix_factorization(4, 4, key=3),
  "matrix_factorization_6x1": lambda: problems.matrix_factorization(6, 1, key=jax.random.key(7)),
}


@pytest.fixture(params=sorted(PROBLEMS), name="problem")
def _problem(request) -> problems.Problem:
  return PROBLEMS[request.param]()


def _value_gradient_hessian(value_fn):
  return jax.jit(jax.vmap(lambda x: (value_fn(x), jax.grad(value_fn)(x), jax.hessian(value_fn)(x))))


def test_critical_points_match_autodiff_in_float64(problem):
  with jax.enable_x64(True):
    points = jnp.asarray(np.stack([critical.point for critical in problem.critical_points]))
    assert points.shape[1:] == problem.init_shape
    values, gradients, hessians = _value_gradient_hessian(problem.value_fn)(points)
  size = math.prod(problem.init_shape)
  for critical, value, gradient, hessian in zip(
    problem.critical_points, values, gradients, hessians, strict=True
  ):
    scale = 1.0 + np.max(np.abs(critical.hessian_eigenvalues))
    size_of_point = 1.0 + np.abs(critical.point).max()
    np.testing.assert_allclose(gradient, 0.0, atol=1e-12 * scale * size_of_point)
    assert float(value) == pytest.approx(critical.value, rel=1e-12, abs=1e-12)
    assert critical.hessian_eigenvalues.dtype == np.float64
    assert np.all(np.diff(critical.hessian_eigenvalues) >= 0)
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessian).reshape(size, size))
    np.testing.assert_allclose(
      eigenvalues, critical.hessian_eigenvalues, rtol=0, atol=1e-10 * scale
    )


def test_kinds_order_and_minimum_value_agree(problem):
  kinds = [critical.kind for critical in problem.critical_points]
  assert set(kinds) <= {"minimum", "strict_saddle", "degenerate_saddle", "maximum"}
  # Saddles (and maxima) first, minima last.
  assert kinds == sorted(kinds, key=lambda kind: kind == "minimum")
  for critical in problem.critical_points:
    smallest, largest = critical.hessian_eigenvalues[[0, -1]]
    if critical.kind == "minimum":
      assert smallest >= 0
    if critical.kind == "strict_saddle":
      assert smallest < 0
    if critical.kind == "maximum":
      assert largest <= 0
    assert problem.minimum_value <= critical.value
  if math.isfinite(problem.minimum_value):
    assert problem.critical_points[-1].value == problem.minimum_value


def test_jit_and_vmap_agree_with_a_python_loop_and_keep_the_dtype(problem):
  points = np.random.default_rng(0).normal(size=(6, *problem.init_shape)).astype(np.float32)
  f = jax.jit(problem.value_fn)
  batched = jax.jit(jax.vmap(problem.value_fn))(points)
  looped = np.array([f(point) for point in points])
  assert batched.dtype == jnp.float32
  np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-6)
  with jax.enable_x64(True):
    float64 = f(points[0].astype(np.float64))
    # The input's dtype wins even when x64 is on.
    float32 = f(points[0])
  assert float64.dtype == jnp.float64 and float32.dtype == jnp.float32
  np.testing.assert_allclose(float64, batched[0], rtol=1e-5, atol=1e-5)


# --- strict_saddle: the stable set is the x-axis (Lee et al. 2016) ---------------------------


def test_gradient_descent_converges_to_the_strict_saddle_only_from_its_stable_set():
  problem = problems.strict_saddle()
  gradient_fn = jax.grad(problem.value_fn)

  @jax.jit
  @jax.vmap
  def descend(x0):
    x = jax.lax.fori_loop(0, 500, lambda _, x: x - 0.1 * gradient_fn(x), x0)
    return x, jnp.linalg.norm(gradient_fn(x))

  with jax.enable_x64(True):
    ends, gradient_norms = descend(jnp.array([[1.0, 0.0], [1.0, 1e-8], [1.0, -1e-8]]))
  np.testing.assert_allclose(ends, [[0.0, 0.0], [0.0, 1.0], [0.0, -1.0]], rtol=0, atol=1e-8)
  assert np.all(np.asarray(gradient_norms) < 1e-8)


# --- quadratic_saddle -----------------------------------------------------------------------------


def test_quadratic_rotation_is_random_reproducible_and_keeps_the_spectrum():
  eigenvalues = [2.0, -1.0, 0.5, -3.0, 1.0]
  variants = [
    problems.quadratic_saddle(eigenvalues, rotation_key=3),
    problems.quadratic_saddle(eigenvalues, rotation_key=jax.random.key(3)),
    problems.quadratic_saddle(eigenvalues, rotation_key=4),
    problems.quadratic_saddle(eigenvalues),
  ]
  points = np.random.default_rng(0).normal(size=(8, 5))

  @jax.jit
  def hessians_and_values(points):
    zero = jnp.zeros_like(points[0])
    return [(jax.hessian(p.value_fn)(zero), jax.vmap(p.value_fn)(points)) for p in variants]

  with jax.enable_x64(True):
    results = jax.tree.map(np.asarray, hessians_and_values(points))
  (rotated, values), (same_key, _), (other, _), (plain, _) = results
  np.testing.assert_array_equal(same_key, rotated)
  np.testing.assert_allclose(rotated, rotated.T, rtol=0, atol=1e-14)
  np.testing.assert_allclose(np.linalg.eigvalsh(rotated), sorted(eigenvalues), rtol=0, atol=1e-12)
  np.testing.assert_array_equal(plain, np.diag(eigenvalues))
  assert np.abs(rotated - np.diag(np.diag(rotated))).max() > 0.1
  assert np.abs(rotated - other).max() > 0.1
  # f is exactly half the Hessian's quadratic form.
  expected = 0.5 * np.einsum("bi,ij,bj->b", points, rotated, points)
  np.testing.assert_allclose(values, expected, rtol=1e-12)


@pytest.mark.parametrize(
  ("eigenvalues", "kind", "minimum_value"),
  [
    ([2.0, -2.0], "strict_saddle", -math.inf),
    ([1.0, 3.0], "minimum", 0.0),
    ([1.0, 0.0], "minimum", 0.0),
    ([0.0, 0.0], "minimum", 0.0),
    ([-1.0, -3.0], "maximum", -math.inf),
    ([0.0, -1.0], "maximum", -math.inf),
    ([0.0, -1.0, 1.0], "strict_saddle", -math.inf),
  ],
)
def test_quadratic_kind_follows_the_signs(eigenvalues, kind, minimum_value):
  problem = problems.quadratic_saddle(eigenvalues)
  assert problem.critical_points[0].kind == kind
  assert problem.minimum_value == minimum_value


# --- octopus: geometry of Du et al. 2017 ----------------------------------------------------------


def test_octopus_saddle_gap_closed_form():
  assert problems.octopus_saddle_gap() == pytest.approx(NU, rel=1e-14)
  assert problems.octopus_saddle_gap(2.0, 3.0, 0.5) == pytest.approx((13 * 3 + 37 * 2) / 24)


def test_octopus_values_on_the_chain():
  tau = E
  problem = problems.octopus(3)
  one_dimensional = problems.octopus(1)
  assert [p.kind for p in problem.critical_points] == ["strict_saddle"] * 3 + ["minimum"]
  # In one dimension the chain is a single hump: the origin is a local maximum.
  assert [p.kind for p in one_dimensional.critical_points] == ["maximum", "minimum"]
  with jax.enable_x64(True):
    f = jax.jit(problem.value_fn)
    assert float(f(jnp.zeros(3, jnp.float64))) == 0.0
    assert float(f(jnp.array([4 * tau, 0.0, 0.0]))) == pytest.approx(-NU, rel=1e-14)
    assert float(f(jnp.array([4 * tau, 4 * tau, 0.0]))) == pytest.approx(-2 * NU, rel=1e-14)
    minimum = float(f(jnp.full(3, 4 * tau)))
    # The sign of each coordinate does not matter.
    assert float(f(jnp.array([-4 * tau, 4 * tau, -4 * tau]))) == minimum
    hump = jax.jit(jax.vmap(one_dimensional.value_fn))(jnp.array([[0.0], [4 * tau], [-4 * tau]]))
  assert minimum == pytest.approx(-419.6113, abs=1e-3)
  assert minimum == pytest.approx(-3 * NU, rel=1e-14)
  assert problem.minimum_value == pytest.approx(-3 * NU, rel=1e-14)
  np.testing.assert_allclose(hump, [0.0, -NU, -NU], rtol=1e-14)


def _octopus_reference(x: np.ndarray, big_l: float, gamma: float, tau: float) -> float:
  """Du et al. (2017) eqs. (6)-(10), transcribed branch by branch; only valid inside the tube."""
  nu = problems.octopus_saddle_gap(big_l, gamma, tau)
  a = np.abs(x)
  dim = len(a)

  def g1(t):
    return (
      -gamma * t**2
      + (-14 * big_l + 10 * gamma) / (3 * tau) * (t - tau) ** 3
      + (5 * big_l - 3 * gamma) / (2 * tau**2) * (t - tau) ** 4
    )

  def g2(t):
    p = big_l + gamma
    return (
      -gamma
      - 10 * p / tau**3 * (t - 2 * tau) ** 3
      - 15 * p / tau**4 * (t - 2 * tau) ** 4
      - 6 * p / tau**5 * (t - 2 * tau) ** 5
    )

  small = np.flatnonzero(a <= 2 * tau)
  if small.size == 0:
    return big_l * np.sum((a - 4 * tau) ** 2) - dim * nu
  i = small[0]
  assert np.all(a[i + 1 :] <= tau), "outside the tube"
  escaped = big_l * np.sum((a[:i] - 4 * tau) ** 2) - i * nu
  if a[i] <= tau:
    return escaped - gamma * a[i] ** 2 + big_l * np.sum(a[i + 1 :] ** 2)
  if i == dim - 1:
    return escaped + g1(a[i])
  return escaped + g1(a[i]) + g2(a[i]) * a[i + 1] ** 2 + big_l * np.sum(a[i + 2 :] ** 2)


def _tube_points(rng: np.random.Generator, dim: int, tau: float, count: int) -> np.ndarray:
  """Random points of the tube, with every number of escaped coordinates."""
  points = []
  for _ in range(count):
    num_escaped = rng.integers(0, dim + 1)
    a = np.concatenate(
      [
        rng.uniform(2 * tau, 6 * tau, num_escaped),
        rng.uniform(0, 2 * tau, min(1, dim - num_escaped)),
        rng.uniform(0, tau, max(0, dim - num_escaped - 1)),
      ]
    )
    points.append(a * rng.choice([-1.0, 1.0], dim))
  return np.array(points)


@pytest.mark.parametrize(("big_l", "gamma", "tau"), [(E, 1.0, E), (0.3, 4.0, 0.7)])
def test_octopus_matches_the_paper_formula_inside_the_tube(big_l, gamma, tau):
  dim = 4
  problem = problems.octopus(
    dim, positive_curvature=big_l, negative_curvature=gamma, length_scale=tau
  )
  points = _tube_points(np.random.default_rng(0), dim, tau, 400)
  with jax.enable_x64(True):
    values = np.asarray(jax.jit(jax.vmap(problem.value_fn))(jnp.asarray(points)))
  expected = [_octopus_reference(point, big_l, gamma, tau) for point in points]
  np.testing.assert_allclose(values, expected, rtol=1e-12, atol=1e-9)


def _boundary_pairs(dim: int, tau: float, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Points just inside and just outside |x_i| = tau and |x_i| = 2 tau, for every i and sign."""
  rng = np.random.default_rng(1)
  inside, outside = [], []
  for i in range(dim):
    for boundary in (tau, 2 * tau):
      for sign in (1.0, -1.0):
        for _ in range(3):
          point = np.concatenate(
            [
              rng.uniform(2.5 * tau, 5.5 * tau, i) * rng.choice([-1.0, 1.0], i),
              [0.0],
              rng.uniform(-0.9 * tau, 0.9 * tau, dim - i - 1),
            ]
          )
          point[i] = sign * (boundary - delta)
          inside.append(point.copy())
          point[i] = sign * (boundary + delta)
          outside.append(point)
  return np.array(inside), np.array(outside)


def test_octopus_is_continuously_differentiable_across_the_boundaries():
  dim, tau = 3, E
  problem = problems.octopus(dim)
  inside, outside = _boundary_pairs(dim, tau, delta=1e-10)
  with jax.enable_x64(True):
    f = jax.jit(jax.vmap(problem.value_fn))
    gradient = jax.jit(jax.vmap(jax.grad(problem.value_fn)))
    jumps = np.abs(np.asarray(f(jnp.asarray(inside)) - f(jnp.asarray(outside))))
    gradient_jumps = np.abs(
      np.asarray(gradient(jnp.asarray(inside)) - gradient(jnp.asarray(outside)))
    )
  assert jumps.max() < 1e-7
  assert gradient_jumps.max() < 1e-6


def test_octopus_continuation_is_finite_and_bounded_below():
  dim, tau = 3, E
  problem = problems.octopus(dim)
  points = np.random.default_rng(2).uniform(-8 * tau, 8 * tau, (2000, dim))
  with jax.enable_x64(True):
    values = np.asarray(jax.jit(jax.vmap(problem.value_fn))(jnp.asarray(points)))
    gradients = np.asarray(jax.jit(jax.vmap(jax.grad(problem.value_fn)))(jnp.asarray(points)))
    # Off the tube the active coordinate's successor is capped at |x| = tau, not -> -inf.
    far = jnp.array([1.9 * tau, 1e6, 0.0], jnp.float64)
    assert float(jax.jit(problem.value_fn)(far)) > problem.minimum_value
  assert np.all(np.isfinite(values)) and np.all(np.isfinite(gradients))
  assert values.min() > problem.minimum_value


def _in_tube(points: np.ndarray, tau: float) -> np.ndarray:
  a = np.abs(points)
  escaped = np.cumprod(a > 2 * tau, axis=-1).sum(-1)
  after_active = np.arange(a.shape[-1]) > escaped[:, None]
  return np.all(~after_active | (a <= tau), axis=-1)


def test_gradient_descent_on_octopus_stays_in_the_tube_and_visits_every_saddle():
  dim, tau, big_l = 3, E, E
  problem = problems.octopus(dim)
  step = 1 / (4 * big_l)
  num_steps = 3000

  def descend(x0):
    def body(x, _):
      x = x - step * jax.grad(problem.value_fn)(x)
      return x, x

    return jax.lax.scan(body, x0, length=num_steps)[1]

  with jax.enable_x64(True):
    starts = jax.random.uniform(jax.random.key(0), (3, dim), jnp.float64, -1.0, 1.0)
    trajectories = np.asarray(jax.jit(jax.vmap(descend))(starts))
    values = np.asarray(jax.jit(jax.vmap(jax.vmap(problem.value_fn)))(trajectories))
  assert np.all(_in_tube(trajectories.reshape(-1, dim), tau))
  np.testing.assert_allclose(np.abs(trajectories[:, -1]), 4 * tau, rtol=0, atol=1e-6)
  # It passes close to each saddle of the chain: f plateaus near -k nu for k = 1, 2.
  for k in (1, 2):
    assert np.all(np.min(np.abs(values + k * NU), axis=1) < 1e-3 * NU)


# --- matrix_factorization -------------------------------------------------------------------------


def test_matrix_factorization_target_is_well_conditioned_and_reproducible():
  problem = problems.matrix_factorization(6, 3, key=11)
  again = problems.matrix_factorization(6, 3, key=11)
  other = problems.matrix_factorization(6, 3, key=12)
  u_star = problem.critical_points[-1].point
  # U*^T U* = diag(s): the nonzero eigenvalues of M.
  gram = u_star.T @ u_star
  spectrum = np.diag(gram)
  np.testing.assert_allclose(gram, np.diag(spectrum), rtol=0, atol=1e-14)
  assert np.all((spectrum >= 1) & (spectrum <= 2))
  assert np.all(np.diff(spectrum) <= 0)
  np.testing.assert_array_equal(u_star, again.critical_points[-1].point)
  assert np.abs(u_star - other.critical_points[-1].point).max() > 0.1
  saddle = problem.critical_points[0]
  assert saddle.value == pytest.approx(0.5 * np.sum(spectrum**2), rel=1e-14)
  # U = 0 is a saddle, not a maximum: f grows along directions orthogonal to range(M).
  direction = np.random.default_rng(1).normal(size=(6, 3))
  direction -= u_star @ np.linalg.solve(gram, u_star.T @ direction)
  with jax.enable_x64(True):
    along = jax.jit(jax.vmap(problem.value_fn))(jnp.asarray([t * direction for t in (0.1, 0.5)]))
  assert np.all(np.asarray(along) > saddle.value)
  # With rank == dim the Hessian at U = 0 is negative definite: a local maximum.
  square = problems.matrix_factorization(3, 3, key=11)
  assert square.critical_points[0].kind == "maximum"
  with jax.enable_x64(True):
    nearby = np.random.default_rng(2).normal(scale=1e-2, size=(20, 3, 3))
    values = np.asarray(jax.jit(jax.vmap(square.value_fn))(jnp.asarray(nearby)))
  assert np.all(values < square.critical_points[0].value)
  # The residual is zero at every rotation U* R of the minimum.
  rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
  with jax.enable_x64(True):
    assert float(jax.jit(problem.value_fn)(jnp.asarray(u_star @ rotation))) < 1e-28


@pytest.mark.parametrize(
  "make",
  [
    lambda: problems.quadratic_saddle([]),
    lambda: problems.quadratic_saddle([[1.0, 2.0]]),
    lambda: problems.octopus(0),
    lambda: problems.octopus(2, length_scale=0.0),
    lambda: problems.matrix_factorization(3, 4),
    lambda: problems.matrix_factorization(3, 0),
    lambda: problems.quadratic_saddle([1.0, float("nan")]),
    lambda: problems.octopus(2, positive_curvature=float("nan")),
    lambda: problems.octopus(2, length_scale=float("inf")),
  ],
)
def test_bad_arguments_raise(make):
  with pytest.raises(ValueError):
    make()


def test_octopus_refuses_traced_constants_with_the_loop_route():
  # JAX's ConcretizationTypeError was all a vmap over length scales gave.
  with pytest.raises(TypeError, match="octopus: length_scale must be concrete.*Python loop"):
    jax.vmap(lambda tau: problems.octopus(2, length_scale=tau).value_fn(jnp.ones(2)))(
      jnp.array([1.0, 2.0])
    )


@pytest.mark.parametrize("eigenvalues", [["1", "-1"], [True, False], [1 + 1j, 2.0]])
def test_quadratic_saddle_refuses_eigenvalues_that_are_not_real_numbers(eigenvalues):
  # Strings and booleans were silently converted to floats.
  with pytest.raises(TypeError, match="quadratic_saddle: eigenvalues must be real numbers"):
    problems.quadratic_saddle(eigenvalues)


def test_value_fns_reject_integer_or_misshapen_params():
  # The fixed data is cast to the params' dtype: integer params truncated it (a value of 0).
  cases = [
    (problems.quadratic_saddle([0.5, -0.5], rotation_key=0), (2,)),
    (problems.strict_saddle(), (2,)),
    (problems.octopus(3), (3,)),
    (problems.matrix_factorization(3, 1, key=0), (3, 1)),
  ]
  for problem, shape in cases:
    assert problem.init_shape == shape
    with pytest.raises(TypeError, match="floating point"):
      problem.value_fn(jnp.zeros(shape, jnp.int32))
    with pytest.raises(ValueError, match="must have shape"):
      problem.value_fn(jnp.zeros((1,)))  # a short vector broadcast silently
    assert np.isfinite(float(problem.value_fn(jnp.zeros(shape))))


def test_a_traced_key_is_refused_with_the_loop_route():
  # The problems are built with host NumPy; a vmapped key raised TracerArrayConversionError.
  keys = jax.random.split(jax.random.key(0), 2)
  with pytest.raises(TypeError, match="quadratic_saddle: the key must be concrete"):
    jax.vmap(
      lambda k: problems.quadratic_saddle([1.0, -1.0], rotation_key=k).value_fn(jnp.ones(2))
    )(keys)
  with pytest.raises(TypeError, match="matrix_factorization: the key must be concrete"):
    jax.vmap(lambda k: problems.matrix_factorization(3, 1, key=k).value_fn(jnp.ones((3, 1))))(keys)
  with pytest.raises(ValueError, match="build one problem per seed in a Python loop"):
    problems.quadratic_saddle([1.0, -1.0], rotation_key=keys)
