"""Attraction dimension of saddles: GD, LSGD, hand-built constant/periodic/general iterations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsaddle
from jaxsaddle import analysis
from jaxsaddle import problems


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def _hessian(problem: problems.Problem) -> np.ndarray:
  saddle = jnp.zeros(problem.init_shape, jnp.float64)
  return np.asarray(jax.jit(jax.hessian(problem.value_fn))(saddle))


def _rotation(dim: int, seed: int) -> np.ndarray:
  return np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))[0]


def _periodic_laplacian(dim: int) -> np.ndarray:
  """The periodic 1-D Laplacian [1, -2, 1]."""
  identity = np.eye(dim)
  return np.roll(identity, 1, axis=1) - 2 * identity + np.roll(identity, -1, axis=1)


def _lsgd_operator(hessian: np.ndarray, sigma: float) -> tuple[np.ndarray, float]:
  """A_sigma^{-1} H with A_sigma = I - sigma L, and eta = 0.9 / rho(A_sigma^{-1} H)."""
  smoothing_matrix = np.eye(len(hessian)) - sigma * _periodic_laplacian(len(hessian))
  smoothed_hessian = np.linalg.solve(smoothing_matrix, hessian)
  return smoothed_hessian, 0.9 / np.max(np.abs(np.linalg.eigvals(smoothed_hessian)))


def _dense_lsgd(smoothing_matrix: np.ndarray, learning_rate: float) -> optax.GradientTransformation:
  """LSGD as an optax transform with a dense solve: u = -eta A^{-1} g."""
  return optax.stateless(
    lambda grads, params: -learning_rate * jnp.linalg.solve(jnp.asarray(smoothing_matrix), grads)
  )


# --- Gradient descent on quadratic saddles -------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 5, 10, 40])
@pytest.mark.parametrize("rotated", [False, True])
def test_gradient_descent_with_one_negative_eigenvalue_attracts_n_minus_1(dim, rotated):
  eigenvalues = np.concatenate([[-0.7], np.linspace(0.3, 2.0, dim - 1)])
  problem = problems.quadratic_saddle(eigenvalues, rotation_key=dim if rotated else None)
  hessian = _hessian(problem)
  learning_rate = 0.9 / 2.0
  matrices = analysis.iteration_matrices(optax.sgd(learning_rate), hessian, num_steps=3)
  np.testing.assert_allclose(
    matrices, np.broadcast_to(np.eye(dim) - learning_rate * hessian, matrices.shape), atol=1e-15
  )

  result = analysis.attraction_dimension(matrices)

  assert (result.dimension, result.num_neutral, result.method, result.period) == (
    dim - 1,
    0,
    "constant",
    1,
  )
  expected = np.sort(np.log(np.abs(1 - learning_rate * eigenvalues)))[::-1]
  np.testing.assert_allclose(result.exponents, expected, rtol=1e-12, atol=1e-12)


def test_gradient_descent_with_two_negative_eigenvalues_attracts_n_minus_2():
  problem = problems.quadratic_saddle([1.0, -0.5, 2.0, -1.5, 0.8, 1.2], rotation_key=3)
  matrices = analysis.iteration_matrices(optax.sgd(0.4), _hessian(problem), num_steps=2)
  result = analysis.attraction_dimension(matrices)
  assert (result.dimension, result.num_neutral) == (4, 0)


def test_gradient_descent_with_too_large_a_step_loses_the_overshooting_directions():
  # Factors 1 - 1.2 lambda = 2.2, 0.4, -0.2, -1.4: the step overshoots lambda = 2, which diverges.
  problem = problems.quadratic_saddle([-1.0, 0.5, 1.0, 2.0], rotation_key=4)
  result = analysis.attraction_dimension(
    analysis.iteration_matrices(optax.sgd(1.2), _hessian(problem), num_steps=1)
  )
  assert (result.dimension, result.num_neutral) == (2, 0)
  np.testing.assert_allclose(result.exponents, np.log([2.2, 1.4, 0.4, 0.2]), rtol=1e-12)


def test_a_zero_eigenvalue_is_neutral_not_converging():
  problem = problems.quadratic_saddle([-1.0, 0.0, 1.0, 2.0], rotation_key=5)
  result = analysis.attraction_dimension(
    analysis.iteration_matrices(optax.sgd(0.4), _hessian(problem), num_steps=1)
  )
  assert (result.dimension, result.num_neutral) == (2, 1)


def test_iteration_matrices_follow_a_step_size_schedule_and_reproduce_a_run():
  problem = problems.quadratic_saddle([-0.5, 1.0, 2.0], rotation_key=6)
  hessian = _hessian(problem)
  schedule = optax.cosine_decay_schedule(0.6, decay_steps=7, alpha=0.1)
  tx = optax.sgd(schedule)
  matrices = analysis.iteration_matrices(tx, hessian, num_steps=10)

  expected = [np.eye(3) - float(schedule(t)) * hessian for t in range(10)]
  np.testing.assert_allclose(matrices, np.stack(expected), atol=1e-15)
  params = jnp.array([0.3, -1.2, 0.7])
  state = tx.init(params)
  propagated = params
  update, grad = jax.jit(tx.update), jax.jit(jax.grad(problem.value_fn))
  for matrix in matrices:
    updates, state = update(grad(params), state, params)
    params = optax.apply_updates(params, updates)
    propagated = matrix @ propagated
  np.testing.assert_allclose(params, propagated, rtol=1e-13)
  # The schedule decays for 7 steps, then stays at alpha * 0.6: a transient, then a constant
  # tail. Over the decay alone the stack is time-varying throughout.
  result = analysis.attraction_dimension(matrices)
  assert (result.method, result.period, result.transient) == ("constant", 1, 7)
  assert analysis.attraction_dimension(matrices[:8]).method == "general"


def test_iteration_matrices_of_a_nonsymmetric_step_use_the_gradient_and_the_params():
  # u = -eta P g + c x: the Jacobian is I - eta P H + c I, for any linear P.
  precondition = np.array([[1.0, 0.3, 0.0], [0.0, 2.0, -0.4], [0.5, 0.0, 1.0]])
  tx = optax.stateless(
    lambda grads, params: -0.1 * jnp.asarray(precondition) @ grads + 0.05 * params
  )
  hessian = _hessian(problems.quadratic_saddle([-1.0, 1.0, 3.0], rotation_key=7))
  matrices = analysis.iteration_matrices(tx, hessian, num_steps=1)
  np.testing.assert_allclose(
    matrices[0], 1.05 * np.eye(3) - 0.1 * precondition @ hessian, atol=1e-15
  )


@pytest.mark.parametrize(
  ("tx", "message"),
  [
    (lambda: optax.sgd(0.1, momentum=0.9), "depends on the params or the gradient"),
    (lambda: optax.adam(0.1), "depends on the params or the gradient"),
    (lambda: jaxsaddle.lsgd(0.1, sigma=1.0, momentum=0.9), "depends on the params or the gradient"),
    (lambda: jaxsaddle.noisy_gd(0.1, noise_scale=0.1), "not a fixed point"),
    (
      lambda: jaxsaddle.pgd(0.1, perturbation_radius=0.1, gradient_threshold=1e-3, escape_steps=5),
      "not a fixed point",
    ),
  ],
)
def test_iteration_matrices_reject_transforms_without_a_params_only_linearisation(tx, message):
  with pytest.raises(ValueError, match=message):
    analysis.iteration_matrices(tx(), np.diag([-1.0, 1.0]), num_steps=3)


def test_iteration_matrices_accept_second_moments_and_counters():
  # nu = decay nu + (1 - decay) g^2 has zero derivative at g = 0, so u = -0.2 g / sqrt(eps).
  tx = optax.chain(optax.scale_by_rms(eps=0.25), optax.sgd(0.2))
  matrices = analysis.iteration_matrices(tx, np.diag([-1.0, 1.0]), num_steps=2)
  np.testing.assert_allclose(matrices, np.broadcast_to(np.diag([1.4, 0.6]), (2, 2, 2)), atol=1e-15)


def test_iteration_matrices_reject_a_step_that_is_not_differentiable_at_the_saddle():
  # g / (sqrt(nu) + eps): forward mode meets d sqrt(0) = inf times dnu = 0.
  tx = optax.chain(optax.scale_by_rms(eps=0.25, eps_in_sqrt=False), optax.sgd(0.2))
  with pytest.raises(ValueError, match="not differentiable at the saddle"):
    analysis.iteration_matrices(tx, np.diag([-1.0, 1.0]), num_steps=2)


# --- LSGD: constant sigma keeps n - 1 -------------------------------------------------------------


@pytest.mark.parametrize("dim", [4, 7, 10])
@pytest.mark.parametrize("sigma", [0.0, 1.0, 10.0])
@pytest.mark.parametrize("rotated", [False, True])
def test_constant_sigma_lsgd_attracts_n_minus_1(dim, sigma, rotated):
  eigenvalues = np.concatenate([[-1.0], np.linspace(0.5, 3.0, dim - 1)])
  problem = problems.quadratic_saddle(eigenvalues, rotation_key=10 + dim if rotated else None)
  hessian = _hessian(problem)
  smoothed_hessian, learning_rate = _lsgd_operator(hessian, sigma)
  iteration = np.eye(dim) - learning_rate * smoothed_hessian

  result = analysis.attraction_dimension(iteration)

  assert (result.dimension, result.num_neutral) == (dim - 1, 0)
  # The oracle: numpy's eigenvalues of I - eta A^{-1} H, exactly one of modulus >= 1.
  moduli = np.abs(np.linalg.eigvals(iteration))
  assert np.sum(moduli < 1) == dim - 1
  np.testing.assert_allclose(
    result.exponents, np.sort(np.log(moduli))[::-1], rtol=1e-10, atol=1e-12
  )


def test_a_dense_lsgd_transform_linearises_to_the_lsgd_iteration():
  dim, sigma = 7, 10.0
  eigenvalues = np.concatenate([[-1.0], np.linspace(0.5, 3.0, dim - 1)])
  hessian = _hessian(problems.quadratic_saddle(eigenvalues, rotation_key=17))
  smoothed_hessian, learning_rate = _lsgd_operator(hessian, sigma)
  smoothing_matrix = np.eye(dim) - sigma * _periodic_laplacian(dim)
  tx = _dense_lsgd(smoothing_matrix, learning_rate)
  matrices = analysis.iteration_matrices(tx, hessian, num_steps=2)
  expected = np.eye(dim) - learning_rate * smoothed_hessian
  np.testing.assert_allclose(matrices, np.broadcast_to(expected, matrices.shape), atol=1e-13)
  assert analysis.attraction_dimension(matrices).dimension == dim - 1


@pytest.mark.parametrize("dim", [4, 7, 10])
@pytest.mark.parametrize("sigma", [0.0, 1.0, 10.0])
def test_jaxsaddle_lsgd_linearises_to_the_dense_iteration_and_attracts_n_minus_1(dim, sigma):
  eigenvalues = np.concatenate([[-1.0], np.linspace(0.5, 3.0, dim - 1)])
  hessian = _hessian(problems.quadratic_saddle(eigenvalues, rotation_key=20 + dim))
  smoothed_hessian, learning_rate = _lsgd_operator(hessian, sigma)
  tx = jaxsaddle.lsgd(learning_rate, sigma=sigma, order=1)
  matrices = analysis.iteration_matrices(tx, hessian, num_steps=3)
  expected = np.eye(dim) - learning_rate * smoothed_hessian
  np.testing.assert_allclose(matrices, np.broadcast_to(expected, matrices.shape), atol=1e-12)
  result = analysis.attraction_dimension(matrices)
  assert (result.dimension, result.num_neutral, result.method) == (dim - 1, 0, "constant")


# --- Hand-built iterations with designed counts --------------------------------------------------


def test_constant_diagonal_iteration_counts_moduli_below_one():
  diagonal = np.array([1.5, 0.9, -0.5, 1.0, 0.0, -1.2, 0.99])
  result = analysis.attraction_dimension(np.diag(diagonal))
  assert (result.dimension, result.num_neutral, result.method) == (4, 1, "constant")
  assert result.exponents[-1] == -np.inf  # the exactly singular direction
  np.testing.assert_allclose(
    result.exponents[:-1], np.sort(np.log(np.abs(diagonal[diagonal != 0])))[::-1]
  )
  # log 0.99 = -0.01005: a coarser tolerance calls it neutral.
  coarse = analysis.attraction_dimension(np.diag(diagonal), tol=0.02)
  assert (coarse.dimension, coarse.num_neutral) == (3, 2)


def _alternating_stack(num_periods: int) -> tuple[np.ndarray, np.ndarray]:
  """S diag(2, .1, 3, .5) S^T, S diag(.1, 2, .5, .5) S^T: monodromy S diag(.2, .2, 1.5, .25) S^T."""
  rotation = _rotation(4, seed=0)
  first = rotation @ np.diag([2.0, 0.1, 3.0, 0.5]) @ rotation.T
  second = rotation @ np.diag([0.1, 2.0, 0.5, 0.5]) @ rotation.T
  return np.stack([first, second] * num_periods), rotation


def test_periodic_iteration_uses_the_monodromy_not_the_steps():
  matrices, _ = _alternating_stack(num_periods=3)
  result = analysis.attraction_dimension(matrices)
  assert (result.dimension, result.num_neutral, result.method, result.period) == (
    3,
    0,
    "periodic",
    2,
  )
  np.testing.assert_allclose(result.exponents, 0.5 * np.log([1.5, 0.25, 0.2, 0.2]), rtol=1e-12)
  # Each step alone expands two directions, so a per-step count would say 2.
  assert analysis.attraction_dimension(matrices[0]).dimension == 2


def test_periodic_iteration_with_noncommuting_steps_matches_the_monodromy_eigenvalues():
  rng = np.random.default_rng(1)
  period = [rng.normal(size=(5, 5)) * scale for scale in (0.6, 0.9, 0.5)]
  monodromy = period[2] @ period[1] @ period[0]
  result = analysis.attraction_dimension(np.stack(period * 2))
  assert (result.method, result.period) == ("periodic", 3)
  moduli = np.abs(np.linalg.eigvals(monodromy))
  np.testing.assert_allclose(result.exponents, np.sort(np.log(moduli))[::-1] / 3, rtol=1e-10)
  assert result.dimension == np.sum(moduli < 1)
  assert 0 < result.dimension < 5


def test_long_period_with_a_huge_multiplier_still_resolves_the_converging_ones():
  # Over 40 steps the multipliers are about 3**40 = 1e19, 0.5**40 and 0.9**40. Rounding the
  # product to float64 would give the two small ones moduli near 1e19 * 1e-16 > 1.
  conjugation = np.random.default_rng(2).normal(size=(3, 3))
  steps = np.arange(40)
  diagonals = np.stack(
    [
      3.0 * (1 + 0.3 * np.sin(2 * np.pi * steps / 40)),
      0.5 + 0.2 * np.cos(2 * np.pi * steps / 40),
      0.9 + 0 * steps,
    ],
    axis=1,
  )
  period = np.stack([conjugation @ np.diag(d) @ np.linalg.inv(conjugation) for d in diagonals])
  result = analysis.attraction_dimension(np.concatenate([period, period]))
  assert (result.dimension, result.num_neutral, result.method, result.period) == (
    2,
    0,
    "periodic",
    40,
  )
  expected = np.sort(np.mean(np.log(diagonals), axis=0))[::-1]
  np.testing.assert_allclose(result.exponents, expected, rtol=1e-9)


def _rotating_general_stack(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """M_t = R_{t+1} D_t R_t^T with random rotations: the product is R_T (prod D_t) R_0^T.

  So the Lyapunov exponents are the time averages of log |D_t|: log 1.5, the average of a
  random sequence of 3 and 0.2 (negative: expands on about half of the steps, yet converges),
  and log 0.5. The eigenvalues of each M_t say nothing about this.
  """
  rng = np.random.default_rng(3)
  rotations = np.linalg.qr(rng.normal(size=(num_steps + 1, 3, 3)))[0]
  middle = rng.choice([3.0, 0.2], size=num_steps)
  diagonals = np.stack([np.full(num_steps, 1.5), middle, np.full(num_steps, 0.5)], axis=1)
  matrices = np.einsum("tij,tj,tkj->tik", rotations[1:], diagonals, rotations[:-1])
  return matrices, np.sort(np.mean(np.log(diagonals), axis=0))[::-1]


def test_general_time_varying_iteration_gives_the_closed_form_lyapunov_exponents():
  num_steps = 2000
  matrices, expected = _rotating_general_stack(num_steps)
  result = analysis.attraction_dimension(matrices)
  assert (result.dimension, result.num_neutral, result.method, result.period) == (
    2,
    0,
    "general",
    None,
  )
  np.testing.assert_allclose(result.exponents, expected, atol=5 / num_steps)
  np.testing.assert_allclose(
    jax.jit(analysis.lyapunov_exponents)(matrices), result.exponents, rtol=1e-12
  )


def test_general_method_agrees_with_the_eigenvalue_methods():
  num_steps = 3000
  hessian = _hessian(problems.quadratic_saddle([-0.4, 0.3, 1.0, 2.0, 1.5], rotation_key=8))
  gd = analysis.iteration_matrices(optax.sgd(0.45), hessian, num_steps=num_steps)
  alternating, _ = _alternating_stack(num_periods=num_steps // 2)
  for matrices, method in [(gd, "constant"), (alternating, "periodic")]:
    exact = analysis.attraction_dimension(matrices)
    general = analysis.attraction_dimension(matrices, kind="general")
    assert exact.method == method and general.method == "general"
    assert general.dimension == exact.dimension
    np.testing.assert_allclose(general.exponents, exact.exponents, atol=5 / num_steps)


def test_explicit_kinds_and_periods():
  matrices, _ = _alternating_stack(num_periods=2)
  assert analysis.attraction_dimension(matrices, kind="periodic").period == 2
  # Treating one step as the period gives the per-step count.
  forced = analysis.attraction_dimension(matrices, kind="periodic", period=1)
  assert forced.dimension == analysis.attraction_dimension(matrices, kind="constant").dimension == 2
  # Three steps of a period-2 sequence do not show two full periods.
  assert analysis.attraction_dimension(matrices[:3]).method == "general"


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"kind": "floquet"}, "kind must be one of"),
    ({"kind": "general", "period": 2}, "period is only used"),
    ({"kind": "periodic", "period": 0}, "period must be an integer"),
  ],
)
def test_attraction_dimension_rejects_bad_arguments(kwargs, message):
  matrices, _ = _alternating_stack(num_periods=2)
  with pytest.raises(ValueError, match=message):
    analysis.attraction_dimension(matrices, **kwargs)


def test_attraction_dimension_rejects_nonperiodic_periodic_input_and_nan():
  matrices, _ = _rotating_general_stack(10)
  with pytest.raises(ValueError, match="no period found"):
    analysis.attraction_dimension(matrices, kind="periodic")
  with pytest.raises(ValueError, match="NaN or Inf"):
    analysis.attraction_dimension(np.diag([np.nan, 1.0]))
  with pytest.raises(ValueError, match="square matrices"):
    analysis.attraction_dimension(np.ones((2, 3)))
  # Dropping the imaginary part would change the moduli (2 and 0.5, dimension 1).
  with pytest.raises(ValueError, match="must be real"):
    analysis.attraction_dimension(np.array([[2j, 0], [0, 0.5]]))
  with pytest.raises(ValueError, match="params_dtype must be floating"):
    analysis.iteration_matrices(optax.sgd(0.3), np.diag([-0.5, 0.5]), 2, params_dtype=jnp.int32)


def test_monte_carlo_attraction_rejects_bad_arguments_and_counts_starts_at_the_saddle():
  matrices = analysis.iteration_matrices(optax.sgd(0.3), np.diag([-1.0, 1.0, 2.0]), 40)
  stable = np.eye(3)[:, 1:]
  assert float(analysis.monte_carlo_attraction(matrices, 0, slice_basis=stable).fraction) == 1.0
  # A tol of 0, below 0 or NaN made every start count as not converged: a fraction of 0.
  for tol in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="tol"):
      analysis.monte_carlo_attraction(matrices, 0, slice_basis=stable, tol=tol)
  with pytest.raises(ValueError, match="NaN or Inf"):
    analysis.monte_carlo_attraction(matrices.at[3, 0, 0].set(jnp.nan), 0, slice_basis=stable)
  with pytest.raises(ValueError, match="num_starts"):
    analysis.monte_carlo_attraction(matrices, 0, num_starts=0)
  with pytest.raises(ValueError, match="1 <= k <= 3"):
    analysis.monte_carlo_attraction(matrices, 0, slice_basis=np.zeros((3, 0)))
  # A zero basis put every start at the saddle and reported that all of them converge.
  with pytest.raises(ValueError, match="linearly independent"):
    analysis.monte_carlo_attraction(matrices, 0, slice_basis=np.zeros((3, 1)))
  # Starts exactly at the saddle stay there: converged (log 0), not NaN.
  assert bool(jnp.all(analysis._log_contraction(matrices, jnp.zeros((2, 3))) == -jnp.inf))


# --- Monte-Carlo cross-check ---------------------------------------------------------------------


def test_monte_carlo_gradient_descent_converges_exactly_from_the_stable_subspace():
  eigenvalues = np.array([-0.1, 1.0, 1.2, 1.5, 1.8, 2.0])
  problem = problems.quadratic_saddle(eigenvalues, rotation_key=9)
  hessian = _hessian(problem)
  matrices = analysis.iteration_matrices(optax.sgd(0.45), hessian, num_steps=60)
  assert analysis.attraction_dimension(matrices).dimension == 5
  eigenvectors = np.linalg.eigh(hessian)[1]  # ascending: column 0 is the negative direction

  generic = analysis.monte_carlo_attraction(matrices, 0, num_starts=512)
  slice_3d = analysis.monte_carlo_attraction(matrices, 1, num_starts=512, slice_dim=3)
  stable = analysis.monte_carlo_attraction(
    matrices, 2, num_starts=512, slice_basis=eigenvectors[:, 1:]
  )
  stable_2d = analysis.monte_carlo_attraction(
    matrices, 3, num_starts=512, slice_basis=eigenvectors[:, 1:3], slice_offset=eigenvectors[:, 4]
  )

  assert float(generic.fraction) == 0.0 and float(slice_3d.fraction) == 0.0
  assert float(stable.fraction) == 1.0 and float(stable_2d.fraction) == 1.0
  # The unstable factor 1.045 over 60 steps: generic starts leave, stable ones shrink to rounding.
  assert np.min(generic.log_contraction) > -np.log(1e6) and np.median(generic.log_contraction) > 0
  assert np.max(stable.log_contraction) < np.log(1e-12)


def test_monte_carlo_sees_a_minimum_attract_everything():
  hessian = _hessian(problems.quadratic_saddle([0.5, 1.0, 2.0], rotation_key=11))
  matrices = analysis.iteration_matrices(optax.sgd(0.5), hessian, num_steps=100)
  assert analysis.attraction_dimension(matrices).dimension == 3
  assert float(analysis.monte_carlo_attraction(matrices, 0, num_starts=256).fraction) == 1.0


def test_monte_carlo_lsgd_converges_from_the_stable_eigenvectors_of_the_smoothed_hessian():
  dim, sigma = 7, 1.0
  # A weak negative and strong positive curvature, so that the stable directions contract to
  # 1e-10 before the rounding errors along the unstable one grow to the tolerance.
  eigenvalues = np.concatenate([[-0.2], np.linspace(1.5, 3.0, dim - 1)])
  hessian = _hessian(problems.quadratic_saddle(eigenvalues, rotation_key=12))
  smoothed_hessian, learning_rate = _lsgd_operator(hessian, sigma)
  iteration = np.eye(dim) - learning_rate * smoothed_hessian
  smoothed_eigenvalues, eigenvectors = np.linalg.eig(smoothed_hessian)
  stable_basis = np.real(eigenvectors[:, np.real(smoothed_eigenvalues) > 0])
  slowest = np.max(
    np.abs(1 - learning_rate * np.real(smoothed_eigenvalues[np.real(smoothed_eigenvalues) > 0]))
  )
  num_steps = int(np.ceil(np.log(1e-10) / np.log(slowest)))
  growth = 1 - learning_rate * np.min(np.real(smoothed_eigenvalues))
  assert 1e-16 * growth**num_steps < 1e-8  # rounding errors stay below the tolerance
  matrices = np.broadcast_to(iteration, (num_steps, dim, dim))

  assert analysis.attraction_dimension(matrices).dimension == stable_basis.shape[1] == dim - 1
  assert float(analysis.monte_carlo_attraction(matrices, 0, num_starts=256).fraction) == 0.0
  stable = analysis.monte_carlo_attraction(matrices, 1, num_starts=256, slice_basis=stable_basis)
  assert float(stable.fraction) == 1.0


def test_monte_carlo_periodic_iteration_matches_the_monodromy():
  matrices, rotation = _alternating_stack(num_periods=40)
  # Monodromy S diag(.2, .2, 1.5, .25) S^T: columns 0, 1 and 3 of S are stable.
  assert float(analysis.monte_carlo_attraction(matrices, 0, num_starts=256).fraction) == 0.0
  stable = analysis.monte_carlo_attraction(
    matrices, 1, num_starts=256, slice_basis=rotation[:, [0, 1, 3]]
  )
  assert float(stable.fraction) == 1.0
  unstable_mixed = analysis.monte_carlo_attraction(
    matrices, 2, num_starts=256, slice_basis=rotation[:, [0, 2]]
  )
  assert float(unstable_mixed.fraction) == 0.0


def test_monte_carlo_is_jittable_and_deterministic_in_the_key():
  matrices, _ = _alternating_stack(num_periods=40)
  run = jax.jit(analysis.monte_carlo_attraction, static_argnames=("num_starts", "slice_dim"))
  jitted = run(matrices, jax.random.key(4), num_starts=256, slice_dim=2)
  eager = analysis.monte_carlo_attraction(matrices, jax.random.key(4), num_starts=256, slice_dim=2)
  np.testing.assert_allclose(jitted.log_contraction, eager.log_contraction, rtol=1e-12)
  other = analysis.monte_carlo_attraction(matrices, jax.random.key(5), num_starts=256, slice_dim=2)
  assert not np.allclose(eager.log_contraction, other.log_contraction)


def test_narrow_float_matrices_are_analysed_in_float32_with_their_own_tolerance():
  # The eigenvalue and QR routines have no bfloat16 kernels: they raised NotImplementedError.
  # The entries are accurate to bfloat16 only, so the default tol is bfloat16's.
  # Exponents log 0.5 and log 1.5, beyond bfloat16's default tol of 0.2.
  matrices = analysis.iteration_matrices(
    optax.sgd(0.5), jnp.diag(jnp.array([1.0, -1.0])), 3, params_dtype=jnp.bfloat16
  )
  assert matrices.dtype == jnp.bfloat16
  upcast = matrices.astype(jnp.float32)
  for kind in ("auto", "general"):
    result = analysis.attraction_dimension(matrices, kind=kind)
    np.testing.assert_array_equal(
      result.exponents, analysis.attraction_dimension(upcast, kind=kind).exponents
    )
  result = analysis.attraction_dimension(matrices)
  assert result.dimension == 1
  np.testing.assert_allclose(result.tol, float(jnp.finfo(jnp.bfloat16).eps) ** (1 / 3))
  np.testing.assert_array_equal(
    analysis.monte_carlo_attraction(matrices, key=0, num_starts=4).log_contraction,
    analysis.monte_carlo_attraction(upcast, key=0, num_starts=4).log_contraction,
  )


def test_a_small_gradient_step_needs_float64_or_an_explicit_tol():
  # I - 1e-3 diag(1, -1): exponents of +-1e-3 a step, under float32's default tol of
  # eps**(1/3) = 4.9e-3 (documented), resolved in float64 or with a smaller tol.
  hessian = jnp.diag(jnp.array([1.0, -1.0]))
  single = analysis.iteration_matrices(optax.sgd(1e-3), hessian, 1, params_dtype=jnp.float32)
  assert (analysis.attraction_dimension(single).num_neutral) == 2
  assert analysis.attraction_dimension(single, tol=1e-4).dimension == 1
  double = analysis.iteration_matrices(optax.sgd(1e-3), hessian, 1, params_dtype=jnp.float64)
  result = analysis.attraction_dimension(double)
  assert (result.dimension, result.num_neutral) == (1, 0)


def test_auto_reads_a_warmup_then_a_constant_or_periodic_tail():
  # A linear warmup over 5 steps, then a constant rate: read as "general" with tol 1/T, both
  # directions were neutral over 10 steps.
  hessian = jnp.diag(jnp.array([1.0, -1.0]))
  warmup = optax.linear_schedule(0.01, 0.05, transition_steps=5)
  matrices = analysis.iteration_matrices(optax.sgd(warmup), hessian, 10)
  result = analysis.attraction_dimension(matrices)
  assert (result.method, result.period, result.transient) == ("constant", 1, 5)
  assert (result.dimension, result.num_neutral) == (1, 0)
  # The schedule computes its rate in float32.
  np.testing.assert_allclose(result.exponents, np.log([1.05, 0.95]), rtol=1e-7)
  # After the same warmup, a rate alternating 0.05 / 0.15 (two periods of it follow).
  tail = [np.diag([0.95, 1.05]), np.diag([0.85, 1.15])] * 2
  stacked = np.concatenate([np.asarray(matrices[:5]), tail])
  result = analysis.attraction_dimension(stacked)
  assert (result.method, result.period, result.transient) == ("periodic", 2, 5)
  np.testing.assert_allclose(result.exponents, np.log([1.05 * 1.15, 0.95 * 0.85]) / 2, rtol=1e-12)
  # A singular transient (a step of 1 on the unit eigenvalue kills that direction) adds
  # converging starts the tail's exponents do not count: no tail reading.
  singular = np.stack([np.diag([0.0, 2.0])] + [np.diag([1.1, 0.9])] * 9)
  result = analysis.attraction_dimension(singular)
  assert (result.method, result.transient) == ("general", 0)
  # A periodic stack whose period ends in a repeat is periodic from the start, not a
  # transient before a constant tail.
  period_three = np.stack([np.diag([0.5, 2.0]), np.diag([2.0, 0.5]), np.diag([2.0, 0.5])] * 2)
  result = analysis.attraction_dimension(period_three)
  assert (result.method, result.period, result.transient) == ("periodic", 3, 0)
