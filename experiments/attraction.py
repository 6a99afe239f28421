r"""Attraction-region dimension of a quadratic saddle against n, for GD, LSGD and variants of it.

Kreusser, Osher and Wang (arXiv:1901.06827; European Journal of Applied
Mathematics 34(4), 2023) state that for "a canonical class of quadratic
functions" the attraction region of their modified LSGD (mLSGD) has dimension
:math:`\lfloor (n-1)/2 \rfloor`, against :math:`n-1` for GD. We could not read
mLSGD's update rule nor the definition of that class (only the abstract and the
opening of the introduction were reachable; ``/work/shared/ALGORITHMS.md``
section 6). So this experiment implements **nothing called mLSGD**: it measures
GD, LSGD and a handful of documented modifications of LSGD, each under a name
that says what it is, and shows their dimensions next to the paper's
:math:`\lfloor (n-1)/2 \rfloor` line. None of them is claimed to be the paper's
method.

**Quadratics.** :math:`f(x) = \tfrac12 x^\top H x` with one negative Hessian
eigenvalue :math:`\lambda_1 = -1`, for :math:`n = 2, \dots, 40`. LSGD couples
neighbouring coordinates, so the basis matters; three problems are measured:

- ``spread``: :math:`H = \operatorname{diag}(-1, \lambda_2, \dots, \lambda_n)`
  in the standard coordinate order, with :math:`\lambda_{2..n}` evenly spaced
  in :math:`[0.5, 2]`;
- ``ones``: :math:`H = \operatorname{diag}(-1, 1, \dots, 1)`;
- ``rotated``: the ``spread`` spectrum in a random orthonormal basis
  (:func:`jaxsaddle.problems.quadratic_saddle` with ``rotation_key`` = the seed,
  ``config.seeds`` of them), a control for GD and constant-:math:`\sigma` LSGD,
  whose dimension must not depend on the basis.

**Candidates.** With :math:`L` the periodic 1-D discrete Laplacian (stencil
:math:`[1,-2,1]`), :math:`A_\sigma = I - \sigma L` LSGD's operator and
:math:`Z` the cyclic shift :math:`(Zx)_i = x_{i-1}`:

- ``gd``: ``optax.sgd``, :math:`M = I - \eta H` (dimension :math:`n - 1`).
- ``lsgd_sigma=s``: :func:`jaxsaddle.lsgd` with constant :math:`\sigma`,
  :math:`M = I - \eta A_\sigma^{-1} H`; by Sylvester's law of inertia
  :math:`A_\sigma^{-1} H` has exactly one negative eigenvalue, so the dimension
  is :math:`n - 1` (acceptance check 8).
- ``lsgd_sigma_on_off``: LSGD with :math:`\sigma_k` alternating between
  :math:`s` and 0 (period 2), i.e. smoothing every other step. A plausible
  reading of "modified LSGD" because only a *time-varying* iteration can escape
  the Sylvester argument above.
- ``lsgd_sigma_alternating``: :math:`\sigma_k` alternating between two positive
  values (period 2): the same idea without plain GD steps.
- ``lsgd_sigma_decaying``: :math:`\sigma_k = s / (k + 1)`: smoothing that fades
  out, so that the method keeps GD's asymptotic convergence rate, which the
  abstract says mLSGD does not sacrifice. General time variation: Lyapunov
  exponents over ``config.steps`` steps.
- ``flipped_laplacian``: :math:`M = I - \eta B^{-1} H` with
  :math:`B = I + \sigma L`, the Laplacian's sign flipped. :math:`B` has
  eigenvalues :math:`1 - 4\sigma \sin^2(\pi k/n)` and is indefinite for
  :math:`\sigma > 1/4`, which changes the inertia of :math:`B^{-1}H` and so
  escapes Sylvester's argument. :func:`jaxsaddle.laplacian_smoothing` rejects
  :math:`\sigma < 0`, so this one is built as a dense matrix. The default
  :math:`\sigma = 0.74` keeps every eigenvalue of :math:`B` at least 0.02 away
  from 0 for all :math:`n \le 40`.
- ``upwind_circulant``: :math:`M = I - \eta B^{-1} H` with
  :math:`B = I + \sigma (I - Z)`, a one-sided difference: a non-symmetric
  circulant whose symmetric part is :math:`A_{\sigma/2}`, i.e. LSGD's operator
  plus a skew-symmetric (advection) term. Built densely.

The period-2 and decaying schedules run through
``optax.inject_hyperparams(jaxsaddle.lsgd, static_args=("order", "mode"))`` with
:math:`\sigma` a function of the step count; their iteration matrices come from
:func:`jaxsaddle.analysis.iteration_matrices`, and every one of them is
compared with the dense :math:`I - \eta A_{\sigma_k}^{-1} H` (``dense_mismatch``
in the metrics). As in :func:`jaxsaddle.laplacian_smoothing`, vectors shorter
than 3 are not smoothed, so every smoothing operator is :math:`I` at
:math:`n = 2`.

**Step sizes** (``step_fraction`` :math:`= 0.9`): :math:`\eta = 0.9 / \rho(P^{-1}
H)` for the constant iterations (:math:`P = I, A_\sigma, B`), so that they are
stable on the positive part; :math:`\eta = 0.9 / \rho(H)` for the time-varying
LSGD ones, which is stable for every :math:`\sigma \ge 0` since
:math:`\rho(A_\sigma^{-1} H) \le \rho(H)`. The step size enters only through
:math:`\eta H`, so each transform is built once with learning rate 1 and given
the Hessian :math:`\eta H`: one compilation per transform and :math:`n` serves
every problem.

**Measurements.** :func:`jaxsaddle.analysis.attraction_dimension` in float64
(``"constant"``, ``"periodic"`` with period 2, or ``"general"``), with its
default neutral tolerance. The same iteration is also run on the convex
quadratic with Hessian :math:`|H|` (the absolute values of the eigenvalues,
step size from the same rule applied to :math:`|H|`): ``dimension_at_minimum``
must be :math:`n` for a method that still converges to minima; a smaller
attraction dimension at the saddle bought by destabilising the
positive-curvature directions does not count. For
``config.monte_carlo_dims`` the constant and periodic candidates are
cross-checked on ``spread`` with :func:`jaxsaddle.analysis.monte_carlo_attraction`:
starts in the computed stable subspace (an orthonormal basis from an ordered
real Schur form of the monodromy matrix) must all converge, and random starts
in the whole space must not (when the dimension is below :math:`n`). The first
test needs a horizon over which the stable subspace contracts before rounding
errors, amplified by the unstable directions, take over; where the exponents
are too far apart for that in float64 it is reported as inconclusive.

An observation of ours, not the paper's: on ``ones`` (more generally for any
diagonal :math:`H` symmetric under the reflection :math:`i \mapsto -i \bmod n`
of the coordinates, which fixes the negative one), every symmetric circulant
operator commutes with the reflection, so the odd vectors
:math:`e_i - e_{-i}` span an invariant subspace of dimension
:math:`\lfloor (n-1)/2 \rfloor` on which :math:`H` is positive definite. Any
such method that converges at minima therefore has attraction dimension at
least :math:`\lfloor (n-1)/2 \rfloor` there, and reaching exactly that value
means making every even direction unstable.

Each unit is one candidate at one :math:`n`, all problems at once.
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg

import jaxsaddle
from experiments import _plots
from experiments import _runner
from jaxsaddle import analysis
from jaxsaddle import problems

NAME = "attraction-region"
MODIFICATIONS = (
  "lsgd_sigma_on_off",
  "lsgd_sigma_alternating",
  "lsgd_sigma_decaying",
  "flipped_laplacian",
  "upwind_circulant",
)
PROBLEMS = ("spread", "ones", "rotated")
# The basis-independence control is run for the methods whose dimension is known to be n - 1.
ROTATED_CONTROL = ("gd", "lsgd_sigma=")
MIN_SMOOTHED_LENGTH = 3  # as in jaxsaddle.laplacian_smoothing
# Many candidates share the n - 1 line, so each gets a marker and a line style besides a colour.
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h")
LINE_STYLES = ("-", "--", "-.", ":")


@dataclasses.dataclass(frozen=True)
class Config:
  """The attraction experiment.

  ``seeds`` is the number of random rotations of the ``rotated`` control, run
  at ``rotated_dims``, and ``steps`` the horizon of the Lyapunov exponents of
  the general time-varying candidate (its neutral tolerance is ``1 / steps``).
  """

  seeds: int = 3
  steps: int = 2000
  dims: tuple[int, ...] = tuple(range(2, 41))
  rotated_dims: tuple[int, ...] = tuple(range(2, 41))
  table_dims: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 12, 20, 30, 40)
  lsgd_sigmas: tuple[float, ...] = (0.5, 1.0, 10.0)
  modifications: tuple[str, ...] = MODIFICATIONS
  positive_eigenvalue_range: tuple[float, float] = (0.5, 2.0)
  step_fraction: float = 0.9
  on_off_sigma: float = 10.0
  alternating_sigmas: tuple[float, float] = (0.5, 10.0)
  decaying_sigma: float = 10.0
  flipped_sigma: float = 0.74
  upwind_sigma: float = 1.0
  monte_carlo_dims: tuple[int, ...] = (5, 8, 13, 21)
  monte_carlo_starts: int = 256
  fast_compile: bool = False  # XLA without optimisations (see experiments._runner)


def default_config(quick: bool = False) -> Config:
  """n = 2..40 with every candidate, or n = 2..12 with two modifications when ``quick``."""
  if quick:
    return Config(
      seeds=1,
      dims=tuple(range(2, 13)),
      # A random rotation compiles jax.random.normal for every n, the slowest part of a quick run.
      rotated_dims=(4, 7, 10),
      table_dims=tuple(range(2, 13)),
      modifications=("lsgd_sigma_on_off", "flipped_laplacian"),
      monte_carlo_dims=(5,),
      fast_compile=True,
    )
  return Config()


def candidates(config: Config) -> list[str]:
  return ["gd", *(f"lsgd_sigma={sigma:g}" for sigma in config.lsgd_sigmas), *config.modifications]


def candidate_label(candidate: str, config: Config) -> str:
  """A name that says what the candidate is."""
  if candidate == "gd":
    return "GD (optax.sgd)"
  if candidate.startswith("lsgd_sigma="):
    return f"LSGD, constant σ = {candidate.removeprefix('lsgd_sigma=')}"
  if candidate == "lsgd_sigma_on_off":
    return f"LSGD, σ alternating {config.on_off_sigma:g}, 0 (period 2)"
  if candidate == "lsgd_sigma_alternating":
    first, second = config.alternating_sigmas
    return f"LSGD, σ alternating {first:g}, {second:g} (period 2)"
  if candidate == "lsgd_sigma_decaying":
    return f"LSGD, σ_k = {config.decaying_sigma:g}/(k+1) (decaying)"
  if candidate == "flipped_laplacian":
    return f"dense I − ηB⁻¹H, B = I + σL, σ = {config.flipped_sigma:g} (indefinite)"
  if candidate == "upwind_circulant":
    return f"dense I − ηB⁻¹H, B = I + σ(I − Z), σ = {config.upwind_sigma:g} (non-symmetric)"
  raise ValueError(f"unknown candidate {candidate!r}; known: {candidates(config)}.")


class Iteration(NamedTuple):
  """How a candidate's iteration matrices are built and read."""

  kind: str  # "constant", "periodic" or "general", for analysis.attraction_dimension
  period: int | None
  # sigma(count) of the LSGD schedule (numpy or jax count); None for GD and dense operators.
  sigma: Callable[[Any], Any] | None
  dense_operator: Callable[[int], np.ndarray] | None  # B(n) for the dense candidates


