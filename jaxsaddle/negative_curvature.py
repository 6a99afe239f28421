r"""Saddle escape that exploits negative curvature.

Four optimizers, all complete (they apply the learning rate themselves):

- :func:`negative_curvature_descent` takes gradient steps and, where the gradient is small,
  runs Lanczos on Hessian-vector products and steps along a direction of negative curvature
  when it finds one (the negative-curvature step of Carmon et al. 2018).
- :func:`neon` takes the same steps with the direction found from gradient differences
  alone, started from noise (the idea of Xu, Jin and Yang's Neon, 2018), and :func:`neon2`
  accelerates its search with Chebyshev polynomials (Allen-Zhu and Li's Neon2, 2018).
- :func:`pagd` is Nesterov's accelerated gradient descent with the perturbations and the
  negative curvature exploitation of Jin, Netrapalli and Jordan (2018); it needs loss values
  but no Hessian-vector products.

All read the loss as ``value_fn``, a function of the parameters returning the scalar loss,
passed to ``update`` as an extra argument (``tx.update(grads, state, params,
value_fn=loss_fn)``; with flax, ``optimizer.update(model, grads, value_fn=...)``). Put them
*last* in a chain: on a curvature or perturbation step their output is a displacement of the
parameters that nothing after them may rescale.

Example::

  import jax, jax.numpy as jnp, optax, jaxsaddle

  # Hessian diag(1, 3 y^2 - 1), 6-Lipschitz for |y| <= 1.
  value_fn = lambda p: 0.5 * p[0] ** 2 + 0.25 * p[1] ** 4 - 0.5 * p[1] ** 2
  tx = jaxsaddle.negative_curvature_descent(
      0.1, hessian_lipschitz=6.0, epsilon=1e-3, num_lanczos_steps=2)

  @jax.jit  # run eagerly, every update would trace and compile the Lanczos branch again
  def step(params, state):
    grads = jax.grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  params = jnp.zeros(2)  # exactly at the strict saddle, where the gradient is zero
  state = tx.init(params)
  for _ in range(100):
    params, state = step(params, state)
  print(params, optax.tree.get(state, "num_curvature_steps"))  # near (0, +-1), 1
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsaddle import _checks
from jaxsaddle import _random
from jaxsaddle import curvature

_NEVER = jnp.iinfo(jnp.int32).max

PyTree = Any
ValueFn = Callable[[PyTree], jax.Array]


def _lower_side(loss_minus: jax.Array, loss_plus: jax.Array) -> jax.Array:
  """-1 when the loss is lower at ``x - delta``, +1 otherwise (ties included), NaN when either
  loss is NaN: a comparison with NaN is False, which would pick +1 whatever the losses."""
  side = jnp.where(loss_minus < loss_plus, -1.0, 1.0)
  return jnp.where(jnp.isnan(loss_minus) | jnp.isnan(loss_plus), jnp.nan, side)


def _scale(scalar, tree: PyTree) -> PyTree:
  """``scalar * tree`` in each leaf's dtype, as ``optax.scale_by_learning_rate`` computes it."""
  return jax.tree.map(lambda leaf: jnp.asarray(scalar, leaf.dtype) * leaf, tree)


def _curvature_descent(
  owner: str,
  uses: str,
  state_type: type,
  search: Callable,
  key,
  learning_rate: optax.ScalarOrSchedule,
  hessian_lipschitz,
  epsilon,
  gradient_threshold,
  *,
  positive=(),
) -> optax.GradientTransformationExtraArgs:
  """A negative-curvature descent whose direction ``search`` finds.

  ``search(value_fn, params, key, dtype)`` returns the gradient at ``params``, an upper bound
  on the curvature along a unit direction, and that direction. ``uses`` says how it reads the
  loss, for the error of a missing ``value_fn``. ``state_type`` has the fields of
  :class:`NegativeCurvatureDescentState`, in its order, the fourth counting the searches under
  a name of its own; ``positive`` lists hyperparameters of the search to guard.
  """
  learning_rate = _checks.checked_learning_rate(owner, learning_rate)
  _checks.check_positive(owner, "hessian_lipschitz", hessian_lipschitz)
  _checks.check_positive(owner, "epsilon", epsilon)
  if gradient_threshold is None:
    gradient_threshold = epsilon
  else:
    _checks.check_positive(owner, "gradient_threshold", gradient_threshold)

  def init_fn(params):
    _checks.check_float_leaves(params, owner, "a curvature step")
    zero = jnp.zeros([], jnp.int32)
    nan = jnp.full([], jnp.nan, curvature._compute_dtype(params))
    return state_type(zero, _random.canonicalize_key(key), nan, zero, zero)

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del extra_args
    new_updates, rng_key, eigenvalue, searched, took_curvature_step = step(
      updates, state, params, value_fn
    )
    num_searches = state[3]
    new_state = state_type(
      optax.safe_increment(state.count),
      rng_key,
      eigenvalue,
      num_searches + searched.astype(jnp.int32),
      state.num_curvature_steps + took_curvature_step.astype(jnp.int32),
    )
    return new_updates, new_state

  def step(updates, state, params, value_fn):
    _checks.require_value_fn(owner, value_fn, params, uses=uses)
    _checks.check_updates(owner, updates, params, "a curvature step")
    if not _checks.has_elements(params):
      # No Hessian to search: the (empty) updates pass, as through any optax transform.
      no = jnp.zeros([], jnp.bool_)
      return updates, state.rng_key, state.last_smallest_eigenvalue, no, no
    gradient_step = _scale(-_checks.learning_rate_at(learning_rate, state.count), updates)
    small_gradient = _random.norm_at_most(updates, gradient_threshold)
    rng_key, search_key = jax.random.split(state.rng_key)
    dtype = state.last_smallest_eigenvalue.dtype

    def curvature_step(gradient_step):
      grad, eigenvalue, direction = search(value_fn, params, search_key, dtype)
      # Products that overflowed (float16 Hessians beyond 65504) gave +inf: recorded as NaN,
      # which takes no curvature step, rather than as a positive-definite Hessian.
      eigenvalue = jnp.where(jnp.isfinite(eigenvalue), eigenvalue, jnp.nan).astype(dtype)
      # Each cast before they are combined: a float16 product (inject_hyperparams) flushed
      # rho * epsilon = 1e-8 to 0, and every negative eigenvalue passed.
      threshold = jnp.sqrt(jnp.asarray(hessian_lipschitz, dtype)) * jnp.sqrt(
        jnp.asarray(epsilon, dtype)
      )
      negative = eigenvalue < -threshold
      step = _scale(-eigenvalue / hessian_lipschitz, direction)
      slope = curvature._tree_vdot(grad, direction, dtype)

      def lower_candidate():
        plus = jax.tree.map(lambda p, s: p + s.astype(p.dtype), params, step)
        minus = jax.tree.map(lambda p, s: p - s.astype(p.dtype), params, step)
        return _lower_side(value_fn(minus), value_fn(plus)).astype(dtype)

      sign = jax.lax.cond(negative & (slope == 0), lower_candidate, lambda: -jnp.sign(slope))
      new_updates = jax.tree.map(
        lambda s, g: jnp.where(negative, (sign * s).astype(g.dtype), g), step, gradient_step
      )
      return new_updates, eigenvalue, negative

    def gradient_only(gradient_step):
      return gradient_step, state.last_smallest_eigenvalue, jnp.zeros([], jnp.bool_)

    new_updates, eigenvalue, took_curvature_step = jax.lax.cond(
      small_gradient, curvature_step, gradient_only, gradient_step
    )
    return new_updates, rng_key, eigenvalue, small_gradient, took_curvature_step

  return _checks.public_transform(
    optax.GradientTransformationExtraArgs(init_fn, update_fn),
    positive=[hessian_lipschitz, epsilon, gradient_threshold, *positive],
    nonnegative=[learning_rate],
  )


