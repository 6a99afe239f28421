"""Bad input across the public API: a clear error naming the problem, or NaN, never a number.

Each case is one a silent wrong answer or a foreign error message once answered; the errors
raised where the input is concrete, the NaN where it is traced (under ``jit``), as the README's
bad-input contract says.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsaddle
from jaxsaddle import analysis
from jaxsaddle import curvature
from jaxsaddle import problems
from jaxsaddle import spectrum
from jaxsaddle._random import canonicalize_key
from jaxsaddle.spectrum import _density


def _quadratic(params):
  return 0.5 * jnp.sum(params * params)


SPECTRUM_ERRORS = [
  # A complex spectrum lost its imaginary part; an empty one failed inside a reduction.
  (lambda: spectrum.degeneracy(jnp.array([1 + 5j, -2 + 0j])), TypeError, "nodes must be real"),
  (lambda: spectrum.semicircle_fit(jnp.array([1 + 5j, -2 + 0j])), TypeError, "must be real"),
  (lambda: spectrum.degeneracy(jnp.zeros(0)), ValueError, "spectrum is empty"),
  # spectral_moment accepted negative weights that degeneracy rejects.
  (
    lambda: spectrum.spectral_moment((jnp.ones((1, 2)), -jnp.ones((1, 2))), 2),
    ValueError,
    "weights must be non-negative",
  ),
  (
    lambda: spectrum.hessian_density(
      _quadratic, jnp.ones(3), key=0, num_probes=1, num_steps=2, grid=jnp.linspace(0, 1, 5) + 1j
    ),
    TypeError,
    "grid must hold real numbers",
  ),
  # A 1-D array of eigenvalues was split into two scalars and reported as shapes () and ().
  (
    lambda: spectrum.spectral_moment(jnp.ones(5), 2),
    ValueError,
    "SpectralDensity or a \\(nodes, weights\\) pair",
  ),
  # RitzPairs, a NamedTuple of five fields, failed inside jnp.asarray (with eigenvectors, as
  # "Cannot concatenate arrays with different numbers of dimensions").
  *[
    (
      lambda fn=fn: fn(
        spectrum.hessian_extreme_eigenvalues(_quadratic, jnp.ones(3), num_steps=2, key=0)
      ),
      ValueError,
      "got RitzPairs.*pairs.eigenvalues",
    )
    for fn in (spectrum.degeneracy, spectrum.semicircle_fit)
  ],
  # jnp.mean turned an integer loss, whose Hessian is zero, into a float one.
  (
    lambda: spectrum.hessian_trace(
      spectrum.dataset_value_fn(
        lambda p, b: (100 * jnp.sum(p * p) * b.sum()).astype(jnp.int32), jnp.ones((2, 1))
      ),
      jnp.ones(2),
      key=0,
      num_probes=2,
    ),
    ValueError,
    "scalar floating-point loss",
  ),
]


@pytest.mark.parametrize(("call", "error", "message"), SPECTRUM_ERRORS)
def test_bad_spectrum_input_raises(call, error, message):
  with pytest.raises(error, match=message):
    call()


def test_low_precision_spectra_are_analysed_in_at_least_float32():
  # In float16 the 70,000 unit weights summed past 65504: the mass near zero came out 0 and the
  # fit NaN, with no error; bfloat16 eigenvalues gave a fit off by 2%, now the float32 fit.
  assert float(spectrum.degeneracy(jnp.zeros(70_000, jnp.float16)).near_zero_mass) == 1.0
  eigenvalues = jnp.linspace(-1.0, 1.0, 70_000).astype(jnp.bfloat16)
  low, single = (
    spectrum.semicircle_fit(eigenvalues),
    spectrum.semicircle_fit(eigenvalues.astype(jnp.float32)),
  )
  assert low.radius.dtype == jnp.float32
  np.testing.assert_allclose([low.center, low.radius], [single.center, single.radius])
  # 300 squared is past float16's largest number.
  nodes, weights = jnp.full((1, 1), 300.0, jnp.float16), jnp.ones((1, 1), jnp.float16)
  np.testing.assert_allclose(spectrum.spectral_moment((nodes, weights), 2).value, 90_000.0)


def test_overflowing_float16_hessian_products_are_recorded_as_nan_not_as_a_spectrum():
  # Finite loss and gradient, but Hessian-vector products past 65504: the monitor recorded
  # +inf for both extremes and NC descent +inf for lambda_min (a positive-definite Hessian).
  params = jnp.zeros(2, jnp.float16)
  value_fn = lambda p: 0.5e5 * p[0] ** 2 - 0.5 * p[1] ** 2  # noqa: E731
  grads = jax.grad(value_fn)(params)
  monitor = jaxsaddle.monitor_curvature(every=1, num_lanczos_steps=2)
  _, state = monitor.update(grads, monitor.init(params), params, value_fn=value_fn)
  assert np.isnan([state.smallest_eigenvalue, state.largest_eigenvalue]).all()
  descent = jaxsaddle.negative_curvature_descent(
    0.1, hessian_lipschitz=1.0, epsilon=1e-2, num_lanczos_steps=2
  )
  updates, state = descent.update(grads, descent.init(params), params, value_fn=value_fn)
  assert np.isnan(state.last_smallest_eigenvalue)
  assert int(state.num_curvature_steps) == 0
  np.testing.assert_array_equal(updates, -0.1 * grads)


def test_a_hyperparameter_rounded_to_zero_by_inject_hyperparams_is_refused_with_the_remedy():
  make = lambda **dtype: optax.inject_hyperparams(jaxsaddle.pgd, **dtype)(  # noqa: E731
    0.1, perturbation_radius=1e-3, gradient_threshold=1e-3, escape_steps=5, escape_threshold=1e-10
  )
  with pytest.raises(ValueError, match="escape_threshold.*hyperparam_dtype=jnp.float32"):
    make().init(jnp.zeros(3, jnp.float16))
  state = make(hyperparam_dtype=jnp.float32).init(jnp.zeros(3, jnp.float16))
  np.testing.assert_allclose(state.hyperparams["escape_threshold"], 1e-10)


def test_a_momentum_rounded_to_one_by_inject_hyperparams_is_refused_with_the_remedy():
  make = lambda **dtype: optax.inject_hyperparams(  # noqa: E731
    jaxsaddle.pagd, static_args=("escape_steps",), **dtype
  )(
    0.01,
    momentum=0.999,
    perturbation_radius=1e-2,
    gradient_threshold=1e-3,
    escape_steps=5,
    exploitation_radius=0.05,
  )
  with pytest.raises(ValueError, match="got 1.0. A bfloat16 1: .*hyperparam_dtype=jnp.float32"):
    make().init(jnp.zeros(2, jnp.bfloat16))
  state = make(hyperparam_dtype=jnp.float32).init(jnp.zeros(2, jnp.bfloat16))
  np.testing.assert_allclose(state.hyperparams["momentum"], 0.999)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_hyperparameter_overflowed_by_inject_hyperparams_is_refused_with_the_remedy():
  make = lambda **dtype: optax.inject_hyperparams(  # noqa: E731
    jaxsaddle.cubic_regularization, static_args=("subsolver_steps", "key"), **dtype
  )(hessian_lipschitz=1e5, smoothness=2.0, epsilon=1e-3, subsolver_steps=3)
  with pytest.raises(ValueError, match="hessian_lipschitz.*float16 inf.*65504.*float32"):
    make().init(jnp.zeros(3, jnp.float16))
  state = make(hyperparam_dtype=jnp.float32).init(jnp.zeros(3, jnp.float16))
  np.testing.assert_allclose(state.hyperparams["hessian_lipschitz"], 1e5)
  # A negative one overflows too, but in float32 it would be refused all the same: no advice.
  negative = optax.inject_hyperparams(jaxsaddle.pgd)(
    -1e5, perturbation_radius=1e-3, gradient_threshold=1e-3, escape_steps=5
  )
  with pytest.raises(ValueError, match=r"learning_rate must be non-negative .*-inf\.$"):
    negative.init(jnp.zeros(3, jnp.float16))


def test_traced_out_of_range_arguments_give_nan_spectrum_results():
  nodes, weights = jnp.array([[0.0, 1.0, 2.0]]), jnp.full((1, 3), 1 / 3)
  density = jax.jit(_density._broadened_density)(nodes.reshape(-1), weights.reshape(-1), None, -0.1)
  assert np.isnan(density[1]).all()

  def classify(gradient_tol):
    return spectrum.classify_critical_point(
      _quadratic, jnp.zeros(2), gradient_tol=gradient_tol, eigenvalue_tol=1e-3, num_steps=2, key=0
    )

  valid, invalid = jax.jit(classify)(1e-6), jax.jit(classify)(jnp.nan)
  assert valid.kind_name == "minimum"
  assert invalid.kind_name == "not critical"
  assert np.isnan(invalid.smallest_eigenvalue)

  # A NaN tol had counted no mass anywhere, a negative one 0 and 3 as negative.
  eigenvalues = jnp.array([-2.0, -1.0, 0.0, 0.0, 3.0])
  degeneracy = jax.jit(lambda tol, atol: spectrum.degeneracy(eigenvalues, tol=tol, atol=atol))
  np.testing.assert_allclose(degeneracy(0.1, 0.0)[:2], [0.4, 0.4])
  for tol, atol in [(jnp.nan, 0.0), (-1.0, -1.0), (0.1, jnp.inf)]:
    assert np.isnan(degeneracy(tol, atol)[:2]).all()


@pytest.mark.parametrize(
  "make",
  [
    lambda lr: jaxsaddle.negative_curvature_descent(
      lr, hessian_lipschitz=1.0, epsilon=1e-3, num_lanczos_steps=2
    ),
    lambda lr: jaxsaddle.saddle_free_newton(lr, num_lanczos_steps=2, damping=1e-3),
    lambda lr: jaxsaddle.pgd(lr, perturbation_radius=1e-3, gradient_threshold=1e-3, escape_steps=5),
  ],
)
def test_a_schedule_s_out_of_range_value_gives_nan_updates_not_a_step_uphill(make):
  # A schedule is read under update's trace, past the factories' checks: -0.1 had stepped along
  # the gradient.
  value_fn = lambda p: jnp.sum(p**2)
  params = jnp.array([1.0, 0.5])
  grads = jax.grad(value_fn)(params)
  for schedule, finite in [(lambda count: 0.1, True), (lambda count: -0.1, False)]:
    tx = make(schedule)
    updates, _ = tx.update(grads, tx.init(params), params, value_fn=value_fn)
    assert bool(jnp.all(jnp.isfinite(updates))) == finite
    if finite:
      assert float(value_fn(params + updates)) < float(value_fn(params))


def test_lanczos_reports_a_nan_start_and_refuses_an_empty_one():
  # A NaN start was read as a zero one: no steps, alphas 0, a plausible empty result.
  result = curvature.lanczos(lambda v: 2 * v, jnp.array([jnp.nan, 1.0]), 2)
  assert int(result.num_valid) == 1 and np.isnan(result.alphas[0])
  with pytest.raises(ValueError, match="no array elements"):
    curvature.lanczos(lambda v: v, jnp.zeros(0), 2)
  with pytest.raises(ValueError, match="matvec's output must have the tree structure"):
    curvature.lanczos(lambda v: {"w": v}, jnp.ones(3), 2)
  with pytest.raises(ValueError, match=r"matvec's output at \['w'\] has shape \(2,\)"):
    curvature.lanczos(lambda v: {"w": v["w"][:2]}, {"w": jnp.ones(3)}, 2)


@pytest.mark.parametrize(
  "make",
  [
    lambda: jaxsaddle.negative_curvature_descent(
      0.1, hessian_lipschitz=1.0, epsilon=1e-3, num_lanczos_steps=2
    ),
    lambda: jaxsaddle.saddle_free_newton(1.0, num_lanczos_steps=2, damping=0.1),
    lambda: jaxsaddle.monitor_curvature(every=1, num_lanczos_steps=2),
    lambda: jaxsaddle.pagd(
      1e-3,
      momentum=0.5,
      exploitation_radius=1e-3,
      perturbation_radius=1e-3,
      gradient_threshold=1e-3,
      escape_steps=10,
    ),
    lambda: jaxsaddle.cubic_regularization(
      1.0, hessian_lipschitz=1e3, smoothness=1e3, epsilon=1e-6, subsolver_steps=2
    ),
  ],
)
def test_curvature_transforms_name_updates_unlike_params(make):
  tx = make()
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  state = tx.init(params)

  def value_fn(p):
    return _quadratic(p["a"]) + _quadratic(p["b"])

  with pytest.raises(ValueError, match="updates must have the tree structure of params"):
    tx.update({"a": jnp.ones(2)}, state, params, value_fn=value_fn)
  with pytest.raises(
    ValueError, match=r"updates at \['b'\] has shape \(2,\), that of params \(3,\)"
  ):
    tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, state, params, value_fn=value_fn)


ANALYSIS_ERRORS = [
  (
    lambda: analysis.iteration_matrices(optax.sgd(0.1), jnp.eye(2) + 1j * jnp.eye(2), 1),
    "hessian must be real",
  ),
  (
    lambda: analysis.iteration_matrices(optax.sgd(0.1), jnp.array([[1.0, 0.5], [0.0, -1.0]]), 1),
    r"hessian must be symmetric; \|H - H\^T\| reaches 0.5",
  ),
  (
    lambda: analysis.iteration_matrices(optax.sgd(0.1), jnp.array([[1.0, 0.0], [0.0, jnp.nan]]), 1),
    "hessian contains NaN or infinite entries",
  ),
  (
    lambda: analysis.monte_carlo_attraction(
      jnp.diag(jnp.array([0.5, 2.0])), key=0, num_starts=4, slice_offset=jnp.array([jnp.nan, 0])
    ),
    "slice_offset contains NaN",
  ),
  (lambda: analysis.attraction_dimension(jnp.eye(2), tol=np.inf), "tol must be non-negative"),
  (
    lambda: analysis.iteration_matrices(optax.sgd(float("nan")), jnp.eye(2), 1),
    "at step 0 the update at the saddle is NaN",
  ),
  # bfloat16's 100 ulps let an asymmetry of 0.7 pass.
  (
    lambda: analysis.iteration_matrices(
      optax.sgd(0.5), jnp.array([[1.0, 0.7], [0.0, -1.0]], jnp.bfloat16), 1
    ),
    r"hessian must be symmetric; \|H - H\^T\| reaches 0.69",
  ),
  (lambda: analysis.iteration_matrices(optax.sgd(0.1), jnp.eye(2), True), "num_steps must be"),
  (
    lambda: analysis.attraction_dimension(jnp.eye(2)[None], kind="periodic", period=True),
    "period must be an integer",
  ),
]


def test_analysis_takes_nested_lists_as_matrices():
  # jnp.result_type cannot read a nested list: both raised "Cannot determine dtype".
  assert int(analysis.attraction_dimension([[0.5, 0.0], [0.0, 2.0]]).dimension) == 1
  matrices = analysis.iteration_matrices(optax.sgd(0.1), [[1.0, 0.0], [0.0, -1.0]], 1)
  np.testing.assert_allclose(matrices[0], np.diag([0.9, 1.1]), rtol=1e-6)


@pytest.mark.parametrize(("call", "message"), ANALYSIS_ERRORS)
def test_bad_analysis_input_raises(call, message):
  with pytest.raises(ValueError, match=message):
    call()


@pytest.mark.parametrize(
  ("call", "message"),
  [
    (lambda: canonicalize_key(None), "key must be a typed PRNG key"),
    (lambda: canonicalize_key(0.5), "key must be a typed PRNG key"),
    (lambda: canonicalize_key(np.random.default_rng(0)), "key must be a typed PRNG key"),
    (lambda: jaxsaddle.lsgd(True), "learning_rate must be a number, got the boolean"),
    (lambda: problems.octopus(2.5), "dim sets a loop length"),
    # float() had failed on these without naming the transform or the hyperparameter.
    (
      lambda: jaxsaddle.negative_curvature_descent(
        0.1, hessian_lipschitz=1.0, epsilon=None, num_lanczos_steps=2
      ),
      "negative_curvature_descent: epsilon must be a number, got None",
    ),
    (
      lambda: jaxsaddle.negative_curvature_descent(
        0.1, hessian_lipschitz=6 + 0j, epsilon=0.1, num_lanczos_steps=2
      ),
      "hessian_lipschitz must be a real number, got the complex",
    ),
    (
      lambda: jaxsaddle.saddle_free_newton(num_lanczos_steps=2, damping=None),
      "saddle_free_newton: damping must be a number, got None",
    ),
  ],
)
def test_wrong_types_are_named(call, message):
  with pytest.raises(TypeError, match=message):
    call()


@pytest.mark.parametrize(
  ("constants", "message"),
  [
    (
      dict(smoothness=1e300, hessian_lipschitz=1e-300, epsilon=1e-300, dim=10),
      "rescale the problem",
    ),
    # Finite, but an escape window of 1.5e10 steps, beyond pgd's int32 step counter.
    (
      dict(smoothness=1e3, hessian_lipschitz=1e-4, epsilon=1e-6, dim=10**6),
      "escape window of 15197061614 steps, beyond the int32",
    ),
  ],
)
def test_pgd_hyperparameters_refuse_constants_that_overflow(constants, message):
  with pytest.raises(ValueError, match=message):
    jaxsaddle.pgd_hyperparameters(failure_probability=0.1, loss_gap=1.0, **constants)


def test_curvature_transforms_refuse_optax_masked():
  # masked hands value_fn a tree with MaskedNode leaves, which failed inside the user's loss.
  tx = optax.masked(
    jaxsaddle.saddle_free_newton(0.1, num_lanczos_steps=2, damping=0.1), {"a": True, "b": False}
  )
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="does not combine with optax.masked"):
    tx.update(params, tx.init(params), params, value_fn=lambda p: _quadratic(p["a"]))
  # multi_transform masks inside: the message names it, since its user never called masked.
  tx = optax.multi_transform(
    {
      "curvature": jaxsaddle.saddle_free_newton(0.1, num_lanczos_steps=2, damping=0.1),
      "sgd": optax.sgd(0.1),
    },
    {"a": "curvature", "b": "sgd"},
  )
  with pytest.raises(ValueError, match="optax.multi_transform"):
    tx.update(params, tx.init(params), params, value_fn=lambda p: _quadratic(p["a"]))
  # flatten hands value_fn one vector: JAX's "does not support string indexing" used to be all
  # the user saw; it now carries a note naming the likely cause.
  for make in (
    lambda: jaxsaddle.saddle_free_newton(0.1, num_lanczos_steps=2, damping=0.1),
    lambda: jaxsaddle.pagd(
      0.1,
      momentum=0.5,
      perturbation_radius=0.1,
      gradient_threshold=1e-3,
      escape_steps=3,
      exploitation_radius=0.1,
    ),
  ):
    tx = optax.flatten(make())
    with pytest.raises(TypeError, match="string indexing") as raised:
      tx.update(params, tx.init(params), params, value_fn=lambda p: _quadratic(p["a"]))
    assert "optax.flatten" in "".join(raised.value.__notes__)
  # JAX's own tracing errors in a loss are left as they are, without the note.
  with pytest.raises(jax.errors.TracerBoolConversionError) as raised:
    spectrum.hessian_trace(
      lambda p: jnp.sum(p) if jnp.sum(p) > 0 else -jnp.sum(p), jnp.ones(3), key=0, num_probes=1
    )
  assert "optax.flatten" not in "".join(getattr(raised.value, "__notes__", []))


def test_iteration_matrices_judges_symmetry_in_the_hessian_s_own_precision():
  # A float32 Hessian, asymmetric by float32 rounding, analysed in float64 as recommended.
  rounding = np.float32(1.0) + np.finfo(np.float32).eps
  hessian = np.array([[2.0, 1.0], [rounding, -1.0]], np.float32)
  with jax.enable_x64(True):
    matrices = analysis.iteration_matrices(optax.sgd(0.1), hessian, 1, params_dtype=jnp.float64)
  assert matrices.dtype == jnp.float64


@pytest.mark.parametrize(
  "tx",
  [
    jaxsaddle.pgd(0.1, perturbation_radius=1.0, gradient_threshold=1.0, escape_steps=1),
    jaxsaddle.perturbed_sgd(0.1, noise_scale=0.1),
    jaxsaddle.negative_curvature_descent(
      0.1, hessian_lipschitz=1.0, epsilon=1e-2, num_lanczos_steps=2
    ),
    jaxsaddle.pagd(
      0.1,
      momentum=0.9,
      perturbation_radius=1.0,
      gradient_threshold=1.0,
      escape_steps=1,
      exploitation_radius=0.1,
    ),
    jaxsaddle.saddle_free_newton(0.1, num_lanczos_steps=2, damping=0.1),
    jaxsaddle.cubic_regularization(
      hessian_lipschitz=1.0, smoothness=1.0, epsilon=1e-2, subsolver_steps=2
    ),
  ],
  ids=["pgd", "perturbed_sgd", "ncd", "pagd", "saddle_free_newton", "cubic_regularization"],
)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_gradients_are_refused_as_updates(tx, dtype):
  # In an integer gradient's dtype PGD's noise was truncated to zero while it counted a
  # perturbation, and NC descent's learning rate became 0: steps that silently did nothing.
  params = {"w": jnp.zeros(4)}
  remedy = "truncated toward zero" if dtype == jnp.int32 else r"gradients\.$"
  with pytest.raises(TypeError, match=rf"the update at \['w'\] has dtype .*{remedy}"):
    tx.update(
      {"w": jnp.zeros(4, dtype)}, tx.init(params), params, value_fn=lambda p: jnp.sum(p["w"] ** 2)
    )


def _scalar_loss(params):
  return jnp.sum(params["w"] ** 3)


HVP_ERRORS = [
  # JAX's "primal and tangent arguments ... float0" named neither the function nor the leaf.
  (
    lambda: jaxsaddle.hvp(_scalar_loss, {"w": jnp.arange(3)}, {"w": jnp.arange(3)}),
    TypeError,
    r"hvp: the parameter at \['w'\] has dtype int32",
  ),
  (
    lambda: jaxsaddle.linearize_hvp(_scalar_loss, {"w": jnp.arange(3)}),
    TypeError,
    r"linearize_hvp: the parameter at \['w'\] has dtype int32",
  ),
  # grad's "Gradient only defined for scalar-output functions".
  (
    lambda: jaxsaddle.hvp(lambda p: p["w"] ** 2, {"w": jnp.ones(3)}, {"w": jnp.ones(3)}),
    ValueError,
    "hvp: value_fn must return the scalar floating-point loss",
  ),
  (
    lambda: jaxsaddle.hvp(_scalar_loss, {"w": jnp.ones(3)}, {"w": jnp.ones(4)}),
    ValueError,
    r"hvp: the leaf of tangent at \['w'\] has shape \(4,\), that of params \(3,\)",
  ),
  (
    lambda: jaxsaddle.hvp(_scalar_loss, {"w": jnp.ones(3)}, {"v": jnp.ones(3)}),
    ValueError,
    "hvp: tangent must have the tree structure of params",
  ),
  (
    lambda: jaxsaddle.hvp(_scalar_loss, {"w": jnp.ones(3)}, {"w": jnp.ones(3, jnp.float16)}),
    TypeError,
    r"hvp: the leaf of tangent at \['w'\] has dtype float16, that of params float32",
  ),
]


@pytest.mark.parametrize(("call", "error", "message"), HVP_ERRORS)
def test_bad_hvp_input_is_named(call, error, message):
  with pytest.raises(error, match=message):
    call()


def test_checked_hvp_still_equals_the_dense_hessian_times_the_tangent():
  params, tangent = {"w": jnp.array([1.0, -2.0, 0.5])}, {"w": jnp.array([0.3, 0.1, -1.0])}
  expected = 6 * params["w"] * tangent["w"]  # the Hessian of sum(w^3) is diag(6 w)
  np.testing.assert_allclose(jaxsaddle.hvp(_scalar_loss, params, tangent)["w"], expected)
  np.testing.assert_allclose(
    jax.jit(jaxsaddle.hvp, static_argnums=0)(_scalar_loss, params, tangent)["w"], expected
  )
  _, hvp_fn = jaxsaddle.linearize_hvp(_scalar_loss, params)
  np.testing.assert_allclose(hvp_fn(tangent)["w"], expected)


def test_a_value_with_aux_outputs_is_refused_with_the_remedy():
  # value_and_grad(..., has_aux=True) returns (loss, aux) as its value; the tuple had failed
  # inside jnp.shape with a TracerArrayConversionError.
  tx = jaxsaddle.pgd(0.1, perturbation_radius=0.1, gradient_threshold=1.0, escape_steps=2)
  params = jnp.ones(3)
  state = tx.init(params)

  def loss_with_aux(params):
    return jnp.sum(params**2), {"norm": jnp.linalg.norm(params)}

  value, grads = jax.value_and_grad(loss_with_aux, has_aux=True)(params)
  with pytest.raises(ValueError, match=r"pgd: value must be the scalar loss, got a tuple of 2"):
    tx.update(grads, state, params, value=value)
  updates, _ = tx.update(grads, state, params, value=value[0])
  np.testing.assert_allclose(updates, -0.1 * grads)
