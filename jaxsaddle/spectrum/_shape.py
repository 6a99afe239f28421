"""What a spectrum's shape says: its mass near and below zero, and its semicircle fit."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsaddle import _checks
from jaxsaddle.spectrum._density import _spectrum_arrays
from jaxsaddle.spectrum._density import _weighted_nodes

# The upper quartile of the standard semicircle on [-1, 1]: t sqrt(1 - t^2) + arcsin t = pi / 4.
_SEMICIRCLE_QUARTILE = 0.4039727532995172
# Points per axis of the grids that refine a semicircle fit; odd, so the start is on them.
_FIT_GRID_POINTS = 21


def _normalized(nodes: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flattened nodes (empty slots at 0) and weights summing to 1."""
  weights = weights.reshape(-1) / jnp.sum(weights)
  return _weighted_nodes(nodes.reshape(-1), weights), weights


def _poisoned(nodes: jax.Array, weights: jax.Array) -> jax.Array:
  """Whether a NaN or infinite node or weight makes every statistic of the spectrum NaN."""
  return ~jnp.isfinite(jnp.sum(weights * nodes))


class Degeneracy(NamedTuple):
  """The output of :func:`degeneracy`: fractions of the spectral mass."""

  near_zero_mass: jax.Array  # mass with |lambda| <= threshold
  negative_mass: jax.Array  # mass with lambda < -threshold: the index of the critical point
  threshold: jax.Array


def degeneracy(spectrum, *, tol: float = 1e-3, atol: float = 0.0) -> Degeneracy:
  r"""The fractions of the spectrum near zero and below zero.

  With threshold :math:`\tau = \max(\text{atol}, \text{tol} \cdot \max_i |\lambda_i|)`,

  .. math::

    \text{near\_zero} = \mu\{|\lambda| \le \tau\}, \qquad
    \text{negative} = \mu\{\lambda < -\tau\},

  where :math:`\mu` is the empirical spectral measure (equal weights for eigenvalues; SLQ
  weights averaged over probes). ``negative`` is the index of a critical point as a fraction
  (Dauphin et al.'s :math:`\alpha`) and ``near_zero`` the degeneracy that Sankar and
  Balasubramanian measure at the saddles networks converge to.

  **Default** ``tol = 1e-3``: three orders of magnitude above the float32 round-off of
  eigenvalues computed from Hessian-vector products (about :math:`10^{-6}\|H\|`), so
  exactly flat directions count whatever the precision, and small enough that only
  directions more than a thousand times flatter than the sharpest one count. From SLQ the
  mass of an isolated zero eigenvalue (a null space) is found to within the sampling error of
  the probes (a converged node carries it); the mass of a continuous bulk inside
  :math:`[-\tau, \tau]` is resolved only to the quadrature's resolution, about the spectral
  width over ``num_steps``.

  Args:
    spectrum: a :class:`SpectralDensity`, a ``(nodes, weights)`` pair of one shape, or a 1-D
      array of eigenvalues.
    tol: the threshold relative to the largest :math:`|\lambda|`.
    atol: an absolute floor on the threshold (useful when the whole spectrum may be zero).

  Returns:
    A :class:`Degeneracy`.
  """
  _checks.check_nonnegative("degeneracy", "tol", tol)
  _checks.check_nonnegative("degeneracy", "atol", atol)
  return _degeneracy(*_spectrum_arrays("degeneracy", spectrum), tol, atol)


@jax.jit
def _degeneracy(nodes: jax.Array, weights: jax.Array, tol, atol) -> Degeneracy:
  nodes, weights = _normalized(nodes, weights)
  scale = jnp.max(jnp.where(weights != 0, jnp.abs(nodes), 0))
  threshold = jnp.maximum(atol, tol * scale).astype(nodes.dtype)
  near_zero = jnp.sum(jnp.where(jnp.abs(nodes) <= threshold, weights, 0))
  negative = jnp.sum(jnp.where(nodes < -threshold, weights, 0))
  # Comparisons with NaN are False; this keeps a NaN (or infinite) spectrum from giving masses,
  # and so do tolerances out of range, which only a traced call gets this far with (a negative
  # one had counted 0 and 3 as negative).
  poisoned = _poisoned(nodes, weights) | ~_checks.within_ranges((), (tol, atol), ())
  return Degeneracy(
    jnp.where(poisoned, jnp.nan, near_zero), jnp.where(poisoned, jnp.nan, negative), threshold
  )


