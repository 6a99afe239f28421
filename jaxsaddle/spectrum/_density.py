"""The Hessian's spectral density by stochastic Lanczos quadrature, and its moments."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsaddle import _checks
from jaxsaddle import _random
from jaxsaddle import _sharding
from jaxsaddle import curvature
from jaxsaddle.spectrum._common import Estimate
from jaxsaddle.spectrum._common import ProbeDistribution
from jaxsaddle.spectrum._common import PyTree
from jaxsaddle.spectrum._common import ValueFn
from jaxsaddle.spectrum._common import _all_finite
from jaxsaddle.spectrum._common import _check_value_fn
from jaxsaddle.spectrum._common import _checked
from jaxsaddle.spectrum._common import _compute_dtype
from jaxsaddle.spectrum._common import _linearize
from jaxsaddle.spectrum._common import _map_probes
from jaxsaddle.spectrum._common import _mean_and_standard_error
from jaxsaddle.spectrum._common import _probe

_DEFAULT_GRID_POINTS = 1000
_DEFAULT_RELATIVE_BROADENING = 0.01
# Kernel widths on either side of the extreme nodes: the Gaussian mass left outside is 6e-7.
_GRID_MARGIN = 5.0


class SpectralDensity(NamedTuple):
  """The output of :func:`hessian_density`.

  Attributes:
    nodes: Gauss quadrature nodes (Ritz values), shape ``(num_probes, num_steps)``, ascending
      per probe; NaN past a probe's valid Lanczos steps (breakdown).
    weights: the matching weights, squared first components of the eigenvectors of
      :math:`T`; each row sums to 1 and is zero past the valid steps.
    grid: the points at which ``density`` is evaluated.
    density: the Gaussian-broadened density on ``grid`` (not renormalised on the grid).
    broadening: the standard deviation :math:`\\sigma` of the Gaussian kernel.
  """

  nodes: jax.Array
  weights: jax.Array
  grid: jax.Array
  density: jax.Array
  broadening: jax.Array


def _gauss_quadrature(result: curvature.LanczosResult) -> tuple[jax.Array, jax.Array]:
  """Nodes (eigenvalues of the valid block of T) and weights (squared first components)."""
  values, vectors, valid = curvature._padded_eigh(result)
  return jnp.where(valid, values, jnp.nan), jnp.where(valid, vectors[0] ** 2, 0)


def _weighted_nodes(nodes: jax.Array, weights: jax.Array) -> jax.Array:
  """Nodes with the empty (zero-weight, NaN) slots at 0; NaN weights keep NaN nodes."""
  return jnp.where(weights == 0, 0, nodes)


def _broadened_density(nodes, weights, grid, broadening):
  """The grid, the density on it and the kernel width, from flattened nodes and weights."""
  safe = _weighted_nodes(nodes, weights)
  present = weights != 0
  low = jnp.min(jnp.where(present, safe, jnp.inf))
  high = jnp.max(jnp.where(present, safe, -jnp.inf))
  if broadening is None:
    width = high - low
    size = jnp.maximum(jnp.abs(low), jnp.abs(high))
    # A spectrum that is a single point has no width to scale with; fall back to its size. So
    # does one whose width is rounding (nodes 3 to 3.000001 for 3 I: a kernel of 1e-8, below
    # float32's spacing at 3, gave a density integrating to 8.7).
    point = width <= 100 * jnp.finfo(nodes.dtype).eps * size
    broadening = _DEFAULT_RELATIVE_BROADENING * jnp.where(point, jnp.maximum(size, 1), width)
  # A traced broadening escapes hessian_density's check: a non-positive one gives NaN.
  broadening = jnp.asarray(broadening, nodes.dtype)
  broadening = jnp.where(broadening > 0, broadening, jnp.nan)
  if grid is None:
    grid = jnp.linspace(
      low - _GRID_MARGIN * broadening, high + _GRID_MARGIN * broadening, _DEFAULT_GRID_POINTS
    )
  grid = jnp.asarray(grid, nodes.dtype)
  kernel = jnp.exp(-0.5 * ((grid[:, None] - safe[None, :]) / broadening) ** 2)
  density = kernel @ weights / (math.sqrt(2 * math.pi) * broadening)
  return grid, density, broadening


def _flattest_ritz_pair(result: curvature.LanczosResult) -> tuple[jax.Array, PyTree]:
  """The Ritz value nearest zero and its Ritz vector (unstacked), from a run with a basis."""
  values, coefficients, _ = curvature._tridiagonal_eigenpairs(result)
  nearest = jnp.argmin(jnp.where(jnp.isnan(values), jnp.inf, jnp.abs(values)))
  vector = curvature._combine(result.basis, coefficients[:, nearest, None])
  return values[nearest], jax.tree.map(lambda stacked: stacked[0], vector)


def _slq(
  hvp_fn,
  params,
  key,
  num_probes,
  num_steps,
  distribution,
  reorthogonalize,
  batch_size,
  *,
  flattest=False,
):
  """Each probe's quadrature rule, and whether the operator underflows; with ``flattest``
  also each probe's Ritz pair nearest zero (values, and vectors stacked leaf by leaf)."""
  if any(_sharding.explicit_spec(leaf) is not None for leaf in jax.tree.leaves(params)):
    # Batched, each lax.cond of Lanczos becomes a select whose predicate JAX broadcasts without
    # the Explicit sharding of the operands, a ShardingTypeError; one at a time they stay conds.
    batch_size = 1

  def quadrature(probe_key):
    probe = _probe(probe_key, params, distribution)
    result = curvature.lanczos(
      hvp_fn, probe, num_steps, reorthogonalize=reorthogonalize, return_basis=flattest
    )
    rule = _gauss_quadrature(result), curvature._largest_entry(result)
    return (*rule, _flattest_ritz_pair(result)) if flattest else rule

  keys = jax.random.split(_random.canonicalize_key(key), num_probes)
  quadratures, largest, *flat_pairs = _map_probes(quadrature, keys, batch_size)
  # Judged from all probes: one that lies in a tiny eigenspace has a tiny T of its own, which
  # is harmless beside the others.
  underflowed = curvature._underflows(jnp.max(largest), params)
  return (quadratures, underflowed, *flat_pairs)