def iteration(candidate: str, config: Config) -> Iteration:
  if candidate == "gd":
    return Iteration("constant", 1, None, None)
  if candidate.startswith("lsgd_sigma="):
    sigma = float(candidate.removeprefix("lsgd_sigma="))
    return Iteration("constant", 1, lambda count: sigma, None)
  if candidate == "lsgd_sigma_on_off":
    first, second = config.on_off_sigma, 0.0
    return Iteration("periodic", 2, lambda count: first + (second - first) * (count % 2), None)
  if candidate == "lsgd_sigma_alternating":
    first, second = config.alternating_sigmas
    return Iteration("periodic", 2, lambda count: first + (second - first) * (count % 2), None)
  if candidate == "lsgd_sigma_decaying":
    scale = config.decaying_sigma
    return Iteration("general", None, lambda count: scale / (count + 1), None)
  if candidate == "flipped_laplacian":
    sigma = config.flipped_sigma
    return Iteration("constant", 1, None, lambda n: smoothing_matrix(n, -sigma))
  if candidate == "upwind_circulant":
    sigma = config.upwind_sigma
    return Iteration("constant", 1, None, lambda n: upwind_matrix(n, sigma))
  raise ValueError(f"unknown candidate {candidate!r}; known: {candidates(config)}.")


