"""A transform that records the extreme Hessian eigenvalues during training."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsaddle import _checks
from jaxsaddle import _random
from jaxsaddle import curvature
from jaxsaddle.spectrum._common import _compute_dtype
from jaxsaddle.spectrum._common import _linearize


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