def hessian_density(
  value_fn: ValueFn,
  params: PyTree,
  *,
  key: jax.Array | int,
  num_probes: int,
  num_steps: int,
  grid: jax.Array | None = None,
  broadening: float | jax.Array | None = None,
  distribution: ProbeDistribution = "rademacher",
  reorthogonalize: curvature.Reorthogonalization = True,
  probe_batch_size: int | None = None,
) -> SpectralDensity:
  r"""Estimates the Hessian eigenvalue density by stochastic Lanczos quadrature.

  Ghorbani, Krishnan and Xiao (ICML 2019), after Golub and Meurant and Lin, Saad and Yang:
  for each of :math:`P` random unit probes, :math:`m` Lanczos steps from the probe give the
  Gauss quadrature rule :math:`\{(\theta_{pj}, \tau_{pj})\}` of the probe's spectral measure
  (see the module docstring), and

  .. math::

    \frac1n \sum_{i=1}^n g(\lambda_i) \approx
    \frac1P \sum_{p=1}^P \sum_{j=1}^m \tau_{pj}\, g(\theta_{pj}),

  exactly in expectation for polynomials :math:`g` of degree below :math:`2m` (see
  :func:`spectral_moment`). Probes are normalised Rademacher (or Gaussian) vectors, run
  in parallel under ``vmap`` or in batches (``probe_batch_size``). Isolated
  eigenvalues appear as converged nodes carrying their share of the mass; the bulk is
  resolved to about its width divided by :math:`m`. Ghorbani et al. find 80-90 steps enough
  for networks with millions of parameters.

  **Broadening.** The default kernel width is :math:`\sigma = 0.01\,(\theta_{\max} -
  \theta_{\min})`: proportional to the spectral width, so rescaling the loss rescales the
  density exactly, and comparable to the spacing of an :math:`m \approx 90`-node quadrature
  rule in the bulk (:math:`\approx \pi R / m`, 1.7% of the width for a semicircle of radius
  :math:`R`), so that several probes fill a smooth bulk while outliers more than a few
  percent of the width apart stay separate. Ghorbani et al.'s code uses :math:`\sigma^2 =
  10^{-5} \max(1, \theta_{\max} - \theta_{\min})` instead, which is narrower for wide
  spectra and not scale-free; pass ``broadening`` to reproduce it. A spectrum that is a
  single point, or whose width is within rounding of one (at most :math:`100 \epsilon
  \max|\theta|`), gets :math:`\sigma = 0.01 \max(|\theta|, 1)`.

  Args:
    value_fn: the loss, a function of a pytree returning a real scalar.
    params: the point at which the Hessian is taken.
    key: a PRNG key or an int seed for the probes.
    num_probes: the number of probes :math:`P`.
    num_steps: the number of Lanczos steps :math:`m` per probe.
    grid: where to evaluate the density, a 1-D array; by default 1000 points from the
      smallest node minus :math:`5\sigma` to the largest plus :math:`5\sigma`, which holds
      all but :math:`6 \times 10^{-7}` of the kernel mass. With the default :math:`\sigma`,
      the nodes' span over 100, its spacing is about :math:`\sigma / 9` and the density
      integrates to 1 on it; a ``broadening`` below a thousandth of the span puts the points
      more than :math:`\sigma` apart, where they miss kernels: pass a finer ``grid`` (spacing
      at most :math:`\sigma`). A narrower grid loses the mass outside it.
    broadening: the kernel standard deviation :math:`\sigma`, or None for the default above.
    distribution: ``"rademacher"`` or ``"gaussian"`` probes (both normalised).
    reorthogonalize: full reorthogonalisation in Lanczos, as in Ghorbani et al.;
      ``"partial"`` keeps the basis semi-orthogonal, which gives the same nodes and weights up
      to round-off for fewer passes over the basis when probes run one at a time
      (``probe_batch_size=1``; probes run together share every pass); without it converged
      nodes get "ghost" copies that share the mass of the original, and gradients through
      the density are NaN once ``num_steps`` reaches the dimension (differentiate with
      ``True`` or ``"partial"``).
    probe_batch_size: how many probes run at once (each holds a ``num_steps`` by ``n``
      Lanczos basis); None, the default, runs all of them at once under ``vmap``, which
      suits accelerators. On CPUs one at a time (``probe_batch_size=1``) is faster and holds
      one basis in memory: on the 784-512-512-10 MLP of ``benchmarks``, 4 probes of 20 steps
      took 385 ms one at a time against 902 ms all at once with full reorthogonalisation, and
      184 against 365 ms without (``benchmarks/results/cpu/slq_probe_batching.log``; under
      ``vmap`` Lanczos's ``lax.cond`` calls become selects). Params
      sharded over Explicit mesh axes run one probe at a time whatever this says: batching
      turns Lanczos's ``lax.cond`` calls into selects, whose predicate JAX broadcasts without
      the operands' sharding, which fails.

  Returns:
    A :class:`SpectralDensity`. A NaN or infinite loss, gradient or product, or a nonzero
    Hessian too small for Lanczos in the compute dtype (in float32, norms below
    :math:`\text{tiny}\, n / \epsilon`, about 3e-28 for 3,000 parameters; see
    :func:`jaxsaddle.curvature.lanczos`), raises ``ValueError`` called eagerly and gives NaN
    under ``jit``: nodes spoiled by underflow are never returned as a spectrum.
  """
  owner = "hessian_density"
  _checks.check_loop_length(owner, "num_probes", num_probes)
  _checks.check_loop_length(owner, "num_steps", num_steps)
  if distribution not in ("rademacher", "gaussian"):
    raise ValueError(
      f"{owner}: distribution must be 'rademacher' or 'gaussian', got {distribution!r}."
    )
  if broadening is not None:
    _checks.check_positive(owner, "broadening", broadening)
  if probe_batch_size is not None:
    _checks.check_loop_length(owner, "probe_batch_size", probe_batch_size)
  if grid is not None and jnp.ndim(grid) != 1:
    raise ValueError(f"{owner}: grid must be a 1-D array of points, got shape {jnp.shape(grid)}.")
  if grid is not None and jnp.issubdtype(jnp.result_type(grid), jnp.complexfloating):
    raise TypeError(f"{owner}: grid must hold real numbers, got dtype {jnp.result_type(grid)}.")
  params = _check_value_fn(owner, value_fn, params)
  _, _, hvp_fn, finite = _linearize(value_fn, params)
  (nodes, weights), underflowed = _slq(
    hvp_fn, params, key, num_probes, num_steps, distribution, reorthogonalize, probe_batch_size
  )
  if not isinstance(underflowed, jax.core.Tracer) and bool(underflowed):
    raise ValueError(
      f"{owner}: the Hessian is too small for Lanczos in {_compute_dtype(params)}: below "
      "tiny * n / eps the recursion's rounding-level coefficients are subnormal numbers and "
      "its nodes lose their accuracy; scale the loss up by a power of two or use float64."
    )
  # Empty slots hold NaN nodes by design; a NaN or infinite node with weight is an overflow.
  finite = finite & ~underflowed
  finite = finite & _all_finite(weights) & _all_finite(_weighted_nodes(nodes, weights))
  grid, density, broadening = _broadened_density(
    nodes.reshape(-1), weights.reshape(-1) / num_probes, grid, broadening
  )
  return _checked(owner, finite, SpectralDensity(nodes, weights, grid, density, broadening))