def laplacian(n: int) -> np.ndarray:
  """The periodic 1-D discrete Laplacian, stencil [1, -2, 1] with wrap-around."""
  identity = np.eye(n)
  return np.roll(identity, 1, axis=0) + np.roll(identity, -1, axis=0) - 2 * identity


def smoothing_matrix(n: int, sigma: float) -> np.ndarray:
  """:math:`I - \\sigma L` (LSGD's :math:`A_\\sigma`; sign-flipped for sigma < 0), I for n < 3."""
  if n < MIN_SMOOTHED_LENGTH:
    return np.eye(n)
  return np.eye(n) - sigma * laplacian(n)


def upwind_matrix(n: int, sigma: float) -> np.ndarray:
  """:math:`I + \\sigma (I - Z)` with :math:`(Zx)_i = x_{i-1}`, I for n < 3."""
  if n < MIN_SMOOTHED_LENGTH:
    return np.eye(n)
  identity = np.eye(n)
  return identity + sigma * (identity - np.roll(identity, 1, axis=0))


def spectral_radius(matrix: np.ndarray) -> float:
  return float(np.max(np.abs(np.linalg.eigvals(matrix))))


def step_size(candidate: str, hessian: np.ndarray, config: Config) -> float:
  """:math:`0.9/\\rho(P^{-1}H)` for constant iterations, :math:`0.9/\\rho(H)` for LSGD schedules."""
  plan = iteration(candidate, config)
  n = hessian.shape[0]
  if plan.dense_operator is not None:
    preconditioned = np.linalg.solve(plan.dense_operator(n), hessian)
  elif plan.kind == "constant" and plan.sigma is not None:
    preconditioned = np.linalg.solve(smoothing_matrix(n, plan.sigma(0)), hessian)
  else:
    preconditioned = hessian
  return config.step_fraction / spectral_radius(preconditioned)


