"""flax.nnx helpers: the ``value_fn`` that curvature-reading transforms need.

``nnx.Optimizer.update(model, grads, **kwargs)`` forwards keyword arguments to
the transform but hands it the parameters as a pure ``nnx.State``, not as the
module. A transform that evaluates the loss elsewhere (a linesearch, a
Hessian-vector product) therefore needs a function from that State to the
loss, which :func:`make_value_fn` builds by merging the State back into the
model's graph.

Example::

  import jax, jax.numpy as jnp, optax
  from flax import nnx
  import jaxsaddle.flax

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.lbfgs(), wrt=nnx.Param)
  x, y = jnp.ones((8, 2)), jnp.zeros((8, 1))
  loss_fn = lambda model, x, y: jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    # Before the gradient, which advances dropout's rng counts: the same masks in both.
    value_fn = jaxsaddle.flax.make_value_fn(model, loss_fn, x, y)
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads, value=loss, grad=grads, value_fn=value_fn)
    return loss

  train_step(model, optimizer, x, y)
"""

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jaxsaddle import _checks


def _variable_paths(state) -> list[str]:
  """The sorted paths of a State's (or nested dict's) variables, such as ``"layer/kernel"``."""
  leaves = jax.tree_util.tree_flatten_with_path(nnx.as_pure(state))[0]
  return sorted(jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves)


def _holds_rng_state(leaf: Any) -> bool:
  """Whether ``leaf`` is an nnx object (an ``nnx.Rngs``, a module with one) holding rng state;
  other nnx objects in a batch (a frozen teacher module, a Variable) are read, not advanced."""
  if not nnx.graph.is_graph_node(leaf) or isinstance(leaf, nnx.Variable):
    return False
  return bool(jax.tree.leaves(nnx.state(leaf, nnx.RngState)))


def make_value_fn(
  model: nnx.Module,
  loss_fn: Callable[..., jax.Array],
  *batch: Any,
  wrt: nnx.filterlib.Filter = nnx.Param,
) -> Callable[[nnx.State], jax.Array]:
  """Returns ``params -> loss_fn(model with params, *batch)``.

  Args:
    model: the nnx module being trained.
    loss_fn: ``loss_fn(model, *batch) -> scalar``.
    *batch: the data the loss is evaluated on (closed over); an nnx object holding rng state
      (an ``nnx.Rngs``) is refused, since its counts would advance at every call.
    wrt: the filter of the optimized variables; the same as ``nnx.Optimizer``'s.

  Returns:
    A function of the ``nnx.State`` of the ``wrt`` variables, pure or not, as
    ``nnx.Optimizer`` passes it. Variables outside ``wrt`` (batch-norm
    statistics, rng counts) are copied as they are when ``make_value_fn`` is
    called, so build it inside the training step, where it costs nothing after
    tracing, and before taking the gradient: ``nnx.value_and_grad`` advances
    dropout's rng counts, so a ``value_fn`` built after it draws other masks
    than the gradient did, and its loss is not the one differentiated. Each
    evaluation starts from that copy and discards what the model
    writes into it: the model itself is never changed, and the loss is one
    deterministic function of the params, as curvature estimates need (a
    dropout layer draws the same mask at every evaluation; batch norm in
    training mode normalises by the batch's statistics and its running
    averages are not updated).
  """
  for path, leaf in jax.tree.leaves_with_path(batch, is_leaf=nnx.graph.is_graph_node):
    if _holds_rng_state(leaf):
      # Its rng counts would advance at every evaluation: the loss would not be one function
      # of the params, and under a transform's trace the update fails.
      raise ValueError(
        f"make_value_fn: the batch holds an nnx object with rng state, a "
        f"{type(leaf).__name__} at batch{jax.tree_util.keystr(path)}; its counts would "
        "advance at every evaluation. Keep it in the model (nnx.Dropout(rate, rngs=rngs)), "
        "where make_value_fn holds its state fixed, or pass arrays drawn from it once (a key: "
        "rngs.dropout())."
      )
  graphdef, selected, rest = nnx.split(model, wrt, ...)
  # Pure arrays, not the model's live Variables: merging those would write batch-norm
  # statistics and rng counts back into the model, across trace levels under jit or grad.
  rest = nnx.as_pure(rest)
  expected = _variable_paths(selected)

  def value_fn(params: nnx.State) -> jax.Array:
    # A module has the paths of its state and would pass the comparison, then fail to merge.
    _checks.reject_module("make_value_fn", params)
    # Compared before merging: the state of other variables of the same shapes merged without
    # error and gave the loss of another model.
    given = _variable_paths(params)
    if given != expected:
      unexpected, missing = sorted(set(given) - set(expected)), sorted(set(expected) - set(given))
      raise ValueError(
        f"make_value_fn: the params given do not fit the model's variables selected by "
        f"wrt={wrt!r} (not selected: {unexpected[:3]}; missing: {missing[:3]}); pass "
        "make_value_fn the same wrt as nnx.Optimizer."
      )
    return loss_fn(nnx.merge(graphdef, params, rest), *batch)

  return value_fn