def spectral_moment(
  spectrum: SpectralDensity | tuple[jax.Array, jax.Array], power: int
) -> Estimate:
  r"""Estimates :math:`\frac1n \operatorname{tr}(H^k)`, the ``power``-th spectral moment, from SLQ.

  Per probe, :math:`\sum_j \tau_{pj} \theta_{pj}^k = v_p^\top H^k v_p` exactly for
  :math:`k < 2m` (Gauss quadrature), a Hutchinson sample of :math:`\operatorname{tr}(H^k)/n`.
  The estimate is their mean over probes and the standard error their sample standard
  deviation over :math:`\sqrt P` (infinite for one probe).

  Args:
    spectrum: a :class:`SpectralDensity`, or ``(nodes, weights)`` of shape
      ``(num_probes, num_steps)``.
    power: the moment :math:`k \ge 0`.

  Returns:
    An :class:`Estimate`.
  """
  owner = "spectral_moment"
  if not isinstance(spectrum, (SpectralDensity, tuple)):
    raise ValueError(
      f"{owner}: spectrum must be a SpectralDensity or a (nodes, weights) pair from SLQ, got "
      f"{type(spectrum).__name__}; the moment of known eigenvalues is jnp.mean(eigenvalues ** "
      "power)."
    )
  nodes, weights = spectrum[:2]
  if jnp.ndim(nodes) != 2 or jnp.shape(nodes) != jnp.shape(weights):
    raise ValueError(
      f"{owner}: nodes and weights must both have shape (num_probes, num_steps), got "
      f"{jnp.shape(nodes)} and {jnp.shape(weights)}."
    )
  if isinstance(power, bool) or not isinstance(power, (int, np.integer)) or power < 0:
    raise ValueError(f"{owner}: power must be a non-negative int, got {power!r}.")
  nodes, weights = _spectrum_arrays(owner, (nodes, weights))
  return _spectral_moment(nodes, weights, int(power))


