r"""Hessian-spectrum diagnostics: extreme eigenvalues, trace, density, degeneracy, saddles.

Everything here touches the Hessian :math:`H = \nabla^2 f(x)` of a scalar ``value_fn``
:math:`f` only through Hessian-vector products (:func:`jaxsaddle.curvature.hvp`) and, for the
trace, quadratic forms :math:`z^\top H z` taken as second directional derivatives, so it works
on any pytree of parameters, jits, and vmaps over random probes.

- :func:`hessian_extreme_eigenvalues`: the :math:`k` smallest and/or largest eigenvalues by
  Lanczos, with residual norms :math:`\|Hv - \theta v\|`.
- :func:`hessian_trace`: Hutchinson's estimator :math:`\operatorname{tr} H \approx \frac1m
  \sum_i z_i^\top H z_i` with Rademacher :math:`z_i`, or Hutch++, with a standard error.
- :func:`hessian_density`: stochastic Lanczos quadrature (SLQ). For a unit probe :math:`v`,
  :math:`m` Lanczos steps give the tridiagonal :math:`T_m = S \Theta S^\top`; the nodes
  :math:`\theta_j` and weights :math:`\tau_j = S_{0j}^2` form the Gauss quadrature rule of
  the spectral measure :math:`\mu_v = \sum_i (v^\top u_i)^2 \delta_{\lambda_i}`, exact for
  polynomials of degree :math:`< 2m` (Golub and Meurant). For normalised Rademacher or
  Gaussian probes :math:`\mathbb E\, v v^\top = I/n`, so :math:`\mathbb E \mu_v = \frac1n
  \sum_i \delta_{\lambda_i}`, the eigenvalue density; averaging over probes and smoothing
  with a Gaussian kernel gives

  .. math::

    \hat\phi(t) = \frac1P \sum_{p=1}^P \sum_{j=1}^m \tau_{pj}\,
      \frac{1}{\sqrt{2\pi}\sigma} e^{-(t - \theta_{pj})^2 / (2\sigma^2)}.

  :func:`spectral_moment` reads :math:`\operatorname{tr}(H^k)/n` off the nodes and weights.
- :func:`degeneracy`: the mass of the spectrum near zero and below zero, as in the
  "degenerate saddle" measurements of Sankar and Balasubramanian.
- :func:`semicircle_fit`: the Wigner semicircle that best fits the bulk of a spectrum, a
  Kolmogorov-Smirnov score, and the outliers (Sagun et al.'s bulk and outliers).
- :func:`classify_critical_point`: minimum, strict saddle, degenerate saddle or not critical.
- :func:`restrict` makes any of these per layer; :func:`dataset_value_fn` makes them use a
  whole dataset; :func:`monitor_curvature` tracks the extreme eigenvalues during training.

**Non-finite input.** A spectrum computed from a NaN or infinite loss, gradient,
Hessian-vector product or quadratic form is never returned as if it were valid. Called eagerly
(the check is concrete), the functions raise ``ValueError``; under ``jit`` or ``vmap``, every
floating-point output is NaN.

References:
  M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines", Comm. Statist. Simulation Comput. 19 (1990).
  R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: Optimal stochastic trace
  estimation", SOSA 2021 (arXiv:2010.09649).
  G. H. Golub and G. Meurant, "Matrices, Moments and Quadrature with Applications" (2010).
  S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
  quadrature", SIAM J. Matrix Anal. Appl. 38 (2017).
  L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large matrices", SIAM Review
  58 (2016).
  B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation into neural net optimization via
  Hessian eigenvalue density", ICML 2019 (arXiv:1901.10159).
  L. Sagun, U. Evci, V. U. Güney, Y. Dauphin, L. Bottou, "Empirical analysis of the Hessian of
  over-parametrized neural networks", arXiv:1706.04454 (2017).
  A. R. Sankar and V. N. Balasubramanian, "Are saddles good enough for deep learning?",
  arXiv:1706.02052 (2017).
  Y. Dauphin, R. Pascanu, C. Gulcehre, K. Cho, S. Ganguli, Y. Bengio, "Identifying and
  attacking the saddle point problem in high-dimensional non-convex optimization", NeurIPS
  2014 (arXiv:1406.2572).
  E. P. Wigner, "Characteristic vectors of bordered matrices with infinite dimensions", Ann.
  Math. 62 (1955).
  D. Féral and S. Péché, "The largest eigenvalue of rank one deformation of large Wigner
  matrices", Comm. Math. Phys. 272 (2007).
  R. Ge, F. Huang, C. Jin, Y. Yuan, "Escaping from saddle points: online stochastic gradient
  for tensor decomposition", COLT 2015 (arXiv:1503.02101).
  A. Anandkumar and R. Ge, "Efficient approaches for escaping higher order saddle points in
  non-convex optimization", COLT 2016 (arXiv:1602.05908).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxsaddle import spectrum
  >>> matrix = jnp.diag(jnp.array([-1.0, 0.0, 0.0, 2.0, 3.0]))
  >>> value_fn = lambda x: 0.5 * x @ matrix @ x
  >>> params = jnp.zeros(5)
  >>> pairs = spectrum.hessian_extreme_eigenvalues(
  ...   value_fn, params, num_steps=5, key=jax.random.key(0), which="both")
  >>> [round(float(x), 4) for x in pairs.eigenvalues]
  [-1.0, 3.0]
  >>> density = spectrum.hessian_density(
  ...   value_fn, params, key=jax.random.key(1), num_probes=64, num_steps=5)
  >>> mass = spectrum.degeneracy(density)
  >>> round(float(mass.near_zero_mass), 1), round(float(mass.negative_mass), 1)
  (0.4, 0.2)
  >>> result = spectrum.classify_critical_point(
  ...   lambda w: (w[0] * w[1] * w[2] - 1.0) ** 2, jnp.zeros(3), gradient_tol=1e-4,
  ...   eigenvalue_tol=1e-3, num_steps=3, key=jax.random.key(2))
  >>> result.kind_name
  'degenerate saddle'
"""

import functools
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxsaddle import _checks
from jaxsaddle import _random
from jaxsaddle import _sharding
from jaxsaddle import curvature

PyTree = Any
ValueFn = Callable[[PyTree], jax.Array]
ProbeDistribution = Literal["rademacher", "gaussian"]

# Kinds returned by classify_critical_point, indexed by its integer ``kind``.
CRITICAL_POINT_KINDS = ("not critical", "minimum", "strict saddle", "degenerate saddle")
_NOT_CRITICAL, _MINIMUM, _STRICT_SADDLE, _DEGENERATE_SADDLE = range(4)

_DEFAULT_GRID_POINTS = 1000
_DEFAULT_RELATIVE_BROADENING = 0.01
# Kernel widths on either side of the extreme nodes: the Gaussian mass left outside is 6e-7.
_GRID_MARGIN = 5.0
# The upper quartile of the standard semicircle on [-1, 1]: t sqrt(1 - t^2) + arcsin t = pi / 4.
_SEMICIRCLE_QUARTILE = 0.4039727532995172
# Points per axis of the grids that refine a semicircle fit; odd, so the start is on them.
_FIT_GRID_POINTS = 21


_compute_dtype = curvature._compute_dtype


