r"""Oracle accounting: what an update costs, in gradients of the whole training set.

The experiments compare methods at equal *oracle* budgets. A gradient of a batch
of :math:`b` of the :math:`n` training examples costs :math:`b / n`; a
Hessian-vector product costs :data:`HVP_COST` gradients; and a Lanczos call of
:math:`k` steps, as :func:`jaxsaddle.negative_curvature_descent` and
:func:`jaxsaddle.saddle_free_newton` make it (one linearisation of the gradient,
then :math:`k` products on it), costs :func:`lanczos_call_cost` :math:`= (k + 1)`
products: the linearisation is a forward-over-reverse pass whose tangent half the
products reuse, so it counts as one product.

**Why** ``HVP_COST = 1``. Timed on the MLPs of ``saddles-good-enough`` (digits
at width 8 on 500 examples and at width 32 on 1,438, MNIST at width 32 on 2,000;
CPU, jitted with XLA's default optimisations, the fastest of 400 interleaved
repetitions), a product inside such a Lanczos call costs 0.40-0.88 gradients and
a whole call 6.0-9.6 gradients for 10 steps (counted 11) and 10.0-18.5 for 20
steps (counted 21). So one gradient per product overcounts every Lanczos call
measured, by 13% or more; a stand-alone forward-over-reverse product
(:func:`jaxsaddle.curvature.hvp`, 1.04-1.41 gradients) costs more, but the
methods here take products only inside Lanczos calls.

A gradient-difference search of :math:`k` steps (:func:`jaxsaddle.neon`,
:func:`jaxsaddle.neon2`) counts :math:`k + 3` gradients
(:func:`curvature_call_cost`). On the 784-512-512-10 MLP of ``benchmarks``, an
update that searches with 20 steps cost 30-31 SGD steps, where 24 gradients
are counted: its vector operations add about a quarter to each gradient there.

:func:`with_oracle_budget` holds a method to a budget inside a jitted, vmapped
training loop.

Example::

  import jax, jax.numpy as jnp, optax, jaxsaddle
  from experiments import _oracle

  value_fn = lambda p: 0.5 * p[0] ** 2 + 0.25 * p[1] ** 4 - 0.5 * p[1] ** 2
  ncd = jaxsaddle.negative_curvature_descent(
      0.1, hessian_lipschitz=6.0, epsilon=1e-3, num_lanczos_steps=2)
  tx = _oracle.with_oracle_budget(
      ncd, budget=10.0, gradient_cost=1.0, lanczos_cost=_oracle.lanczos_call_cost(2))
  params, state = jnp.zeros(2), tx.init(jnp.zeros(2))
  for _ in range(20):
    updates, state = tx.update(jax.grad(value_fn)(params), state, params, value_fn=value_fn)
    params = optax.apply_updates(params, updates)
  # 10.0 7: a Lanczos call at the saddle (1 + 3 gradients), six gradient steps, then stopped.
  print(optax.tree.get(state, "oracle_calls"), optax.tree.get(state, "num_steps_taken"))
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsaddle import _checks

HVP_COST = 1.0


def lanczos_call_cost(num_lanczos_steps: int) -> float:
  """The gradients a Lanczos call of ``num_lanczos_steps`` steps costs: (k + 1) products."""
  return HVP_COST * (num_lanczos_steps + 1)


def curvature_call_cost(transform: str, num_steps: int) -> float:
  """The gradients one curvature call of ``num_steps`` steps costs: a gradient-difference
  search of :func:`jaxsaddle.neon` or :func:`jaxsaddle.neon2` (``transform`` ``"neon"`` or
  ``"neon2"``) takes one gradient a step, the gradient at the point and the forward and
  backward differences of its bound; any other ``transform`` makes a Lanczos call
  (:func:`lanczos_call_cost`)."""
  if transform in ("neon", "neon2"):
    return num_steps + 3.0
  return lanczos_call_cost(num_steps)


# A few float32 roundings of the products of costs and counts: 8 eps.
BUDGET_ROUNDING = 8 * float(jnp.finfo(jnp.float32).eps)


class OracleBudgetState(NamedTuple):
  """State of :func:`with_oracle_budget`."""

  inner_state: optax.OptState
  oracle_calls: jax.Array  # float32, gradients spent so far
  num_steps_taken: jax.Array  # int32, updates applied
  num_gradients_paid: jax.Array  # int32, gradients paid for (the refused step's too)
  num_lanczos_calls_paid: jax.Array  # int32
  stopped: jax.Array  # bool, a step did not fit: every later update is zero


def with_oracle_budget(
  inner: optax.GradientTransformation,
  *,
  budget: float,
  gradient_cost: float,
  lanczos_cost: float,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` while its oracle calls fit in ``budget``, then stops it for good.

  Step :math:`t` costs :math:`c_t = c_g + c_L \ell_t`, with :math:`c_g` =
  ``gradient_cost`` (the incoming gradient), :math:`c_L` = ``lanczos_cost`` and
  :math:`\ell_t \in \{0, 1\}` the Lanczos calls the inner update made, read from the
  inner state's ``num_lanczos_calls`` counter (none without one). With :math:`s_t` the
  calls spent before step :math:`t` and :math:`B` = ``budget``, the inner update is
  applied when :math:`s_t + c_t \le B`. Otherwise the update is zero, the inner state is
  kept and the method stops: every later update is zero too. The refused step still
  evaluated its gradient (which showed that Lanczos would run), so it spends
  :math:`c_g` when that fits; no step spends more than what remains, so :math:`s_t \le
  B` always. The selection is a ``jnp.where``, so it works under ``jit`` and ``vmap``.
  The state counts the gradients and Lanczos calls paid for and computes :math:`s_t`
  from the counts: a float32 running sum of hundreds of thousands of mini-batch costs
  would drift by about a percent, enough to stop SGD before its last steps. The
  products of costs and counts are still rounded to float32, so a step fits when it
  reaches :math:`B` within a relative :data:`BUDGET_ROUNDING`, and ``oracle_calls``
  reports :math:`\min(s_t, B)`: with 64-example batches from 960 examples, 3,000 steps
  cost exactly 200 gradients but 200.00002 in float32, which refused the last one.

  Args:
    inner: the method; its update may take ``params`` and extra arguments, passed on.
    budget: :math:`B`, in gradients of the whole training set.
    gradient_cost: :math:`c_g`, the cost of the gradient each step receives.
    lanczos_cost: :math:`c_L`, the cost of one of the inner update's Lanczos calls
      (:func:`lanczos_call_cost`).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state has ``oracle_calls`` (spent so
    far), ``num_steps_taken`` and ``stopped``, readable with ``optax.tree.get``.
  """
  owner = "with_oracle_budget"
  for name, value in (
    ("budget", budget),
    ("gradient_cost", gradient_cost),
    ("lanczos_cost", lanczos_cost),
  ):
    _checks.check_nonnegative(owner, name, value)
  inner = optax.with_extra_args_support(inner)
  limit = budget * (1 + BUDGET_ROUNDING)

  def lanczos_calls(inner_state) -> jax.Array:
    return optax.tree.get(inner_state, "num_lanczos_calls", default=jnp.int32(0))

  def init_fn(params):
    return OracleBudgetState(
      inner_state=inner.init(params),
      oracle_calls=jnp.zeros([], jnp.float32),
      num_steps_taken=jnp.zeros([], jnp.int32),
      num_gradients_paid=jnp.zeros([], jnp.int32),
      num_lanczos_calls_paid=jnp.zeros([], jnp.int32),
      stopped=jnp.zeros([], jnp.bool_),
    )

  def update_fn(updates, state, params=None, **extra_args):
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    new_calls = lanczos_calls(inner_state) - lanczos_calls(state.inner_state)

    def spent(num_gradients, num_lanczos_calls):
      return gradient_cost * num_gradients.astype(jnp.float32) + (
        lanczos_cost * num_lanczos_calls.astype(jnp.float32)
      )

    gradients = state.num_gradients_paid + 1
    running = ~state.stopped
    fits = running & (spent(gradients, state.num_lanczos_calls_paid + new_calls) <= limit)
    gradient_fits = running & (spent(gradients, state.num_lanczos_calls_paid) <= limit)
    num_gradients_paid = jnp.where(gradient_fits, gradients, state.num_gradients_paid)
    num_lanczos_calls_paid = state.num_lanczos_calls_paid + jnp.where(fits, new_calls, 0)
    new_state = OracleBudgetState(
      inner_state=optax.tree.where(fits, inner_state, state.inner_state),
      oracle_calls=jnp.minimum(spent(num_gradients_paid, num_lanczos_calls_paid), budget),
      num_steps_taken=state.num_steps_taken + fits.astype(jnp.int32),
      num_gradients_paid=num_gradients_paid,
      num_lanczos_calls_paid=num_lanczos_calls_paid,
      stopped=~fits,
    )
    return optax.tree.where(fits, inner_updates, optax.tree.zeros_like(inner_updates)), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
