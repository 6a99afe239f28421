r"""Noise-based saddle escape: perturbed gradient descent and noisy gradients.

Two building blocks:

- :func:`add_isotropic_noise` adds a fresh isotropic sample to the gradient at
  every step (Ge et al. 2015; Jin et al. 2021). Chain it *before* the learning
  rate, so the noise is scaled like the gradient.
- :func:`perturb_near_saddle` wraps a base optimizer and, when the gradient is
  small and no perturbation happened recently, replaces that step by a jump
  uniform in a ball (Jin et al. 2017). It must be the *last* element of a
  chain, because its output on a perturbing step is a displacement of the
  parameters that nothing after it may rescale.

Example::

  import jax, jax.numpy as jnp, optax, jaxsaddle

  value_fn = lambda p: 0.5 * p[0] ** 2 + 0.25 * p[1] ** 4 - 0.5 * p[1] ** 2
  tx = jaxsaddle.perturb_near_saddle(
      optax.sgd(0.1), perturbation_radius=0.1, gradient_threshold=1e-3,
      escape_steps=50, key=0)
  params = jnp.zeros(2)  # exactly at the strict saddle
  state = tx.init(params)
  for _ in range(200):
    grads = jax.grad(value_fn)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  print(params, optax.tree.get(state, "num_perturbations"))  # near (0, +-1)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsaddle import _checks
from jaxsaddle import _random

_NEVER = jnp.iinfo(jnp.int32).max


class AddIsotropicNoiseState(NamedTuple):
  """State of :func:`add_isotropic_noise`."""

  count: jax.Array  # int32, number of updates
  rng_key: jax.Array  # typed key, split at every update


def add_isotropic_noise(
  noise_scale: float | jax.Array,
  *,
  distribution: _random.Distribution = "gaussian",
  key: jax.Array | int = 0,
) -> optax.GradientTransformation:
  r"""Adds isotropic noise over the whole parameter vector to the updates.

  .. math::

    g_t \leftarrow g_t + \xi_t, \qquad \xi_t \text{ independent across steps},

  where, with :math:`d` the total number of parameters and
  :math:`r` = ``noise_scale``, :math:`\xi_t \sim \mathcal N(0, (r^2/d) I_d)`
  for ``"gaussian"`` (so :math:`\mathbb E \|\xi_t\|^2 = r^2`), uniform on the
  sphere of radius :math:`r` for ``"sphere"`` and uniform in the ball of
  radius :math:`r` for ``"ball"``. The sample is drawn over the concatenation
  of all leaves, not leaf by leaf, as the escape analyses assume. Noise comes
  from the cheap counter-hash sampler described in ``jaxsaddle._random``.

  Gradients that contain NaN or Inf stay NaN or Inf: noise never hides them.

  Args:
    noise_scale: the radius :math:`r` (non-negative).
    distribution: ``"gaussian"``, ``"sphere"`` or ``"ball"``.
    key: a typed ``jax.random.key``, a raw uint32 key or an int seed. Traced
      keys are accepted, so the factory can be called inside ``jax.vmap``.

  Returns:
    A ``GradientTransformationExtraArgs`` (extra arguments are ignored).
    Integer, boolean or complex parameters are rejected by ``init`` with a
    ``TypeError``.
  """
  return _add_isotropic_noise(
    noise_scale, distribution=distribution, key=key, owner="add_isotropic_noise"
  )


def _add_isotropic_noise(
  noise_scale, *, distribution: _random.Distribution, key, owner: str
) -> optax.GradientTransformationExtraArgs:
  """:func:`add_isotropic_noise`, its errors naming ``owner`` (an alias built on it)."""
  _checks.check_nonnegative(owner, "noise_scale", noise_scale)
  if distribution not in _random.DISTRIBUTIONS:
    raise ValueError(
      f"{owner}: distribution must be one of {_random.DISTRIBUTIONS}, got {distribution!r}."
    )

  def init_fn(params):
    _checks.check_float_leaves(params, owner)
    return AddIsotropicNoiseState(
      count=jnp.zeros([], jnp.int32), rng_key=_random.canonicalize_key(key)
    )

  def update_fn(updates, state, params=None, **extra_args):
    # Extra arguments (value, value_fn) are accepted and unused, so the transform works alone
    # under nnx.Optimizer.update(model, grads, **kwargs) as well as inside a chain.
    del params, extra_args
    _checks.check_float_leaves(updates, owner, "noise", leaves="update")
    if not _checks.has_elements(updates):
      return _checks.pass_empty(updates, state)
    rng_key, sample_key = jax.random.split(state.rng_key)
    noise = _random.sample_isotropic(sample_key, updates, noise_scale, distribution)
    updates = jax.tree.map(lambda g, n: g + n.astype(g.dtype), updates, noise)
    return updates, AddIsotropicNoiseState(optax.safe_increment(state.count), rng_key)

  return _checks.public_transform(
    optax.GradientTransformationExtraArgs(init_fn, update_fn),
    nonnegative=[noise_scale],
  )


def _scalar_loss(owner: str, value, like: jax.Array) -> jax.Array:
  if len(jax.tree.leaves(value)) != 1:
    raise ValueError(
      f"{owner}: value must be the scalar loss, got a {type(value).__name__} of "
      f"{len(jax.tree.leaves(value))} leaves; from value_and_grad(..., has_aux=True), whose "
      "value is (loss, aux), pass value=loss."
    )
  if jnp.shape(value) != ():
    raise ValueError(
      f"{owner}: value must be the scalar loss, got shape {jnp.shape(value)} "
      "(reduce per-example losses before passing them)."
    )
  return jnp.asarray(value).astype(like.dtype)


class PerturbNearSaddleState(NamedTuple):
  """State of :func:`perturb_near_saddle`; every field is an escape diagnostic."""

  count: jax.Array  # int32, number of updates (perturbing ones included)
  rng_key: jax.Array  # typed key, split only when a perturbation is drawn
  steps_since_perturbation: jax.Array  # int32, gradient steps since; int32 max if never
  num_perturbations: jax.Array  # int32
  last_perturbation_step: jax.Array  # int32, ``count`` at the last perturbation; -1 if never
  value_at_perturbation: jax.Array  # loss where the last perturbation started; NaN if unknown
  second_order_stationary: jax.Array  # bool, the last escape check saw too little decrease
  inner_state: optax.OptState


def perturb_near_saddle(
  inner: optax.GradientTransformation,
  *,
  perturbation_radius: float | jax.Array,
  gradient_threshold: float | jax.Array,
  escape_steps: int | jax.Array,
  escape_threshold: float | jax.Array | None = None,
  key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Perturbs the iterate near saddle points, as in perturbed gradient descent.

  Jin, Ge, Netrapalli, Kakade and Jordan, *How to Escape Saddle Points
  Efficiently*, ICML 2017 (arXiv:1703.00887), Algorithm 2. With :math:`s` the
  number of gradient steps since the last perturbation, :math:`g_t` the
  incoming gradient at :math:`x_t`, :math:`r` the radius,
  :math:`g_{\rm thres}` the gradient threshold and :math:`t_{\rm thres}` =
  ``escape_steps``, each call returns

  .. math::

    u_t = \begin{cases}
      \xi_t \sim \mathcal U(B_0(r)) & \text{if } \|g_t\| \le g_{\rm thres}
        \text{ and } s > t_{\rm thres}, \\
      \mathrm{inner}(g_t) & \text{otherwise.}
    \end{cases}

  The ball is over the whole concatenated parameter vector. A perturbing call
  moves the iterate to :math:`x_t + \xi_t` and nothing else; the next call's
  gradient is taken *at the perturbed point*, so the iterates are exactly the
  paper's :math:`\tilde x_t = x_t,\ x_t \leftarrow \tilde x_t + \xi_t,\
  x_{t+1} = x_t - \eta \nabla f(x_t)`, at the price of one gradient that is used
  only for the test. The inner optimizer's state does not advance on a
  perturbing call.

  **Escape check.** When ``escape_threshold`` (:math:`f_{\rm thres}`) is given,
  the loss must be passed as ``update(..., value=f(x_t))`` (a ``ValueError`` says so
  otherwise, rather than leave the flag silently False); the state keeps the
  loss at :math:`\tilde x`, and after exactly ``escape_steps`` gradient steps
  sets ``second_order_stationary`` to
  :math:`f(x_t) - f(\tilde x) > -f_{\rm thres}`: the perturbation did not lead
  to enough decrease, so :math:`\tilde x` is an approximate second-order
  stationary point with high probability. The paper stops there; here training
  goes on and the flag stays readable with ``optax.tree.get``.

  **Where it goes in a chain.** Last: ``optax.chain(clip, ...,
  perturb_near_saddle(base))``. Transforms before it preprocess the gradient
  that is tested and fed to ``inner``; anything after it would rescale the
  displacement. Under ``jax.vmap`` the ``lax.cond`` that draws the
  perturbation becomes a ``select`` that draws it at every step.

  NaN or Inf gradients never trigger a perturbation (their norm fails the
  test), so they reach ``inner`` and the updates unchanged.

  Args:
    inner: the base optimizer, e.g. ``optax.sgd(lr)`` or ``optax.adam(lr)``.
    perturbation_radius: :math:`r \ge 0`.
    gradient_threshold: :math:`g_{\rm thres} > 0`.
    escape_steps: :math:`t_{\rm thres} \ge 1`: a perturbation needs more than
      ``escape_steps`` gradient steps since the last one, and the escape check
      runs after exactly ``escape_steps`` of them.
    escape_threshold: :math:`f_{\rm thres} > 0`, or None to skip the check.
    key: a typed key, a raw uint32 key or an int seed (may be traced).

  Returns:
    A ``GradientTransformationExtraArgs``; ``value`` is the loss, required with
    ``escape_threshold`` and optional without, and all extra arguments are forwarded to
    ``inner``.
  """
  return _perturb_near_saddle(
    inner,
    perturbation_radius=perturbation_radius,
    gradient_threshold=gradient_threshold,
    escape_steps=escape_steps,
    escape_threshold=escape_threshold,
    key=key,
    owner="perturb_near_saddle",
  )