class SemicircleFit(NamedTuple):
  """The output of :func:`semicircle_fit`.

  Attributes:
    center: the center :math:`c` of the fitted semicircle.
    radius: its radius :math:`R`; the support is :math:`[c - R, c + R]`.
    ks_distance: the Kolmogorov-Smirnov distance between the semicircle and the whole
      spectrum, outliers included: small only if the spectrum *is* a semicircle.
    bulk_ks_distance: the same for the bulk alone (outliers removed, mass renormalised).
    outlier_mass: the spectral mass outside the support widened by ``margin``.
    outliers: the input's eigenvalues or nodes (same shape) where they are outliers, NaN
      elsewhere.
  """

  center: jax.Array
  radius: jax.Array
  ks_distance: jax.Array
  bulk_ks_distance: jax.Array
  outlier_mass: jax.Array
  outliers: jax.Array


def _semicircle_cdf(x, center, radius):
  t = jnp.clip((x - center) / radius, -1, 1)
  return 0.5 + (t * jnp.sqrt(1 - t**2) + jnp.arcsin(t)) / jnp.pi


def _ks_distance(sorted_nodes, sorted_weights, center, radius):
  """sup |F_semicircle - F_empirical| for a weighted sample (weights summing to 1), sorted."""
  model = _semicircle_cdf(sorted_nodes, center, radius)
  after = jnp.cumsum(sorted_weights)
  before = after - sorted_weights
  return jnp.maximum(jnp.max(after - model), jnp.max(model - before))


def semicircle_fit(spectrum, *, margin: float = 0.1) -> SemicircleFit:
  r"""Fits a Wigner semicircle to the bulk of a spectrum; scores it and finds the outliers.

  The semicircle law (Wigner 1955) has density :math:`\rho(\lambda) = \frac{2}{\pi R^2}
  \sqrt{R^2 - (\lambda - c)^2}` on :math:`[c - R, c + R]` and CDF
  :math:`F(\lambda) = \frac12 + \frac1\pi(t\sqrt{1 - t^2} + \arcsin t)`,
  :math:`t = (\lambda - c)/R`. The fit:

  1. a robust start: :math:`c` the weighted median and :math:`R` from the interquartile
     range, :math:`R = (q_{3/4} - q_{1/4}) / (2 \cdot 0.40397)`, which a few outliers cannot
     move;
  2. the bulk is the mass within :math:`[c - (1 + \text{margin})R, c + (1 + \text{margin})R]`;
     the method of moments on it (mean :math:`c`, variance :math:`R^2/4`) updates the fit and
     the bulk is recomputed;
  3. :math:`(c, R)` minimising the Kolmogorov-Smirnov distance to the bulk is found on two
     nested 21 x 21 grids around the moment fit (:math:`\pm 10\%` of
     :math:`R`, then :math:`\pm 1\%`), and the outliers are taken outside the widened
     support of that fit.

  Sagun et al. and Ghorbani et al. describe network Hessians as a bulk plus outliers; a bulk
  that is a semicircle is what a random (GOE-like) Hessian gives, and an outlier is an
  eigenvalue outside it, as a low-rank "spike" of strength :math:`\theta > R/2` makes, at
  :math:`\theta + R^2/(4\theta)` (Féral and Péché 2007). For SLQ input the empirical CDF is
  the quadrature's, which is within about one node weight of the true CDF, so KS distances
  below about ``1 / num_steps`` cannot be told apart.

  Args:
    spectrum: a :class:`SpectralDensity`, a ``(nodes, weights)`` pair of one shape, or a 1-D
      array of eigenvalues.
    margin: how far beyond the support, relative to :math:`R`, an eigenvalue must lie to be an
      outlier. The default 0.1 is about four Tracy-Widom standard deviations of the largest
      eigenvalue of a 400 x 400 GOE matrix (fluctuations of order :math:`R n^{-2/3}`).

  Returns:
    A :class:`SemicircleFit`.
  """
  owner = "semicircle_fit"
  _checks.check_nonnegative(owner, "margin", margin)
  nodes, weights = _spectrum_arrays(owner, spectrum)
  fit = _semicircle_fit(nodes, weights, margin)
  return fit._replace(outliers=fit.outliers.reshape(nodes.shape))