def _check_params(owner: str, params: PyTree) -> None:
  """Raises unless ``params`` has array elements, all of them real floating point."""
  if not _checks.has_elements(params):
    raise ValueError(f"{owner}: params has no array elements; there is no Hessian to study.")
  _checks.check_float_leaves(params, owner, "a Hessian")


def _check_value_fn(owner: str, value_fn: ValueFn, params: PyTree) -> None:
  """Raises unless ``value_fn`` maps ``params`` (real floating leaves) to a real scalar.

  Every public function calls it once, before anything is traced: the scalar-loss check is an
  abstract evaluation of ``value_fn``, paid at every eager call.
  """
  if not callable(value_fn):
    raise TypeError(f"{owner}: value_fn must be callable, got {type(value_fn).__name__}.")
  _check_params(owner, params)
  _checks.check_scalar_loss(owner, value_fn, params)


def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _linearize(value_fn: ValueFn, params: PyTree):
  """The loss, gradient, an HVP function and a finiteness flag, for a checked ``value_fn``."""
  # Linearising value_and_grad gives the loss from the same forward pass as the gradient.
  (value, gradient), linear = jax.linearize(jax.value_and_grad(value_fn), params)

  def hvp_fn(tangent):
    return linear(tangent)[1]

  return value, gradient, hvp_fn, jnp.isfinite(value) & _all_finite(gradient)


def _checked(owner: str, finite: jax.Array, result):
  """Raises when ``finite`` is concretely False; otherwise NaN-fills float outputs where it is."""
  if not isinstance(finite, jax.core.Tracer) and not bool(finite):
    raise ValueError(
      f"{owner}: the loss, its gradient or its curvature (a Hessian-vector product or "
      "quadratic form) at params is NaN or infinite; no spectrum is computed from it. (With "
      "a finite loss, the curvature may have overflowed: Hessian-vector products in the params' "
      "dtype (float16 beyond 65504), or their squared norms in float32, Hessian norms beyond "
      "about 1e19; scale the loss or use a wider dtype.)"
    )
  return jax.tree.map(
    lambda leaf: (
      jnp.where(finite, leaf, jnp.nan)
      if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
      else leaf
    ),
    result,
  )


def _probe(key: jax.Array, like: PyTree, distribution: ProbeDistribution) -> PyTree:
  """One random vector shaped and typed like ``like``: signs, or standard normal entries."""
  if distribution == "rademacher":
    return _random.tree_rademacher(key, like)
  return jax.tree.map(
    lambda noise, leaf: noise.astype(leaf.dtype), _random.tree_standard_normal(key, like), like
  )


def _map_probes(fn: Callable, xs: PyTree, batch_size: int | None):
  """``fn`` over the leading axis of ``xs``: ``batch_size`` at a time, or all at once if None."""
  if batch_size is None:
    return jax.vmap(fn)(xs)
  if batch_size == 1:
    # lax.map with batch_size vmaps each batch, which turns every lax.cond in fn (partial
    # reorthogonalisation's) into a select that runs both branches; a plain map keeps them.
    return jax.lax.map(fn, xs)
  return jax.lax.map(fn, xs, batch_size=batch_size)


def _quadratic_form(hvp_fn: Callable, vector: PyTree, dtype) -> jax.Array:
  """``v . (H v)``, accumulated in ``dtype``."""
  return curvature._tree_vdot(vector, hvp_fn(vector), dtype)


def _calls_custom_vjp(jaxpr) -> bool:
  """Whether ``jaxpr``, or a jaxpr nested in one of its equations, calls a custom_vjp function."""

  def nested(value):
    if hasattr(value, "eqns"):
      yield value
    elif hasattr(getattr(value, "jaxpr", None), "eqns"):
      yield value.jaxpr
    elif isinstance(value, (tuple, list)):
      for item in value:
        yield from nested(item)

  return any(
    "custom_vjp" in eqn.primitive.name
    or any(_calls_custom_vjp(inner) for value in eqn.params.values() for inner in nested(value))
    for eqn in jaxpr.eqns
  )


def _second_derivative_form(value_fn: ValueFn, params: PyTree, dtype):
  r"""``v -> (v^T H v, finite)`` without a reverse pass, or None where that is not done.

  :math:`v^\top \nabla^2 f(x) v = \frac{d^2}{dt^2} f(x + t v)|_{t=0}`, the second directional
  derivative, by forward-over-forward differentiation: the tangent and second-order passes
  run forward beside the loss's own (which XLA hoists out of a loop over probes). On a ReLU
  MLP that is about 0.6x the work of a Hessian-vector product, which also needs the backward
  pass and its tangent. ``finite`` says whether the loss and the first directional
  derivative :math:`\nabla f(x)^\top v` are finite, as forward mode computes them.

  None, and the caller takes Hessian-vector products, when forward mode cannot differentiate
  ``value_fn`` twice (it calls a ``jax.custom_vjp`` function, or a primitive lacks a rule), and
  when the loss or a leaf is narrower than float32: the form then comes out in that dtype,
  summed over every parameter inside ``value_fn`` (float16 overflows at 65504), where the
  products' inner product accumulates in ``dtype``.
  """
  leaf_dtypes = jax.tree.map(lambda leaf: jnp.result_type(leaf), params)
  traced = jax.make_jaxpr(value_fn)(params)
  narrow = any(
    jnp.finfo(d).bits < 32 for d in [*jax.tree.leaves(leaf_dtypes), traced.out_avals[0].dtype]
  )
  if narrow or _calls_custom_vjp(traced.jaxpr):
    return None

  def form(vector):
    vector = jax.tree.map(lambda leaf, d: leaf.astype(d), vector, leaf_dtypes)

    def directional(point):
      return jax.jvp(value_fn, (point,), (vector,))

    (value, slope), (_, second) = jax.jvp(directional, (params,), (vector,))
    return second.astype(dtype), jnp.isfinite(value) & jnp.isfinite(slope)

  try:
    jax.eval_shape(form, params)
  except (TypeError, NotImplementedError):
    return None
  return form


