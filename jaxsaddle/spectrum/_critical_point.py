"""Minimum, strict or degenerate saddle, not critical or undetermined: the critical points of
:func:`classify_critical_point`."""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxsaddle import _checks
from jaxsaddle import _random
from jaxsaddle import _sharding
from jaxsaddle import curvature
from jaxsaddle.spectrum._common import PyTree
from jaxsaddle.spectrum._common import ValueFn
from jaxsaddle.spectrum._common import _check_value_fn
from jaxsaddle.spectrum._common import _checked
from jaxsaddle.spectrum._common import _compute_dtype
from jaxsaddle.spectrum._common import _linearize
from jaxsaddle.spectrum._density import _slq
from jaxsaddle.spectrum._shape import degeneracy

# Kinds returned by classify_critical_point, indexed by its integer ``kind``.
CRITICAL_POINT_KINDS = (
  "not critical",
  "minimum",
  "strict saddle",
  "degenerate saddle",
  "undetermined",
)
_NOT_CRITICAL, _MINIMUM, _STRICT_SADDLE, _DEGENERATE_SADDLE, _UNDETERMINED = range(5)
# The relative residual at which the smallest Ritz pair counts as converged.
_CONVERGED_RELATIVE = 1e-2


class CriticalPointReport(NamedTuple):
  """The output of :func:`classify_critical_point`.

  Attributes:
    kind: an int32 index into ``CRITICAL_POINT_KINDS``: 0 "not critical", 1 "minimum",
      2 "strict saddle", 3 "degenerate saddle", 4 "undetermined" (``kind_name`` gives the
      string).
    value: the loss at the point.
    gradient_norm: :math:`\\|\\nabla f\\|`.
    smallest_eigenvalue: :math:`\\lambda_{\\min}` (exact for small problems, else Lanczos).
    largest_eigenvalue: :math:`\\lambda_{\\max}` (likewise).
    index: the fraction of eigenvalues below ``-eigenvalue_tol`` (NaN for a Hessian too
      small for Lanczos in the compute dtype, whose SLQ nodes are unreliable).
    degeneracy: the fraction of eigenvalues within ``eigenvalue_tol`` of zero (likewise).
    probe_decrease: the largest decrease :math:`f(x) - f(x + r d)` seen by the higher-order
      probe (negative when every probe went up).
    smallest_residual: :math:`\\|Hv - \\theta v\\|` for ``smallest_eigenvalue``'s Ritz
      pair, computed with one more product (0 on the dense path).
  """

  kind: jax.Array
  value: jax.Array
  gradient_norm: jax.Array
  smallest_eigenvalue: jax.Array
  largest_eigenvalue: jax.Array
  index: jax.Array
  degeneracy: jax.Array
  probe_decrease: jax.Array
  smallest_residual: jax.Array

  @property
  def kind_name(self) -> str:
    """The kind as a string (needs a concrete, unbatched ``kind``)."""
    return CRITICAL_POINT_KINDS[int(self.kind)]


def _dense_eigh(hvp_fn, params, dtype) -> tuple[jax.Array, PyTree]:
  """All eigenpairs of the Hessian built from n vmapped products; vectors stacked as a pytree.

  Raveling an explicitly sharded leaf is not defined, so such leaves are gathered first (the
  dense path serves small problems) and the eigenvectors split again like them.
  """
  gather = lambda tree: jax.tree.map(_sharding.replicated, tree)
  flat, unravel = ravel_pytree(gather(params))
  split_like_params = lambda tree: jax.tree.map(_sharding.sharded_like, tree, params)
  columns = jax.vmap(lambda e: ravel_pytree(gather(hvp_fn(split_like_params(unravel(e)))))[0])(
    jnp.eye(flat.size, dtype=flat.dtype)
  )
  columns = columns.astype(dtype)
  values, vectors = jnp.linalg.eigh(0.5 * (columns + columns.T))
  vectors = jax.vmap(unravel)(vectors.T.astype(flat.dtype))
  split = lambda stacked, leaf: _sharding.sharded_like(stacked, leaf, leading_axes=1)
  return values, jax.tree.map(split, vectors, params)