@jax.jit
def _semicircle_fit(nodes: jax.Array, weights: jax.Array, margin) -> SemicircleFit:
  nodes, weights = _normalized(nodes, weights)
  # The fit squares distances between nodes, which underflow float32 for spectra near 1e-18 and
  # overflow it near 1e19: it runs on the nodes divided by a power of two near their largest
  # magnitude (exactly) and scales its answer back.
  magnitude = jnp.max(jnp.where((weights != 0) & jnp.isfinite(nodes), jnp.abs(nodes), 0))
  scale = jnp.where(magnitude > 0, jnp.exp2(jnp.floor(jnp.log2(magnitude))), 1).astype(nodes.dtype)
  fit = _unit_scale_fit(nodes / scale, weights, margin)
  # The unit-scale fit keeps its radius above zero; so must the scaled one.
  radius = jnp.maximum(fit.radius * scale, 2 * jnp.finfo(nodes.dtype).tiny)
  return fit._replace(center=fit.center * scale, radius=radius, outliers=fit.outliers * scale)


def _unit_scale_fit(nodes: jax.Array, weights: jax.Array, margin) -> SemicircleFit:
  order = jnp.argsort(nodes)
  sorted_nodes, sorted_weights = nodes[order], weights[order]
  cumulative = jnp.cumsum(sorted_weights)

  def quantile(q):
    index = jnp.clip(jnp.sum(cumulative < q), 0, nodes.shape[0] - 1)
    return sorted_nodes[index]

  def in_bulk(center, radius):
    return (weights != 0) & (jnp.abs(nodes - center) <= (1 + margin) * radius)

  # Twice the smallest normal number: the fit's grid scales the radius by 0.9, and a subnormal
  # radius flushed to zero would make a point mass's distances NaN.
  tiny = 2 * jnp.finfo(nodes.dtype).tiny
  center = quantile(0.5)
  radius = jnp.maximum((quantile(0.75) - quantile(0.25)) / (2 * _SEMICIRCLE_QUARTILE), tiny)
  bulk = in_bulk(center, radius)
  bulk_weights = jnp.where(bulk, weights, 0) / jnp.sum(jnp.where(bulk, weights, 0))
  center = jnp.sum(bulk_weights * nodes)
  radius = 2 * jnp.sqrt(jnp.sum(bulk_weights * (nodes - center) ** 2))
  radius = jnp.maximum(radius, tiny)

  bulk = in_bulk(center, radius)
  bulk_sorted = jnp.where(bulk[order], sorted_weights, 0)
  bulk_sorted = bulk_sorted / jnp.sum(bulk_sorted)
  offsets = jnp.linspace(-1.0, 1.0, _FIT_GRID_POINTS, dtype=nodes.dtype)
  for span in (0.1, 0.01):
    centers = center + span * radius * offsets
    radii = radius * (1 + span * offsets)
    distances = jax.vmap(
      jax.vmap(_ks_distance, in_axes=(None, None, None, 0)), in_axes=(None, None, 0, None)
    )(sorted_nodes, bulk_sorted, centers, radii)
    best = jnp.argmin(distances)
    center, radius = centers[best // _FIT_GRID_POINTS], radii[best % _FIT_GRID_POINTS]

  bulk = in_bulk(center, radius)
  outlier = ~bulk & (weights != 0)
  bulk_sorted = jnp.where(bulk[order], sorted_weights, 0)
  fit = SemicircleFit(
    center=center,
    radius=radius,
    ks_distance=_ks_distance(sorted_nodes, sorted_weights, center, radius),
    bulk_ks_distance=_ks_distance(sorted_nodes, bulk_sorted / jnp.sum(bulk_sorted), center, radius),
    outlier_mass=jnp.sum(jnp.where(outlier, weights, 0)),
    outliers=jnp.where(outlier, nodes, jnp.nan),
  )
  # A non-finite eigenvalue poisons every number, the outlier mass included.
  poisoned = _poisoned(nodes, weights)
  return jax.tree.map(lambda leaf: jnp.where(poisoned, jnp.nan, leaf), fit)