@jax.jit(static_argnames="power")
def _spectral_moment(nodes: jax.Array, weights: jax.Array, power: int) -> Estimate:
  per_probe = jnp.sum(weights * _weighted_nodes(nodes, weights) ** power, axis=1)
  return Estimate(*_mean_and_standard_error(per_probe))


def _spectrum_arrays(owner: str, spectrum) -> tuple[jax.Array, jax.Array]:
  """Validated ``(nodes, weights)`` of one shape from any form of spectrum."""
  if isinstance(spectrum, curvature.RitzPairs):
    raise ValueError(
      f"{owner}: got RitzPairs, a few extreme eigenvalues rather than a sample of the whole "
      "spectrum; pass hessian_density's result, or pairs.eigenvalues when they are every "
      "eigenvalue (missing ones are NaN)."
    )
  if isinstance(spectrum, SpectralDensity) or (isinstance(spectrum, tuple) and len(spectrum) == 2):
    nodes, weights = jnp.asarray(spectrum[0]), jnp.asarray(spectrum[1])
    if nodes.shape != weights.shape:
      raise ValueError(
        f"{owner}: nodes and weights must have one shape, got {nodes.shape} and {weights.shape}."
      )
    if nodes.ndim == 0:
      # Two eigenvalues in a tuple would otherwise be read as one node and its weight.
      raise ValueError(
        f"{owner}: a (nodes, weights) pair holds arrays, got two scalars; pass two eigenvalues "
        "as a 1-D array."
      )
    if not isinstance(weights, jax.core.Tracer) and bool(jnp.any(weights < 0)):
      raise ValueError(f"{owner}: weights must be non-negative, got {weights}.")
  else:
    nodes = jnp.asarray(spectrum)
    if nodes.ndim != 1:
      raise ValueError(
        f"{owner}: a spectrum is a SpectralDensity, a (nodes, weights) pair or a 1-D array of "
        f"eigenvalues, got an array of shape {nodes.shape}."
      )
    weights = jnp.ones_like(nodes)
  for name, array in (("nodes", nodes), ("weights", weights)):
    # A Hessian's spectrum is real: complex values would be cast, dropping their imaginary part.
    if jnp.issubdtype(array.dtype, jnp.complexfloating) or array.dtype == bool:
      raise TypeError(f"{owner}: {name} must be real numbers, got dtype {array.dtype}.")
  if nodes.size == 0:
    raise ValueError(f"{owner}: the spectrum is empty.")
  # At least float32, as elsewhere: in float16 the weights of 70,000 eigenvalues sum past
  # its largest number and every statistic came out 0 or NaN.
  dtype = (
    jnp.promote_types(nodes.dtype, jnp.float32)
    if jnp.issubdtype(nodes.dtype, jnp.floating)
    else jnp.result_type(float)
  )
  return nodes.astype(dtype), weights.astype(dtype)