def _perturb_near_saddle(
  inner: optax.GradientTransformation,
  *,
  perturbation_radius,
  gradient_threshold,
  escape_steps,
  escape_threshold,
  key,
  owner: str,
) -> optax.GradientTransformationExtraArgs:
  """:func:`perturb_near_saddle`, its errors naming ``owner`` (an alias built on it)."""
  _checks.check_nonnegative(owner, "perturbation_radius", perturbation_radius)
  _checks.check_positive(owner, "gradient_threshold", gradient_threshold)
  _checks.check_at_least_one(owner, "escape_steps", escape_steps)
  if escape_threshold is not None:
    _checks.check_positive(owner, "escape_threshold", escape_threshold)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    _checks.check_float_leaves(params, owner)
    leaves = jax.tree.leaves(params)
    value_dtype = jnp.result_type(jnp.float32, *(leaf.dtype for leaf in leaves))
    return PerturbNearSaddleState(
      count=jnp.zeros([], jnp.int32),
      rng_key=_random.canonicalize_key(key),
      steps_since_perturbation=jnp.asarray(_NEVER, jnp.int32),
      num_perturbations=jnp.zeros([], jnp.int32),
      last_perturbation_step=jnp.full([], -1, jnp.int32),
      value_at_perturbation=jnp.full([], jnp.nan, value_dtype),
      second_order_stationary=jnp.zeros([], jnp.bool_),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    if escape_threshold is not None and value is None:
      raise ValueError(
        f"{owner}: escape_threshold is set, so the escape check needs the loss at every step: "
        "call `tx.update(grads, state, params, value=loss)` (with flax, "
        "`optimizer.update(model, grads, value=loss)`), or leave escape_threshold out."
      )
    _checks.check_float_leaves(updates, owner, "a perturbation", leaves="update")
    # A tree without elements has nothing to perturb; the inner transform still runs on it.
    near_saddle = (
      _random.norm_at_most(updates, gradient_threshold)
      & (state.steps_since_perturbation > escape_steps)
      & _checks.has_elements(updates)
    )

    # The cond swaps the displacement in for the gradient and the inner transform then runs
    # on whatever came out, so on the steps that do not perturb (almost all) the inner
    # update fuses with whatever consumes it, e.g. ``apply_updates``. On perturbing steps
    # the inner's output and state are thrown away by the two ``where``s below.
    def draw(operand):
      rng_key, gradient = operand
      rng_key, sample_key = jax.random.split(rng_key)
      displacement = _random.sample_isotropic(sample_key, gradient, perturbation_radius, "ball")
      return rng_key, optax.tree.cast_like(displacement, gradient)

    rng_key, gradient_or_displacement = jax.lax.cond(
      near_saddle, draw, lambda operand: operand, (state.rng_key, updates)
    )

    if value is not None:
      extra_args["value"] = value
    inner_updates, inner_state = inner.update(
      gradient_or_displacement, state.inner_state, params, **extra_args
    )
    inner_state = optax.tree.where(near_saddle, state.inner_state, inner_state)
    new_updates = optax.tree.where(
      near_saddle, optax.tree.cast_like(gradient_or_displacement, inner_updates), inner_updates
    )

    # A perturbation whose starting loss is unknown leaves a NaN baseline, so no later
    # check compares against the loss of an older perturbation.
    loss = jnp.nan if value is None else _scalar_loss(owner, value, state.value_at_perturbation)
    value_at_perturbation = jnp.where(near_saddle, loss, state.value_at_perturbation)
    second_order_stationary = state.second_order_stationary
    if escape_threshold is not None:
      baseline = state.value_at_perturbation
      checked = (state.steps_since_perturbation == escape_steps) & ~jnp.isnan(baseline)
      too_little_decrease = loss - baseline > -escape_threshold
      second_order_stationary = jnp.where(checked, too_little_decrease, second_order_stationary)

    new_state = PerturbNearSaddleState(
      count=optax.safe_increment(state.count),
      rng_key=rng_key,
      steps_since_perturbation=jnp.where(
        near_saddle, 0, optax.safe_increment(state.steps_since_perturbation)
      ),
      num_perturbations=state.num_perturbations + near_saddle.astype(jnp.int32),
      last_perturbation_step=jnp.where(near_saddle, state.count, state.last_perturbation_step),
      value_at_perturbation=value_at_perturbation,
      second_order_stationary=second_order_stationary,
      inner_state=inner_state,
    )
    return new_updates, new_state

  return _checks.public_transform(
    optax.GradientTransformationExtraArgs(init_fn, update_fn),
    positive=[gradient_threshold, escape_threshold],
    counts=[escape_steps],
    nonnegative=[perturbation_radius],
  )