def classify_critical_point(
  value_fn: ValueFn,
  params: PyTree,
  *,
  gradient_tol: float,
  eigenvalue_tol: float,
  num_steps: int,
  key: jax.Array | int,
  num_probes: int = 4,
  probe_radii: Sequence[float] = (1e-3, 1e-2, 1e-1),
  num_probe_directions: int = 8,
) -> CriticalPointReport:
  r"""Classifies ``params``: minimum, strict or degenerate saddle, not critical, or undetermined.

  With :math:`g = \|\nabla f(x)\|`, :math:`\tau` = ``eigenvalue_tol`` and
  :math:`\lambda_{\min}(\nabla^2 f(x))` (see **Spectrum** below):

  - **not critical** if :math:`g > ` ``gradient_tol``;
  - **strict saddle** if :math:`\lambda_{\min} < -\tau`: a direction of negative curvature,
    from which gradient methods escape (Ge et al. 2015; this includes local maxima);
  - otherwise the Hessian is positive semi-definite up to :math:`\tau`. If
    :math:`\lambda_{\min} > \tau` it is positive definite: **minimum**. If
    :math:`|\lambda_{\min}| \le \tau`, second-order information cannot decide (deciding is
    NP-hard in general, Anandkumar and Ge 2016), so a **higher-order probe** evaluates
    :math:`f(x \pm r d)` for each radius :math:`r` in ``probe_radii`` and each direction
    :math:`d` among the eigenvector of :math:`\lambda_{\min}` (the flattest direction),
    ``num_probe_directions`` uniformly random unit directions and as many random mixtures of
    the near-null eigenvectors (:math:`|\lambda| \le \tau`; on the Lanczos path, of the
    smallest Ritz vector and each SLQ probe's Ritz vector nearest zero, which is the probe's
    component in a degenerate eigenspace): descent confined to a null space of two or more
    dimensions lies along mixtures, as for :math:`(w_1 w_2 w_3 - 1)^2 + \sum_{i > 3} c_i
    w_i^2` with :math:`c_i > 0`, constant along each null axis and dominated by the
    :math:`c_i` along random directions. It reports descent when

    .. math::

      f(x + r d) < f(x) - r\, g_{\rm tol} - \tfrac12 \tau r^2 - 64 \epsilon\,
        (|f(x)| + |f(x + r d)|),

    a decrease no gradient within the tolerance, no curvature above :math:`-\tau` and no
    rounding can explain, so it comes from third- or higher-order terms:
    **degenerate saddle**. With no such descent the point is reported a **minimum**
    (possibly degenerate: ``degeneracy`` > 0). So :math:`(w_1 w_2 w_3 - 1)^2` at 0 (zero
    Hessian, descent of order :math:`r^3`) and :math:`x^2 - y^4` are degenerate saddles,
    while :math:`x^2 + y^4` is a minimum. A probe can miss descent confined to a thin cusp
    or beyond the largest radius; set ``probe_radii`` to the scale of the problem;
  - **undetermined** (Lanczos path only) if the smallest Ritz value :math:`\theta` is at
    least :math:`-\tau` but :math:`\theta - r < -\tau`, with :math:`r` its residual
    estimate: :math:`\theta` is an upper bound on :math:`\lambda_{\min}`, and one that has
    not converged says nothing of how far below it :math:`\lambda_{\min}` lies. With
    eigenvalues -0.02 and 199 spread over [0.01, 100], 20 steps gave :math:`\theta = 0.071`
    with :math:`r = 0.43`, which used to read "minimum". More steps, or the dense path,
    decide, except where :math:`r` cannot shrink: with bfloat16 or float16 leaves it carries
    their rounding of the products and, for a Hessian too small for the compute dtype, it is
    floored at the underflow scale of :func:`jaxsaddle.curvature.lanczos`, and there a strict
    saddle needs :math:`\theta + r < -\tau`, since the tridiagonal is then no longer the
    Hessian's projection and :math:`\theta` no longer an upper bound; there widen the dtype,
    raise :math:`\tau` or take the dense path. A probe that saw
    descent does not decide it either (a saddle, strict or degenerate: ``probe_decrease``
    shows it). (:math:`r` is a convergence test, not a bound on :math:`\lambda_{\min}`:
    there is an eigenvalue within :math:`r` of :math:`\theta`, and Lanczos from a random
    start finds the extreme ones first.) So "minimum" on this path also needs
    :math:`r \le \max(\tau, 0.01 |\theta|, 2 \epsilon \max(|\theta|, |\theta_{\max}|))`,
    with :math:`\epsilon` the widest of the leaves' and the compute dtype's: with
    :math:`\lambda_{\min} = -0.5` below 199 eigenvalues in [1, 2], 3 steps gave
    :math:`\theta = 1.12` with :math:`r = 0.23`, which read "minimum". Every SLQ node is a
    Ritz value too, so the smallest node with weight bounds :math:`\lambda_{\min}` from
    above as :math:`\theta` does, and one below :math:`-\tau` makes a strict saddle;
  - **undetermined** too where the probe decides (:math:`\theta \le \tau`, no descent)
    but proves nothing: every change it saw is within four units of rounding,
    :math:`4 \epsilon (|f(x)| + |f(x + r d)|)`, or it saw a decrease larger than those units
    plus what the gradient and curvature tolerances explain, yet within the :math:`64
    \epsilon` allowance, so not provably descent (bfloat16 params, whose allowance is about
    :math:`|f|` itself).

  **Spectrum.** When the parameter count :math:`n` is at most ``num_steps``, the Hessian is
  formed from :math:`n` vmapped products (no more than one Lanczos run costs) and everything
  is exact. Otherwise the extreme eigenpairs come from Lanczos with ``num_steps`` steps and
  the spectrum for ``index`` and ``degeneracy`` from SLQ with ``num_probes`` probes. Both use
  the same :math:`\tau` (:func:`degeneracy` with ``atol=eigenvalue_tol, tol=0``). SLQ's
  nodes are quadrature points, not eigenvalues: a cluster of eigenvalues near zero puts its
  mass on nodes that lie near zero only to the quadrature's resolution, about the spectrum's
  width over ``num_steps``, so with a :math:`\tau` much finer than that ``degeneracy`` on
  this path can read 0 for a Hessian with many zero eigenvalues (a 610-parameter MLP with
  24% of them within 1e-4 of zero read 0 at 30 steps). The kind does not depend on it; to
  measure degeneracy, use :func:`hessian_density` and :func:`degeneracy` with a relative
  ``tol`` near that resolution, or the dense path.

  Args:
    value_fn: the loss, a function of a pytree returning a real scalar.
    params: the point to classify.
    gradient_tol: the largest gradient norm of a critical point.
    eigenvalue_tol: :math:`\tau`, the absolute size below which an eigenvalue is zero.
    num_steps: Lanczos steps for the extreme eigenvalues and for each SLQ probe; problems
      with at most this many parameters are solved densely.
    key: a PRNG key or an int seed.
    num_probes: SLQ probes for ``index`` and ``degeneracy``.
    probe_radii: the radii of the higher-order probe.
    num_probe_directions: random directions of the higher-order probe in the whole space, and
      as many in the near-null space (each tried with both signs, as is the eigenvector).

  The probe's rounding allowance uses the machine epsilon of the loss's dtype (at least that
  of float32, or float64 for float64 params), and the
  distance actually moved once the params' dtype has rounded :math:`x + r d`: bfloat16
  params of :math:`2 + x^4 + y^4` computed in bfloat16 read a decrease of 0.03 from rounding
  alone, which used to make that minimum a degenerate saddle.

  Returns:
    A :class:`CriticalPointReport`. Under ``jit``, a non-finite loss, gradient or Hessian gives
    NaN numbers and kind "not critical", and so does a NaN loss at a probe point when the probe
    decides (no descent seen elsewhere); called eagerly, both raise ``ValueError``.
  """
  owner = "classify_critical_point"
  _checks.check_nonnegative(owner, "gradient_tol", gradient_tol)
  _checks.check_nonnegative(owner, "eigenvalue_tol", eigenvalue_tol)
  _checks.check_loop_length(owner, "num_steps", num_steps)
  _checks.check_loop_length(owner, "num_probes", num_probes)
  _checks.check_loop_length(owner, "num_probe_directions", num_probe_directions)
  radii = np.asarray(probe_radii, np.float64)
  if radii.ndim != 1 or radii.size == 0 or not np.all((radii > 0) & np.isfinite(radii)):
    raise ValueError(f"{owner}: probe_radii must be positive and finite, got {probe_radii!r}.")
  params = _check_value_fn(owner, value_fn, params)
  value, gradient, hvp_fn, finite = _linearize(value_fn, params)
  dtype = _compute_dtype(params)
  # The loss's rounding, and at least the compute dtype's: a float32 loss cast to float64 still
  # carries float32's. The params' rounding of a probe point is in the distance moved.
  rounding = max(float(jnp.finfo(d).eps) for d in (value.dtype, dtype))
  value = value.astype(dtype)
  lanczos_key, slq_key, direction_key = jax.random.split(_random.canonicalize_key(key), 3)

  if _random.tree_size(params) <= num_steps:
    eigenvalues, eigenvectors = _dense_eigh(hvp_fn, params, dtype)
    smallest, largest = eigenvalues[0], eigenvalues[-1]
    smallest_residual = jnp.zeros((), dtype)
    measure = eigenvalues
    underflowed = jnp.zeros((), bool)
    smallest_node = smallest
    converged = jnp.ones((), bool)
    flat_values, flat_vectors = eigenvalues, eigenvectors
  else:
    pairs = curvature.extreme_eigenpairs(
      hvp_fn, params, num_steps=num_steps, key=lanczos_key, k=1, which="both"
    )
    (smallest, largest), eigenvectors = pairs.eigenvalues, pairs.eigenvectors
    smallest_residual = pairs.residual_norms[0]
    # Too small an operator floors the extremes' residuals at the underflow scale, so the
    # kind is undetermined unless eigenvalue_tol exceeds it; SLQ's nodes are unreliable too,
    # so index and degeneracy are NaN.
    measure, underflowed, (probe_flat_values, probe_flat_vectors) = _slq(
      hvp_fn, params, slq_key, num_probes, num_steps, "rademacher", True, None, flattest=True
    )
    # Each probe's Ritz vector nearest zero: in a degenerate eigenspace, the probe's component
    # there, so a random vector of it, where the extreme run gives one only.
    flat_values = jnp.concatenate([smallest[None], probe_flat_values])
    flat_vectors = jax.tree.map(
      lambda extreme, probes: jnp.concatenate([extreme[:1], probes.astype(extreme.dtype)]),
      eigenvectors,
      probe_flat_vectors,
    )
    size = jnp.maximum(jnp.abs(smallest), jnp.abs(largest))
    underflowed = underflowed | curvature._underflows(size, params)
    # Every Ritz value, an SLQ node too, lies above lambda_min: the probes' smallest node bounds
    # it as the extreme pair's value does (a strict saddle whose pair had not yet converged,
    # 1.12 with residual 0.23 for lambda_min = -0.5, read "minimum" though SLQ saw the -0.5).
    nodes, weights = measure
    # NaN nodes bound nothing (fmin below passes over a NaN too).
    smallest_node = jnp.nanmin(jnp.where(weights > 0, nodes, jnp.inf))
    # A pair that has not converged bounds lambda_min from above only: with no negative value
    # seen, "minimum" needs its residual within tau, 1% of the value, or the floor the
    # operator's rounding puts under it (a narrow leaf's epsilon times ||H||).
    operator_rounding = max(float(jnp.finfo(leaf.dtype).eps) for leaf in jax.tree.leaves(params))
    converged = smallest_residual <= jnp.maximum(
      jnp.maximum(eigenvalue_tol, _CONVERGED_RELATIVE * jnp.abs(smallest)),
      2 * max(operator_rounding, rounding) * size,
    )
  # Below the underflow scale the tridiagonal is not the operator's projection, so even a Ritz
  # value under -eigenvalue_tol proves nothing finer than the scale the residual is floored at.
  smallest_upper_bound = jnp.where(
    underflowed, smallest + smallest_residual, jnp.fmin(smallest, smallest_node)
  )
  mass = degeneracy(measure, tol=0.0, atol=eigenvalue_tol)

  flattest = jax.tree.map(lambda stacked: stacked[:1], eigenvectors)
  random_directions = jax.vmap(lambda k: _random.sample_isotropic(k, params, 1.0, "sphere"))(
    jax.random.split(direction_key, num_probe_directions)
  )
  # Random directions within the near-null space too: descent confined to a degenerate
  # eigenspace of dimension two or more lies along mixtures of its eigenvectors, where a single
  # eigenvector sees none ((w1 w2 w3 - 1)^2 at 0 is constant along each axis) and random
  # directions of the whole space see the other eigenvalues' positive curvature first.
  near_null = jnp.abs(flat_values) <= eigenvalue_tol
  mixtures = jax.random.normal(
    jax.random.fold_in(direction_key, 1), (near_null.size, num_probe_directions), dtype
  )
  null_directions, inverse_norms = curvature._unit_rows(
    curvature._combine(flat_vectors, jnp.where(near_null[:, None], mixtures, 0))
  )
  directions = jax.tree.map(
    lambda a, b, c: jnp.concatenate([a.astype(b.dtype), b, c.astype(b.dtype)]),
    flattest,
    random_directions,
    null_directions,
  )
  # Mixtures of no near-null vector (a Hessian positive definite beyond tau) are zero: no probe.
  probed = jnp.concatenate([jnp.ones(1 + num_probe_directions, bool), inverse_norms > 0])[:, None]
  steps = jnp.asarray(np.concatenate([radii, -radii]), dtype)

  def change(direction, step):
    moved = jax.tree.map(lambda p, d: p + (step * d).astype(p.dtype), params, direction)
    moved_by = jax.tree.map(lambda m, p: m.astype(dtype) - p.astype(dtype), moved, params)
    return value_fn(moved).astype(dtype) - value, _random.global_norm(moved_by).astype(dtype)

  # One direction at a time, so that the probe holds as many moved copies of the params as it
  # has radii, not that times the directions.
  changes, distances = jax.lax.map(lambda d: jax.vmap(lambda s: change(d, s))(steps), directions)
  # A loss falling to -inf at a probe point is descent: the rounding allowance comes from finite
  # values only, or it would be infinite too.
  finite_changes = jnp.where(jnp.isfinite(changes), changes, 0)
  # One unit of the loss's rounding at both ends of each change.
  unit = rounding * (jnp.abs(value) + jnp.abs(value + finite_changes))
  roundoff = 64 * unit
  explained = distances * gradient_tol + 0.5 * eigenvalue_tol * distances**2
  descent = jnp.any(changes < -(explained + roundoff))
  # Its silence proves no minimum where every change is within a few units of rounding (the
  # probe saw nothing), or where it saw a decrease beyond those units and what the gradient and
  # curvature tolerances explain that the rounding allowance still cannot call descent
  # (bfloat16 params of (w1 w2 w3 - 1)^2 at 0, -0.34 at radius 1, had read "minimum"). NaN
  # changes are neither: they leave the minimum unproven below.
  ulps = 4 * unit
  blind = jnp.all(~probed | (jnp.isfinite(changes) & (jnp.abs(changes) <= ulps)))
  inconclusive = blind | jnp.any(changes < -(explained + ulps))

  gradient_norm = _random.global_norm(gradient).astype(dtype)
  kind = jnp.where(
    gradient_norm > gradient_tol,
    _NOT_CRITICAL,
    jnp.where(
      smallest_upper_bound < -eigenvalue_tol,
      _STRICT_SADDLE,
      jnp.where(
        (smallest - smallest_residual < -eigenvalue_tol) | ~converged,
        _UNDETERMINED,
        jnp.where(
          smallest <= eigenvalue_tol,
          jnp.where(descent, _DEGENERATE_SADDLE, jnp.where(inconclusive, _UNDETERMINED, _MINIMUM)),
          _MINIMUM,
        ),
      ),
    ),
  )
  finite = finite & jnp.isfinite(smallest) & jnp.isfinite(largest)
  # A NaN loss at a probe point leaves a "minimum" unproven: it is reported as non-finite input.
  # (Descent seen elsewhere, or a verdict the probe does not decide, stands.)
  probe_undefined = (kind == _MINIMUM) & (smallest <= eigenvalue_tol) & jnp.any(jnp.isnan(changes))
  if not isinstance(probe_undefined, jax.core.Tracer) and bool(finite & probe_undefined):
    raise ValueError(
      f"{owner}: the loss is NaN at a point of the higher-order probe, so the point cannot be "
      "shown a minimum; set probe_radii to where the loss is defined."
    )
  finite = finite & ~probe_undefined
  # Traced tolerances escape the checks above; out of range they void the report like NaN input.
  tolerances_valid = _checks.within_ranges((), (gradient_tol, eigenvalue_tol), ())
  if tolerances_valid is not None:
    finite = finite & tolerances_valid
  report = CriticalPointReport(
    kind=jnp.where(finite, kind, _NOT_CRITICAL).astype(jnp.int32),
    value=value,
    gradient_norm=gradient_norm,
    smallest_eigenvalue=smallest,
    largest_eigenvalue=largest,
    index=jnp.where(underflowed, jnp.nan, mass.negative_mass),
    degeneracy=jnp.where(underflowed, jnp.nan, mass.near_zero_mass),
    probe_decrease=-jnp.min(jnp.where(probed, changes, jnp.inf)),
    smallest_residual=smallest_residual,
  )
  return _checked(owner, finite, report)