def _mean_and_standard_error(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The mean of i.i.d. samples and its standard error; infinite for a single sample."""
  count = samples.shape[0]
  if count < 2:
    return jnp.mean(samples), jnp.full((), jnp.inf, samples.dtype)
  return jnp.mean(samples), jnp.std(samples, ddof=1) / math.sqrt(count)


# --------------------------------------------------------------------------------------------
# Extreme eigenvalues.


def hessian_extreme_eigenvalues(
  value_fn: ValueFn,
  params: PyTree,
  *,
  num_steps: int,
  key: jax.Array | int,
  k: int = 1,
  which: curvature.Which = "largest",
  reorthogonalize: curvature.Reorthogonalization | None = None,
  eigenvectors: bool = True,
  exact_residuals: bool | None = None,
  tol: float | None = None,
) -> curvature.RitzPairs:
  r"""Estimates the ``k`` largest and/or smallest Hessian eigenvalues, with residuals.

  Runs :func:`jaxsaddle.curvature.extreme_eigenpairs` on :math:`v \mapsto \nabla^2 f(x) v`
  (linearised once at ``params``) from a Gaussian start vector. Extreme eigenvalues separated
  from the rest by a gap converge geometrically in ``num_steps``; without a gap, the
  Kuczyński-Woźniakowski bound gives relative accuracy :math:`\varepsilon` with probability
  :math:`1 - \delta` once :math:`\text{num\_steps} \ge \frac12 + \ln(1.648\sqrt n / \delta)
  / (2\sqrt\varepsilon)` (about 60 steps for :math:`\varepsilon = \delta = 10^{-2}` and
  :math:`n = 10^6`). The residual norm :math:`r = \|Hv - \theta v\|` bounds the error:
  some eigenvalue lies within :math:`r` of :math:`\theta`.

  Args:
    value_fn: the loss, a function of a pytree returning a real scalar.
    params: the point at which the Hessian is taken.
    num_steps: the number of Lanczos steps (Hessian-vector products), at least ``k``.
    key: a PRNG key or an int seed for the start vector.
    k: the number of eigenvalues at each requested end.
    which: ``"largest"`` (descending), ``"smallest"`` (ascending) or ``"both"`` (the ``k``
      smallest ascending, then the ``k`` largest descending).
    reorthogonalize: reorthogonalisation in Lanczos (``True``, ``"partial"`` or ``False``, see
      :func:`jaxsaddle.curvature.lanczos`); None (the default) uses ``"partial"`` when
      ``k > 1`` and none when ``k == 1``; ``False`` with ``k > 1`` is refused, since the
      duplicates of converged values would take the later slots. The loss of orthogonality
      only duplicates converged values, so the extreme Ritz value at each end stays accurate
      up to round-off that grows with the steps, about ``num_steps`` :math:`\epsilon \|H\|`
      (5e-6 relatively after 60 float32 steps on a spectrum with outliers at 100 and 50), and
      without reorthogonalisation each step skips a pass over the whole basis. The Ritz
      *vectors* suffer more than the values: on a 1,210-parameter MLP, 60 steps from three
      keys gave top eigenvectors whose exact residuals ranged from 4e-7 to 2.4e-3, against 2e-7
      to 3e-7 with ``"partial"``. Pass ``"partial"`` when the vectors matter; their
      ``residual_norms`` say how far each is from an eigenvector either way.
    eigenvectors: whether to return the eigenvectors. Without them and without
      reorthogonalisation (the default for ``k == 1``) Lanczos stores no basis: memory is a
      few parameter-sized vectors whatever ``num_steps``, instead of ``num_steps`` of them,
      which is what lets a large model's sharpness be measured with many steps. The residuals
      are then the Lanczos estimates for the unnormalised Ritz vector :math:`Q s` (see
      :func:`jaxsaddle.curvature.ritz_pairs`), whose norm is no longer known.
    exact_residuals: compute each residual norm with one more Hessian-vector product per
      eigenvalue (needs ``eigenvectors``). Otherwise it comes free from the Lanczos relation,
      :math:`\beta_m |s_m|` over the Ritz vector's norm, which holds up to a few
      :math:`\epsilon \|H\|` with full reorthogonalisation, up to round-off growing with the
      steps (about ``num_steps`` :math:`\epsilon \|H\|`) without any, whether or not the
      basis stayed orthogonal (Paige 1972), and only up to :math:`\sqrt{\epsilon} \|H\|`
      with partial reorthogonalisation. None (the default) computes them when Lanczos runs with
      ``"partial"`` and ``eigenvectors`` is set.
    tol: stop Lanczos early once every wanted eigenvalue's relative residual estimate is at
      most ``tol`` (as PyHessian's ``tol``, though PyHessian compares successive iterates);
      ``num_steps`` is then the most steps taken, and the result's ``num_steps`` says how
      many were. See :func:`jaxsaddle.curvature.extreme_eigenpairs`. The early stop is a
      ``while_loop``, which reverse-mode differentiation cannot go through: leave ``tol``
      out to take ``jax.grad`` of the result.

  The results are differentiable (a sharpness penalty, say) with respect to ``params`` and to
  whatever ``value_fn`` closes over. Without reorthogonalisation the Ritz values are accurate
  but their derivatives through the recursion are not (2% off after 40 float32 steps on 600
  parameters, 1e4 times the derivative after 60 on 1500), so there derivatives are taken
  through a partially reorthogonalised run, which stores a basis only when differentiated.
  The values, vectors and residuals returned stay those of the plain run, and each vector's
  derivative takes its sign.

  Returns:
    :class:`jaxsaddle.curvature.RitzPairs` with ``k`` (``2 k`` for ``"both"``) eigenvalues,
    eigenvectors (leaves with a leading axis of that size; None without ``eigenvectors``) and
    residual norms. Values the Krylov space could not provide (fewer distinct eigenvalues than
    asked for) are NaN. The eigenvectors are in the compute dtype, float64 when any leaf is
    float64 and float32 otherwise, not in each leaf's own: cast them before adding them to
    bfloat16 params. A residual bounds the distance to the nearest eigenvalue in exact
    arithmetic; in floating point the products' own rounding, a few :math:`\epsilon \|H\|`,
    comes on top. Under ``vmap`` over keys with params on an explicitly sharded mesh, map
    with ``lax.map`` instead (see :func:`jaxsaddle.curvature.lanczos`).

  Raises:
    ValueError: for a non-scalar ``value_fn``, ``num_steps < 1``, a bad ``k`` or ``which``,
      ``k > 1`` with ``reorthogonalize=False``, or, when called eagerly, a non-finite loss,
      gradient or Hessian-vector product.
    TypeError: for a ``num_steps`` or ``k`` that is not a Python int.
  """
  owner = "hessian_extreme_eigenvalues"
  # None reorthogonalises whenever k > 1, so it passes the check as True; k is read only after.
  curvature.check_extreme_arguments(
    owner,
    num_steps=num_steps,
    k=k,
    which=which,
    tol=tol,
    reorthogonalize=True if reorthogonalize is None else reorthogonalize,
  )
  if reorthogonalize is None:
    reorthogonalize = "partial" if k > 1 else False
  _check_value_fn(owner, value_fn, params)
  if exact_residuals is None:
    exact_residuals = reorthogonalize == "partial" and eigenvectors

  def estimate(mode, value_fn, params):
    _, _, hvp_fn, finite = _linearize(value_fn, params)
    pairs = curvature.extreme_eigenpairs(
      hvp_fn,
      params,
      num_steps=num_steps,
      key=key,
      k=k,
      which=which,
      reorthogonalize=mode,
      eigenvectors=eigenvectors,
      exact_residuals=exact_residuals,
      tol=tol,
    )
    return finite, pairs

  if curvature._reorthogonalization_mode(reorthogonalize) == "none":
    finite, pairs = _differentiated_with_partial_reorthogonalization(estimate, value_fn, params)
  else:
    finite, pairs = estimate(reorthogonalize, value_fn, params)
  # The first value at each end always exists; NaN there means NaN in the operator.
  ends = jnp.array([0, k] if which == "both" else [0])
  finite = finite & jnp.all(jnp.isfinite(pairs.eigenvalues[ends]))
  return _checked(owner, finite, pairs)


def _differentiated_with_partial_reorthogonalization(estimate, value_fn, params):
  """``estimate(False, value_fn, params)``, whose derivatives are those of the ``"partial"`` run.

  Without reorthogonalisation the converged Ritz values are accurate, but their derivatives
  through the recursion are not: the lost orthogonality makes the tangent recursion unstable
  (the gradient of the top eigenvalue was 2% off after 40 float32 steps on 600 parameters and
  1e4 times off after 60 on 1500, against 5e-6 with partial reorthogonalisation). The values
  the loss closes over become arguments (``jax.closure_convert``), so derivatives with respect
  to them, a batch or a weight inside the loss, come from the partial run too. The primal
  outputs stay those of the plain run, and each eigenvector's tangent takes the sign of its
  vector there (the two runs may return a vector with opposite signs).
  """
  closed_value_fn, constants = jax.closure_convert(value_fn, params)

  def run_with(mode, params, constants):
    return estimate(mode, lambda p: closed_value_fn(p, *constants), params)

  @jax.custom_jvp
  def run(params, constants):
    return run_with(False, params, constants)

  @run.defjvp
  def run_jvp(primals, tangents):
    primal_out = run_with(False, *primals)
    (_, partial), (finite_tangent, partial_tangent) = jax.jvp(
      functools.partial(run_with, "partial"), primals, tangents
    )
    vectors = primal_out[1].eigenvectors
    if vectors is not None:
      dtype = curvature._compute_dtype(vectors)
      alignment = jax.vmap(lambda plain, other: curvature._tree_vdot(plain, other, dtype))(
        vectors, partial.eigenvectors
      )
      signs = jnp.where(alignment < 0, -1, 1)
      partial_tangent = partial_tangent._replace(
        eigenvectors=jax.tree.map(
          lambda tangent: (
            tangent * signs.reshape((-1,) + (1,) * (tangent.ndim - 1)).astype(tangent.dtype)
          ),
          partial_tangent.eigenvectors,
        )
      )
    return primal_out, (finite_tangent, partial_tangent)

  return run(params, constants)


# --------------------------------------------------------------------------------------------
# Trace.


class Estimate(NamedTuple):
  """A Monte-Carlo estimate and its standard error (the standard deviation of the estimate)."""

  value: jax.Array
  standard_error: jax.Array


def _stacked_coefficients(left: PyTree, right: PyTree, dtype) -> jax.Array:
  """``C[i, j] = <left_i, right_j>`` for two stacks of vectors."""

  def leaf_products(a, b):
    axes = tuple(range(1, a.ndim))
    return jnp.tensordot(
      a.astype(dtype),
      b.astype(dtype),
      axes=(axes, axes),
      precision=jax.lax.Precision.HIGHEST,
      out_sharding=_sharding.replicated_if_explicit(a, b),
    )

  return sum(jax.tree.leaves(jax.tree.map(leaf_products, left, right)))


def _combine(coefficients: jax.Array, stacked: PyTree) -> PyTree:
  """``b_i = sum_j coefficients[i, j] a_j`` for stacked vectors ``a``."""
  return jax.tree.map(
    lambda leaf: jnp.tensordot(
      coefficients.astype(leaf.dtype), leaf, axes=1, precision=jax.lax.Precision.HIGHEST
    ),
    stacked,
  )


def _orthonormal_range(stacked: PyTree, dtype) -> PyTree:
  """An orthonormal basis of the span of stacked vectors, padded with zero vectors.

  Two passes of Gram-matrix orthonormalisation (as in CholeskyQR2), through an eigen-
  decomposition so that rank deficiency is harmless: directions whose squared singular value
  is below sqrt(eps) of the largest become zero vectors. Dropping them only moves their part
  of the trace to the Hutchinson term of Hutch++, which stays unbiased for any orthonormal
  basis; keeping the condition number below eps^(-1/4) makes the second pass exact.
  """
  cutoff = math.sqrt(float(jnp.finfo(dtype).eps))
  for _ in range(2):
    values, vectors = jnp.linalg.eigh(_stacked_coefficients(stacked, stacked, dtype))
    keep = values > cutoff * jnp.max(values)
    scale = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, values, 1)), 0)
    stacked = _combine((vectors * scale).T, stacked)
  return stacked


def hessian_trace(
  value_fn: ValueFn,
  params: PyTree,
  *,
  key: jax.Array | int,
  num_probes: int,
  method: Literal["hutchinson", "hutch++"] = "hutchinson",
  probe_batch_size: int | None = 1,
) -> Estimate:
  r"""Estimates :math:`\operatorname{tr} \nabla^2 f(x)` from ``num_probes`` random quadratic forms.

  **Hutchinson** (1990): with i.i.d. Rademacher :math:`z_i \in \{\pm 1\}^n`,

  .. math::

    \widehat{\operatorname{tr}} = \frac1m \sum_{i=1}^m z_i^\top H z_i, \qquad
    \operatorname{Var} z^\top H z = 2 \Big(\|H\|_F^2 - \sum_i H_{ii}^2\Big).

  **Hutch++** (Meyer, Musco, Musco and Woodruff 2021, Algorithm 1): :math:`s = \lfloor m/3
  \rfloor` Hessian-vector products sketch the range, :math:`Q = \operatorname{orth}(H S)`;
  :math:`s` quadratic forms give :math:`\operatorname{tr}(Q^\top H Q)` exactly; the remaining
  :math:`r = m - 2s` run Hutchinson on the deflated :math:`(I - QQ^\top) H (I - QQ^\top)`. It
  is unbiased, and its variance is far lower when a few eigenvalues carry most of
  :math:`\|H\|_F`, as is typical of network Hessians (a bulk near zero and outliers); for a
  flat spectrum it is somewhat higher, since only a third of the probes sample the remainder.
  Derivatives of the estimate hold :math:`Q` fixed: the estimator is unbiased for any
  orthonormal :math:`Q`, so they are unbiased estimates of the trace's derivatives (through the
  orthonormalisation they would be NaN, from ``eigh``'s derivative at repeated eigenvalues).

  **Quadratic forms.** Each :math:`z^\top H z` is the second directional derivative
  :math:`\frac{d^2}{dt^2} f(x + t z)|_{t=0}`, by forward-over-forward differentiation
  (``jax.jvp`` of ``jax.jvp``): no backward pass and no Hessian-vector product, about 0.6x
  the work of one on a ReLU MLP, and nothing stored for a reverse pass. When ``value_fn``
  cannot be differentiated twice in forward mode (it calls a ``jax.custom_vjp`` function),
  the forms are :math:`z \cdot (H z)` from Hessian-vector products instead, with the same
  probes and the same result up to round-off; so are they when a leaf or the loss is narrower
  than float32, so that they accumulate in float32. Hutch++'s sketch :math:`H S` always takes
  products. With forward-over-forward forms the non-finite check (see the module docstring) is
  on the loss and the directional derivatives :math:`\nabla f(x)^\top z` as forward mode
  computes them, which do not see the NaN gradients reverse mode can give where ``jnp.where``
  guards a singular branch (Hutch++ and the product path also check the gradient).

  **Standard error.** :math:`\mathrm{SE} = s_q / \sqrt{r}` with :math:`s_q` the sample
  standard deviation (``ddof=1``) of the :math:`r` Rademacher quadratic forms (:math:`r = m`
  for Hutchinson). For Hutch++ it is the standard error conditional on the sketch
  :math:`Q`, whose term is exact. It is infinite when :math:`r = 1`. The estimate is a mean of
  independent terms, so for moderate :math:`r` it is within :math:`2\,\mathrm{SE}` of the
  trace about 95% of the time. With few probes the standard error is itself a noisy estimate
  from :math:`r - 1` degrees of freedom, and for Hutch++ :math:`r = m - 2s` is about a third
  of the probes: with :math:`m = 6`, two forms give both the remainder's estimate and its
  error, which then understates the error now and then by a large factor (Student's t with
  one degree of freedom has heavy tails). Use :math:`m \ge 30` for Hutch++ when the error
  matters.

  Args:
    value_fn: the loss, a function of a pytree returning a real scalar.
    params: the point at which the Hessian is taken.
    key: a PRNG key or an int seed.
    num_probes: the number of probes :math:`m`, each one quadratic form or Hessian-vector
      product (at least 3 for Hutch++).
    method: ``"hutchinson"`` or ``"hutch++"``.
    probe_batch_size: how many probes run at once (``lax.map`` in batches); None vmaps all
      of them. The default, one at a time, holds one probe in memory and is the fastest on
      CPUs, where a batch is not cheaper than its probes one by one and its probes and
      intermediate results must be written to memory; batches can pay on accelerators. Probes
      are drawn inside the loop, from a counter hash (``jaxsaddle._random``), so they are the
      same whatever the batch size. For a convolutional model on the CPU pass None: XLA runs
      convolutions inside a loop body many times slower (see :mod:`jaxsaddle.curvature`).

  Returns:
    An :class:`Estimate` of the trace and its standard error.
  """
  owner = "hessian_trace"
  _checks.check_loop_length(owner, "num_probes", num_probes)
  if method not in ("hutchinson", "hutch++"):
    raise ValueError(f"{owner}: method must be 'hutchinson' or 'hutch++', got {method!r}.")
  if method == "hutch++" and num_probes < 3:
    raise ValueError(f"{owner}: hutch++ needs num_probes >= 3, got {num_probes}.")
  if probe_batch_size is not None:
    _checks.check_loop_length(owner, "probe_batch_size", probe_batch_size)
  _check_value_fn(owner, value_fn, params)
  dtype = _compute_dtype(params)
  form = _second_derivative_form(value_fn, params, dtype)
  finite = jnp.array(True)
  if method == "hutch++" or form is None:
    _, _, hvp_fn, finite = _linearize(value_fn, params)
  if form is None:
    form = lambda vector: (_quadratic_form(hvp_fn, vector, dtype), jnp.array(True))  # noqa: E731
  keys = jax.random.split(_random.canonicalize_key(key), num_probes)

  if method == "hutchinson":
    forms, flags = _map_probes(
      lambda k: form(_probe(k, params, "rademacher")), keys, probe_batch_size
    )
    value, standard_error = _mean_and_standard_error(forms)
  else:
    sketch_size = num_probes // 3
    sketch = jax.vmap(lambda k: _probe(k, params, "rademacher"))(keys[:sketch_size])
    # Derivatives hold the sketched basis fixed: the estimator is unbiased for any orthonormal
    # basis, so they are unbiased estimates of the trace's, and eigh's derivative in the
    # orthonormalisation is NaN on its nearly identity second Gram matrix.
    basis = jax.lax.stop_gradient(
      _orthonormal_range(_map_probes(hvp_fn, sketch, probe_batch_size), dtype)
    )
    captured, captured_flags = _map_probes(form, basis, probe_batch_size)

    def deflated_form(k):
      # (I - Q Q^T) g: a Rademacher probe with the sketched range projected out.
      probe = jax.tree.map(lambda leaf: leaf[None], _probe(k, params, "rademacher"))
      coefficients = _stacked_coefficients(probe, basis, dtype)
      projected = jax.tree.map(
        lambda g, q: g[0] - _combine(coefficients, q)[0].astype(g.dtype), probe, basis
      )
      return form(projected)

    forms, flags = _map_probes(deflated_form, keys[2 * sketch_size :], probe_batch_size)
    residual, standard_error = _mean_and_standard_error(forms)
    value = jnp.sum(captured) + residual
    flags = jnp.concatenate([captured_flags, flags])
  finite = finite & jnp.all(flags) & jnp.isfinite(value)
  return _checked(owner, finite, Estimate(value, standard_error))


# --------------------------------------------------------------------------------------------
# Spectral density by stochastic Lanczos quadrature.


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
    # A spectrum that is a single point has no width to scale with; fall back to its size.
    broadening = _DEFAULT_RELATIVE_BROADENING * jnp.where(
      width > 0, width, jnp.maximum(jnp.abs(high), 1)
    )
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


def _slq(hvp_fn, params, key, num_probes, num_steps, distribution, reorthogonalize, batch_size):
  if any(_sharding.explicit_spec(leaf) is not None for leaf in jax.tree.leaves(params)):
    # Batched, each lax.cond of Lanczos becomes a select whose predicate JAX broadcasts without
    # the Explicit sharding of the operands, a ShardingTypeError; one at a time they stay conds.
    batch_size = 1

  def quadrature(probe_key):
    probe = _probe(probe_key, params, distribution)
    return _gauss_quadrature(
      curvature.lanczos(
        hvp_fn, probe, num_steps, reorthogonalize=reorthogonalize, return_basis=False
      )
    )

  keys = jax.random.split(_random.canonicalize_key(key), num_probes)
  return _map_probes(quadrature, keys, batch_size)


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
  :func:`spectral_moment`). Probes are normalised Rademacher (or Gaussian) vectors and run
  in parallel under ``vmap``. Isolated eigenvalues appear as converged nodes carrying their
  share of the mass; the bulk is resolved to about its width divided by :math:`m`. Ghorbani et
  al. find 80-90 steps enough for networks with millions of parameters.

  **Broadening.** The default kernel width is :math:`\sigma = 0.01\,(\theta_{\max} -
  \theta_{\min})`: proportional to the spectral width, so rescaling the loss rescales the
  density exactly, and comparable to the spacing of an :math:`m \approx 90`-node quadrature
  rule in the bulk (:math:`\approx \pi R / m`, 1.7% of the width for a semicircle of radius
  :math:`R`), so that several probes fill a smooth bulk while outliers more than a few
  percent of the width apart stay separate. Ghorbani et al.'s code uses :math:`\sigma^2 =
  10^{-5} \max(1, \theta_{\max} - \theta_{\min})` instead, which is narrower for wide
  spectra and not scale-free; pass ``broadening`` to reproduce it. A spectrum that is a
  single point gets :math:`\sigma = 0.01 \max(|\theta|, 1)`.

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
      nodes get "ghost" copies that share the mass of the original.
    probe_batch_size: how many probes run at once (each holds a ``num_steps`` by ``n``
      Lanczos basis); None runs all of them at once. Params sharded over Explicit mesh axes
      run one probe at a time whatever this says: batching turns Lanczos's ``lax.cond`` calls into
      selects, whose predicate JAX broadcasts without the operands' sharding, which fails.

  Returns:
    A :class:`SpectralDensity`.
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
  _check_value_fn(owner, value_fn, params)
  _, _, hvp_fn, finite = _linearize(value_fn, params)
  nodes, weights = _slq(
    hvp_fn, params, key, num_probes, num_steps, distribution, reorthogonalize, probe_batch_size
  )
  # Empty slots hold NaN nodes by design; a NaN or infinite node with weight is an overflow.
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


# --------------------------------------------------------------------------------------------
# Degeneracy and semicircle fit.


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
  # Comparisons with NaN are False; this keeps a NaN (or infinite) spectrum from giving masses.
  poisoned = _poisoned(nodes, weights)
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


# --------------------------------------------------------------------------------------------
# Critical points.


class CriticalPointReport(NamedTuple):
  """The output of :func:`classify_critical_point`.

  Attributes:
    kind: an int32 index into ``CRITICAL_POINT_KINDS``: 0 "not critical", 1 "minimum",
      2 "strict saddle", 3 "degenerate saddle" (``kind_name`` gives the string).
    value: the loss at the point.
    gradient_norm: :math:`\\|\\nabla f\\|`.
    smallest_eigenvalue: :math:`\\lambda_{\\min}` (exact for small problems, else Lanczos).
    largest_eigenvalue: :math:`\\lambda_{\\max}` (likewise).
    index: the fraction of eigenvalues below ``-eigenvalue_tol``.
    degeneracy: the fraction of eigenvalues within ``eigenvalue_tol`` of zero.
    probe_decrease: the largest decrease :math:`f(x) - f(x + r d)` seen by the higher-order
      probe (negative when every probe went up).
  """

  kind: jax.Array
  value: jax.Array
  gradient_norm: jax.Array
  smallest_eigenvalue: jax.Array
  largest_eigenvalue: jax.Array
  index: jax.Array
  degeneracy: jax.Array
  probe_decrease: jax.Array

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
  r"""Classifies ``params`` as a minimum, a strict saddle, a degenerate saddle or not critical.

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
    :math:`d` among the eigenvector of :math:`\lambda_{\min}` (the flattest direction) and
    ``num_probe_directions`` uniformly random unit directions. It reports descent when

    .. math::

      f(x + r d) < f(x) - r\, g_{\rm tol} - \tfrac12 \tau r^2 - 64 \epsilon\,
        (|f(x)| + |f(x + r d)|),

    a decrease no gradient within the tolerance, no curvature above :math:`-\tau` and no
    rounding can explain, so it comes from third- or higher-order terms:
    **degenerate saddle**. With no such descent the point is reported a **minimum**
    (possibly degenerate: ``degeneracy`` > 0). So :math:`(w_1 w_2 w_3 - 1)^2` at 0 (zero
    Hessian, descent of order :math:`r^3`) and :math:`x^2 - y^4` are degenerate saddles,
    while :math:`x^2 + y^4` is a minimum. A probe can miss descent confined to a thin cusp
    or beyond the largest radius; set ``probe_radii`` to the scale of the problem.

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
    num_probe_directions: random directions of the higher-order probe (each tried with both
      signs, as is the eigenvector).

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
  _check_value_fn(owner, value_fn, params)
  value, gradient, hvp_fn, finite = _linearize(value_fn, params)
  dtype = _compute_dtype(params)
  value = value.astype(dtype)
  lanczos_key, slq_key, direction_key = jax.random.split(_random.canonicalize_key(key), 3)

  if _random.tree_size(params) <= num_steps:
    eigenvalues, eigenvectors = _dense_eigh(hvp_fn, params, dtype)
    smallest, largest = eigenvalues[0], eigenvalues[-1]
    measure = eigenvalues
  else:
    pairs = curvature.extreme_eigenpairs(
      hvp_fn, params, num_steps=num_steps, key=lanczos_key, k=1, which="both"
    )
    (smallest, largest), eigenvectors = pairs.eigenvalues, pairs.eigenvectors
    measure = _slq(hvp_fn, params, slq_key, num_probes, num_steps, "rademacher", True, None)
  mass = degeneracy(measure, tol=0.0, atol=eigenvalue_tol)

  flattest = jax.tree.map(lambda stacked: stacked[:1], eigenvectors)
  random_directions = jax.vmap(lambda k: _random.sample_isotropic(k, params, 1.0, "sphere"))(
    jax.random.split(direction_key, num_probe_directions)
  )
  directions = jax.tree.map(
    lambda a, b: jnp.concatenate([a.astype(b.dtype), b]), flattest, random_directions
  )
  steps = jnp.asarray(np.concatenate([radii, -radii]), dtype)

  def change(direction, step):
    moved = jax.tree.map(lambda p, d: p + (step * d).astype(p.dtype), params, direction)
    return value_fn(moved).astype(dtype) - value

  changes = jax.vmap(lambda d: jax.vmap(lambda s: change(d, s))(steps))(directions)
  # A loss falling to -inf at a probe point is descent: the rounding allowance comes from finite
  # values only, or it would be infinite too.
  finite_changes = jnp.where(jnp.isfinite(changes), changes, 0)
  roundoff = 64 * jnp.finfo(dtype).eps * (jnp.abs(value) + jnp.abs(value + finite_changes))
  allowance = jnp.abs(steps) * gradient_tol + 0.5 * eigenvalue_tol * steps**2 + roundoff
  descent = jnp.any(changes < -allowance)

  gradient_norm = _random.global_norm(gradient).astype(dtype)
  kind = jnp.where(
    gradient_norm > gradient_tol,
    _NOT_CRITICAL,
    jnp.where(
      smallest < -eigenvalue_tol,
      _STRICT_SADDLE,
      jnp.where((smallest <= eigenvalue_tol) & descent, _DEGENERATE_SADDLE, _MINIMUM),
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
    index=mass.negative_mass,
    degeneracy=mass.near_zero_mass,
    probe_decrease=-jnp.min(changes),
  )
  return _checked(owner, finite, report)


# --------------------------------------------------------------------------------------------
# Per-layer spectra and whole-dataset losses.


class Restriction(NamedTuple):
  """The output of :func:`restrict`: the loss as a function of part of the parameters."""

  value_fn: ValueFn
  params: PyTree


def _path_names(path) -> tuple[str, ...]:
  names = []
  for entry in path:
    for attribute in ("key", "idx", "name"):
      if hasattr(entry, attribute):
        names.append(str(getattr(entry, attribute)))
        break
    else:
      names.append(str(entry))
  return tuple(names)


def restrict(
  value_fn: ValueFn,
  params: PyTree,
  select: str | Sequence[Any] | Callable[[Any, jax.Array], bool],
) -> Restriction:
  r"""Restricts the loss to some leaves of the parameters, for per-layer spectra.

  The restricted loss :math:`g(y) = f(x \text{ with the selected leaves set to } y)` has
  Hessian :math:`\nabla^2 g(y) = [\nabla^2 f(x)]_{SS}`, the diagonal block of the selected
  leaves :math:`S`, so every function of this module applied to it gives that layer's
  spectrum (the per-layer eigenvalues and traces PyHessian users ask for). Products cost what
  they cost for the whole model.

  Args:
    value_fn: the loss, a function of ``params``.
    params: the point; leaves that are not selected stay fixed at their values here.
    select: which leaves; one of

      - a string of path names joined by ``/``, e.g. ``"layers/0/kernel"`` or ``"Linear_0"``,
        selecting every leaf whose path starts with those names (dict keys, sequence indices
        and attribute names, as ``jax.tree_util`` paths spell them);
      - a sequence of such names, e.g. ``("layers", 0)``;
      - a callable ``select(path, leaf) -> bool`` on ``jax.tree_util`` key paths.

  Returns:
    A :class:`Restriction` ``(value_fn, params)``: ``params`` has the structure of the input
    with ``None`` in place of the leaves not selected, and ``value_fn`` takes a pytree of
    that structure.

  Raises:
    ValueError: when ``select`` matches no leaf.
  """
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  if callable(select):
    keep = [bool(select(path, leaf)) for path, leaf in with_paths]
  else:
    prefix = tuple(select.split("/")) if isinstance(select, str) else tuple(map(str, select))
    keep = [_path_names(path)[: len(prefix)] == prefix for path, _ in with_paths]
  if not any(keep):
    available = ", ".join("/".join(_path_names(path)) for path, _ in with_paths[:20])
    raise ValueError(f"restrict: {select!r} selects no parameter; the leaves are {available}.")
  full_leaves = [leaf for _, leaf in with_paths]
  sub_params = treedef.unflatten(
    [leaf if kept else None for kept, leaf in zip(keep, full_leaves, strict=True)]
  )

  def restricted_value_fn(sub: PyTree) -> jax.Array:
    # Another tree (the full params, or a subtree of another leaf) would be spliced in silently.
    _checks.check_tree_like(
      "restrict", sub, sub_params, what="the restricted value_fn's argument", like="sub_params"
    )
    selected = iter(jax.tree.leaves(sub))
    merged = [
      next(selected) if kept else leaf for kept, leaf in zip(keep, full_leaves, strict=True)
    ]
    return value_fn(treedef.unflatten(merged))

  return Restriction(restricted_value_fn, sub_params)


def dataset_value_fn(
  loss_fn: Callable[[PyTree, PyTree], jax.Array],
  batches: PyTree,
  *,
  weights: jax.Array | None = None,
) -> ValueFn:
  r"""The mean loss over a dataset of batches, evaluated one batch at a time.

  .. math::

    f(x) = \frac{\sum_{b=1}^B w_b\, \ell(x, \text{batch}_b)}{\sum_{b=1}^B w_b},

  computed with ``jax.lax.map`` over the leading axis of ``batches`` and ``jax.checkpoint``
  on each term, so gradients and Hessian-vector products also run batch by batch: the
  activations of one batch are alive at a time, and memory does not grow with the number of
  batches beyond the data itself. With a per-batch mean loss and each batch weighted by its
  number of examples this is the full-batch loss, whose Hessian has far less sampling noise
  than one batch's (the variance PyHessian and pytorch-hessian-eigenthings users report).

  A dataset that does not split evenly: pad the last batch to the common size, pass a mask
  with the batch and have ``loss_fn`` average over the masked examples only, and give each
  batch its number of real examples as weight (10 examples in batches of 4 here):

  >>> import jax.numpy as jnp
  >>> from jaxsaddle import spectrum
  >>> inputs = jnp.linspace(-1.0, 1.0, 10)
  >>> padded, mask = jnp.pad(inputs, (0, 2)).reshape(3, 4), (jnp.arange(12) < 10).reshape(3, 4)
  >>> def loss_fn(w, batch):
  ...   x, real = batch
  ...   return jnp.sum(jnp.where(real, (w * x - 1.0) ** 2, 0.0)) / jnp.sum(real)
  >>> value_fn = spectrum.dataset_value_fn(loss_fn, (padded, mask), weights=mask.sum(axis=1))
  >>> bool(jnp.allclose(value_fn(2.0), jnp.mean((2.0 * inputs - 1.0) ** 2)))
  True

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, where ``batch`` is one slice of
      ``batches``.
    batches: a pytree (e.g. ``(inputs, labels)``) whose leaves all have the number of
      batches :math:`B \ge 1` as leading axis, e.g. inputs of shape ``(B, batch_size, ...)``.
    weights: :math:`w`, one non-negative weight per batch, shape ``(B,)``, not all zero
      (booleans select batches); a batch of weight 0 does not count even where its loss is
      NaN, as a masked mean over a batch of padding only is (0 / 0); masking the examples
      with ``jnp.where``, as above, keeps its gradient out too. None (the default) weighs
      the batches equally.

  Returns:
    ``value_fn(params)``, a function usable with every function of this module.
  """
  owner = "dataset_value_fn"
  leading = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(batches)}
  if len(leading) != 1 or None in leading or 0 in leading:
    raise ValueError(
      f"{owner}: every leaf of batches needs the same leading axis (the number of batches, at "
      f"least 1); got leading sizes {sorted(map(str, leading))}."
    )
  (num_batches,) = leading
  for path, leaf in jax.tree.leaves_with_path(batches):
    spec = _sharding.explicit_spec(leaf) if isinstance(leaf, jax.Array) else None
    if spec is not None and spec[0] is not None:
      # lax.map runs the batches one after another: each device would hold only its own.
      raise ValueError(
        f"{owner}: the leading axis of batches{jax.tree_util.keystr(path)}, the batches that "
        f"are evaluated one after another, is split over the mesh axes {spec[0]!r}; leave it "
        "whole and split the examples inside each batch instead, e.g. "
        f"PartitionSpec(None, {spec[0]!r})."
      )
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.shape != (num_batches,):
      raise ValueError(
        f"{owner}: weights must hold one number per batch, shape ({num_batches},); got shape "
        f"{weights.shape}."
      )
    if not (jnp.issubdtype(weights.dtype, jnp.number) or weights.dtype == jnp.bool_) or (
      jnp.issubdtype(weights.dtype, jnp.complexfloating)
    ):
      raise TypeError(f"{owner}: weights must be real numbers or booleans, got {weights.dtype}.")
    if not isinstance(weights, jax.core.Tracer):
      concrete = np.asarray(weights, np.float64)
      if not (np.all(np.isfinite(concrete)) and np.all(concrete >= 0) and concrete.sum() > 0):
        raise ValueError(
          f"{owner}: weights must be finite, non-negative and not all zero, got {weights}."
        )
  checkpointed = jax.checkpoint(loss_fn)

  def value_fn(params: PyTree) -> jax.Array:
    first = jax.tree.map(lambda leaf: leaf[0], batches)
    out = jax.eval_shape(loss_fn, params, first)
    # jnp.mean would also average a vector of per-example losses into a plausible scalar.
    # And it would turn an integer loss, whose Hessian is not defined, into a float one.
    if not (
      isinstance(out, jax.ShapeDtypeStruct)
      and out.shape == ()
      and jnp.issubdtype(out.dtype, jnp.floating)
    ):
      raise ValueError(
        f"{owner}: loss_fn(params, batch) must return the scalar floating-point loss, "
        f"got {out}. Reduce per-example losses within the batch (e.g. with jnp.mean)."
      )
    losses = jax.lax.map(lambda batch: checkpointed(params, batch), batches)
    if weights is None:
      return jnp.mean(losses)
    # Accumulated in float32 at least (weights in the tens of thousands overflow float16), and
    # a batch of weight 0, all padding, may well have a NaN loss (0 / 0): it must not count.
    dtype = jnp.promote_types(losses.dtype, jnp.float32)
    weight = weights.astype(dtype)
    terms = jnp.where(weight > 0, weight * losses.astype(dtype), 0)
    return (jnp.sum(terms) / jnp.sum(weight)).astype(losses.dtype)

  return value_fn


# --------------------------------------------------------------------------------------------
# Monitoring during training.


class MonitorCurvatureState(NamedTuple):
  """State of :func:`monitor_curvature`."""

  count: jax.Array  # int32, number of updates
  rng_key: jax.Array  # typed key, split at every estimate
  smallest_eigenvalue: jax.Array  # the latest estimate; NaN before the first
  largest_eigenvalue: jax.Array  # the latest estimate; NaN before the first
  # Lanczos estimates of ||H v - theta v|| for the latest estimates (see monitor_curvature);
  # NaN before the first.
  smallest_residual: jax.Array
  largest_residual: jax.Array
  eigenvalue_step: jax.Array  # int32, ``count`` when the latest estimate was taken; -1 if none


def monitor_curvature(
  *, every: int | jax.Array, num_lanczos_steps: int, key: jax.Array | int = 0
) -> optax.GradientTransformationExtraArgs:
  r"""Records the extreme Hessian eigenvalues every ``every`` steps; updates pass unchanged.

  .. math::

    u_t = g_t, \qquad (\lambda_{\min}, \lambda_{\max}) \leftarrow
      \text{Lanczos}(\nabla^2 f(x_t)) \text{ when } t \bmod \text{every} = 0,

  with ``num_lanczos_steps`` Hessian-vector products of the loss ``value_fn`` at the
  parameters ``params`` passed to ``update`` (see
  :func:`jaxsaddle.curvature.extreme_eigenpairs`), without reorthogonalisation and without a
  stored basis: only the extreme Ritz values are kept, which the loss of orthogonality leaves
  accurate up to round-off of about ``num_lanczos_steps`` :math:`\epsilon \|H\|`, so memory
  is a few vectors whatever ``num_lanczos_steps``. The estimate runs
  inside ``lax.cond``, so other steps skip its products (under ``vmap`` the cond becomes a
  select and every step pays; with params on a mesh with Explicit axes JAX cannot type that
  select, so map over seeds with ``jax.lax.map`` there, or use Auto axes). On the CPU, XLA
  allocates the temporary memory of both branches at every call, which is why the estimate must
  stay small. An estimating step costs
  ``num_lanczos_steps`` Hessian-vector products and one linearisation, measured at 33-36 SGD
  steps for 20 Lanczos steps on a CPU MLP (about ``1.7 * num_lanczos_steps``), so averaged
  over ``every`` steps the monitor adds about ``1.7 * num_lanczos_steps / every`` SGD steps'
  worth of work.
  The state keeps the latest estimate and the step it was taken at, readable with
  ``optax.tree.get(state, "smallest_eigenvalue")``. The sharpness :math:`\lambda_{\max}`
  against :math:`2/\eta` shows the edge of stability, and a negative :math:`\lambda_{\min}`
  shows a saddle region. Beside each estimate the state keeps ``smallest_residual`` and
  ``largest_residual``, the Lanczos estimates :math:`\beta_m |s_m|` of
  :math:`\|Hv - \theta v\|` for its Ritz vector (see
  :func:`jaxsaddle.curvature.ritz_pairs`; no basis is stored, so the vector's norm, near 1, is
  not divided out). An eigenvalue lies within about that distance of the estimate: a
  :math:`\lambda_{\min}` of -2e-5 with a residual of 1e-2 says the steps were too few to
  tell a saddle from a minimum, not that the run sits at a flat point. A NaN or infinite loss
  or gradient, or products that overflowed, are recorded as NaN extremes and residuals.

  Example::

    import jax, jax.numpy as jnp, optax, jaxsaddle

    loss_fn = lambda p: jnp.sum(jnp.arange(1.0, 5.0) * p**2)  # Hessian diag(2, 4, 6, 8)
    tx = optax.chain(
        optax.sgd(0.1), jaxsaddle.monitor_curvature(every=100, num_lanczos_steps=4))
    params = jnp.ones(4)
    state = tx.init(params)
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, value_fn=loss_fn)
    print(optax.tree.get(state, "largest_eigenvalue"))  # 8.0

  Args:
    every: estimate at steps 0, ``every``, ``2 every``, ... (at least 1).
    num_lanczos_steps: Lanczos steps per estimate (static).
    key: a typed key, a raw uint32 key or an int seed for the Lanczos start vectors.

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and
    ``value_fn``; it returns the incoming updates unchanged (bitwise).
  """
  owner = "monitor_curvature"
  _checks.check_at_least_one(owner, "every", every)
  _checks.check_loop_length(owner, "num_lanczos_steps", num_lanczos_steps)

  def init_fn(params):
    _checks.check_float_leaves(params, owner, "a Hessian")
    dtype = _compute_dtype(params)
    return MonitorCurvatureState(
      count=jnp.zeros([], jnp.int32),
      rng_key=_random.canonicalize_key(key),
      smallest_eigenvalue=jnp.full([], jnp.nan, dtype),
      largest_eigenvalue=jnp.full([], jnp.nan, dtype),
      smallest_residual=jnp.full([], jnp.nan, dtype),
      largest_residual=jnp.full([], jnp.nan, dtype),
      eigenvalue_step=jnp.full([], -1, jnp.int32),
    )

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del extra_args
    _checks.require_value_fn(owner, value_fn, params)
    _checks.check_float_leaves(params, owner, "a Hessian")
    # The updates pass through, but a chain whose updates are unlike the params it estimates
    # at is a mistake the other curvature transforms report too.
    _checks.check_tree_like(owner, updates, params, what="updates", like="params")
    if not _checks.has_elements(params):
      return _checks.pass_empty(updates, state)
    dtype = state.smallest_eigenvalue.dtype

    def estimate(rng_key):
      rng_key, lanczos_key = jax.random.split(rng_key)
      _, _, hvp_fn, finite = _linearize(value_fn, params)
      pairs = curvature.extreme_eigenpairs(
        hvp_fn,
        params,
        num_steps=num_lanczos_steps,
        key=lanczos_key,
        which="both",
        reorthogonalize=False,
        eigenvectors=False,
        exact_residuals=False,
      )
      # A NaN loss or gradient, or products that overflowed (float16 Hessians beyond 65504
      # gave +inf for both), are recorded as NaN extremes, never as a spectrum.
      finite = finite & jnp.all(jnp.isfinite(pairs.eigenvalues))
      extremes = jnp.stack([pairs.eigenvalues, pairs.residual_norms])
      return rng_key, jnp.where(finite, extremes, jnp.nan).astype(dtype), state.count

    def keep(rng_key):
      extremes = jnp.stack(
        [
          jnp.stack([state.smallest_eigenvalue, state.largest_eigenvalue]),
          jnp.stack([state.smallest_residual, state.largest_residual]),
        ]
      )
      return rng_key, extremes, state.eigenvalue_step

    rng_key, extremes, step = jax.lax.cond(state.count % every == 0, estimate, keep, state.rng_key)
    # Nothing else orders the cond, which reads params, before a donated params buffer is
    # overwritten by the update: XLA then copied every parameter at every step (5% of the MLP's
    # SGD step). Updates that depend on the cond's result order it first. The select is always
    # true and fuses into whatever consumes the updates, which pass through bitwise.
    updates = jax.tree.map(
      lambda update: jnp.where(step >= -1, update, jnp.zeros_like(update)), updates
    )
    new_state = MonitorCurvatureState(
      count=optax.safe_increment(state.count),
      rng_key=rng_key,
      smallest_eigenvalue=extremes[0, 0],
      largest_eigenvalue=extremes[0, 1],
      smallest_residual=extremes[1, 0],
      largest_residual=extremes[1, 1],
      eigenvalue_step=step,
    )
    return updates, new_state

  return _checks.public_transform(
    optax.GradientTransformationExtraArgs(init_fn, update_fn), counts=[every]
  )