@functools.cache
def transform(candidate: str, config: Config) -> optax.GradientTransformation:
  """The optax transform of a candidate, with learning rate 1 (the step size is in the Hessian)."""
  plan = iteration(candidate, config)
  if candidate == "gd":
    return optax.sgd(1.0)
  if plan.kind == "constant":
    return jaxsaddle.lsgd(1.0, sigma=plan.sigma(0))
  scheduled_lsgd = optax.inject_hyperparams(jaxsaddle.lsgd, static_args=("order", "mode"))
  return scheduled_lsgd(learning_rate=1.0, sigma=plan.sigma)


def num_steps(plan: Iteration, config: Config) -> int:
  return config.steps if plan.kind == "general" else plan.period


def candidate_matrices(
  candidate: str, hessian: np.ndarray, eta: float, config: Config
) -> tuple[np.ndarray, float | None]:
  """The matrices :math:`M_0, \\dots, M_{T-1}` and, for transforms, their largest deviation
  from the dense :math:`I - \\eta A_{\\sigma_k}^{-1} H` (None for the dense candidates)."""
  plan = iteration(candidate, config)
  n = hessian.shape[0]
  steps = num_steps(plan, config)
  if plan.dense_operator is not None:
    matrix = np.eye(n) - eta * np.linalg.solve(plan.dense_operator(n), hessian)
    return matrix[None], None
  matrices = np.asarray(
    analysis.iteration_matrices(transform(candidate, config), jnp.asarray(eta * hessian), steps)
  )
  counts = np.arange(steps)
  sigmas = np.zeros(steps) if plan.sigma is None else plan.sigma(counts) * np.ones(steps)
  mismatch = 0.0
  for sigma in np.unique(sigmas):
    dense = np.eye(n) - eta * np.linalg.solve(smoothing_matrix(n, sigma), hessian)
    mismatch = max(mismatch, float(np.max(np.abs(matrices[sigmas == sigma] - dense))))
  return matrices, mismatch


def absolute_hessian(hessian: np.ndarray) -> np.ndarray:
  """:math:`|H| = V |\\Lambda| V^\\top`: the convex quadratic with the same eigenvectors."""
  eigenvalues, eigenvectors = np.linalg.eigh(hessian)
  return (eigenvectors * np.abs(eigenvalues)) @ eigenvectors.T


@functools.cache
def hessians(problem: str, n: int, config: Config) -> tuple[tuple[int | None, np.ndarray], ...]:
  """``(rotation_key, H)`` for each instance of a problem at dimension ``n``.

  The rotated Hessians are those of :func:`jaxsaddle.problems.quadratic_saddle`; the diagonal
  ones are written down directly (eager ``jax.hessian`` compiles every primitive for every n,
  which took longer than the rest of a unit).
  """
  if problem == "ones":
    positive = np.ones(n - 1)
  else:
    positive = np.linspace(*config.positive_eigenvalue_range, n - 1)
  eigenvalues = np.concatenate([[-1.0], positive])
  if problem != "rotated":
    return ((None, np.diag(eigenvalues)),)
  instances = []
  for key in range(config.seeds):
    quadratic = problems.quadratic_saddle(eigenvalues, rotation_key=key)
    hessian = jax.jit(jax.hessian(quadratic.value_fn))(jnp.zeros(n, jnp.float64))
    instances.append((key, np.asarray(hessian)))
  return tuple(instances)


