"""The extreme eigenvalues of the Hessian by Lanczos, with residuals and derivatives."""

import functools

import jax
import jax.numpy as jnp

from jaxsaddle import curvature
from jaxsaddle.spectrum._common import PyTree
from jaxsaddle.spectrum._common import ValueFn
from jaxsaddle.spectrum._common import _check_value_fn
from jaxsaddle.spectrum._common import _checked
from jaxsaddle.spectrum._common import _linearize


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
    k: the number of eigenvalues at each requested end. Lanczos sees a repeated eigenvalue
      once, so these are usually the ``k`` extreme distinct ones (see
      :func:`jaxsaddle.curvature.extreme_eigenpairs`), and after a breakdown the test misses
      (see :func:`jaxsaddle.curvature.lanczos`) a repeated one may fill several slots;
      count eigenvalues with :func:`hessian_density`.
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
      *vectors* suffer more than the values, even though the copy of the extreme value with
      the smallest residual is the one returned (see
      :func:`jaxsaddle.curvature.extreme_eigenpairs`): on a 40-parameter Hessian with outliers
      at 10, 6 and -7, 20 float32 steps from keys 0-7 gave top eigenvectors whose exact
      residuals ranged from 2e-6 to 2e-4, against 1e-6 to 5e-6 with ``"partial"``. Pass
      ``"partial"`` when the vectors matter; their ``residual_norms`` say how far each is from
      an eigenvector either way.
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
  params = _check_value_fn(owner, value_fn, params)
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
  vector there (both runs sign vectors by their component along the start vector, which
  leaves opposite signs possible where that component is within rounding of zero).
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