class NegativeCurvatureDescentState(NamedTuple):
  """State of :func:`negative_curvature_descent`; the counters are escape diagnostics."""

  count: jax.Array  # int32, number of updates
  rng_key: jax.Array  # typed key, split at every update
  # The last Lanczos estimate of lambda_min, NaN before any and where the Hessian-vector
  # products were NaN or overflowed (that step is a gradient step). Not "smallest_eigenvalue",
  # the field of monitor_curvature, so that optax.tree.get finds each in a chain of both.
  last_smallest_eigenvalue: jax.Array
  num_lanczos_calls: jax.Array  # int32, updates whose gradient was small enough to run Lanczos
  num_curvature_steps: jax.Array  # int32, updates that stepped along negative curvature


def negative_curvature_descent(
  learning_rate: optax.ScalarOrSchedule,
  *,
  hessian_lipschitz: float | jax.Array,
  epsilon: float | jax.Array,
  num_lanczos_steps: int,
  gradient_threshold: float | jax.Array | None = None,
  key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient descent with Lanczos negative-curvature steps where the gradient is small.

  With :math:`g_t` the incoming gradient at :math:`x_t`, :math:`\rho` =
  ``hessian_lipschitz``, :math:`\varepsilon` = ``epsilon`` and :math:`g_{\rm thres}` =
  ``gradient_threshold`` (default :math:`\varepsilon`), each call returns

  .. math::

    u_t = \begin{cases}
      \sigma_t \dfrac{|\lambda_t|}{\rho}\, v_t
        & \text{if } \|g_t\| \le g_{\rm thres} \text{ and } \lambda_t < -\sqrt{\rho\varepsilon}, \\
      -\eta_t\, g_t & \text{otherwise,}
    \end{cases}

  where :math:`(\lambda_t, v_t)` is the smallest Ritz pair, :math:`\|v_t\| = 1`, of
  ``num_lanczos_steps`` Lanczos steps on :math:`\nabla^2 f(x_t)` from a Gaussian start drawn
  from the state's key, and :math:`\sigma_t = -\operatorname{sign}\langle \nabla f(x_t),
  v_t\rangle`, with :math:`\nabla f(x_t)` the gradient of ``value_fn`` that the
  linearisation for Lanczos yields anyway (not the incoming, possibly preprocessed,
  :math:`g_t`). When that inner product is exactly zero (at a critical point, or where the
  gradient is orthogonal to :math:`v_t`), :math:`\sigma_t` is the sign of the candidate
  :math:`x_t \pm (|\lambda_t|/\rho) v_t` with the lower loss, :math:`+1` if they are equal.
  Where the gradient is small but the curvature is not negative enough, :math:`x_t` is an
  :math:`\varepsilon`-second-order stationary point up to the Lanczos error and the update is
  the gradient step, so the iterates keep converging.

  **Guaranteed decrease.** With a :math:`\rho`-Lipschitz Hessian and :math:`v^\top \nabla^2
  f(x) v = \lambda < 0`, the sign choice makes the first-order term non-positive and

  .. math::

    f(x + \sigma \alpha v) \le f(x) + \tfrac12 \alpha^2 \lambda + \tfrac16 \rho \alpha^3
    = f(x) - \frac{|\lambda|^3}{3 \rho^2} \quad\text{at } \alpha = |\lambda| / \rho,

  so every curvature step lowers the loss by at least :math:`(\rho\varepsilon)^{3/2} /
  (3\rho^2) = \sqrt{\varepsilon^3 / \rho} / 3`. The Ritz value equals the Rayleigh quotient
  of its Ritz vector, so the bound holds for the estimate, however rough. A :math:`\rho`
  that underestimates the Hessian's Lipschitz constant makes the step too long and voids the
  guarantee.

  The curvature step is the negative-curvature step of Carmon, Duchi, Hinder and Sidford,
  *Accelerated Methods for Nonconvex Optimization*, SIAM J. Optim. 2018 (arXiv:1611.00756);
  here it alternates with plain gradient descent rather than their accelerated solver of
  almost-convex subproblems. :func:`neon` finds such directions from gradient differences
  alone; this transform uses exact Hessian-vector products.

  **Cost.** A Lanczos call linearises :math:`\nabla f` at :math:`x_t` once (about one
  gradient) and takes ``num_lanczos_steps`` Hessian-vector products; the tie-break adds two
  loss evaluations. :func:`jaxsaddle.extreme_eigenpairs` gives the number of steps that finds
  :math:`\lambda_{\min}` to a given accuracy with a given probability. The call sits in a
  ``lax.cond``, so updates with a large gradient pay nothing for it under ``jit``; under
  ``jax.vmap`` the ``cond`` becomes a ``select`` and Lanczos runs at every update. JAX cannot
  type that ``select`` when the params are on a mesh with Explicit axes (a
  ``ShardingTypeError``): map over seeds with ``jax.lax.map`` there, or use Auto axes.

  NaN or Inf gradients fail the small-gradient test and reach the update unchanged (scaled
  by :math:`-\eta_t`). The loss itself is read only by the tie-break at a zero slope: a NaN
  there gives NaN updates rather than an arbitrary sign.

  Example::

    import jax, jax.numpy as jnp, jaxsaddle

    loss_fn = lambda p: p[0] ** 2 - p[1] ** 2 + p[1] ** 4  # strict saddle at 0
    params = jnp.zeros(2)
    tx = jaxsaddle.negative_curvature_descent(
        0.1, hessian_lipschitz=6.0, epsilon=1e-3, num_lanczos_steps=2)
    state = tx.init(params)
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, value_fn=loss_fn)
    print(updates, state.num_curvature_steps)  # a step of 1/3 along +-y, 1

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule of the update count.
    hessian_lipschitz: :math:`\rho > 0`, a Lipschitz constant of :math:`\nabla^2 f`; sets the
      curvature step's length and, with ``epsilon``, the curvature threshold.
    epsilon: :math:`\varepsilon > 0`, the target accuracy: curvature steps are taken while
      :math:`\lambda_{\min} < -\sqrt{\rho\varepsilon}`.
    num_lanczos_steps: the number of Lanczos steps (Hessian-vector products) per call, a
      Python int >= 1 (under ``optax.inject_hyperparams``, list it in ``static_args``).
    gradient_threshold: :math:`g_{\rm thres} > 0`, or None for :math:`\varepsilon`.
    key: a typed key, a raw uint32 key or an int seed (may be traced, e.g. under ``vmap``).

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and
    ``value_fn``; without them it raises a ``ValueError`` that shows the call to make.
    Integer, boolean or complex parameters are rejected by ``init`` with a ``TypeError``.
  """
  _checks.check_loop_length("negative_curvature_descent", "num_lanczos_steps", num_lanczos_steps)

  def lanczos_search(value_fn, params, key, dtype):
    _, grad, hvp_fn = curvature._linearize_value_and_hvp(value_fn, params)
    pairs = curvature.extreme_eigenpairs(
      hvp_fn, params, num_steps=num_lanczos_steps, key=key, which="smallest", exact_residuals=False
    )
    return grad, pairs.eigenvalues[0], jax.tree.map(lambda stacked: stacked[0], pairs.eigenvectors)

  return _curvature_descent(
    "negative_curvature_descent",
    "takes Hessian-vector products of the loss",
    NegativeCurvatureDescentState,
    lanczos_search,
    key,
    learning_rate,
    hessian_lipschitz,
    epsilon,
    gradient_threshold,
  )


class NeonState(NamedTuple):
  """State of :func:`neon`; the counters are escape diagnostics."""

  count: jax.Array  # int32, number of updates
  rng_key: jax.Array  # typed key, split at every update
  # The last upper bound on the curvature along the search's direction, NaN before any, where
  # the gradients were NaN or overflowed, and where the params' rounding took the displacement
  # (each such step is a gradient step).
  last_smallest_eigenvalue: jax.Array
  num_searches: jax.Array  # int32, updates whose gradient was small enough to search
  num_curvature_steps: jax.Array  # int32, updates that stepped along negative curvature


def _gradient_difference_search(
  value_fn: ValueFn,
  params: PyTree,
  key: jax.Array,
  dtype,
  *,
  num_steps,
  smoothness,
  radius,
  rho,
  accelerated=False,
):
  """Power iteration on ``I - H / smoothness``, or Chebyshev's recurrence on ``I - 2 H /
  smoothness`` where ``accelerated``, with ``H u ~ grad f(x + u) - grad f(x)`` at radius
  ``radius``; returns the gradient, an upper bound on the curvature along the final direction
  (NaN where rounding took more than half the displacement), and that unit direction."""
  gradient_fn = jax.grad(value_fn)
  grad = curvature._cast(gradient_fn(params), dtype)

  def displaced(u):
    """The displacement the params' dtype actually makes of ``u``, and the gradient change."""
    # The barrier rounds the moved point to the params' dtype, as value_fn sees it: inside one
    # XLA program bfloat16 sums are otherwise kept wider, and the displacement read back was
    # not the one the gradient was taken at (a bound of -0.3 where the curvature was +1.6).
    moved = jax.lax.optimization_barrier(
      jax.tree.map(lambda p, d: p + d.astype(p.dtype), params, u)
    )
    actual = jax.tree.map(lambda m, p: m.astype(dtype) - p.astype(dtype), moved, params)
    change = jax.tree.map(lambda g, g0: g.astype(dtype) - g0, gradient_fn(moved), grad)
    return actual, change

  def radius_over(size):
    return curvature._reciprocal_where(size > 0, size) * radius

  def power_step(_, u):
    actual, change = displaced(u)
    image = jax.tree.map(lambda a, c: a - c / smoothness, actual, change)
    return _scale(radius_over(_random.global_norm(image)), image)

  def chebyshev_step(step, vectors):
    # T_{k+1}(z) = 2 z T_k(z) - T_{k-1}(z), T_1(z) = z, for z = I - 2H / ell: [0, ell] maps
    # onto [-1, 1], where |T_k| <= 1, and curvature -gamma onto 1 + 2 gamma / ell, where T_k
    # grows as exp(2 k sqrt(gamma / ell)) / 2. The recurrence is linear, so both vectors are
    # rescaled by one factor to keep the newest at radius r.
    previous, current = vectors
    actual, change = displaced(current)
    weight = jnp.asarray(jnp.where(step == 0, 1, 2), dtype)
    following = jax.tree.map(
      lambda a, c, p: weight * (a - 2 * c / smoothness) - p, actual, change, previous
    )
    # At a root of the polynomial (H = ell I / 2 and T_1, say) the newest vector is zero and
    # the pair is rescaled by the current one's norm: the next step then takes the zero
    # vector's exactly zero difference and continues with -y_{k-1}.
    size = _random.global_norm(following)
    size = jnp.where(size > 0, size, _random.global_norm(actual))
    return _scale(radius_over(size), actual), _scale(radius_over(size), following)

  start = _random.sample_isotropic(key, curvature._cast(params, dtype), radius, "sphere")
  unroll = curvature.unroll_by_default(gradient_fn, params)
  if accelerated:
    last, u = curvature.fori_loop(
      num_steps, chebyshev_step, (optax.tree.zeros_like(start), start), unroll=unroll
    )
    # Zero where every curvature sits at a root of T_K: y_{K-1} is the direction then.
    nonzero = _random.global_norm(u) > 0
    u = jax.tree.map(lambda newest, previous: jnp.where(nonzero, newest, previous), u, last)
  else:
    u = curvature.fori_loop(num_steps, power_step, start, unroll=unroll)
  actual, change = displaced(u)
  _, change_back = displaced(_scale(-1, actual))
  length = _random.global_norm(actual)
  inverse = curvature._reciprocal_where(length > 0, length)
  # With a rho-Lipschitz Hessian, grad f(x + d) - grad f(x) = H d + e with |e| <= rho |d|^2 / 2,
  # and so is grad f(x) - grad f(x - d): in exact arithmetic the two differ by at most
  # rho |d|^2, and beyond that by the rounding of the gradients, which the mismatch measures
  # and the bound takes in (a float32 mean of large cancelling terms read a convex quadratic's
  # curvature 1e-3 as -6e-3 without it).
  mismatch = _random.global_norm(jax.tree.map(jnp.add, change, change_back))
  bound = (
    curvature._tree_vdot(actual, change, dtype) * inverse**2 + rho * length / 2 + mismatch * inverse
  )
  # A displacement mostly rounded away (a radius below the params' spacing) measures nothing.
  return grad, jnp.where(length >= radius / 2, bound, jnp.nan), _scale(inverse, actual)


def neon(
  learning_rate: optax.ScalarOrSchedule,
  *,
  hessian_lipschitz: float | jax.Array,
  epsilon: float | jax.Array,
  smoothness: float | jax.Array,
  num_search_steps: int,
  difference_radius: float | jax.Array | None = None,
  gradient_threshold: float | jax.Array | None = None,
  key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Negative-curvature descent whose direction comes from gradients alone, started from noise.

  The update is that of :func:`negative_curvature_descent`, with the pair
  :math:`(\lambda_t, v_t)` found without Hessian-vector products. From :math:`u_0` uniform on
  the sphere of radius :math:`r` = ``difference_radius``, ``num_search_steps`` steps of

  .. math::

    u_{k+1} = r\, \frac{w_k}{\|w_k\|}, \qquad
    w_k = u_k - \frac{1}{\ell} \bigl(\nabla f(x_t + u_k) - \nabla f(x_t)\bigr),

  with :math:`\ell` = ``smoothness``, are the power method on :math:`I - \nabla^2 f(x_t) /
  \ell` with each Hessian-vector product replaced by a gradient difference; its dominant
  eigenvalue, :math:`1 + |\lambda_{\min}| / \ell` when :math:`\lambda_{\min} < 0` and the
  spectrum lies in :math:`[\lambda_{\min}, \ell]`, belongs to the most negative curvature.
  Then :math:`v_t = d / \|d\|` for the displacement :math:`d` the params' dtype actually makes
  of :math:`u_K`; with :math:`\Delta_\pm = \pm(\nabla f(x_t \pm d) - \nabla f(x_t))`,

  .. math::

    \lambda_t = \frac{d^\top \Delta_+}{\|d\|^2} + \frac{\rho \|d\|}{2}
      + \frac{\|\Delta_+ - \Delta_-\|}{\|d\|} \;\ge\; v_t^\top \nabla^2 f(x_t)\, v_t,

  since a :math:`\rho`-Lipschitz Hessian puts each difference within :math:`\rho \|d\|^2 / 2`
  of :math:`\nabla^2 f(x_t)\, d`. The last term is at most :math:`\rho \|d\|` in exact
  arithmetic; in floating point it measures the rounding of the gradients, which divided by
  :math:`\|d\|` would otherwise fake curvature (a float32 mean of large cancelling terms
  read a convex quadratic's 1e-3 as -6e-3 without it), so the bound holds up to rounding not
  seen by both differences alike. Being an upper bound, :math:`\lambda_t` keeps the
  guarantee of :func:`negative_curvature_descent`: a curvature step lowers the loss by at
  least :math:`|\lambda_t|^3 / (3\rho^2)`. The default :math:`r = 0.1 \sqrt{\varepsilon /
  \rho}` keeps the slack within :math:`0.15 \sqrt{\rho\varepsilon}` in exact arithmetic,
  against the curvature threshold :math:`\sqrt{\rho\varepsilon}`. Where the params' dtype
  rounds away more than half of the displacement (a radius below their spacing: bfloat16 or
  float16 params, or float32 ones of magnitude :math:`10^4` at the default radius), the
  search measures nothing and :math:`\lambda_t` is NaN, which takes a gradient step and shows
  in the state; set ``difference_radius`` to a few units of the params' last place then.

  This is the idea of Neon, "NEgative-curvature-Originated-from-Noise" (Xu, Jin and Yang,
  *First-order Stochastic Algorithms for Escaping From Saddle Points in Almost Linear Time*,
  NeurIPS 2018, arXiv:1711.01944): a sequence of first-order updates started from noise that
  extracts negative curvature, the power method in essence; :func:`neon2` accelerates it with
  Chebyshev polynomials, as Allen-Zhu and Li's Neon2 does. The papers' stopping
  rules and stochastic variants are not reproduced: the search runs a fixed number of steps
  on full gradients of ``value_fn``, renormalised to radius :math:`r` at every step (as in
  Zhang and Li's robust Hessian power method, NeurIPS 2021, arXiv:2111.14069), and its
  direction is judged by the bound above.

  **Cost.** A search takes ``num_search_steps`` + 3 gradients of ``value_fn`` and no
  Hessian-vector product, so it suits losses that forward mode cannot differentiate twice.
  The power method needs about :math:`(\ell / \gamma) \log(n / \delta)` steps to find
  curvature :math:`-\gamma / 2` with probability :math:`1 - \delta` in :math:`n` parameters,
  against about :math:`\sqrt{\ell / \gamma} \log(n / \delta)` for Lanczos and for
  :func:`neon2`'s Chebyshev recurrence: where Hessian-vector products are available,
  :func:`negative_curvature_descent` needs far fewer, and without them :func:`neon2` does,
  where its stricter need of an :math:`\ell` above the whole spectrum is met.
  As there, the search sits in a ``lax.cond`` and runs only where the gradient is small (at
  every update under ``vmap``).

  Example::

    import jax, jax.numpy as jnp, jaxsaddle

    loss_fn = lambda p: p[0] ** 2 - p[1] ** 2 + p[1] ** 4  # strict saddle at 0
    params = jnp.zeros(2)
    tx = jaxsaddle.neon(
        0.1, hessian_lipschitz=6.0, epsilon=1e-3, smoothness=2.0, num_search_steps=30)
    state = tx.init(params)
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, value_fn=loss_fn)
    print(updates, state.num_curvature_steps)  # about 1/3 along +-y, 1

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule of the update count.
    hessian_lipschitz: :math:`\rho > 0`, a Lipschitz constant of :math:`\nabla^2 f`.
    epsilon: :math:`\varepsilon > 0`: curvature steps are taken while the bound
      :math:`\lambda_t < -\sqrt{\rho\varepsilon}`.
    smoothness: :math:`\ell > 0`, at least the Hessian's largest eigenvalue (a Lipschitz
      constant of :math:`\nabla f`). Smaller, the search can lock onto the largest
      eigenvalue instead, which only makes it find no negative curvature.
    num_search_steps: the number of power steps per search, a Python int >= 1 (under
      ``optax.inject_hyperparams``, list it in ``static_args``).
    difference_radius: :math:`r > 0`, or None for :math:`0.1 \sqrt{\varepsilon / \rho}`; at
      least a few units of the params' last place.
    gradient_threshold: :math:`g_{\rm thres} > 0`, or None for :math:`\varepsilon`.
    key: a typed key, a raw uint32 key or an int seed (may be traced, e.g. under ``vmap``).

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and ``value_fn``.
  """
  return _gradient_difference_descent(
    "neon",
    learning_rate,
    hessian_lipschitz=hessian_lipschitz,
    epsilon=epsilon,
    smoothness=smoothness,
    num_search_steps=num_search_steps,
    difference_radius=difference_radius,
    gradient_threshold=gradient_threshold,
    key=key,
    accelerated=False,
  )


def _gradient_difference_descent(
  owner: str,
  learning_rate,
  *,
  hessian_lipschitz,
  epsilon,
  smoothness,
  num_search_steps,
  difference_radius,
  gradient_threshold,
  key,
  accelerated: bool,
) -> optax.GradientTransformationExtraArgs:
  """:func:`neon`, or :func:`neon2` where ``accelerated``."""
  _checks.check_positive(owner, "smoothness", smoothness)
  _checks.check_loop_length(owner, "num_search_steps", num_search_steps)
  if difference_radius is not None:
    _checks.check_positive(owner, "difference_radius", difference_radius)

  def search(value_fn, params, key, dtype):
    radius = difference_radius
    if radius is None:
      radius = 0.1 * jnp.sqrt(jnp.asarray(epsilon, dtype) / jnp.asarray(hessian_lipschitz, dtype))
    return _gradient_difference_search(
      value_fn,
      params,
      key,
      dtype,
      num_steps=num_search_steps,
      smoothness=jnp.asarray(smoothness, dtype),
      radius=jnp.asarray(radius, dtype),
      rho=jnp.asarray(hessian_lipschitz, dtype),
      accelerated=accelerated,
    )

  return _curvature_descent(
    owner,
    "takes gradients of the loss away from the current parameters",
    NeonState,
    search,
    key,
    learning_rate,
    hessian_lipschitz,
    epsilon,
    gradient_threshold,
    positive=[smoothness, difference_radius],
  )


def neon2(
  learning_rate: optax.ScalarOrSchedule,
  *,
  hessian_lipschitz: float | jax.Array,
  epsilon: float | jax.Array,
  smoothness: float | jax.Array,
  num_search_steps: int,
  difference_radius: float | jax.Array | None = None,
  gradient_threshold: float | jax.Array | None = None,
  key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  r""":func:`neon` with its power method replaced by Chebyshev's recurrence: gradients in the
  number, in order, that Lanczos needs Hessian-vector products.

  The update, the curvature bound and its guaranteed decrease are those of :func:`neon`; only
  the search differs. With :math:`\ell` = ``smoothness``, :math:`r` = ``difference_radius``,
  :math:`y_{-1} = 0` and :math:`y_0` uniform on the sphere of radius :math:`r`,
  ``num_search_steps`` = :math:`K` steps of

  .. math::

    y_{k+1} = c_k \Bigl(y_k - \frac{2}{\ell}\bigl(\nabla f(x_t + y_k) - \nabla f(x_t)\bigr)
      \Bigr) - y_{k-1}, \qquad c_0 = 1,\ c_{k \ge 1} = 2,

  each followed by rescaling :math:`y_k` and :math:`y_{k+1}` by one factor that puts
  :math:`y_{k+1}` at radius :math:`r`, give :math:`y_K \propto T_K(I - 2\nabla^2 f(x_t) /
  \ell)\, y_0` on a quadratic, with :math:`T_K` the Chebyshev polynomial of the first kind.
  (Where :math:`y_{k+1}` is exactly zero, every curvature at a root of the polynomial, the
  factor puts :math:`y_k` at radius :math:`r` instead, and :math:`y_{K-1}` is the direction
  where :math:`y_K` is zero.)
  The map :math:`\lambda \mapsto 1 - 2\lambda/\ell` takes curvature in :math:`[0, \ell]` onto
  :math:`[-1, 1]`, where :math:`|T_K| \le 1`, and curvature :math:`-\gamma` to :math:`1 +
  2\gamma/\ell`, where :math:`T_K = \cosh(K \operatorname{arccosh}(1 + 2\gamma/\ell)) \approx
  \tfrac12 e^{2K\sqrt{\gamma/\ell}}`. So about :math:`\tfrac12\sqrt{\ell/\gamma}\,\log(n /
  \delta)` steps find curvature near :math:`-\gamma` with probability :math:`1 - \delta` in
  :math:`n` parameters, where the power method of :func:`neon` needs about :math:`(\ell /
  \gamma) \log(n / \delta)`: at :math:`\gamma / \ell = 10^{-2}`, tens of gradients instead of
  hundreds. That is the order of Lanczos's Hessian-vector products, though Lanczos, optimal
  over all polynomials of its degree and needing no :math:`\ell`, does at least as well. As in
  :func:`neon`, each gradient is taken at the displacement the params' dtype actually makes of
  :math:`y_k`.

  The acceleration is that of Allen-Zhu and Li's deterministic Neon2 (*NEON2: Finding Local
  Minima via First-Order Oracles*, NeurIPS 2018, arXiv:1711.06673), which turns Lanczos into
  a first-order method through Chebyshev approximation. As with :func:`neon`, the paper's
  stopping rule and its stochastic (online) variant are not reproduced: the search runs
  :math:`K` steps of the plain three-term recurrence, on full gradients of ``value_fn``, and
  its direction is judged by :func:`neon`'s upper bound. The interval mapped onto
  :math:`[-1, 1]` is :math:`[0, \ell]`, so the search needs no hyperparameter beyond
  :func:`neon`'s. An error made at step :math:`j` reaches :math:`y_K` multiplied by
  :math:`U_{K-j-1}(z)`, the Chebyshev polynomial of the second kind, up to :math:`K - j` on
  :math:`[-1, 1]`: the errors of the differences (:math:`\rho r / 2` relative to the
  curvature, plus rounding) accumulate about as over the power method's steps, tens of times
  one difference's at :math:`\gamma / \ell = 10^{-2}`. Whatever they are, the bound is
  computed afresh along the final direction, so it stays an upper bound.

  **smoothness matters more than for neon.** Curvature :math:`\lambda > \ell` maps below
  :math:`-1`, where :math:`|T_K|` grows as well: from about :math:`\ell + |\lambda_{\min}|`
  (a little below it at finite :math:`K`, where the large curvature also weighs more in the
  Rayleigh quotient) it outgrows the negative curvature and the search finds none (the bound
  is positive and the update a gradient step): 10% above :math:`\ell` is enough to switch it
  off at :math:`\lambda_{\min} = -0.05\ell`. :func:`neon`'s power method tolerates curvature
  up to about :math:`2\ell + |\lambda_{\min}|`.
  Use a Lipschitz constant of :math:`\nabla f`, or an estimate of the largest eigenvalue
  (:func:`jaxsaddle.hessian_extreme_eigenvalues`) with a margin.

  **Cost.** As :func:`neon`: ``num_search_steps`` + 3 gradients per search, one more vector
  kept, no Hessian-vector product.

  Example::

    import jax, jax.numpy as jnp, jaxsaddle

    loss_fn = lambda p: p[0] ** 2 - p[1] ** 2 + p[1] ** 4  # strict saddle at 0
    params = jnp.zeros(2)
    tx = jaxsaddle.neon2(
        0.1, hessian_lipschitz=6.0, epsilon=1e-3, smoothness=2.0, num_search_steps=10)
    state = tx.init(params)
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, value_fn=loss_fn)
    print(updates, state.num_curvature_steps)  # about 1/3 along +-y, 1

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule of the update count.
    hessian_lipschitz: :math:`\rho > 0`, a Lipschitz constant of :math:`\nabla^2 f`.
    epsilon: :math:`\varepsilon > 0`: curvature steps are taken while the bound
      :math:`\lambda_t < -\sqrt{\rho\varepsilon}`.
    smoothness: :math:`\ell > 0`, at least the Hessian's largest eigenvalue (see above).
    num_search_steps: :math:`K`, the number of Chebyshev steps per search, a Python int >= 1
      (under ``optax.inject_hyperparams``, list it in ``static_args``).
    difference_radius: :math:`r > 0`, or None for :math:`0.1 \sqrt{\varepsilon / \rho}`; at
      least a few units of the params' last place.
    gradient_threshold: :math:`g_{\rm thres} > 0`, or None for :math:`\varepsilon`.
    key: a typed key, a raw uint32 key or an int seed (may be traced, e.g. under ``vmap``).

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and ``value_fn``;
    its state is a :class:`NeonState`.
  """
  return _gradient_difference_descent(
    "neon2",
    learning_rate,
    hessian_lipschitz=hessian_lipschitz,
    epsilon=epsilon,
    smoothness=smoothness,
    num_search_steps=num_search_steps,
    difference_radius=difference_radius,
    gradient_threshold=gradient_threshold,
    key=key,
    accelerated=True,
  )


class PAGDState(NamedTuple):
  """State of :func:`pagd`; the counters are escape diagnostics."""

  count: jax.Array  # int32, number of updates (perturbing ones included)
  rng_key: jax.Array  # typed key, split at every update
  velocity: PyTree  # v_t = x_t - x_{t-1}, like the params
  steps_since_perturbation: jax.Array  # int32, accelerated steps since; int32 max if never
  num_perturbations: jax.Array  # int32
  num_exploitations: jax.Array  # int32, negative curvature exploitations


def pagd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float | jax.Array,
  perturbation_radius: float | jax.Array,
  gradient_threshold: float | jax.Array,
  escape_steps: int | jax.Array,
  exploitation_radius: float | jax.Array,
  curvature_threshold: float | jax.Array | None = None,
  key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Perturbed accelerated gradient descent with negative curvature exploitation.

  Jin, Netrapalli and Jordan, *Accelerated Gradient Descent Escapes Saddle Points Faster than
  Gradient Descent*, COLT 2018 (arXiv:1711.10456), Algorithm 2 (PAGD) with Algorithm 3
  (NCE). With :math:`\eta` = ``learning_rate``, :math:`1 - \theta` = ``momentum``,
  :math:`r` = ``perturbation_radius``, :math:`\epsilon` = ``gradient_threshold``,
  :math:`T` = ``escape_steps``, :math:`s` = ``exploitation_radius`` and :math:`\gamma` =
  ``curvature_threshold`` (default :math:`\theta^2/\eta`), and :math:`v_0 = 0`:

  .. math::

    &\text{if } \|\nabla f\| \le \epsilon \text{ and no perturbation in the last } T
      \text{ steps: } x_t \leftarrow x_t + \xi_t,\ \xi_t \sim \mathcal U(B_0(r)); \\
    &y_t = x_t + (1 - \theta) v_t, \quad x_{t+1} = y_t - \eta \nabla f(y_t), \quad
      v_{t+1} = x_{t+1} - x_t; \\
    &\text{if } f(x_t) \le f(y_t) + \langle \nabla f(y_t), x_t - y_t \rangle
      - \tfrac{\gamma}{2} \|x_t - y_t\|^2: \quad
      (x_{t+1}, v_{t+1}) = \mathrm{NCE}(x_t, v_t, s),

  where :math:`\mathrm{NCE}(x, v, s) = (x, 0)` if :math:`\|v\| \ge s`, and otherwise
  :math:`(\arg\min_{x \pm \delta} f, 0)` with :math:`\delta = s\, v / \|v\|` (:math:`x +
  \delta` when the two losses are equal), and :math:`\xi_t` is uniform in the ball over the
  whole concatenated parameter vector. The test finds :math:`f` more concave than
  :math:`-\gamma` on the segment from :math:`y_t` to :math:`x_t`; NCE then either undoes the
  step and drops the momentum, or moves a fixed distance along that direction.

  **How the optax call maps onto the iterates.** The parameters handed to ``update`` are
  :math:`y_t`, the point where the caller evaluates the gradient, and ``updates`` is taken to
  be :math:`\nabla f(y_t)`. The state keeps :math:`v_t`, so :math:`x_t = y_t - (1 -
  \theta) v_t`, and each call returns :math:`y_{t+1} - y_t`, that is
  :math:`(1 - \theta) v_{t+1} - \eta \nabla f(y_t)` after an accelerated step (for a
  constant :math:`\eta`, the iteration of ``optax.sgd(eta, momentum=1 - theta,
  nesterov=True)``, up to rounding; with a schedule the velocity here accumulates
  :math:`\eta_t g_t`, optax's accumulates :math:`g_t` and scales by :math:`\eta_t` last) and
  :math:`x_{t+1} - y_t` after NCE, where :math:`v_{t+1} = 0` makes :math:`y_{t+1} = x_{t+1}`.
  After training the parameters are :math:`y_T`, one momentum step from :math:`x_T`.

  Departures from the algorithm as written, each to keep one gradient per call:

  - The small-gradient test reads :math:`\|\nabla f(y_t)\|`, the gradient the caller computed,
    instead of :math:`\|\nabla f(x_t)\|`; the two differ by at most
    :math:`\ell (1 - \theta) \|v_t\|` for an :math:`\ell`-smooth :math:`f`.
  - A perturbation is a call of its own: it returns :math:`\xi_t` (moving :math:`x_t` and
    :math:`y_t` together, :math:`v_t` unchanged) and the accelerated step follows on the
    next call, from the gradient at the perturbed point, as in
    :func:`jaxsaddle.perturb_near_saddle`.
  - With :math:`v_t = 0` the test reads :math:`f(x_t) \le f(x_t)` and NCE's direction is
    undefined, so NCE is skipped; and the test must hold by more than the rounding error of
    the losses, :math:`16\, \mathrm{eps} \cdot (|f(x_t)| + |f(y_t)|)` in the loss's dtype,
    because near convergence both sides agree to rounding and a test decided by round-off
    would throw the iterate a distance :math:`s`. For the same reason the test reads
    :math:`x_t - y_t` as the difference of the two points ``value_fn`` saw, :math:`x_t` rounded
    to the params' dtype, not as :math:`-(1 - \theta) v_t`.

  :math:`f(x_t)` and :math:`f(y_t)` both come from ``value_fn`` (two forward passes per
  accelerated step; ``value=`` is not used, so both sides of the test come from one function
  in one precision), and NCE adds two more when it moves along :math:`\pm\delta`. The
  paper's analysis takes :math:`\gamma = \theta^2/\eta` and ties :math:`s`, :math:`r` and
  :math:`T` to the smoothness :math:`\ell`, the Hessian-Lipschitz constant :math:`\rho` and
  :math:`\epsilon`. Perturbations and NCE sit in ``lax.cond``; under ``jax.vmap`` they
  become ``select`` and both branches run. NaN or Inf gradients never trigger a perturbation.
  On the steps that run the test (the perturbing ones read no loss), a NaN or infinite
  :math:`f(x_t)` or :math:`f(y_t)`, or a NaN loss at :math:`x \pm \delta`, gives NaN
  updates: the test cannot be read from them, and taking the plain accelerated step instead
  would silently switch NCE off. (``optax.apply_if_finite`` checks the gradients it is
  given, not the updates, so it does not skip such a step.)

  Example::

    import jax, jax.numpy as jnp, optax, jaxsaddle

    loss_fn = lambda p: p[0] ** 2 - p[1] ** 2 + p[1] ** 4  # strict saddle at 0
    tx = jaxsaddle.pagd(0.1, momentum=0.9, perturbation_radius=1e-2,
                        gradient_threshold=1e-3, escape_steps=20, exploitation_radius=0.05)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, value_fn=loss_fn))
    params = jnp.zeros(2)
    state = tx.init(params)
    for _ in range(100):
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
    print(params)  # near (0, +-1/sqrt 2)

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule of the update count.
    momentum: :math:`1 - \theta \in [0, 1)`.
    perturbation_radius: :math:`r \ge 0`.
    gradient_threshold: :math:`\epsilon > 0`.
    escape_steps: :math:`T \ge 1`: a perturbation needs more than ``escape_steps``
      accelerated steps since the last one.
    exploitation_radius: :math:`s > 0`, NCE's step length.
    curvature_threshold: :math:`\gamma > 0`, or None for :math:`\theta^2 / \eta` (with a
      schedule, :math:`\eta` at the current count).
    key: a typed key, a raw uint32 key or an int seed (may be traced, e.g. under ``vmap``).

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and
    ``value_fn``; without them it raises a ``ValueError`` that shows the call to make.
  """
  owner = "pagd"
  learning_rate = _checks.checked_learning_rate(owner, learning_rate)
  _checks.check_momentum(owner, momentum)
  _checks.check_nonnegative(owner, "perturbation_radius", perturbation_radius)
  _checks.check_positive(owner, "gradient_threshold", gradient_threshold)
  _checks.check_at_least_one(owner, "escape_steps", escape_steps)
  _checks.check_positive(owner, "exploitation_radius", exploitation_radius)
  if curvature_threshold is not None:
    _checks.check_positive(owner, "curvature_threshold", curvature_threshold)

  def init_fn(params):
    _checks.check_float_leaves(params, owner)
    return PAGDState(
      count=jnp.zeros([], jnp.int32),
      rng_key=_random.canonicalize_key(key),
      velocity=optax.tree.zeros_like(params),
      steps_since_perturbation=jnp.asarray(_NEVER, jnp.int32),
      num_perturbations=jnp.zeros([], jnp.int32),
      num_exploitations=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del extra_args
    _checks.require_value_fn(
      owner,
      value_fn,
      params,
      uses="evaluates the loss away from the current parameters (its convexity test and the "
      "negative curvature exploitation)",
    )
    _checks.check_updates(owner, updates, params, "an accelerated step")
    if not _checks.has_elements(params):
      return _checks.pass_empty(updates, state)
    near_saddle = _random.norm_at_most(updates, gradient_threshold) & (
      state.steps_since_perturbation > escape_steps
    )
    rng_key, noise_key = jax.random.split(state.rng_key)
    dtype = curvature._compute_dtype(params)

    def perturb(velocity):
      noise = _random.sample_isotropic(noise_key, params, perturbation_radius, "ball")
      return optax.tree.cast_like(noise, updates), velocity, jnp.zeros([], jnp.bool_)

    def accelerate(velocity):
      step_size = _checks.learning_rate_at(learning_rate, state.count)
      gradient_step = _scale(-step_size, updates)
      # x_t = y_t - m v_t;  v_{t+1} = m v_t - eta g;  y_{t+1} - y_t = m v_{t+1} - eta g.
      shrunk = _scale(momentum, velocity)
      # The barrier makes x the rounded array value_fn sees: without it XLA may keep x in
      # float32 inside the difference below (excess precision, which it allows for bfloat16).
      x = jax.lax.optimization_barrier(
        jax.tree.map(lambda y, mv: y - mv.astype(y.dtype), params, shrunk)
      )
      next_velocity = optax.tree.cast_like(optax.tree.add(shrunk, gradient_step), velocity)
      agd_update = optax.tree.cast_like(
        optax.tree.add(_scale(momentum, next_velocity), gradient_step), updates
      )

      loss_x, loss_y = value_fn(x), value_fn(params)
      eps = jnp.finfo(jnp.result_type(loss_x, loss_y)).eps
      loss_x, loss_y = loss_x.astype(dtype), loss_y.astype(dtype)
      # The x - y that f saw, not -m v: x is rounded to the params' dtype, an error of eps |x|
      # per element that near a minimum moves f(x) by more than every other term of the test
      # (a convex quadratic at loss 4e-10 in float32 exploited every 89 steps). Rounded points
      # within a factor 2 of each other subtract exactly, so this difference is exact.
      difference = jax.tree.map(lambda a, b: a.astype(dtype) - b.astype(dtype), x, params)
      slope = curvature._tree_vdot(updates, difference, dtype)
      squared_distance = curvature._tree_vdot(difference, difference, dtype)
      # In jnp: a step size of 0 (a schedule's warm-up) makes gamma infinite, NCE never fires.
      gamma = (
        (1 - momentum) ** 2 / jnp.asarray(step_size, dtype)
        if curvature_threshold is None
        else curvature_threshold
      )
      gap = loss_y + slope - 0.5 * gamma * squared_distance - loss_x
      rounding = 16 * eps * (jnp.abs(loss_x) + jnp.abs(loss_y))
      # Strictly: where x_t rounds to y_t (momentum 0 among them) the gap is exactly 0.
      too_nonconvex = (squared_distance > 0) & (gap > rounding)
      velocity_norm = jnp.sqrt(curvature._tree_vdot(velocity, velocity, dtype))

      def along_velocity(scale):
        # s / ||v|| overflows float16 once ||v|| < s / 65504: scaled in the compute dtype.
        return jax.tree.map(lambda v: (scale * v.astype(dtype)).astype(v.dtype), velocity)

      def exploit():
        def move_along():
          scale = exploitation_radius / velocity_norm
          delta = along_velocity(scale)
          plus = optax.tree.add(x, delta)
          minus = optax.tree.sub(x, delta)
          return along_velocity(_lower_side(value_fn(minus), value_fn(plus)) * scale)

        shift = jax.lax.cond(
          velocity_norm < exploitation_radius, move_along, lambda: optax.tree.zeros_like(velocity)
        )
        # x_{t+1} - y_t = (x_t + shift) - (x_t + m v_t).
        exploit_update = optax.tree.cast_like(optax.tree.sub(shift, shrunk), updates)
        return exploit_update, optax.tree.zeros_like(velocity)

      # A NaN or infinite loss makes gap NaN or rounding infinite, so the test reads False and
      # would silently switch NCE off: the accelerated step is NaN instead. A factor of 1 (or
      # NaN) fuses into the step's own computation, where a select after the cond took a pass.
      nan_unless_readable = jnp.where(jnp.isfinite(loss_x) & jnp.isfinite(loss_y), 1, jnp.nan)
      agd_update = jax.tree.map(lambda u: u * nan_unless_readable.astype(u.dtype), agd_update)
      new_updates, new_velocity = jax.lax.cond(
        too_nonconvex, exploit, lambda: (agd_update, next_velocity)
      )
      return new_updates, new_velocity, too_nonconvex

    new_updates, velocity, exploited = jax.lax.cond(
      near_saddle, perturb, accelerate, state.velocity
    )
    new_state = PAGDState(
      count=optax.safe_increment(state.count),
      rng_key=rng_key,
      velocity=velocity,
      steps_since_perturbation=jnp.where(
        near_saddle, 0, optax.safe_increment(state.steps_since_perturbation)
      ),
      num_perturbations=state.num_perturbations + near_saddle.astype(jnp.int32),
      num_exploitations=state.num_exploitations + exploited.astype(jnp.int32),
    )
    return new_updates, new_state

  return _checks.public_transform(
    optax.GradientTransformationExtraArgs(init_fn, update_fn),
    positive=[gradient_threshold, exploitation_radius, curvature_threshold],
    counts=[escape_steps],
    nonnegative=[learning_rate, perturbation_radius],
    fractions=[momentum],
  )
