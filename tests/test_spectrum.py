"""Tests for the Hessian-spectrum diagnostics, against dense eigh on small problems."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jaxsaddle.flax
from jaxsaddle import _random
from jaxsaddle import curvature
from jaxsaddle import spectrum
from jaxsaddle.spectrum import _trace

FULL = os.environ.get("JAXSADDLE_FULL") == "1"


def _rotated(eigenvalues, seed: int) -> np.ndarray:
  """A float64 symmetric matrix with the given spectrum and a random orthogonal eigenbasis."""
  eigenvalues = np.asarray(eigenvalues, np.float64)
  rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((eigenvalues.size,) * 2))
  matrix = (rotation * eigenvalues) @ rotation.T
  return (matrix + matrix.T) / 2


def _goe(n: int, seed: int) -> np.ndarray:
  """A GOE matrix scaled so that its spectrum fills the semicircle of radius 2."""
  gaussian = np.random.default_rng(seed).standard_normal((n, n))
  return (gaussian + gaussian.T) / np.sqrt(2 * n)


def _quadratic(matrix):
  """``0.5 x^T A x``, whose Hessian is ``A`` everywhere."""
  return lambda x: 0.5 * x @ matrix @ x


# One compilation per function and shape, reused across tests: matrices are arguments, not
# constants baked into the program.
@jax.jit
def _extremes(matrix, key):
  return spectrum.hessian_extreme_eigenvalues(
    _quadratic(matrix),
    jnp.zeros(matrix.shape[0], matrix.dtype),
    num_steps=60,
    key=key,
    k=3,
    which="both",
  )


@jax.jit
def _density(matrix, key):
  return spectrum.hessian_density(
    _quadratic(matrix),
    jnp.zeros(matrix.shape[0], matrix.dtype),
    key=key,
    num_probes=32,
    num_steps=30,
  )


@functools.partial(jax.jit, static_argnames="method")
def _trace_estimates(matrix, keys, method):
  def estimate(key):
    return spectrum.hessian_trace(
      _quadratic(matrix),
      jnp.zeros(matrix.shape[0], matrix.dtype),
      key=key,
      num_probes=30,
      method=method,
    )

  return jax.vmap(estimate)(keys)


def test_extreme_eigenvalues_match_eigh_on_prescribed_spectra():
  with jax.enable_x64(True):
    spectra = [
      np.concatenate([[-5.0, -4.0, -3.0], np.linspace(-1.0, 1.0, 114), [2.0, 3.5, 6.0]]),
      # As in networks: a null space, a bulk near zero and outliers, two of them close.
      np.concatenate([np.zeros(60), np.geomspace(0.01, 0.2, 54), [5, 5.5, 6, 20, 21, 40.0]]),
    ]
    for seed, eigenvalues in enumerate(spectra):
      matrix = _rotated(eigenvalues, seed)
      pairs = _extremes(jnp.asarray(matrix), jax.random.key(seed))
      expected = np.linalg.eigvalsh(matrix)
      np.testing.assert_allclose(pairs.eigenvalues[3:], expected[::-1][:3], rtol=1e-4)
      # The residual bounds the error, and for these well separated ends it is small.
      assert float(jnp.max(pairs.residual_norms[3:])) < 1e-3 * expected[-1]
      vector = jax.tree.map(lambda leaf: leaf[3], pairs.eigenvectors)
      np.testing.assert_allclose(matrix @ vector, expected[-1] * vector, atol=1e-3)
    # The smallest is the null space's 0. In exact arithmetic a Krylov space holds one vector of
    # each eigenspace; in floating point it picks up a second of the null space (the values are
    # about 1e-15 and 2e-10), so only this is promised: each smallest value is an eigenvalue.
    np.testing.assert_allclose(pairs.eigenvalues[0], 0.0, atol=1e-10)
    for value in np.asarray(pairs.eigenvalues[:3]):
      assert np.min(np.abs(eigenvalues - value)) < 1e-8
    first = _extremes(jnp.asarray(_rotated(spectra[0], 0)), jax.random.key(0))
    np.testing.assert_allclose(first.eigenvalues[:3], [-5.0, -4.0, -3.0], rtol=1e-4)


def test_extreme_eigenvalues_with_tol_stop_early_within_the_tolerance():
  eigenvalues = np.concatenate([np.linspace(-1.0, 1.0, 297), [2.0, 4.0, 8.0]])
  matrix = jnp.asarray(_rotated(eigenvalues, 33), jnp.float32)

  @jax.jit
  def top(key):
    loose, tight = (
      spectrum.hessian_extreme_eigenvalues(
        _quadratic(matrix), jnp.zeros(300), num_steps=80, key=key, k=1, tol=tol
      )
      for tol in (1e-2, 1e-5)
    )
    return loose, tight

  loose, tight = top(jax.random.key(34))
  for pairs, tol in ((loose, 1e-2), (tight, 1e-5)):
    relative = float(pairs.residual_norms[0] / abs(pairs.eigenvalues[0]))
    assert relative <= 1.01 * tol
    assert abs(float(pairs.eigenvalues[0]) - 8.0) <= relative * 8.0
  # The loose run stopped well before the tight one: its residual is orders of magnitude larger,
  # and it says how many steps (Hessian-vector products) it took.
  assert float(loose.residual_norms[0]) > 100 * float(tight.residual_norms[0])
  assert 1 <= int(loose.num_steps) < int(tight.num_steps) < 80


def test_single_extreme_pairs_without_reorthogonalization_match_eigh_with_unit_vectors():
  with jax.enable_x64(True):
    # Outliers that converge early, so that without reorthogonalisation ghosts appear.
    eigenvalues = np.concatenate([[-3.0], np.linspace(-0.5, 1.0, 146), [4.0, 9.0, 10.0]])
    matrix = jnp.asarray(_rotated(eigenvalues, 15))
    params = jnp.zeros(150)

    def pairs(reorthogonalize):
      return spectrum.hessian_extreme_eigenvalues(
        _quadratic(matrix),
        params,
        num_steps=60,
        key=16,
        which="both",
        reorthogonalize=reorthogonalize,
      )

    default, full = pairs(None), pairs(True)
    np.testing.assert_allclose(default.eigenvalues, [-3.0, 10.0], rtol=1e-10)
    np.testing.assert_allclose(default.eigenvalues, full.eigenvalues, rtol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(default.eigenvectors, axis=1), 1.0, rtol=1e-10)
    for vector, value, residual in zip(
      default.eigenvectors, default.eigenvalues, default.residual_norms, strict=True
    ):
      np.testing.assert_allclose(
        residual, np.linalg.norm(matrix @ vector - value * vector), atol=1e-12
      )
      assert residual < 1e-6
    # The default's Lanczos, from the same start vector, did lose orthogonality: 10 has ghost
    # copies.
    start = _random.tree_standard_normal(jax.random.key(16), params)
    ritz_values = curvature.ritz_pairs(
      curvature.lanczos(lambda v: matrix @ v, start, 60, reorthogonalize=False)
    ).eigenvalues
    assert np.sum(np.abs(np.asarray(ritz_values) - 10.0) < 1e-8) >= 2


def test_extreme_eigenvalues_without_eigenvectors_store_no_basis():
  # A quadratic whose Hessian is a diagonal with a separated top, in 20,000 parameters.
  size = 20_000
  diagonal = jnp.concatenate([jnp.linspace(-1.0, 1.0, size - 1), jnp.array([3.0])])
  value_fn = lambda x: 0.5 * jnp.sum(diagonal * x * x)
  vector_bytes = 4 * size

  def top(num_steps, eigenvectors):
    return jax.jit(
      lambda key: spectrum.hessian_extreme_eigenvalues(
        value_fn, jnp.zeros(size), num_steps=num_steps, key=key, eigenvectors=eigenvectors
      )
    )

  temporaries = {
    (num_steps, eigenvectors): top(num_steps, eigenvectors)
    .lower(jax.random.key(0))
    .compile()
    .memory_analysis()
    .temp_size_in_bytes
    for num_steps in (10, 60)
    for eigenvectors in (True, False)
  }
  # With eigenvectors the basis grows with the steps; without, memory is a few vectors.
  assert temporaries[60, True] - temporaries[10, True] >= 50 * vector_bytes
  assert temporaries[60, False] < 10 * vector_bytes
  # Only the coefficients (num_steps numbers each) grow.
  assert temporaries[60, False] - temporaries[10, False] < vector_bytes

  with_vectors, without = top(60, True)(jax.random.key(1)), top(60, False)(jax.random.key(1))
  assert without.eigenvectors is None
  # The same recurrence from the same start vector: the same Ritz value, which is the top of
  # the spectrum, and a residual estimate that bounds its error.
  np.testing.assert_allclose(without.eigenvalues, with_vectors.eigenvalues, rtol=1e-6)
  np.testing.assert_allclose(without.eigenvalues, [3.0], rtol=1e-5)
  assert abs(float(without.eigenvalues[0]) - 3.0) <= float(without.residual_norms[0]) + 1e-5
  assert int(without.num_steps) == 60
  with pytest.raises(ValueError, match="exact_residuals=True needs the Ritz vectors"):
    spectrum.hessian_extreme_eigenvalues(
      value_fn, jnp.zeros(size), num_steps=3, key=0, eigenvectors=False, exact_residuals=True
    )


def test_hessian_trace_is_within_its_standard_error_across_seeds():
  with jax.enable_x64(True):
    matrix = _rotated(np.random.default_rng(3).normal(0.5, 1.0, 100), 4)
    trace = np.trace(matrix)
    keys = jax.random.split(jax.random.key(5), 200)
    # Hutchinson's variance per Rademacher probe: 2 (||A||_F^2 - sum_i A_ii^2).
    variance = 2 * (np.sum(matrix**2) - np.sum(np.diag(matrix) ** 2))
    for method in ("hutchinson", "hutch++"):
      estimates = _trace_estimates(jnp.asarray(matrix), keys, method)
      z_scores = (np.asarray(estimates.value) - trace) / np.asarray(estimates.standard_error)
      # A t-statistic: mean 0, standard deviation a little above 1 (29 or 9 degrees of freedom).
      assert abs(np.mean(z_scores)) < 0.25, method
      assert 0.8 < np.std(z_scores) < 1.45, method
      assert np.mean(np.abs(z_scores) < 2) > 0.88, method
    hutchinson = _trace_estimates(jnp.asarray(matrix), keys, "hutchinson")
    np.testing.assert_allclose(
      np.mean(np.asarray(hutchinson.standard_error) ** 2), variance / 30, rtol=0.15
    )


def test_hutchinson_is_the_mean_of_rademacher_forms_with_their_sample_standard_error():
  with jax.enable_x64(True):
    matrix = jnp.asarray(_rotated(np.random.default_rng(3).normal(0.5, 1.0, 20), 4))
    params = jnp.zeros(20)
    estimate = spectrum.hessian_trace(_quadratic(matrix), params, key=7, num_probes=6)
    # The probes are drawn from the split keys, one per probe.
    keys = jax.random.split(jax.random.key(7), 6)
    probes = np.stack([np.asarray(_random.tree_rademacher(key, params)) for key in keys])
    assert set(np.unique(probes)) == {-1.0, 1.0}
    forms = np.einsum("pi,ij,pj->p", probes, np.asarray(matrix), probes)
    np.testing.assert_allclose(estimate.value, forms.mean(), rtol=1e-12)
    np.testing.assert_allclose(estimate.standard_error, forms.std(ddof=1) / np.sqrt(6), rtol=1e-12)


def test_hessian_trace_draws_the_same_probes_whatever_the_batch_size():
  with jax.enable_x64(True):
    matrix = jnp.asarray(_rotated(np.random.default_rng(12).normal(0.5, 1.0, 30), 13))
    value_fn = lambda x: 0.5 * x @ matrix @ x  # noqa: E731
    params = jnp.zeros(30)
    for method in ("hutchinson", "hutch++"):
      one_by_one, in_threes, all_at_once = (
        spectrum.hessian_trace(
          value_fn, params, key=14, num_probes=10, method=method, probe_batch_size=size
        )
        for size in (1, 3, None)
      )
      for other in (in_threes, all_at_once):
        np.testing.assert_allclose(other.value, one_by_one.value, rtol=1e-12)
        np.testing.assert_allclose(other.standard_error, one_by_one.standard_error, rtol=1e-10)
    with pytest.raises(ValueError, match="probe_batch_size"):
      spectrum.hessian_trace(value_fn, params, key=0, num_probes=4, probe_batch_size=0)


def test_hessian_trace_forms_match_hessian_vector_products_and_flag_infinite_slopes():
  # The quadratic forms are second directional derivatives, taken forward-over-forward; a
  # custom_vjp anywhere in value_fn (here one whose residuals do not depend on x, which an
  # abstract evaluation of the forms does not reject, wrapped in a jit) makes them z . (H z)
  # from Hessian-vector products instead. Same key, same probes: the estimates must agree.
  with jax.enable_x64(True):
    matrix = jnp.asarray(_rotated(np.random.default_rng(40).normal(0.0, 1.0, 20), 41))
    cubic = jnp.linspace(-0.5, 0.5, 20)
    params = jnp.linspace(-1.0, 1.0, 20)

    def value_fn(x):
      return 0.5 * x @ matrix @ x + jnp.sum(cubic * x**3)

    @jax.custom_vjp
    def identity(x):
      return x

    identity.defvjp(lambda x: (x, None), lambda _, g: (g,))
    reverse_only = jax.jit(lambda x: value_fn(identity(x)))
    assert _trace._second_derivative_form(value_fn, params, jnp.float64) is not None
    assert _trace._second_derivative_form(reverse_only, params, jnp.float64) is None
    for method in ("hutchinson", "hutch++"):
      forward, reverse = (
        spectrum.hessian_trace(fn, params, key=42, num_probes=9, method=method)
        for fn in (value_fn, reverse_only)
      )
      np.testing.assert_allclose(forward.value, reverse.value, rtol=1e-12)
      np.testing.assert_allclose(forward.standard_error, reverse.standard_error, rtol=1e-10)
    # The Hessian at params is A + diag(6 c x); the diagonal does not enter the variance.
    expected_variance = 2 * (
      np.sum(np.asarray(matrix) ** 2) - np.sum(np.diag(np.asarray(matrix)) ** 2)
    )
    hutchinson = spectrum.hessian_trace(value_fn, params, key=43, num_probes=2000)
    exact = float(jnp.trace(matrix) + jnp.sum(6 * cubic * params))
    assert abs(float(hutchinson.value) - exact) < 4 * float(hutchinson.standard_error)
    np.testing.assert_allclose(
      float(hutchinson.standard_error) ** 2 * 2000, expected_variance, rtol=0.15
    )

  # A finite loss with an infinite slope and a finite second derivative: only the slope says so.
  @jax.custom_jvp
  def steep(x):
    return jnp.zeros_like(x)

  steep.defjvp(lambda primals, tangents: (steep(primals[0]), jnp.inf * tangents[0]))
  params = jnp.array([0.0, 1.0, 2.0])
  infinite_slope = lambda x: jnp.sum(x**2) + steep(x[0])  # noqa: E731
  form = _trace._second_derivative_form(infinite_slope, params, jnp.float32)
  second, finite = form(jnp.ones(3))
  assert float(second) == 6.0 and not bool(finite)
  with pytest.raises(ValueError, match="NaN or infinite"):
    spectrum.hessian_trace(infinite_slope, params, key=0, num_probes=3)


def test_a_custom_vjp_that_reads_its_input_gets_reverse_over_reverse_products():
  # Forward mode cannot differentiate the backward pass of a custom_vjp whose residual is its
  # input: every Hessian-vector product, and so every spectrum function, failed on such a loss.
  @jax.custom_vjp
  def softplus(x):
    return jnp.logaddexp(x, 0.0)

  softplus.defvjp(lambda x: (softplus(x), x), lambda x, g: (g * jax.nn.sigmoid(x),))
  value_fn = lambda p: jnp.sum(softplus(p["a"]) ** 2)  # noqa: E731
  with jax.enable_x64(True):
    a = jnp.linspace(-2.0, 2.0, 7)
    params, tangent = {"a": a}, {"a": jnp.linspace(1.0, 3.0, 7)}
    with pytest.raises(TypeError, match="custom_vjp"):
      jax.jvp(jax.grad(value_fn), (params,), (tangent,))
    smooth, slope = jnp.logaddexp(a, 0.0), jax.nn.sigmoid(a)
    diagonal = 2 * (slope**2 + smooth * slope * (1 - slope))
    expected = diagonal * tangent["a"]
    np.testing.assert_allclose(curvature.hvp(value_fn, params, tangent)["a"], expected, rtol=1e-13)
    gradient, hvp_fn = curvature.linearize_hvp(value_fn, params)
    np.testing.assert_allclose(gradient["a"], 2 * smooth * slope, rtol=1e-13)
    np.testing.assert_allclose(hvp_fn(tangent)["a"], expected, rtol=1e-13)
    pairs = spectrum.hessian_extreme_eigenvalues(value_fn, params, num_steps=7, key=0, which="both")
    np.testing.assert_allclose(pairs.eigenvalues, [diagonal.min(), diagonal.max()], rtol=1e-10)
    # Rademacher probes give a diagonal Hessian's trace exactly.
    trace = spectrum.hessian_trace(value_fn, params, key=0, num_probes=3)
    np.testing.assert_allclose(trace.value, jnp.sum(diagonal), rtol=1e-12)


def test_hessian_trace_of_narrow_dtypes_accumulates_in_float32():
  # A float16 loss cannot hold a form above 65504: narrow leaves take Hessian-vector products,
  # whose inner products accumulate in float32.
  value_fn = lambda x: 0.5 * jnp.sum(100 * x * x)  # noqa: E731
  for dtype in (jnp.float16, jnp.bfloat16):
    params = jnp.zeros(1000, dtype)
    assert _trace._second_derivative_form(value_fn, params, jnp.float32) is None
    estimate = spectrum.hessian_trace(value_fn, params, key=0, num_probes=3)
    assert estimate.value.dtype == jnp.float32
    np.testing.assert_allclose(estimate.value, 100_000.0, rtol=1e-6)
  wide = spectrum.hessian_trace(value_fn, jnp.zeros(1000), key=0, num_probes=3)
  np.testing.assert_allclose(wide.value, 100_000.0, rtol=1e-6)


def test_hutch_plus_plus_has_lower_variance_on_low_rank_plus_small():
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    spectrum_values = np.concatenate([np.geomspace(10.0, 100.0, 8), rng.uniform(0, 0.05, 92)])
    matrix = jnp.asarray(_rotated(spectrum_values, 7))
    trace = float(np.sum(spectrum_values))
    keys = jax.random.split(jax.random.key(8), 200)
    hutchinson = _trace_estimates(matrix, keys, "hutchinson")
    hutch_plus_plus = _trace_estimates(matrix, keys, "hutch++")
    # The rank-8 part fits in the 10-vector sketch, so only the small part is sampled.
    assert np.var(hutch_plus_plus.value) < 1e-3 * np.var(hutchinson.value)
    assert abs(np.mean(hutch_plus_plus.value) - trace) < 3 * np.std(hutch_plus_plus.value) / 14
    assert float(np.median(hutch_plus_plus.standard_error)) < 0.05 * float(
      np.median(hutchinson.standard_error)
    )


def _cubic_diagonal_loss(matrix):
  """``0.5 x^T A x + sum(x^4) / 12``: Hessian ``A + diag(x^2)``, trace gradient ``2 x``."""
  return lambda x: 0.5 * x @ matrix @ x + jnp.sum(x**4) / 12


def test_hutch_plus_plus_gradients_are_finite_and_unbiased():
  # eigh's derivative in the sketch's orthonormalisation made every gradient NaN; derivatives
  # now hold the sketched basis fixed, an unbiased estimate of the trace's gradient, 2 x.
  rng = np.random.default_rng(0)
  matrix = jnp.asarray(_rotated(rng.uniform(-3, 3, 8), 1), jnp.float32)
  x = jnp.asarray(rng.standard_normal(8), jnp.float32)
  loss = _cubic_diagonal_loss(matrix)

  def trace(x, key):
    return spectrum.hessian_trace(loss, x, key=key, num_probes=30, method="hutch++").value

  gradients = np.asarray(jax.jit(jax.vmap(jax.grad(trace), in_axes=(None, 0)))(x, jnp.arange(400)))
  assert np.isfinite(gradients).all()
  standard_error = gradients.std(axis=0) / np.sqrt(400)
  assert np.all(np.abs(gradients.mean(axis=0) - 2 * np.asarray(x)) < 4 * standard_error + 1e-5)


def test_top_eigenvalue_gradient_without_reorthogonalization_is_accurate():
  # By default (k = 1) Lanczos runs without reorthogonalisation: the value is accurate, but its
  # derivative through the recursion was 2% off here; it now comes from the partial run.
  rng = np.random.default_rng(0)
  values = np.concatenate([[100.0, 50.0, 20.0], rng.uniform(-0.05, 0.05, 597)])
  matrix = jnp.asarray(_rotated(values, 0), jnp.float32)
  x = jnp.asarray(0.1 * rng.standard_normal(600), jnp.float32)

  def top(x, weight):
    loss = lambda y: weight * _cubic_diagonal_loss(matrix)(y)  # noqa: E731
    pairs = spectrum.hessian_extreme_eigenvalues(loss, x, num_steps=40, key=0, eigenvectors=False)
    return pairs.eigenvalues[0]

  _, vectors = np.linalg.eigh(np.asarray(jax.hessian(_cubic_diagonal_loss(matrix))(x), np.float64))
  exact = 2 * np.asarray(x) * vectors[:, -1] ** 2  # v^T (d H / d x_i) v
  gradient, weight_derivative = jax.jit(jax.grad(top, argnums=(0, 1)))(x, 1.0)
  assert np.linalg.norm(gradient - exact) < 1e-4 * np.linalg.norm(exact)
  # The weight is closed over by the loss: d lambda(w H) / dw = lambda(H).
  np.testing.assert_allclose(weight_derivative, jax.jit(top)(x, 1.0), rtol=1e-5)


def test_differentiated_top_eigenpair_is_the_plain_calls_with_aligned_tangents():
  # Under differentiation the outputs were the partial run's: residuals at its sqrt(eps) floor
  # and a vector that may have the other sign (a loss one step along it was 6.17 under
  # value_and_grad against 1.38 in a plain call). The tangents come from that run: a vector's
  # must take the plain vector's sign, or the derivative of (v . c)^2 has the wrong sign.
  rng = np.random.default_rng(0)
  values = np.concatenate([[10.0, 6.0, -7.0], rng.uniform(-0.5, 0.5, 37)])
  rotation, _ = np.linalg.qr(rng.standard_normal((40, 40)))
  matrix = jnp.asarray((rotation * values) @ rotation.T, jnp.float32)
  x = jnp.asarray(0.3 * rng.standard_normal(40), jnp.float32)
  loss = _cubic_diagonal_loss(matrix)
  weights = jnp.asarray(rng.standard_normal(40), jnp.float32)

  def overlap(z):
    # At these steps and key the two runs' vectors have opposite signs.
    pairs = spectrum.hessian_extreme_eigenvalues(loss, z, num_steps=20, key=1)
    return (pairs.eigenvectors[0] @ weights) ** 2, pairs

  (_, differentiated), gradient = jax.jit(jax.value_and_grad(overlap, has_aux=True))(x)
  plain = jax.jit(overlap)(x)[1]
  # The two programs' rounding may differ, and without reorthogonalisation the vectors carry
  # it: compiled without XLA's optimisations, one's residual was 5e-4 and the other's 2e-6.
  # Each is within its residual of the eigenpair, whose gap to the next eigenvalue is 4
  # (Davis-Kahan), so the vectors may differ by their residuals over 4 but not by a sign.
  reach = differentiated.residual_norms[0] + plain.residual_norms[0]
  assert differentiated.num_steps == plain.num_steps == 20
  assert abs(differentiated.eigenvalues[0] - plain.eigenvalues[0]) <= reach
  assert np.linalg.norm(differentiated.eigenvectors[0] - plain.eigenvectors[0]) <= reach / 2
  # The partial run floors its residuals at sqrt(eps) ||H||, 3.4e-3 here.
  assert differentiated.residual_norms[0] < 1e-3
  # Against the dense derivative in float64 (finite differences of float32 Lanczos are noise).
  with jax.enable_x64(True):
    wide = lambda z: _cubic_diagonal_loss(jnp.asarray(matrix, jnp.float64))(z)  # noqa: E731

    def dense_overlap(z):
      _, vectors = jnp.linalg.eigh(jax.hessian(wide)(z))
      return (vectors[:, -1] @ jnp.asarray(weights, jnp.float64)) ** 2

    exact = np.asarray(jax.grad(dense_overlap)(jnp.asarray(x, jnp.float64)))
  # The wrong sign is an error of order 1. Float32 Lanczos derivatives over keys 0-7 came
  # within 1e-6 to 5e-3 of the dense one (this key: 7e-5, and 5e-3 once the start vector was
  # scaled by a power of two before its normalisation, which moved the rounding; key 3 read
  # 7e-4 before that).
  assert np.linalg.norm(gradient - exact) < 1e-2 * np.linalg.norm(exact)


def test_slq_density_integrates_to_one_and_its_moments_match_traces():
  eigenvalues = np.random.default_rng(9).gamma(2.0, 1.0, 400) - 1.5
  matrix = _rotated(eigenvalues, 10)
  density = _density(jnp.asarray(matrix, jnp.float32), jax.random.key(11))
  np.testing.assert_allclose(jnp.sum(density.weights, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.trapezoid(density.density, density.grid), 1.0, atol=1e-3)
  for power in (1, 2):
    moment = spectrum.spectral_moment(density, power)
    expected = np.mean(eigenvalues**power)
    assert abs(float(moment.value) - expected) < 4 * float(moment.standard_error), power
    # The error bar is informative: well below the moment itself.
    assert float(moment.standard_error) < 0.1 * abs(expected)
  # Most of the kernel mass lies where the eigenvalues are.
  inside = (density.grid >= eigenvalues.min()) & (density.grid <= eigenvalues.max())
  assert float(jnp.trapezoid(jnp.where(inside, density.density, 0), density.grid)) > 0.95
  # The documented defaults: a kernel 1% of the nodes' span wide, on 1,000 points reaching five
  # widths past the extreme nodes.
  nodes = np.asarray(density.nodes)[np.asarray(density.weights) > 0]
  width = 0.01 * (nodes.max() - nodes.min())
  np.testing.assert_allclose(density.broadening, width, rtol=1e-5)
  assert density.grid.shape == (1000,)
  np.testing.assert_allclose(
    density.grid[np.array([0, -1])],
    [nodes.min() - 5 * width, nodes.max() + 5 * width],
    rtol=1e-5,
    atol=1e-6,
  )
  # Another key, other probes.
  other = _density(jnp.asarray(matrix, jnp.float32), jax.random.key(12))
  assert not np.allclose(other.nodes, density.nodes)


def test_a_spectrum_whose_width_is_rounding_gets_the_point_spectrum_s_kernel():
  # 3 I rotated: nodes from 3 to 3.000001, whose 1% is a kernel of 1e-8, below float32's spacing
  # at 3; only 5 grid points were distinct and the density integrated to 8.7.
  matrix = jnp.asarray(_rotated(np.full(50, 3.0), 0), jnp.float32)
  density = spectrum.hessian_density(
    _quadratic(matrix), jnp.zeros(50), key=0, num_probes=8, num_steps=5
  )
  # On the CPU the nodes spread by rounding (on an H200 they were all exactly 3).
  assert float(jnp.nanmax(density.nodes) - jnp.nanmin(density.nodes)) < 1e-5
  np.testing.assert_allclose(density.broadening, 0.03, rtol=1e-5)
  np.testing.assert_allclose(jnp.trapezoid(density.density, density.grid), 1.0, atol=1e-3)


def test_slq_with_partial_reorthogonalization_matches_full():
  # 60 steps on a spectrum of 400 with separated extremes: the basis loses orthogonality and
  # partial reorthogonalisation has to act, yet the quadrature (nodes and weights) must be the
  # full one's; without reorthogonalisation the extremes get ghost copies that split the weight.
  eigenvalues = np.concatenate([[-4.0], np.linspace(-1.0, 1.0, 398), [6.0]])
  matrix = jnp.asarray(_rotated(eigenvalues, 31), jnp.float32)

  @functools.partial(jax.jit, static_argnames="reorthogonalize")
  def density(matrix, reorthogonalize):
    return spectrum.hessian_density(
      _quadratic(matrix),
      jnp.zeros(400),
      key=32,
      num_probes=4,
      num_steps=60,
      reorthogonalize=reorthogonalize,
    )

  full, partial, plain = (density(matrix, mode) for mode in (True, "partial", False))
  np.testing.assert_allclose(partial.nodes, full.nodes, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(partial.weights, full.weights, rtol=1e-3, atol=1e-5)
  top = lambda d: jnp.sum(jnp.abs(d.nodes - 6.0) < 1e-3, axis=1)  # noqa: E731
  np.testing.assert_array_equal(top(partial), 1)
  assert int(jnp.max(top(plain))) > 1


def test_density_options_batching_gaussian_probes_and_user_grid():
  eigenvalues = np.linspace(-1.0, 2.0, 30)
  grid = jnp.linspace(-2.0, 3.0, 101)

  @jax.jit
  def densities(matrix, key):
    def density(**kwargs):
      return spectrum.hessian_density(
        _quadratic(matrix), jnp.zeros(30), key=key, num_probes=6, num_steps=8, **kwargs
      )

    return (
      density(),
      density(probe_batch_size=4),
      density(probe_batch_size=1),
      density(distribution="gaussian", grid=grid, broadening=0.2),
    )

  whole, batched, one_by_one, gaussian = densities(
    jnp.asarray(_rotated(eigenvalues, 27), jnp.float32), 28
  )
  # Batched and unbatched reductions round differently: float32 differences of up to 3e-5,
  # through eight Lanczos steps.
  for field in ("nodes", "weights", "density"):
    for other in (batched, one_by_one):
      np.testing.assert_allclose(getattr(other, field), getattr(whole, field), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gaussian.grid, grid)
  assert float(gaussian.broadening) == pytest.approx(0.2)
  kernel = np.exp(-0.5 * ((grid[:, None] - gaussian.nodes.reshape(-1)) / 0.2) ** 2)
  expected = kernel @ (gaussian.weights.reshape(-1) / 6) / (np.sqrt(2 * np.pi) * 0.2)
  np.testing.assert_allclose(gaussian.density, expected, rtol=1e-4, atol=1e-6)
  moment = spectrum.spectral_moment(gaussian, 1)
  assert abs(float(moment.value) - eigenvalues.mean()) < 4 * float(moment.standard_error)
  # Gaussian probes differ from the Rademacher ones.
  assert not np.allclose(gaussian.weights, whole.weights)


def test_degeneracy_and_negative_mass_match_true_fractions():
  rng = np.random.default_rng(12)
  eigenvalues = np.concatenate(
    [np.zeros(120), rng.uniform(-3.0, -0.5, 80), rng.uniform(0.5, 4.0, 200)]
  )
  exact = spectrum.degeneracy(jnp.asarray(eigenvalues))
  np.testing.assert_allclose([exact.near_zero_mass, exact.negative_mass], [0.3, 0.2], atol=1e-6)
  assert float(exact.threshold) == pytest.approx(1e-3 * eigenvalues.max(), rel=1e-6)

  density = _density(jnp.asarray(_rotated(eigenvalues, 13), jnp.float32), jax.random.key(14))
  mass = spectrum.degeneracy(density)
  assert abs(float(mass.near_zero_mass) - 0.3) < 0.02
  assert abs(float(mass.negative_mass) - 0.2) < 0.02
  # The same from the (nodes, weights) pair.
  pair_mass = spectrum.degeneracy((density.nodes, density.weights))
  np.testing.assert_allclose(pair_mass.near_zero_mass, mass.near_zero_mass, rtol=1e-6)


def test_semicircle_fit_finds_the_centre_and_radius_of_a_shifted_goe_of_2000():
  # The n = 2000, from eigvalsh alone; shifted and scaled so that a fit that assumed
  # centre 0 or radius 2 would fail: 3 + 0.5 GOE fills the semicircle of centre 3, radius 1.
  eigenvalues = 3.0 + 0.5 * np.linalg.eigvalsh(_goe(2000, 21))
  fit = spectrum.semicircle_fit(jnp.asarray(eigenvalues))
  assert abs(float(fit.center) - 3.0) < 0.01
  assert abs(float(fit.radius) - 1.0) < 0.02
  assert float(fit.ks_distance) < 0.01
  assert float(fit.outlier_mass) == 0.0


def test_semicircle_fit_is_scale_free_in_float32():
  # Squared distances between nodes underflowed float32 at 1e-18 (every eigenvalue an outlier)
  # and overflowed it at 1e19 (an infinite radius).
  eigenvalues = np.linalg.eigvalsh(_goe(400, 15)) + np.linspace(0, 12, 400) * (
    np.arange(400) >= 395
  )
  unit = spectrum.semicircle_fit(jnp.asarray(eigenvalues, jnp.float32))
  assert 0 < float(unit.outlier_mass) < 0.05
  for scale in (1e-18, 1e19):
    fit = spectrum.semicircle_fit(jnp.asarray(eigenvalues * scale, jnp.float32))
    np.testing.assert_allclose(
      [fit.center, fit.radius],
      [unit.center * scale, unit.radius * scale],
      rtol=1e-5,
      atol=1e-6 * scale,
    )
    np.testing.assert_allclose(
      [fit.ks_distance, fit.bulk_ks_distance, fit.outlier_mass],
      [unit.ks_distance, unit.bulk_ks_distance, unit.outlier_mass],
      atol=1e-6,
    )
    np.testing.assert_array_equal(np.isnan(fit.outliers), np.isnan(unit.outliers))
  # A point mass keeps a positive radius however small its scale.
  assert float(spectrum.semicircle_fit(jnp.full(5, 1e-30, jnp.float32)).radius) > 0


@pytest.mark.parametrize(
  "n", [400, pytest.param(2000, marks=pytest.mark.skipif(not FULL, reason="JAXSADDLE_FULL"))]
)
def test_goe_spectrum_fits_the_semicircle(n):
  matrix = _goe(n, 15)
  fit = spectrum.semicircle_fit(jnp.asarray(np.linalg.eigvalsh(matrix)))
  assert abs(float(fit.center)) < 0.03
  assert abs(float(fit.radius) - 2.0) < 0.05
  assert float(fit.ks_distance) < 0.02
  assert float(fit.outlier_mass) == 0.0
  assert bool(jnp.all(jnp.isnan(fit.outliers)))

  density = _density(jnp.asarray(matrix, jnp.float32), jax.random.key(16))
  slq_fit = spectrum.semicircle_fit(density)
  assert abs(float(slq_fit.center)) < 0.05
  assert abs(float(slq_fit.radius) - 2.0) < 0.1
  assert float(slq_fit.ks_distance) < 0.04
  assert float(slq_fit.outlier_mass) < 0.01


def test_spiked_spectrum_does_not_fit_and_its_outliers_are_found():
  n, num_spikes = 400, 20
  rng = np.random.default_rng(17)
  spikes, _ = np.linalg.qr(rng.standard_normal((n, num_spikes)))
  strengths = np.linspace(3.0, 6.0, num_spikes)
  matrix = _goe(n, 18) + (spikes * strengths) @ spikes.T
  eigenvalues = np.linalg.eigvalsh(matrix)
  fit = spectrum.semicircle_fit(jnp.asarray(eigenvalues))
  goe_fit = spectrum.semicircle_fit(jnp.asarray(np.linalg.eigvalsh(_goe(n, 18))))

  assert abs(float(fit.radius) - 2.0) < 0.1  # the bulk is still the semicircle
  assert float(fit.bulk_ks_distance) < 0.02
  assert float(fit.ks_distance) > 0.04 > 2 * float(goe_fit.ks_distance)
  outliers = np.sort(np.asarray(fit.outliers)[~np.isnan(np.asarray(fit.outliers))])
  np.testing.assert_allclose(outliers, eigenvalues[-num_spikes:], rtol=1e-6)
  assert float(fit.outlier_mass) == pytest.approx(num_spikes / n)
  # Beyond the BBP threshold a spike of strength theta sits near theta + 1/theta.
  np.testing.assert_allclose(outliers, strengths + 1 / strengths, atol=0.3)


_TWO_DIMENSIONAL = {
  "(w1 w2 - 1)^2": (lambda w: (w[0] * w[1] - 1.0) ** 2, "strict saddle"),
  "x^2 + y^2": (lambda w: w[0] ** 2 + w[1] ** 2, "minimum"),
  "x^2 + y^4": (lambda w: w[0] ** 2 + w[1] ** 4, "minimum"),
  "x^2 - y^4": (lambda w: w[0] ** 2 - w[1] ** 4, "degenerate saddle"),
  "(x - 1)^2 + y^2": (lambda w: (w[0] - 1.0) ** 2 + w[1] ** 2, "not critical"),
  "-x^2 - y^2": (lambda w: -(w[0] ** 2) - w[1] ** 2, "strict saddle"),
}


def _classify(value_fns, dimension, key):
  """classify_critical_point at 0 for every function, in one compilation (a lax.switch)."""

  def classify(case):
    def value_fn(w):
      return jax.lax.switch(case, value_fns, w)

    return spectrum.classify_critical_point(
      value_fn,
      jnp.zeros(dimension),
      gradient_tol=1e-4,
      eigenvalue_tol=1e-3,
      num_steps=3,
      key=key,
    )

  return jax.jit(jax.vmap(classify))(jnp.arange(len(value_fns)))


def test_classify_critical_point_estimates_index_and_degeneracy_by_lanczos():
  # 40 parameters and 10 Lanczos steps: the index and the degeneracy come from SLQ (4 probes),
  # not from the two extreme Ritz values (which would say 0.5). Seeded, so exact bounds hold;
  # the SLQ spread over keys is about +-0.07 here.
  rotation = np.linalg.qr(np.random.default_rng(3).standard_normal((40, 40)))[0]
  cases = [
    (np.concatenate([-np.ones(10), np.linspace(0.5, 2, 30)]), 0.25, 0.0),
    (np.concatenate([-np.ones(10), np.zeros(10), np.linspace(0.5, 2, 20)]), 0.25, 0.25),
  ]
  classify = jax.jit(
    lambda matrix: spectrum.classify_critical_point(
      _quadratic(matrix), jnp.zeros(40), gradient_tol=1e-6, eigenvalue_tol=1e-3, num_steps=10, key=0
    )
  )
  for eigenvalues, index, degeneracy in cases:
    report = classify(jnp.asarray(rotation @ np.diag(eigenvalues) @ rotation.T, jnp.float32))
    assert report.kind_name == "strict saddle"
    assert abs(float(report.index) - index) < 0.1
    assert abs(float(report.degeneracy) - degeneracy) < 0.1
    np.testing.assert_allclose(report.smallest_eigenvalue, -1.0, rtol=1e-4)


def test_classify_critical_points():
  cases = list(_TWO_DIMENSIONAL.values())
  reports = _classify([value_fn for value_fn, _ in cases], 2, jax.random.key(19))
  kinds = [spectrum.CRITICAL_POINT_KINDS[int(kind)] for kind in reports.kind]
  assert kinds == [kind for _, kind in cases]
  # (w1 w2 - 1)^2 at 0: Hessian [[0, -2], [-2, 0]], eigenvalues -2 and 2, index 1/2.
  np.testing.assert_allclose(reports.smallest_eigenvalue[0], -2.0, rtol=1e-5)
  np.testing.assert_allclose(reports.largest_eigenvalue[0], 2.0, rtol=1e-5)
  np.testing.assert_allclose(reports.index[0], 0.5)
  # x^2 +- y^4: Hessian diag(2, 0), half of the spectrum is degenerate.
  np.testing.assert_allclose(reports.degeneracy[2:4], 0.5)
  np.testing.assert_allclose(reports.gradient_norm[4], 2.0, rtol=1e-6)
  assert float(reports.probe_decrease[2]) <= 0 < float(reports.probe_decrease[3])

  # (w1 w2 w3 - 1)^2 at 0: zero Hessian, f = 1 above its minimum 0, descent of order r^3.
  report = jax.jit(
    lambda params: spectrum.classify_critical_point(
      lambda w: (w[0] * w[1] * w[2] - 1.0) ** 2,
      params,
      gradient_tol=1e-4,
      eigenvalue_tol=1e-3,
      num_steps=3,
      key=jax.random.key(20),
    )
  )(jnp.zeros(3))
  assert report.kind_name == "degenerate saddle"
  np.testing.assert_allclose([report.smallest_eigenvalue, report.largest_eigenvalue], 0.0)
  assert float(report.degeneracy) == 1.0 and float(report.index) == 0.0

  # x^4 + y^4 is a minimum at 0 with a zero Hessian, unless the loss falls to -inf away from
  # it (descent); where it is NaN the probe cannot show a minimum.
  def quartic_with(outside):
    return lambda w: jnp.sum(w**4) + jnp.where(jnp.abs(w[0]) > 0.05, outside, 0.0)

  def classify(value_fn):
    return spectrum.classify_critical_point(
      value_fn, jnp.zeros(2), gradient_tol=1e-4, eigenvalue_tol=1e-3, num_steps=3, key=0
    )

  assert classify(quartic_with(0.0)).kind_name == "minimum"
  falling = classify(quartic_with(-jnp.inf))
  assert falling.kind_name == "degenerate saddle"
  assert float(falling.probe_decrease) == np.inf
  with pytest.raises(ValueError, match="NaN at a point of the higher-order probe"):
    classify(quartic_with(jnp.nan))
  assert jax.jit(lambda: classify(quartic_with(jnp.nan)))().kind_name == "not critical"


@pytest.mark.parametrize(
  "num_params, num_steps, least_decrease",
  [(20, 20, 1e-4), (50, 30, 2e-4)],
  ids=["dense", "lanczos"],
)
def test_degenerate_saddles_with_a_null_space_of_several_dimensions_are_found(
  num_params, num_steps, least_decrease
):
  # (w1 w2 w3 - 1)^2 beside positive curvatures 0.5-5: f is constant along each null axis and
  # falls, at third order, only along mixtures of them, most along (+-1, +-1, +-1) / sqrt(3):
  # by 2 r^3 / 3^1.5 = 3.85e-4 at radius 0.1. Random directions of the whole space see the
  # positive curvature first. On the dense path eigh returns the axes, and every key read
  # "minimum". On the Lanczos path the smallest Ritz vector, from a Gaussian start, is one random
  # null vector, whose decrease varied from 4.5e-5 to 2.6e-4 over these keys; mixing it with
  # the SLQ probes' Ritz vectors nearest zero gives 2.9e-4 or more. Squared without the 1, the
  # same null space holds a minimum.
  weights = jnp.linspace(0.5, 5.0, num_params - 3)
  saddle = lambda w: (w[0] * w[1] * w[2] - 1.0) ** 2 + jnp.sum(weights * w[3:] ** 2)
  minimum = lambda w: (w[0] * w[1] * w[2]) ** 2 + jnp.sum(weights * w[3:] ** 2)

  def kinds(value_fn):
    classify = lambda key: spectrum.classify_critical_point(
      value_fn,
      jnp.zeros(num_params),
      gradient_tol=1e-4,
      eigenvalue_tol=1e-3,
      num_steps=num_steps,
      key=key,
    )
    reports = jax.jit(jax.vmap(classify))(jax.random.split(jax.random.key(31), 5))
    return [spectrum.CRITICAL_POINT_KINDS[int(kind)] for kind in reports.kind], reports

  saddle_kinds, reports = kinds(saddle)
  assert saddle_kinds == ["degenerate saddle"] * 5
  assert np.all((reports.probe_decrease > least_decrease) & (reports.probe_decrease <= 3.9e-4))
  assert kinds(minimum)[0] == ["minimum"] * 5
  # A positive-definite Hessian has no near-null vector to mix: every probe goes up, and no
  # empty mixture is counted as a change of zero.
  definite_kinds, reports = kinds(lambda w: jnp.sum(jnp.linspace(1.0, 2.0, num_params) * w**2))
  assert definite_kinds == ["minimum"] * 5
  assert np.all(reports.probe_decrease < 0)


def _tree_value(params):
  hidden = jnp.tanh(params["a"] @ params["c"]["d"][:4] + params["b"][:3])
  return jnp.sum(jnp.sin(hidden)) + 0.1 * jnp.sum(params["b"] ** 4) + jnp.prod(params["c"]["d"])


def _tree_params():
  keys = jax.random.split(jax.random.key(21), 3)
  return {
    "a": jax.random.normal(keys[0], (3, 4), jnp.float64),
    "b": jax.random.normal(keys[1], (5,), jnp.float64),
    "c": {"d": jax.random.normal(keys[2], (6,), jnp.float64)},
  }


def test_restriction_is_the_dense_block_of_the_hessian():
  selections = {
    "a": slice(0, 12),  # ravel_pytree orders the leaves a (12), b (5), c/d (6)
    ("c", "d"): slice(17, 23),
    # A filter picking two leaves gives the Hessian of the two blocks together.
    lambda path, leaf: leaf.shape != (5,): np.r_[0:12, 17:23],
  }

  @jax.jit
  def hessians(params):
    flat, unravel = ravel_pytree(params)
    full = jax.hessian(lambda x: _tree_value(unravel(x)))(flat)
    blocks = []
    for select in selections:
      value_fn, sub_params = spectrum.restrict(_tree_value, params, select)
      sub_flat, sub_unravel = ravel_pytree(sub_params)
      blocks.append(jax.hessian(lambda x, f=value_fn, u=sub_unravel: f(u(x)))(sub_flat))
    pairs = spectrum.hessian_extreme_eigenvalues(
      value_fn, sub_params, num_steps=18, key=jax.random.key(22), which="both"
    )
    return full, blocks, pairs

  with jax.enable_x64(True):
    full, blocks, pairs = hessians(_tree_params())
    full = np.asarray(full)
    for block, (select, index) in zip(blocks, selections.items(), strict=True):
      expected = full[np.ix_(np.r_[index], np.r_[index])]
      np.testing.assert_allclose(block, expected, rtol=1e-12, atol=1e-12, err_msg=str(select))
    expected = np.linalg.eigvalsh(expected)
    np.testing.assert_allclose(pairs.eigenvalues, [expected[0], expected[-1]], rtol=1e-8)


def test_dataset_value_fn_memory_does_not_grow_with_the_number_of_batches():
  # One batch's activations alive at a time: XLA's temporaries for a Hessian-vector product are
  # the same for 4 and 64 batches (vmapping the batches instead grew them by 240 batches'
  # activations). The data itself is an argument, not a temporary.
  width, batch_size = 256, 128
  params = {"w": jnp.full((32, width), 0.01), "v": jnp.full(width, 0.01)}

  def loss_fn(params, batch):
    return jnp.mean((jnp.tanh(batch @ params["w"]) @ params["v"]) ** 2)

  def temporaries(num_batches):
    def product(params, batches):
      return curvature.hvp(spectrum.dataset_value_fn(loss_fn, batches), params, params)

    batches = jax.ShapeDtypeStruct((num_batches, batch_size, 32), jnp.float32)
    compiled = jax.jit(product).lower(params, batches).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temporaries(64) - temporaries(4) < batch_size * width * 4


def test_dataset_value_fn_hvp_equals_full_batch_hvp():
  with jax.enable_x64(True):
    params = _tree_params()
    keys = jax.random.split(jax.random.key(23), 2)
    inputs = jax.random.normal(keys[0], (4, 8, 6), jnp.float64)
    targets = jax.random.normal(keys[1], (4, 8), jnp.float64)

    def loss_fn(params, batch):
      inputs, targets = batch
      hidden = jnp.tanh(inputs[:, :4] @ params["a"].T + params["b"][:3])
      outputs = hidden @ params["c"]["d"][:3] + inputs @ params["c"]["d"]
      return jnp.mean((outputs - targets) ** 2)

    @jax.jit
    def values_products_and_traces(params, tangent):
      value_fn = spectrum.dataset_value_fn(loss_fn, (inputs, targets))
      full_batch = lambda params: loss_fn(params, (inputs.reshape(32, 6), targets.reshape(32)))
      return [
        (
          f(params),
          ravel_pytree(curvature.hvp(f, params, tangent))[0],
          # Same key, same probes: the forward-over-forward forms run batch by batch too.
          spectrum.hessian_trace(f, params, key=24, num_probes=5).value,
        )
        for f in (value_fn, full_batch)
      ]

    tangent = jax.tree.map(lambda leaf: jnp.cos(jnp.arange(leaf.size).reshape(leaf.shape)), params)
    (value, product, trace), (expected_value, expected, expected_trace) = (
      values_products_and_traces(params, tangent)
    )
    np.testing.assert_allclose(value, expected_value, rtol=1e-13)
    np.testing.assert_allclose(product, expected, rtol=1e-11)
    np.testing.assert_allclose(trace, expected_trace, rtol=1e-11)
    assert abs(float(expected_trace)) > 0.1
    assert float(jnp.max(jnp.abs(expected))) > 0.1

    with pytest.raises(ValueError, match="leading axis"):
      spectrum.dataset_value_fn(loss_fn, (inputs, targets[:3]))


def test_dataset_value_fn_weights_a_padded_last_batch_by_its_real_examples():
  # 10 examples in batches of 4: the last batch holds 2 and 2 of padding, masked in the loss.
  with jax.enable_x64(True):
    inputs = jax.random.normal(jax.random.key(25), (10, 3), jnp.float64)
    targets = jnp.sin(inputs.sum(axis=1))
    mask = jnp.arange(12) < 10
    batches = (
      jnp.pad(inputs, ((0, 2), (0, 0))).reshape(3, 4, 3),
      jnp.pad(targets, (0, 2)).reshape(3, 4),
      mask.reshape(3, 4),
    )

    def per_example(w, x, y):
      return (jnp.tanh(x @ w) - y) ** 2

    def loss_fn(w, batch):
      x, y, real = batch
      return jnp.sum(jnp.where(real, per_example(w, x, y), 0.0)) / jnp.sum(real)

    w = jnp.array([0.3, -0.5, 0.8])
    full = lambda w: jnp.mean(per_example(w, inputs, targets))
    weighted = spectrum.dataset_value_fn(loss_fn, batches, weights=mask.reshape(3, 4).sum(1))
    equal = spectrum.dataset_value_fn(loss_fn, batches)
    np.testing.assert_allclose(weighted(w), full(w), rtol=1e-13)
    np.testing.assert_allclose(
      curvature.hvp(weighted, w, jnp.ones(3)), curvature.hvp(full, w, jnp.ones(3)), rtol=1e-12
    )
    # Equal weights count the two real examples of the last batch twice as much.
    assert abs(float(equal(w)) - float(full(w))) > 1e-3
    np.testing.assert_allclose(
      spectrum.dataset_value_fn(loss_fn, batches, weights=[2.0, 2.0, 2.0])(w), equal(w), rtol=1e-14
    )
    # A batch of padding only has the loss 0 / 0; weighted 0 it does not count, nor does its
    # gradient. Booleans select batches.
    with_empty = jax.tree.map(
      lambda leaf: jnp.concatenate([leaf, jnp.zeros_like(leaf[:1])]), batches
    )
    first_two = spectrum.dataset_value_fn(loss_fn, jax.tree.map(lambda leaf: leaf[:2], batches))
    for weights, reference in (([4, 4, 2, 0], weighted), ([True, True, False, False], first_two)):
      selected = spectrum.dataset_value_fn(loss_fn, with_empty, weights=jnp.asarray(weights))
      np.testing.assert_allclose(selected(w), reference(w), rtol=1e-13)
      assert np.all(np.isfinite(jax.grad(selected)(w)))
    # Traced, the same weights give a NaN loss; a negative weight used to drop its batch from the
    # sum but not from the total weight.
    traced = jax.jit(
      lambda weights: spectrum.dataset_value_fn(loss_fn, batches, weights=weights)(w)
    )
    for bad in ([1.0, -1.0, 1.0], [1.0, jnp.inf, 1.0], [0.0, 0.0, 0.0]):
      assert np.isnan(traced(jnp.asarray(bad)))
    np.testing.assert_allclose(traced(jnp.asarray([4.0, 4.0, 2.0])), full(w), rtol=1e-13)
  for bad, error in [
    ([1.0, 1.0], ValueError),
    ([0.0, 0.0, 0.0], ValueError),
    ([1, -1, 1], ValueError),
    ([1j, 1, 1], TypeError),
  ]:
    with pytest.raises(error, match="dataset_value_fn: weights"):
      spectrum.dataset_value_fn(loss_fn, batches, weights=jnp.asarray(bad))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads XLA:CPU's compiled HLO")
def test_monitor_curvature_adds_no_parameter_copies_to_a_donated_training_step():
  # The monitor's cond reads params; unless the updates depend on its result, XLA cannot order
  # it before the in-place update of donated params and copies every parameter at every step.
  params = {"w1": jnp.full((64, 32), 0.1), "b1": jnp.zeros(32), "w2": jnp.full((32, 4), 0.1)}
  batch = (jnp.ones((16, 64)), jnp.ones((16, 4)))

  def loss(params, batch):
    inputs, targets = batch
    hidden = jnp.tanh(inputs @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - targets) ** 2)

  def parameter_copies(tx):
    def step(params, state, batch):
      value_fn = lambda params: loss(params, batch)  # noqa: E731
      updates, state = tx.update(jax.grad(value_fn)(params), state, params, value_fn=value_fn)
      return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), batch).compile()
    text = compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    shapes = {f"f32[{','.join(map(str, leaf.shape))}]" for leaf in jax.tree.leaves(params)}
    copied = [line.split("= ")[1].split("{")[0] for line in entry.splitlines() if " copy(" in line]
    return sorted(shape for shape in copied if shape in shapes)

  monitored = optax.chain(optax.sgd(0.1), spectrum.monitor_curvature(every=10, num_lanczos_steps=3))
  assert parameter_copies(monitored) == parameter_copies(optax.sgd(0.1))


def test_monitor_fields_are_found_by_name_beside_negative_curvature_descent():
  # The obvious pairing: monitoring a run of NC descent, whose state records its own estimate.
  tx = optax.chain(
    jaxsaddle.negative_curvature_descent(
      0.1, hessian_lipschitz=1.0, epsilon=1e-3, num_lanczos_steps=4, gradient_threshold=1e3
    ),
    spectrum.monitor_curvature(every=1, num_lanczos_steps=4),
  )
  value_fn = lambda p: jnp.sum(jnp.arange(-1.0, 3.0) * p**2)  # noqa: E731
  params = jnp.ones(4)
  _, state = tx.update(params, tx.init(params), params, value_fn=value_fn)
  np.testing.assert_allclose(optax.tree.get(state, "smallest_eigenvalue"), -2.0, rtol=1e-5)
  np.testing.assert_allclose(optax.tree.get(state, "largest_eigenvalue"), 4.0, rtol=1e-5)
  np.testing.assert_allclose(optax.tree.get(state, "last_smallest_eigenvalue"), -2.0, rtol=1e-5)


def test_monitor_curvature_passes_updates_and_records_eigenvalues_at_the_right_steps():
  with jax.enable_x64(True):
    matrix = jnp.asarray(_rotated(np.linspace(-1.0, 3.0, 6), 24))

    def value_fn(x):
      return 0.5 * x @ matrix @ x + 0.25 * jnp.sum(x**4)

    def hessian(x):
      return np.asarray(matrix) + 3 * np.diag(np.asarray(x) ** 2)

    monitor = spectrum.monitor_curvature(every=3, num_lanczos_steps=6, key=25)
    tx = optax.chain(optax.sgd(0.05), monitor)
    plain = optax.sgd(0.05)

    @jax.jit
    def step(params, state, plain_state):
      grads = jax.grad(value_fn)(params)
      updates, state = tx.update(grads, state, params, value_fn=value_fn)
      plain_updates, plain_state = plain.update(grads, plain_state, params)
      passed, _ = monitor.update(grads, state[1], params, value_fn=value_fn)
      return updates, state, plain_state, plain_updates, passed, grads

    params = jnp.linspace(-1.0, 1.0, 6)
    state, plain_state = tx.init(params), plain.init(params)
    assert np.isnan(optax.tree.get(state, "smallest_eigenvalue"))
    recorded = {}
    for count in range(7):
      updates, state, plain_state, plain_updates, passed, grads = step(params, state, plain_state)
      np.testing.assert_array_equal(updates, plain_updates)  # bitwise
      np.testing.assert_array_equal(passed, grads)
      taken_at = int(optax.tree.get(state, "eigenvalue_step"))
      assert taken_at == count - count % 3
      if taken_at == count:
        recorded[count] = np.linalg.eigvalsh(hessian(params))
      expected = recorded[taken_at]
      np.testing.assert_allclose(
        [optax.tree.get(state, "smallest_eigenvalue"), optax.tree.get(state, "largest_eigenvalue")],
        [expected[0], expected[-1]],
        rtol=1e-8,
      )
      params = optax.apply_updates(params, updates)
    assert sorted(recorded) == [0, 3, 6]
    assert not np.allclose(recorded[0], recorded[6])  # the Hessian moved

    with pytest.raises(ValueError, match="value_fn"):
      monitor.update(params, monitor.init(params), params)

    # A NaN loss is recorded as NaN extremes at that step, not as a spectrum; updates still pass.
    nan_loss = lambda x: value_fn(x) + jnp.nan  # noqa: E731
    passed, nan_state = jax.jit(lambda g, s, p: monitor.update(g, s, p, value_fn=nan_loss))(
      params, monitor.init(params), params
    )
    np.testing.assert_array_equal(passed, params)
    assert int(nan_state.eigenvalue_step) == 0
    assert np.isnan(float(nan_state.smallest_eigenvalue))
    assert np.isnan(float(nan_state.largest_eigenvalue))
    assert np.isnan(float(nan_state.smallest_residual))
    assert np.isnan(float(nan_state.largest_residual))


def test_top_eigenvalues_of_digits_mlp_match_dense_hessian():
  datasets = pytest.importorskip("sklearn.datasets")
  from flax import nnx

  # The first 500 of the 1797 images keep the dense Hessian cheap.
  digits = datasets.load_digits()
  inputs = jnp.asarray(digits.data[:500] / 16.0, jnp.float32)
  labels = jnp.asarray(digits.target[:500])

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(64, 8, rngs=rngs)
      self.output = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
      return self.output(jnp.tanh(self.hidden(x)))

  def loss_fn(model, inputs, labels):
    logits = model(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  model = MLP(nnx.Rngs(0))
  value_fn = jaxsaddle.flax.make_value_fn(model, loss_fn, inputs, labels)
  tx = optax.adam(1e-2)

  @jax.jit
  def train(params):
    def body(_, carry):
      params, state = carry
      updates, state = tx.update(jax.grad(value_fn)(params), state, params)
      return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, 100, body, (params, tx.init(params)))[0]

  params = train(nnx.state(model, nnx.Param))
  assert float(value_fn(params)) < 0.5  # trained well past the initial ln(10)

  flat, unravel = ravel_pytree(params)
  assert flat.size == 64 * 8 + 8 + 8 * 10 + 10
  dense = np.asarray(jax.jit(jax.hessian(lambda x: value_fn(unravel(x))))(flat), np.float64)
  expected = np.linalg.eigvalsh((dense + dense.T) / 2)[::-1][:3]

  pairs = jax.jit(
    lambda params, key: spectrum.hessian_extreme_eigenvalues(
      value_fn, params, num_steps=40, key=key, k=3
    )
  )(params, jax.random.key(26))
  np.testing.assert_allclose(pairs.eigenvalues, expected, rtol=1e-3)
  assert float(jnp.max(pairs.residual_norms)) < 1e-2 * expected[0]

  # restrict on an nnx.State: the output layer's kernel and bias, the rest held fixed.
  layer_fn, layer_params = spectrum.restrict(value_fn, params, "output")
  assert [leaf.shape for leaf in jax.tree.leaves(layer_params)] == [(10,), (8, 10)]
  # Not a constant shift: softmax ignores those in the output layer.
  shift = lambda leaf: leaf + 0.1 * jnp.cos(jnp.arange(leaf.size)).reshape(leaf.shape)
  moved = jax.tree.map(shift, layer_params)
  shifted = jax.tree_util.tree_map_with_path(
    lambda path, leaf: shift(leaf) if path[0].key == "output" else leaf, params
  )
  np.testing.assert_allclose(layer_fn(moved), value_fn(shifted), rtol=1e-6)
  assert abs(float(value_fn(shifted)) - float(value_fn(params))) > 1e-3


def test_non_finite_loss_raises_eagerly_and_gives_nan_under_jit():
  def nan_below_zero(x):
    return jnp.sum(x**2) + jnp.log(x[0])  # -inf at x[0] = 0, NaN below

  params = jnp.array([-1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="NaN or infinite"):
    spectrum.hessian_trace(nan_below_zero, params, key=0, num_probes=2)

  @jax.jit
  def under_jit(params):
    # Three parameters and two steps: classify_critical_point takes its Lanczos and SLQ path.
    return (
      spectrum.hessian_extreme_eigenvalues(nan_below_zero, params, num_steps=2, key=0),
      spectrum.hessian_trace(nan_below_zero, params, key=0, num_probes=4, method="hutch++"),
      spectrum.hessian_density(nan_below_zero, params, key=0, num_probes=2, num_steps=2),
      spectrum.classify_critical_point(
        nan_below_zero, params, gradient_tol=1.0, eigenvalue_tol=1e-3, num_steps=2, key=0
      ),
    )

  *spectra, report = under_jit(params)
  # Every floating-point output is NaN; counts (the Ritz pairs' num_steps) stay counts.
  for output in jax.tree.leaves(spectra) + list(report[1:]):
    if jnp.issubdtype(output.dtype, jnp.floating):
      assert bool(jnp.all(jnp.isnan(output)))
    else:
      assert output is spectra[0].num_steps
  assert spectrum.CRITICAL_POINT_KINDS[int(report.kind)] == "not critical"

  # At (1, 3, 3) the same function is finite, with Hessian diag(1, 2, 2).
  *spectra, report = under_jit(params + 2)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(spectra) + list(report))
  np.testing.assert_allclose(spectra[0].eigenvalues, 2.0, rtol=1e-5)
  np.testing.assert_allclose(
    [report.smallest_eigenvalue, report.largest_eigenvalue, report.gradient_norm],
    [1.0, 2.0, 9.0],
    rtol=1e-5,
  )
  assert float(report.index) == 0.0 and float(report.degeneracy) == 0.0
  assert report.kind_name == "not critical"

  # A finite loss, and finite products, whose Hessian, 1e37 diag(1, ..., 100), has a norm
  # beyond float32's range: the quadratic forms overflow. (1e20 diag(1, 2, 3) overflowed the
  # squared norms of SLQ before they were scaled; it is resolved now.)
  def huge(x):
    return 1e37 * jnp.sum(jnp.arange(1.0, 101.0) * x**2) / 2

  with pytest.raises(ValueError, match="overflowed"):
    spectrum.hessian_density(huge, jnp.zeros(100), key=0, num_probes=2, num_steps=3)
  density = jax.jit(lambda x: spectrum.hessian_density(huge, x, key=0, num_probes=2, num_steps=3))(
    jnp.zeros(100)
  )
  assert bool(jnp.all(jnp.isnan(density.nodes))) and bool(jnp.all(jnp.isnan(density.density)))

  for poison in (jnp.nan, jnp.inf):
    poisoned = jnp.array([1.0, -2.0, poison])
    masses = spectrum.degeneracy(poisoned)
    assert np.isnan(masses.near_zero_mass) and np.isnan(masses.negative_mass)
    fit = spectrum.semicircle_fit(poisoned)
    assert np.isnan(fit.outlier_mass) and np.isnan(fit.ks_distance) and np.isnan(fit.radius)
  # A point mass is a semicircle of zero radius: finite scores, no outliers.
  point = spectrum.semicircle_fit(jnp.ones(3))
  np.testing.assert_allclose(point.center, 1.0)
  assert float(point.radius) < 1e-6
  assert np.isfinite(point.ks_distance) and float(point.outlier_mass) == 0.0


def test_bad_input_raises():
  params = jnp.ones(3)
  vector_valued = lambda x: x**2
  quadratic = lambda x: jnp.sum(x**2)
  with pytest.raises(ValueError, match="scalar"):
    spectrum.hessian_extreme_eigenvalues(vector_valued, params, num_steps=3, key=0)
  with pytest.raises(ValueError, match="scalar"):
    spectrum.hessian_density(lambda x: (jnp.sum(x), x), params, key=0, num_probes=1, num_steps=2)
  with pytest.raises(ValueError, match="num_steps"):
    spectrum.hessian_extreme_eigenvalues(quadratic, params, num_steps=0, key=0)
  for empty in ({}, {"w": jnp.zeros((0, 3))}):
    with pytest.raises(ValueError, match="no array elements"):
      spectrum.hessian_trace(quadratic, empty, key=0, num_probes=2)
  with pytest.raises(ValueError, match="num_steps"):
    spectrum.hessian_density(quadratic, params, key=0, num_probes=2, num_steps=0)
  with pytest.raises(ValueError, match="num_probes"):
    spectrum.hessian_density(quadratic, params, key=0, num_probes=0, num_steps=2)
  with pytest.raises(ValueError, match="num_probes"):
    spectrum.hessian_trace(quadratic, params, key=0, num_probes=0)
  with pytest.raises(TypeError, match="num_steps sets a loop length"):
    spectrum.hessian_density(quadratic, params, key=0, num_probes=2, num_steps=5.0)
  with pytest.raises(ValueError, match="hutch\\+\\+ needs"):
    spectrum.hessian_trace(quadratic, params, key=0, num_probes=2, method="hutch++")
  with pytest.raises(ValueError, match="method"):
    spectrum.hessian_trace(quadratic, params, key=0, num_probes=2, method="exact")
  with pytest.raises(ValueError, match="which"):
    spectrum.hessian_extreme_eigenvalues(quadratic, params, num_steps=3, key=0, which="top")
  with pytest.raises(TypeError, match="k sets a loop length"):
    spectrum.hessian_extreme_eigenvalues(quadratic, params, num_steps=3, key=0, k="2")
  with pytest.raises(ValueError, match="distribution"):
    spectrum.hessian_density(
      quadratic, params, key=0, num_probes=1, num_steps=2, distribution="uniform"
    )
  with pytest.raises(TypeError, match="dtype int32"):
    spectrum.hessian_trace(quadratic, jnp.ones(3, jnp.int32), key=0, num_probes=2)
  with pytest.raises(ValueError, match="probe_radii"):
    spectrum.classify_critical_point(
      quadratic,
      params,
      gradient_tol=1e-3,
      eigenvalue_tol=1e-3,
      num_steps=2,
      key=0,
      probe_radii=(0.1, -1.0),
    )
  with pytest.raises(ValueError, match="selects no parameter"):
    spectrum.restrict(quadratic, {"a": params}, "b")
  restriction = spectrum.restrict(
    lambda t: quadratic(t["a"]) + quadratic(t["b"]),
    {
      "a": params,
      "b": jnp.ones(2),
    },
    "b",
  )
  with pytest.raises(ValueError, match="argument must have the tree structure of sub_params"):
    restriction.value_fn({"a": params, "b": jnp.ones(2)})  # the full tree, not the subtree
  with pytest.raises(ValueError, match=r"argument at \['b'\] has shape \(3,\)"):
    restriction.value_fn({"a": None, "b": jnp.ones(3)})  # would broadcast into the loss
  vector_loss = spectrum.dataset_value_fn(lambda p, batch: p * jnp.sum(batch), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="must return the scalar floating-point loss"):
    spectrum.hessian_trace(vector_loss, params, key=0, num_probes=2)
  with pytest.raises(ValueError, match="1-D array"):
    spectrum.degeneracy(jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="two scalars"):
    spectrum.degeneracy((0.0, -3.0))  # two eigenvalues, not a node and its weight
  with pytest.raises(ValueError, match="weights must be non-negative"):
    spectrum.degeneracy((jnp.array([0.0, -2.0]), jnp.array([1.0, -0.5])))
  with pytest.raises(ValueError, match="grid must be a 1-D array"):
    spectrum.hessian_density(quadratic, params, key=0, num_probes=1, num_steps=2, grid=1.0)
  with pytest.raises(ValueError, match="one shape"):
    spectrum.semicircle_fit((jnp.ones((2, 3)), jnp.ones((2, 2))))
  with pytest.raises(ValueError, match="power"):
    spectrum.spectral_moment((jnp.ones((2, 3)), jnp.ones((2, 3))), -1)
  with pytest.raises(ValueError, match="every"):
    spectrum.monitor_curvature(every=0, num_lanczos_steps=3)
  # Named by the function called, not by the curvature helper that used to check them.
  for bad in (dict(which="top"), dict(k=4), dict(tol=-1.0)):
    with pytest.raises(ValueError, match="^hessian_extreme_eigenvalues: "):
      spectrum.hessian_extreme_eigenvalues(quadratic, params, num_steps=3, key=0, **bad)


def test_monitor_curvature_keeps_residuals_that_tell_converged_estimates_from_unconverged_ones():
  # 200 eigenvalues evenly in [-1, 1]: a few Lanczos steps leave both extremes far off, and the
  # residuals recorded beside them say so; many steps converge both, with small residuals.
  diagonal = jnp.linspace(-1.0, 1.0, 200)
  value_fn = lambda p: 0.5 * jnp.sum(diagonal * p**2)  # noqa: E731
  params = jnp.ones(200)

  def recorded(num_lanczos_steps):
    monitor = spectrum.monitor_curvature(every=1, num_lanczos_steps=num_lanczos_steps, key=3)
    state = monitor.init(params)
    assert np.isnan(float(state.smallest_residual)) and np.isnan(float(state.largest_residual))
    _, state = jax.jit(lambda s: monitor.update(params, s, params, value_fn=value_fn))(state)
    return (
      np.array([state.smallest_eigenvalue, state.largest_eigenvalue]),
      np.array([state.smallest_residual, state.largest_residual]),
    )

  few, few_residuals = recorded(4)
  errors = np.abs(few - [-1.0, 1.0])
  assert np.all(errors > 0.05)
  assert np.all(few_residuals > 0.05)
  # Some eigenvalue lies within the residual of each estimate (the spectrum is dense here).
  for estimate, residual in zip(few, few_residuals, strict=True):
    assert np.min(np.abs(np.asarray(diagonal) - estimate)) <= residual
  many, many_residuals = recorded(80)
  np.testing.assert_allclose(many, [-1.0, 1.0], atol=1e-4)
  assert np.all(many_residuals < 1e-4)
  assert np.all(np.abs(many - [-1.0, 1.0]) <= many_residuals + 1e-5)


def test_python_float_leaves_are_parameters_like_arrays():
  # They used to fail in the probes with "'float' object has no attribute 'size'".
  value_fn = lambda p: 3.0 * p["e"] ** 2 + jnp.sum(p["f"] ** 2)
  params = {"e": 2.0, "f": jnp.ones(2)}
  trace = spectrum.hessian_trace(value_fn, params, key=0, num_probes=2)
  assert float(trace.value) == pytest.approx(10.0, rel=1e-6)
  density = spectrum.hessian_density(value_fn, params, key=0, num_probes=2, num_steps=3)
  assert float(spectrum.degeneracy(density).negative_mass) == 0.0
  report = spectrum.classify_critical_point(
    value_fn,
    {"e": 0.0, "f": jnp.zeros(2)},
    gradient_tol=1e-6,
    eigenvalue_tol=1e-3,
    num_steps=3,
    key=0,
  )
  assert report.kind_name == "minimum"
  np.testing.assert_allclose(
    [report.smallest_eigenvalue, report.largest_eigenvalue], [2.0, 6.0], rtol=1e-6
  )
  top = spectrum.hessian_extreme_eigenvalues(value_fn, params, num_steps=3, key=0)
  np.testing.assert_allclose(top.eigenvalues, [6.0], rtol=1e-6)


def test_unconverged_lanczos_makes_the_classification_undetermined_not_a_minimum():
  # lambda_min = -0.02 below a cluster from 0.01 to 100: 20 steps leave the smallest Ritz value
  # at +0.07 with a residual of about 0.4, which used to read "minimum".
  eigenvalues = np.concatenate([[-0.02], np.geomspace(0.01, 100, 199)])
  matrix = jnp.asarray(_rotated(eigenvalues, 0), jnp.float32)
  classify = jax.jit(
    lambda num_steps: spectrum.classify_critical_point(
      _quadratic(matrix),
      jnp.zeros(200),
      gradient_tol=1e-4,
      eigenvalue_tol=1e-3,
      num_steps=num_steps,
      key=0,
    ),
    static_argnums=0,
  )
  early = classify(20)
  assert early.kind_name == "undetermined"
  assert float(early.smallest_eigenvalue) > 1e-3
  assert float(early.smallest_eigenvalue - early.smallest_residual) < -1e-3
  late = classify(100)
  assert late.kind_name == "strict saddle"
  assert float(late.smallest_eigenvalue) == pytest.approx(-0.02, abs=2e-3)


def test_ordinary_float32_minima_stay_minima_under_the_convergence_and_probe_rules():
  def classify(value_fn, params, num_steps):
    return spectrum.classify_critical_point(
      value_fn, params, gradient_tol=1e-4, eigenvalue_tol=1e-3, num_steps=num_steps, key=0
    )

  # A large loss: the probe's changes (0.01) are far above float32's rounding at 1000.
  assert classify(lambda w: 1000 + w[0] ** 2 + w[1] ** 4, jnp.zeros(2), 5).kind_name == "minimum"
  assert classify(lambda w: 10 + w[0] ** 4 + w[1] ** 4, jnp.zeros(2), 5).kind_name == "minimum"
  # A Lanczos pair converged to 1% of its value (theta 1.00005, residual 0.003) though not to
  # tau, in float32 and with bfloat16 params.
  scales = jnp.linspace(1.0, 2.0, 40)
  quadratic = lambda p: 0.5 * jnp.sum(scales * p.astype(jnp.float32) ** 2)
  for dtype in (jnp.float32, jnp.bfloat16):
    report = classify(quadratic, jnp.zeros(40, dtype), 15)
    assert float(report.smallest_residual) > 1e-3
    assert report.kind_name == "minimum"
  # Near a flat minimum with a gradient inside the tolerance (3e-6), the probe's decreases
  # along it are what that gradient explains, not a sign of an unprovable saddle.
  near = jnp.array([0.0, 0.009])
  assert classify(lambda w: w[0] ** 2 + w[1] ** 4, near, 5).kind_name == "minimum"
  # A NaN loss at a probe point of a large loss still leaves the minimum unproven.
  undefined = lambda w: jnp.where(jnp.sum(w**2) > 0.05**2, jnp.nan, 1000 + w[0] ** 2 + w[1] ** 4)
  with pytest.raises(ValueError, match="loss is NaN at a point of the higher-order probe"):
    classify(undefined, jnp.zeros(2), 5)


def test_an_unconverged_pair_reads_no_minimum_and_a_negative_slq_node_makes_a_strict_saddle():
  # lambda_min = -0.5 below 199 eigenvalues in [1, 2]: 3 steps left the extreme pair positive
  # (1.12 with residual 0.23 on the diagonal), which read "minimum", while SLQ's probes had a
  # node near -0.5.
  eigenvalues = np.concatenate([[-0.5], np.linspace(1.0, 2.0, 199)])
  matrix = jnp.asarray(_rotated(eigenvalues, 0), jnp.float32)

  def classify(matrix, key):
    return spectrum.classify_critical_point(
      _quadratic(matrix),
      jnp.zeros(200),
      gradient_tol=1e-4,
      eigenvalue_tol=1e-3,
      num_steps=3,
      key=key,
    )

  report = classify(matrix, 1)
  assert float(report.smallest_eigenvalue) > 0 and float(report.index) > 0
  assert report.kind_name == "strict saddle"
  # A positive definite Hessian whose pair has not converged in 3 steps is no proven minimum.
  positive = jnp.asarray(_rotated(np.linspace(1.0, 2.0, 200), 0), jnp.float32)
  report = classify(positive, 1)
  assert float(report.smallest_residual) > 1e-3
  assert report.kind_name == "undetermined"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_params_round_no_minimum_into_a_degenerate_saddle(dtype):
  # 2 + x^4 + y^4, written so that rounding in the narrow dtype shows: a minimum, whose probe
  # read decreases of 0.03 (bfloat16) and 0.003 (float16) from rounding alone. Every change the
  # probe sees is within its rounding allowance, so it cannot tell this minimum from a
  # degenerate saddle: undetermined (it had read "minimum", and so had the bfloat16 degenerate
  # saddle below).
  value_fn = lambda w: jnp.sum((1 + w) ** 4 - 4 * w - 6 * w**2 - 4 * w**3)
  report = spectrum.classify_critical_point(
    value_fn, jnp.zeros(2, dtype), gradient_tol=1e-4, eigenvalue_tol=1e-3, num_steps=5, key=0
  )
  assert report.kind_name == "undetermined"
  assert float(report.probe_decrease) > 0  # rounding's
  assert float(report.smallest_residual) == 0.0  # the dense path
  product = lambda w: (w[0] * w[1] * w[2] - 1.0) ** 2
  # Its descent at radius 1 (0.34) is within bfloat16's allowance, not float16's.
  narrow_kind = "undetermined" if dtype == jnp.bfloat16 else "degenerate saddle"
  for params, kind in [(jnp.zeros(3, dtype), narrow_kind), (jnp.zeros(3), "degenerate saddle")]:
    report = spectrum.classify_critical_point(
      product,
      params,
      gradient_tol=1e-4,
      eigenvalue_tol=1e-3,
      num_steps=3,
      key=0,
      probe_radii=(0.3, 0.5, 1.0),
    )
    assert report.kind_name == kind
  # Narrow params with a float32 loss: the loss's rounding is float32's, so the r^3 descent of
  # 1 + x^2 - y^3 is seen.
  mixed = lambda w: 1 + w.astype(jnp.float32)[0] ** 2 - w.astype(jnp.float32)[1] ** 3
  report = spectrum.classify_critical_point(
    mixed, jnp.zeros(2, dtype), gradient_tol=1e-4, eigenvalue_tol=1e-3, num_steps=5, key=0
  )
  assert report.kind_name == "degenerate saddle"


@pytest.mark.parametrize("reorthogonalize", [True, "partial", False])
def test_estimated_residuals_cover_the_rounding_of_bfloat16_products(reorthogonalize):
  # The operator computes in the leaves' bfloat16: its rounding, not the recursion's float32,
  # bounds how close the Ritz values come (the estimates were 7e-7 for errors of 2e-3).
  eigenvalues = np.linspace(-1.0, 10.0, 30)
  matrix = jnp.asarray(_rotated(eigenvalues, 1), jnp.float32)
  value_fn = lambda x: 0.5 * x.astype(jnp.float32) @ matrix @ x.astype(jnp.float32)
  result = spectrum.hessian_extreme_eigenvalues(
    value_fn,
    jnp.zeros(30, jnp.bfloat16),
    num_steps=30,
    key=0,
    which="both",
    reorthogonalize=reorthogonalize,
    exact_residuals=False,
  )
  errors = np.abs(np.asarray(result.eigenvalues) - eigenvalues[[0, -1]])
  assert np.all(errors <= np.asarray(result.residual_norms))


def test_a_hessian_too_small_for_float32_lanczos_is_reported_not_turned_into_a_density():
  # A [-1, 10] spectrum scaled by 1e-33, below tiny n / eps = 3e-30: the recursion's
  # rounding-level coefficients are subnormal. (At 1e-20, where unscaled squared norms
  # underflowed, the nodes collapsed to one per probe with no negative mass; now the density
  # and the classification below are right there.)
  matrix = jnp.asarray(_rotated(np.linspace(-1.0, 10.0, 30), 2) * 1e-33, jnp.float32)
  density = functools.partial(
    spectrum.hessian_density, _quadratic(matrix), jnp.zeros(30), key=0, num_probes=2, num_steps=10
  )
  with pytest.raises(ValueError, match="too small for Lanczos in float32"):
    density()
  assert np.all(np.isnan(jax.jit(density)().density))
  # The classification cannot resolve the sign of the smallest eigenvalue either, whether its
  # Ritz value lies above -eigenvalue_tol or below: the tridiagonal is no longer the projection.
  # One compilation for the three matrices and tolerances below.
  classify = jax.jit(
    lambda matrix, tol: spectrum.classify_critical_point(
      _quadratic(matrix), jnp.zeros(30), gradient_tol=0.0, eigenvalue_tol=tol, num_steps=10, key=0
    )
  )
  for low, high in ((-1.0, 10.0), (-10.0, 1.0)):
    matrix = jnp.asarray(_rotated(np.linspace(low, high, 30), 2) * 1e-33, jnp.float32)
    report = classify(matrix, 1e-36)
    assert report.kind_name == "undetermined"
    assert np.isnan(report.index) and np.isnan(report.degeneracy)
  # At 1e-20: three of the thirty eigenvalues are negative.
  matrix = jnp.asarray(_rotated(np.linspace(-1.0, 10.0, 30), 2) * 1e-20, jnp.float32)
  report = classify(matrix, 1e-23)
  assert report.kind_name == "strict saddle"
  np.testing.assert_allclose(float(report.index), 0.1, atol=0.02)
  # One probe in a tiny eigenspace is no underflow when another sees the Hessian's norm, 4.
  rank_one = lambda x: 0.5 * jnp.sum(x) ** 2 + 0.5e-35 * jnp.sum(x**2)
  for key in range(4):
    spectrum.hessian_density(rank_one, jnp.zeros(4), key=key, num_probes=4, num_steps=3)
  # A zero Hessian is resolved exactly: all its mass at 0.
  zero = spectrum.hessian_density(
    lambda x: jnp.sum(x), jnp.zeros(30), key=0, num_probes=2, num_steps=10
  )
  assert float(spectrum.degeneracy(zero, tol=0.0, atol=0.0).near_zero_mass) == 1.0


def test_a_float32_loss_returned_in_float64_keeps_float32_s_rounding_allowance():
  # At a true minimum of 1 + sum((x+1)^4 - 4x - 6x^2 - 4x^3 - 1), computed in float32: cast to
  # float64, its rounding noise (4e-7) read as higher-order descent.
  def value_fn(x):
    loss = 1 + jnp.sum((x + 1) ** 4 - 4 * x - 6 * x**2 - 4 * x**3 - 1)
    return loss.astype(jnp.float64)

  with jax.enable_x64(True):
    report = spectrum.classify_critical_point(
      value_fn,
      jnp.zeros(2, jnp.float32),
      gradient_tol=1e-4,
      eigenvalue_tol=1e-3,
      num_steps=5,
      key=0,
    )
  assert report.kind_name == "minimum"