def problems_of(candidate: str, n: int, config: Config) -> tuple[str, ...]:
  if candidate.startswith(ROTATED_CONTROL) and n in config.rotated_dims:
    return PROBLEMS
  return tuple(problem for problem in PROBLEMS if problem != "rotated")


def measure(matrices: np.ndarray, plan: Iteration) -> analysis.AttractionDimension:
  return analysis.attraction_dimension(
    jnp.asarray(matrices), kind=plan.kind, period=plan.period if plan.kind == "periodic" else None
  )


def stable_basis(matrices: np.ndarray, result: analysis.AttractionDimension) -> np.ndarray:
  """An orthonormal basis of the stable subspace: the leading columns of an ordered real Schur
  form of the monodromy matrix (exponents below ``-tol``, as counted by the dimension)."""
  monodromy = functools.reduce(lambda product, matrix: matrix @ product, matrices)
  threshold = math.exp(-result.tol * len(matrices))
  _, vectors, num_stable = scipy.linalg.schur(
    monodromy, output="real", sort=lambda re, im: math.hypot(re, im) < threshold
  )
  if num_stable != result.dimension:
    raise RuntimeError(
      f"the Schur form has {num_stable} stable directions, attraction_dimension "
      f"counted {result.dimension}."
    )
  return vectors[:, :num_stable]


