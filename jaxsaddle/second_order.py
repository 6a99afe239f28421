r"""Second-order saddle escape: saddle-free Newton and stochastic cubic regularisation.

Both transforms take Hessian-vector products of the loss at the current parameters, so
``update`` needs the loss as ``value_fn`` (a function of the parameters returning the scalar
loss) besides ``params``; the incoming updates are used as the gradient :math:`g`, so a
stochastic gradient, or one preprocessed earlier in an ``optax.chain``, is what the step
uses, while the curvature comes from ``value_fn`` (for instance a closure over another
minibatch). Each step linearises :math:`\nabla f` once (:func:`jaxsaddle.linearize_hvp`) and
then takes all its products at that point.

- :func:`saddle_free_newton` rescales the gradient by :math:`|H|^{-1}`, the inverse of the
  Hessian with its eigenvalues replaced by their absolute values, inside a Krylov space
  (Dauphin et al. 2014): saddles repel it, where Newton's method is attracted to them.
- :func:`cubic_regularization` minimises a cubic-regularised second-order model of the loss
  with a few gradient steps on the model (Tripuraneni et al. 2018).

Example::

  import jax, jax.numpy as jnp, optax, jaxsaddle

  value_fn = lambda p: 5 * p[0] ** 2 - p[1] ** 2 + 0.25 * p[1] ** 4
  tx = jaxsaddle.saddle_free_newton(1.0, num_lanczos_steps=2, damping=1e-3)
  params = jnp.array([0.1, 0.01])  # next to the saddle at the origin
  state = tx.init(params)
  for _ in range(20):
    grads = jax.grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    params = optax.apply_updates(params, updates)
  print(params)  # near the minimum (0, sqrt(2)), not the saddle
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

PyTree = Any


def _hessian_operator(
  value_fn: Callable[[PyTree], jax.Array], params: PyTree, like: PyTree
) -> Callable[[PyTree], PyTree]:
  """``v -> H v`` at ``params``, taking and returning vectors in the dtypes of ``like``."""
  _, _, hvp_fn = curvature._linearize_value_and_hvp(value_fn, params)

  def matvec(vector):
    image = hvp_fn(optax.tree.cast_like(vector, params))
    return optax.tree.cast_like(image, like)

  return matvec


# --- saddle-free Newton -----------------------------------------------------------------------


class SaddleFreeNewtonState(NamedTuple):
  """State of :func:`saddle_free_newton`."""

  count: jax.Array  # int32, number of updates
  # The smallest Ritz value of the last step; NaN before one or at g = 0.
  last_smallest_eigenvalue: jax.Array
  krylov_dimension: jax.Array  # int32, Lanczos vectors of the last step (< steps: breakdown)


def _absolute_inverse_first_column(result: curvature.LanczosResult, damping) -> tuple:
  r"""Returns :math:`S (|\Theta| + \lambda)^{+} S^\top e_0` and the smallest Ritz value.

  Only the valid leading block of the tridiagonal enters: the invalid block is decoupled from
  it and sorts last (see ``curvature._padded_eigh``).
  """
  num_steps = result.alphas.shape[0]
  eigenvalues, eigenvectors, valid = curvature._padded_eigh(result)
  denominators = jnp.abs(eigenvalues) + damping
  # Moore-Penrose: a direction with no curvature left after damping is dropped, not divided by
  # zero (only possible with zero damping).
  largest = jnp.max(jnp.where(valid, denominators, 0))
  cutoff = num_steps * jnp.finfo(denominators.dtype).eps * largest
  usable = denominators > cutoff
  weights = curvature._reciprocal_where(usable, denominators)
  column = eigenvectors @ (weights * eigenvectors[0])
  smallest = jnp.where(result.num_valid > 0, eigenvalues[0], jnp.nan)
  return jnp.where(valid, column, 0), smallest


def saddle_free_newton(
  learning_rate: optax.ScalarOrSchedule = 1.0,
  *,
  num_lanczos_steps: int,
  damping: float | jax.Array,
) -> optax.GradientTransformationExtraArgs:
  r"""Saddle-free Newton in the Krylov space of the gradient.

  Dauphin, Pascanu, Gulcehre, Cho, Ganguli and Bengio, *Identifying and attacking the saddle
  point problem in high-dimensional non-convex optimization*, NeurIPS 2014
  (arXiv:1406.2572). Newton's step :math:`-H^{-1} g` moves *towards* a saddle along the
  directions of negative curvature; replacing :math:`H = \sum_i \lambda_i v_i v_i^\top` by
  :math:`|H| = \sum_i |\lambda_i| v_i v_i^\top` keeps the Newton scaling but descends along
  every eigendirection, so saddles repel the iterate. As in the paper, the inverse is taken
  in a Krylov space: :math:`k` Lanczos steps on :math:`H` from the gradient give an
  orthonormal :math:`Q = [q_0, \dots, q_{m-1}]` with :math:`q_0 = g / \|g\|` and the
  tridiagonal :math:`T = Q^\top H Q = S \Theta S^\top`, and

  .. math::

    u = -\eta\, Q S \,(|\Theta| + \lambda I)^{-1} S^\top Q^\top g
      = -\eta\, \|g\|\, Q S \,(|\Theta| + \lambda I)^{-1} S^\top e_0,

  with :math:`\eta` the learning rate and :math:`\lambda` the damping. Because :math:`g`
  lies in the Krylov space, on a quadratic whose Hessian has :math:`m \le k` distinct
  eigenvalues in the gradient's support this is the exact :math:`-\eta |H|^{-1} g` (and,
  for positive definite :math:`H` and :math:`\lambda = 0`, Newton's step).

  The paper picks :math:`\lambda` among a few values by the loss it reaches; here it is a
  fixed hyperparameter (wrap the factory in ``optax.inject_hyperparams`` to change it).

  **What it cannot see.** The step lies in :math:`\mathcal K_k(H, g)`, so curvature that the
  gradient has no component along is invisible to it: at a critical point (:math:`g = 0`)
  the update is zero, and on an invariant set such as the ridge :math:`y = 0, x > 0` of the
  monkey saddle :math:`x^3 - 3xy^2` the iterate stays on it. The step is deterministic;
  for an exact saddle, wrap the optimizer in :func:`jaxsaddle.perturb_near_saddle`.

  **Breakdown and zero gradients.** When the Krylov space becomes invariant after
  :math:`m < k` steps, only those :math:`m` vectors are used (``krylov_dimension`` in the
  state says how many). A zero gradient gives a zero update; a NaN or Inf gradient gives a
  NaN update. With zero damping, a Ritz value with :math:`|\theta| \le k\,\epsilon_{\rm
  mach} \max_j(|\theta_j| + \lambda)` is dropped (the pseudo-inverse) instead of producing an
  infinite step.

  **Cost.** One linearisation of :math:`\nabla f` and ``num_lanczos_steps`` Hessian-vector
  products per step, plus Lanczos' reorthogonalisation; the eigensolve is of size
  :math:`k`. The basis is stored, so memory is :math:`k` copies of the parameters.

  Example:

    >>> import jax, jax.numpy as jnp, optax, jaxsaddle
    >>> value_fn = lambda p: 5 * p[0] ** 2 - p[1] ** 2
    >>> params = jnp.array([1e-2, 1e-3])
    >>> tx = jaxsaddle.saddle_free_newton(num_lanczos_steps=2, damping=0.0)
    >>> grads = jax.grad(value_fn)(params)
    >>> updates, state = tx.update(grads, tx.init(params), params, value_fn=value_fn)
    >>> # -|H|^{-1} g = (-x, +y): y grows, where Newton's (-x, -y) lands on the saddle.
    >>> [round(float(ratio), 4) for ratio in updates / params]
    [-1.0, 1.0]

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule; 1 is the full step.
    num_lanczos_steps: :math:`k \ge 1`, the Krylov dimension (static: it sets shapes).
    damping: :math:`\lambda \ge 0`, added to the absolute Ritz values.

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and the extra
    argument ``value_fn``. The state's ``last_smallest_eigenvalue`` (named as in
    :func:`jaxsaddle.negative_curvature_descent`'s state) is the smallest Ritz value of the
    last step, an estimate of the most negative curvature seen from the gradient.
  """
  owner = "saddle_free_newton"
  learning_rate = _checks.checked_learning_rate(owner, learning_rate)
  _checks.check_loop_length(owner, "num_lanczos_steps", num_lanczos_steps)
  _checks.check_nonnegative(owner, "damping", damping)

  def init_fn(params):
    _checks.check_float_leaves(params, owner, "a Newton step")
    return SaddleFreeNewtonState(
      count=jnp.zeros([], jnp.int32),
      last_smallest_eigenvalue=jnp.full([], jnp.nan, curvature._compute_dtype(params)),
      krylov_dimension=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del extra_args
    _checks.require_value_fn(owner, value_fn, params)
    _checks.check_updates(owner, updates, params, "a Newton step")
    if not _checks.has_elements(params):
      return _checks.pass_empty(updates, state)
    gradient = optax.tree.cast(updates, curvature._compute_dtype(updates))
    matvec = _hessian_operator(value_fn, params, gradient)
    result = curvature.lanczos(matvec, gradient, num_lanczos_steps)
    column, smallest = _absolute_inverse_first_column(result, damping)
    # Scaling by ||g|| after the masking keeps a NaN gradient NaN (Lanczos sees no start).
    step_size = _checks.learning_rate_at(learning_rate, state.count)
    coefficients = -step_size * curvature._scaled_norm(gradient, column.dtype) * column
    step = jax.tree.map(
      lambda stacked: jnp.tensordot(
        coefficients.astype(stacked.dtype), stacked, axes=1, precision=jax.lax.Precision.HIGHEST
      ),
      result.basis,
    )
    new_state = SaddleFreeNewtonState(
      count=optax.safe_increment(state.count),
      last_smallest_eigenvalue=smallest.astype(state.last_smallest_eigenvalue.dtype),
      krylov_dimension=result.num_valid,
    )
    return optax.tree.cast_like(step, updates), new_state

  return _checks.public_transform(
    optax.GradientTransformationExtraArgs(init_fn, update_fn),
    nonnegative=[learning_rate, damping],
  )


# --- stochastic cubic regularisation ----------------------------------------------------------


class CubicRegularizationState(NamedTuple):
  """State of :func:`cubic_regularization`; the counters are its oracle calls."""

  count: jax.Array  # int32, number of updates, one gradient each
  rng_key: jax.Array  # typed key, split at every update
  num_hvps: jax.Array  # int32, Hessian-vector products taken so far
  model_decrease: jax.Array  # -m(Delta) of the last step: what the model promised
  second_order_stationary: jax.Array  # bool, the last step's model decrease was too small


def cubic_regularization(
  learning_rate: optax.ScalarOrSchedule = 1.0,
  *,
  hessian_lipschitz: float | jax.Array,
  smoothness: float | jax.Array,
  epsilon: float | jax.Array,
  subsolver_steps: int,
  subsolver_learning_rate: float | jax.Array | None = None,
  perturbation_scale: float | jax.Array | None = None,
  key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Stochastic cubic regularisation with the gradient-descent cubic subsolver.

  Tripuraneni, Stern, Jin, Regier and Jordan, *Stochastic Cubic Regularization for Fast
  Nonconvex Optimization*, NeurIPS 2018 (arXiv:1711.02838), Algorithms 1 and 2. With
  :math:`g` the incoming (stochastic) gradient and :math:`B` the (stochastic) Hessian of
  ``value_fn`` at the parameters, each step approximately minimises the model

  .. math::

    m(\Delta) = g^\top \Delta + \tfrac12 \Delta^\top B \Delta
      + \tfrac{\rho}{6} \|\Delta\|^3

  and returns :math:`u = \eta\,\Delta`. When :math:`\|g\| \ge \ell^2 / \rho` it takes the
  Cauchy step, the minimiser of :math:`m` along :math:`-g` (one Hessian-vector product):

  .. math::

    \Delta = -R_c \frac{g}{\|g\|}, \qquad
    R_c = -\kappa + \sqrt{\kappa^2 + 2 \|g\| / \rho}, \qquad
    \kappa = \frac{g^\top B g}{\rho \|g\|^2}.

  Otherwise it runs ``subsolver_steps`` (:math:`T`) steps of gradient descent on the model
  from :math:`\Delta_0 = 0`, with a gradient perturbed once by
  :math:`\sigma \zeta,\ \zeta \sim \mathcal U(S^{d-1})` so that an exact saddle
  (:math:`g = 0`) still has a direction to grow along:

  .. math::

    \tilde g = g + \sigma \zeta, \qquad
    \Delta_{j+1} = \Delta_j - \eta_s \big(\tilde g + B \Delta_j
      + \tfrac{\rho}{2} \|\Delta_j\| \Delta_j\big),

  which costs :math:`T` Hessian-vector products (the last one gives :math:`B \Delta_T`, used
  only for the model value). The paper's defaults are :math:`\eta_s = 1 / (20 \ell)` and
  :math:`\sigma = c' \sqrt{\varepsilon \rho} / \ell` for an absolute constant :math:`c'`,
  taken here as 1. Its theory needs :math:`T = \tilde O(\ell / \sqrt{\rho \varepsilon})`.

  The state records the oracle calls (``count`` gradients, ``num_hvps`` Hessian-vector
  products), ``model_decrease`` :math:`= -m(\Delta)` and ``second_order_stationary``, the
  paper's stopping test :math:`m(\Delta) \ge -\frac{1}{100}\sqrt{\varepsilon^3 / \rho}`.
  Where Algorithm 1 then returns after a final, more accurate solve (Cubic-Finalsolver), an
  optax transform keeps going: training decides what to do with the flag.

  **Costs under** ``jax.vmap``. The choice between the Cauchy step and the subsolver is a
  ``lax.cond``; under ``vmap`` (for instance over keys) it becomes a ``select`` that runs
  both branches, so every step pays :math:`T + 1` products.

  Example:

    >>> import jax, jax.numpy as jnp, optax, jaxsaddle
    >>> value_fn = lambda p: 0.5 * p[0] ** 2 + 0.25 * p[1] ** 4 - 0.5 * p[1] ** 2
    >>> tx = jaxsaddle.cubic_regularization(
    ...   hessian_lipschitz=1.0, smoothness=2.0, epsilon=1e-3, subsolver_steps=30,
    ...   subsolver_learning_rate=0.25, key=0)
    >>> params = jnp.zeros(2)  # exactly at the saddle: the gradient is zero
    >>> state = tx.init(params)
    >>> for _ in range(5):
    ...   grads = jax.grad(value_fn)(params)
    ...   updates, state = tx.update(grads, state, params, value_fn=value_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> # At |y| = 1.8 the gradient norm passed l^2 / rho = 4: one Cauchy step, one product.
    >>> print(round(abs(float(params[1])), 2), int(state.num_hvps))
    1.0 121

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule scaling :math:`\Delta`; the
      paper's step is 1.
    hessian_lipschitz: :math:`\rho > 0`, the cubic penalty.
    smoothness: :math:`\ell > 0`, the gradient's Lipschitz constant: it sets the Cauchy-step
      threshold :math:`\ell^2 / \rho` and the defaults of the subsolver.
    epsilon: :math:`\varepsilon > 0`, the target gradient norm: it sets :math:`\sigma` and
      the stopping test.
    subsolver_steps: :math:`T \ge 1` (static: a loop length). On the CPU, when the loss
      convolves, the loop is unrolled (see :mod:`jaxsaddle.curvature`), and compile time
      grows with :math:`T`.
    subsolver_learning_rate: :math:`\eta_s > 0`; defaults to :math:`1 / (20 \ell)`. Gradient
      descent on the model is stable for :math:`\eta_s < 2 / \ell` near :math:`\Delta = 0`.
    perturbation_scale: :math:`\sigma \ge 0`; defaults to :math:`\sqrt{\varepsilon \rho} /
      \ell`.
    key: a typed key, a raw uint32 key or an int seed (may be traced).

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and the extra
    argument ``value_fn``.
  """
  owner = "cubic_regularization"
  learning_rate = _checks.checked_learning_rate(owner, learning_rate)
  _checks.check_positive(owner, "hessian_lipschitz", hessian_lipschitz)
  _checks.check_positive(owner, "smoothness", smoothness)
  _checks.check_positive(owner, "epsilon", epsilon)
  _checks.check_loop_length(owner, "subsolver_steps", subsolver_steps)
  if subsolver_learning_rate is None:
    subsolver_learning_rate = 1 / (20 * smoothness)
  _checks.check_positive(owner, "subsolver_learning_rate", subsolver_learning_rate)
  if perturbation_scale is not None:
    _checks.check_nonnegative(owner, "perturbation_scale", perturbation_scale)

  def init_fn(params):
    _checks.check_float_leaves(params, owner, "a cubic-regularised step")
    return CubicRegularizationState(
      count=jnp.zeros([], jnp.int32),
      rng_key=_random.canonicalize_key(key),
      num_hvps=jnp.zeros([], jnp.int32),
      model_decrease=jnp.zeros([], curvature._compute_dtype(params)),
      second_order_stationary=jnp.zeros([], jnp.bool_),
    )

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del extra_args
    _checks.require_value_fn(owner, value_fn, params)
    _checks.check_updates(owner, updates, params, "a cubic-regularised step")
    if not _checks.has_elements(params):
      return _checks.pass_empty(updates, state)
    dtype = curvature._compute_dtype(updates)
    gradient = optax.tree.cast(updates, dtype)
    matvec = _hessian_operator(value_fn, params, gradient)
    gradient_norm = curvature._scaled_norm(gradient, dtype)
    # Hyperparameters in the compute dtype, so that a float64 one (inject_hyperparams under
    # x64) cannot promote the subsolver's carry or one branch of the cond, and each cast before
    # they are combined: float16 ones (inject_hyperparams) made sqrt(epsilon rho) and epsilon^3
    # 0, so the subsolver never perturbed and the stopping test never held.
    rho, ell, eps = (jnp.asarray(h, dtype) for h in (hessian_lipschitz, smoothness, epsilon))
    subsolver_step_size = jnp.asarray(subsolver_learning_rate, dtype)
    sigma = (
      jnp.sqrt(eps) * jnp.sqrt(rho) / ell
      if perturbation_scale is None
      else jnp.asarray(perturbation_scale, dtype)
    )
    stopping_decrease = eps * jnp.sqrt(eps / rho) / 100
    rng_key, perturbation_key = jax.random.split(state.rng_key)

    def cauchy_step(_):
      # Under vmap this branch also runs where g = 0; the guard keeps it finite there.
      safe_norm = jnp.where(gradient_norm > 0, gradient_norm, 1)
      hessian_gradient = matvec(gradient)
      # g'Hg / ||g||^2 as (g / ||g||)'Hg / ||g||: ||g||^2 leaves the range first.
      direction = optax.tree.scale(1 / safe_norm, gradient)
      kappa = curvature._tree_vdot(direction, hessian_gradient, dtype) / (rho * safe_norm)
      radius = -kappa + jnp.sqrt(kappa**2 + 2 * safe_norm / rho)
      scale = -radius / safe_norm
      step = optax.tree.scale(scale, gradient)
      return step, optax.tree.scale(scale, hessian_gradient), jnp.ones([], jnp.int32)

    def subsolver(_):
      noise = _random.sample_isotropic(perturbation_key, gradient, sigma, "sphere")
      perturbed = optax.tree.add(gradient, noise)

      def body(_, carry):
        step, hessian_step = carry
        model_gradient = optax.tree.add(
          perturbed, hessian_step, optax.tree.scale(rho / 2 * _random.global_norm(step), step)
        )
        step = optax.tree.add_scale(step, -subsolver_step_size, model_gradient)
        return step, matvec(step)

      zeros = optax.tree.zeros_like(gradient)
      # Unrolled on the CPU when the loss convolves, as Lanczos is (see jaxsaddle.curvature).
      step, hessian_step = curvature.fori_loop(
        subsolver_steps,
        body,
        (zeros, zeros),
        unroll=curvature.unroll_by_default(matvec, gradient),
      )
      return step, hessian_step, jnp.asarray(subsolver_steps, jnp.int32)

    step, hessian_step, num_hvps = jax.lax.cond(
      gradient_norm >= ell**2 / rho, cauchy_step, subsolver, None
    )
    step_norm = _random.global_norm(step)
    model_change = (
      curvature._tree_vdot(gradient, step, dtype)
      + curvature._tree_vdot(step, hessian_step, dtype) / 2
      + rho / 6 * step_norm**3
    )
    new_state = CubicRegularizationState(
      count=optax.safe_increment(state.count),
      rng_key=rng_key,
      num_hvps=state.num_hvps + num_hvps,
      model_decrease=(-model_change).astype(state.model_decrease.dtype),
      second_order_stationary=model_change >= -stopping_decrease,
    )
    step = optax.tree.scale(_checks.learning_rate_at(learning_rate, state.count), step)
    return optax.tree.cast_like(step, updates), new_state

  return _checks.public_transform(
    optax.GradientTransformationExtraArgs(init_fn, update_fn),
    positive=[hessian_lipschitz, smoothness, epsilon, subsolver_learning_rate],
    nonnegative=[learning_rate, perturbation_scale],
  )