def monte_carlo_check(
  matrices: np.ndarray, result: analysis.AttractionDimension, config: Config
) -> dict[str, Any]:
  r"""Random starts in the computed stable subspace, and in the whole space.

  With :math:`\chi_1` the fastest growth rate and :math:`\chi_s` the slowest
  contraction rate, a start in the stable subspace ends the horizon :math:`T`
  at about :math:`e^{\chi_s T} + \epsilon e^{\chi_1 T}` (rounding errors of
  size :math:`\epsilon \approx 10^{-16}` excite the unstable directions), and a
  start counts as converged when it shrank by :math:`e^{\chi_s T/2}`. So
  :math:`T` is at most :math:`30 / (\chi_1 + |\chi_s|/2)`, which keeps the
  rounding term :math:`e^{-7}` below the threshold, and at most
  :math:`12/|\chi_s|`. When that horizon contracts the stable subspace by less
  than :math:`e^{-6}` (rates too far apart for float64), the stable-subspace
  test is inconclusive and skipped; the random starts are still tested.
  """
  exponents = np.asarray(result.exponents)
  n = matrices.shape[-1]
  period = len(matrices)
  fastest = float(exponents[0])
  stable = exponents[exponents < -result.tol]
  slowest_stable = float(stable[0]) if stable.size else -1.0
  horizon = 12 / abs(slowest_stable)
  if fastest > 0:
    horizon = min(horizon, 30 / (fastest + abs(slowest_stable) / 2))
  horizon = min(2000, period * max(1, math.ceil(horizon / period)))
  tiled = jnp.asarray(np.tile(matrices, (horizon // period, 1, 1)))
  tol = math.exp(0.5 * slowest_stable * horizon)
  random_starts = analysis.monte_carlo_attraction(
    tiled, 0, num_starts=config.monte_carlo_starts, tol=tol
  )
  conclusive = result.dimension > 0 and abs(slowest_stable) * horizon >= 6
  record = {
    "check": "monte_carlo",
    "horizon": horizon,
    "tol": tol,
    "fraction_random": float(random_starts.fraction),
    "expected_fraction_random": 1.0 if result.dimension == n else 0.0,
    "fraction_stable_subspace": None,
  }
  if conclusive:
    in_subspace = analysis.monte_carlo_attraction(
      tiled,
      1,
      num_starts=config.monte_carlo_starts,
      slice_basis=jnp.asarray(stable_basis(matrices, result)),
      tol=tol,
    )
    record["fraction_stable_subspace"] = float(in_subspace.fraction)
  record["consistent"] = record["fraction_random"] == record["expected_fraction_random"] and (
    record["fraction_stable_subspace"] in (None, 1.0)
  )
  return record


def compute_unit(config: Config, unit: str) -> tuple[list[dict], dict[str, Any]]:
  """One candidate at one n: every problem, the check at the minimum, and Monte Carlo."""
  candidate, dim_text = unit.split("/")
  n = int(dim_text.removeprefix("n="))
  plan = iteration(candidate, config)
  start = time.perf_counter()
  records = []
  with jax.enable_x64(True):
    for problem in problems_of(candidate, n, config):
      for rotation_key, hessian in hessians(problem, n, config):
        eta = step_size(candidate, hessian, config)
        matrices, mismatch = candidate_matrices(candidate, hessian, eta, config)
        result = measure(matrices, plan)
        # The same step-size rule on the convex quadratic: a saddle-point step size may be
        # too long at the minimum for reasons that have nothing to do with the operator.
        convex = absolute_hessian(hessian)
        convex_eta = step_size(candidate, convex, config)
        at_minimum = measure(candidate_matrices(candidate, convex, convex_eta, config)[0], plan)
        common = {"candidate": candidate, "n": n, "problem": problem, "rotation_key": rotation_key}
        records.append(
          {
            **common,
            "check": "dimension",
            "eta": eta,
            "dimension": result.dimension,
            "num_neutral": result.num_neutral,
            "method": result.method,
            "period": result.period,
            "tol": result.tol,
            "exponents": _runner.to_json_floats(result.exponents),
            "eta_at_minimum": convex_eta,
            "dimension_at_minimum": at_minimum.dimension,
            "num_neutral_at_minimum": at_minimum.num_neutral,
            "dense_mismatch": mismatch,
          }
        )
        if problem == "spread" and n in config.monte_carlo_dims and plan.kind != "general":
          records.append({**common, **monte_carlo_check(matrices, result, config)})
  closing = {
    "candidate": candidate,
    "label": candidate_label(candidate, config),
    "n": n,
    "seconds": round(time.perf_counter() - start, 3),
  }
  return records, closing


def unit_names(config: Config) -> list[str]:
  return [f"{candidate}/n={n}" for candidate in candidates(config) for n in config.dims]


def dimension_records(run: _runner.RunDirectory) -> list[dict]:
  return [record for record in run.records() if record.get("check") == "dimension"]


def dimensions(run: _runner.RunDirectory, candidate: str, problem: str) -> dict[int, list[int]]:
  """n -> the dimension of every instance (one, or one per rotation)."""
  by_n: dict[int, list[int]] = {}
  for record in dimension_records(run):
    if record["candidate"] == candidate and record["problem"] == problem:
      by_n.setdefault(record["n"], []).append(record["dimension"])
  return by_n


def floor_half(n: int) -> int:
  return (n - 1) // 2


def _cell(values: list[int], neutral: int) -> str:
  text = str(values[0]) if min(values) == max(values) else f"{min(values)}–{max(values)}"
  return f"{text} (+{neutral} neutral)" if neutral else text


def _yes_no(matches: list[bool]) -> str:
  return "yes" if all(matches) else f"no (at {sum(matches)} of {len(matches)})"


def summary_table(run: _runner.RunDirectory, config: Config, problem: str) -> str:
  records = [r for r in dimension_records(run) if r["problem"] == problem]
  shown = [n for n in config.table_dims if n in config.dims]
  header = [
    "candidate",
    *(f"n={n}" for n in shown),
    "matches ⌊(n−1)/2⌋ for all n?",
    "= n − 1 for all n?",
    "dimension n at the minimum for all n?",
  ]
  rows = [
    ["n − 1 (GD)", *(n - 1 for n in shown), "", "", ""],
    ["⌊(n−1)/2⌋ (paper's mLSGD claim)", *(floor_half(n) for n in shown), "", "", ""],
  ]
  for candidate in candidates(config):
    mine = [r for r in records if r["candidate"] == candidate]
    if not mine:
      continue
    cells = []
    for n in shown:
      at_n = [r for r in mine if r["n"] == n]
      if not at_n:
        cells.append("–")
        continue
      cells.append(_cell([r["dimension"] for r in at_n], max(r["num_neutral"] for r in at_n)))
    rows.append(
      [
        candidate_label(candidate, config),
        *cells,
        _yes_no([r["dimension"] == floor_half(r["n"]) for r in mine]),
        _yes_no([r["dimension"] == r["n"] - 1 for r in mine]),
        _yes_no([r["dimension_at_minimum"] == r["n"] for r in mine]),
      ]
    )
  return _runner.markdown_table(header, rows)


PROBLEM_TITLES = {
  "spread": "H = diag(−1, λ₂..λₙ), λ evenly in [{low:g}, {high:g}]",
  "ones": "H = diag(−1, 1, …, 1)",
  "rotated": "spread spectrum, random rotation keys {keys}, n in {rotated_dims}",
}


def problem_title(problem: str, config: Config) -> str:
  low, high = config.positive_eigenvalue_range
  rotated_dims = _ranges(sorted(set(config.rotated_dims) & set(config.dims)))
  return PROBLEM_TITLES[problem].format(
    low=low, high=high, keys=_ranges(list(range(config.seeds))), rotated_dims=rotated_dims
  )


def _ranges(values: list[int]) -> str:
  """``[2, 3, 4, 7]`` -> ``"2–4, 7"``."""
  groups = []
  for value in values:
    if groups and value == groups[-1][1] + 1:
      groups[-1][1] = value
    else:
      groups.append([value, value])
  return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in groups)


def converges_at_minima(run: _runner.RunDirectory, candidate: str, problem: str) -> bool:
  """Whether the candidate's iteration on every convex quadratic |H| of ``problem`` had
  dimension n."""
  return all(
    record["dimension_at_minimum"] == record["n"]
    for record in dimension_records(run)
    if record["candidate"] == candidate and record["problem"] == problem
  )


def make_figure(run: _runner.RunDirectory, config: Config) -> str:
  """Dimension against n, one panel per problem, with the n − 1 and ⌊(n−1)/2⌋ lines."""
  plt = _plots.plt  # pyplot with the Agg backend that _plots selects
  figure, panels = plt.subplots(
    1, len(PROBLEMS), figsize=(6 * len(PROBLEMS), 5.5), layout="constrained", sharey=True
  )
  dims = np.asarray(config.dims)
  # tab10 without its grey, which the reference lines use.
  colors = [color for index, color in enumerate(plt.get_cmap("tab10").colors) if index != 7]
  for axes, problem in zip(panels, PROBLEMS, strict=True):
    axes.plot(dims, dims - 1, color="0.2", linewidth=3, alpha=0.35, label="n − 1 (GD)")
    axes.plot(
      dims,
      (dims - 1) // 2,
      color="black",
      linestyle="--",
      linewidth=1.5,
      label="⌊(n−1)/2⌋ (paper's mLSGD claim)",
    )
    for index, candidate in enumerate(candidates(config)):
      by_n = dimensions(run, candidate, problem)
      if not by_n:
        continue
      ns = sorted(by_n)
      label = candidate_label(candidate, config)
      if not converges_at_minima(run, candidate, problem):
        label += " [unstable at a minimum]"
      color = colors[index % len(colors)]
      # Hollow markers shrinking with the index, so that candidates on the same line show as
      # nested rings instead of hiding each other.
      # The largest dimension over rotations, with a bar down to the smallest where they differ.
      highest = np.asarray([max(by_n[n]) for n in ns])
      axes.errorbar(
        ns,
        highest,
        yerr=[highest - np.asarray([min(by_n[n]) for n in ns]), np.zeros(len(ns))],
        capsize=2,
        color=color,
        marker=MARKERS[index % len(MARKERS)],
        markersize=max(2.5, 9.0 - 0.8 * index),
        markerfacecolor="none",
        linestyle=LINE_STYLES[index % len(LINE_STYLES)],
        linewidth=1.5,
        label=label,
      )
    axes.set_title(problem_title(problem, config), fontsize="medium")
    axes.set_xlabel("n")
    axes.grid(alpha=0.3)
  panels[0].set_ylabel("attraction-region dimension (stable exponents)")
  handles, labels = panels[0].get_legend_handles_labels()
  figure.legend(handles, labels, loc="outside lower center", ncol=3, fontsize="small")
  figure.suptitle(
    "Attraction region of the saddle of ½xᵀHx (λ₁ = −1): linearised dimension vs n "
    "(candidates on the same line show as nested rings)"
  )
  path = run.figures / "attraction.png"
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return str(path.relative_to(run.path))


def _stable_fraction_cell(record: dict, dimension: int) -> str:
  if record["fraction_stable_subspace"] is not None:
    return f"{record['fraction_stable_subspace']:g}"
  return "– (dimension 0)" if dimension == 0 else "inconclusive (rates too far apart)"


def monte_carlo_lines(run: _runner.RunDirectory, config: Config) -> list[str]:
  checks = [r for r in run.records() if r.get("check") == "monte_carlo"]
  if not checks:
    return ["No Monte-Carlo cross-checks were configured."]
  dims = {
    (r["candidate"], r["n"]): r["dimension"]
    for r in dimension_records(run)
    if r["problem"] == "spread"
  }
  rows = [
    [
      candidate_label(r["candidate"], config),
      r["n"],
      dims[(r["candidate"], r["n"])],
      r["horizon"],
      _stable_fraction_cell(r, dims[(r["candidate"], r["n"])]),
      f"{r['fraction_random']:g}",
      "yes" if r["consistent"] else "**NO**",
    ]
    for r in checks
  ]
  header = [
    "candidate",
    "n",
    "dimension",
    "horizon",
    "fraction converged, starts in the stable subspace",
    "fraction converged, random starts",
    "consistent?",
  ]
  return [
    f"On `spread`, {config.monte_carlo_starts} starts each "
    "(jaxsaddle.analysis.monte_carlo_attraction): every start in the computed stable "
    "subspace should converge, and no random start should when the dimension is below n.",
    "",
    _runner.markdown_table(header, rows),
  ]


def verdict_lines(run: _runner.RunDirectory, config: Config) -> list[str]:
  """Which candidates reach ⌊(n−1)/2⌋ at every n, and which go below n − 1 at all, per problem."""
  lines = ["## Verdict", ""]
  for problem in PROBLEMS:
    records = [r for r in dimension_records(run) if r["problem"] == problem]
    matching, smaller = [], []
    for candidate in candidates(config):
      mine = [r for r in records if r["candidate"] == candidate]
      if not mine:
        continue
      label = candidate_label(candidate, config)
      if not converges_at_minima(run, candidate, problem):
        label += " (unstable at a minimum)"
      if all(r["dimension"] == floor_half(r["n"]) for r in mine):
        matching.append(label)
      if any(r["dimension"] < r["n"] - 1 for r in mine):
        smaller.append(label)
    lines.append(
      f"- `{problem}`: ⌊(n−1)/2⌋ at every n: {', '.join(matching) or 'no candidate'}; "
      f"below n − 1 at some n: {', '.join(smaller) or 'no candidate'}."
    )
  return lines


def summary(run: _runner.RunDirectory, config: Config, figure: str) -> str:
  seconds = sum(closing["seconds"] for closing in run.finished_units().values())
  lines = [
    "# Attraction-region dimension of a quadratic saddle",
    "",
    "The dimension of the set of starts from which the linearised iteration converges to the "
    "saddle of f = ½xᵀHx (one negative eigenvalue, λ₁ = −1), from "
    "`jaxsaddle.analysis.attraction_dimension` in float64; `(+k neutral)` counts exponents "
    "within the neutral tolerance, which the dimension leaves out. The last column runs the "
    "same iteration on the convex quadratic with Hessian |H| (step size from the same rule "
    "applied to |H|): a method that still converges to minima has dimension n there. "
    "**Nothing here is the paper's mLSGD**, whose update rule and canonical quadratic class "
    "we could not read; the candidates are documented modifications of LSGD under their own "
    "names (module docstring of experiments/attraction.py).",
    "",
    f"Step sizes: η = {config.step_fraction:g}/ρ(P⁻¹H) for constant iterations, "
    f"{config.step_fraction:g}/ρ(H) for σ schedules; the general time-varying candidate uses "
    f"Lyapunov exponents over {config.steps} steps. Units took {seconds:.1f} s in all.",
    "",
  ]
  lines += [*verdict_lines(run, config), ""]
  for problem in PROBLEMS:
    lines += [f"## `{problem}`: {problem_title(problem, config)}", ""]
    lines += [summary_table(run, config, problem), ""]
  records = dimension_records(run)
  transforms = [r["dense_mismatch"] for r in records if r["dense_mismatch"] is not None]
  lines += [
    "## Checks",
    "",
    "- Largest difference between the iteration matrices of the optax transforms "
    "(`jaxsaddle.analysis.iteration_matrices`) and the dense I − ηA_σ⁻¹H: "
    f"{max(transforms, default=0.0):.2g}.",
    "",
    *monte_carlo_lines(run, config),
    "",
    "## Figure",
    "",
    f"![{figure}]({figure})",
    "",
  ]
  return "\n".join(lines)


def check_config(config: Config) -> None:
  """Raises ValueError for a config the run would fail on; the CLI calls it before writing."""
  _runner.check_seeds_and_steps(config)
  if min(config.dims) < 2:
    raise ValueError(f"dims must be at least 2 (one negative, one positive), got {config.dims}.")
  for candidate in candidates(config):
    candidate_label(candidate, config)  # rejects unknown names


def run(run_dir: _runner.RunDirectory) -> str:
  """Computes the missing units, then writes the figure and summary; returns the tables."""
  config: Config = run_dir.config
  check_config(config)
  _runner.run_units(run_dir, unit_names(config), functools.partial(compute_unit, config))
  figure = make_figure(run_dir, config)
  run_dir.write_summary(summary(run_dir, config, figure))
  return "\n\n".join(
    f"{problem}: {problem_title(problem, config)}\n{summary_table(run_dir, config, problem)}"
    for problem in PROBLEMS
  )
