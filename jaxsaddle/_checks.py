"""Validation shared by the transforms: clear errors for bad input."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

_INT32_MAX = int(np.iinfo(np.int32).max)


def concrete_float(value, owner: str = "jaxsaddle", name: str = "value") -> float | None:
  """The value as a float, or None when it is traced (e.g. under inject_hyperparams)."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{owner}: {name} must be a number, got the boolean {value!r}.")
  if isinstance(value, (str, bytes)):
    # np.asarray would read "0.1" as a number here and the update would fail on the string.
    raise TypeError(f"{owner}: {name} must be a number, got the string {value!r}.")
  if callable(value):
    raise TypeError(
      f"{owner}: {name} must be a number, got the callable {value!r}; to change it during "
      "training, wrap the optimizer in optax.inject_hyperparams and pass the schedule there."
    )
  if value is None:
    raise TypeError(f"{owner}: {name} must be a number, got None.")
  array = np.asarray(value)
  if array.dtype == np.bool_:
    raise TypeError(f"{owner}: {name} must be a number, got the boolean array {value!r}.")
  if array.dtype == np.dtype(object):
    raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__} {value!r}.")
  if np.iscomplexobj(array):
    # float() would drop the imaginary part, or fail without naming the hyperparameter.
    raise TypeError(f"{owner}: {name} must be a real number, got the complex {value!r}.")
  if array.ndim:
    raise ValueError(f"{owner}: {name} must be a scalar, got an array of shape {array.shape}.")
  return float(array)


def check_positive(owner: str, name: str, value) -> None:
  """Raises ValueError naming ``name`` unless ``value`` is > 0 (traced values pass)."""
  number = concrete_float(value, owner, name)
  if number is not None and not 0 < number < np.inf:
    hint = _narrow_cast_hint(value, number)
    raise ValueError(f"{owner}: {name} must be positive and finite, got {value}.{hint}")


def check_nonnegative(owner: str, name: str, value) -> None:
  """Raises ValueError naming ``name`` unless ``value`` is >= 0 (traced values pass)."""
  number = concrete_float(value, owner, name)
  if number is not None and not 0 <= number < np.inf:
    hint = _narrow_cast_hint(value, number)
    raise ValueError(f"{owner}: {name} must be non-negative and finite, got {value}.{hint}")


def _narrow_cast_hint(value, number: float) -> str:
  """Why a float16 or bfloat16 hyperparameter may be 0, 1 or infinite when its user passed
  neither."""
  dtype = jnp.result_type(value)
  if dtype not in (jnp.float16, jnp.bfloat16):
    return ""
  if number == 0:
    found, cause = "zero", "small ones may round to 0"
  elif number == 1:
    found, cause = "1", "momenta near 1 may round to 1"
  elif number == np.inf and dtype == jnp.float16:
    # bfloat16 overflows where float32 does, so the remedy would not help there.
    found, cause = "inf", f"ones beyond {float(jnp.finfo(dtype).max):g} overflow to inf"
  else:
    return ""
  return (
    f" A {dtype} {found}: optax.inject_hyperparams casts hyperparameters to the params' dtype, "
    f"where {cause}; pass it hyperparam_dtype=jnp.float32."
  )


def check_at_least_one(owner: str, name: str, value) -> None:
  """Raises ValueError naming ``name`` unless ``value`` is an int32-sized integer >= 1."""
  number = concrete_float(value, owner, name)
  if isinstance(value, bool) or (
    number is not None and not (1 <= number < _INT32_MAX and number == int(number))
  ):
    raise ValueError(f"{owner}: {name} must be an integer in [1, 2**31 - 1), got {value!r}.")


def check_loop_length(owner: str, name: str, value) -> None:
  """Raises unless ``value`` is a Python int >= 1: it sets a loop length, so it cannot be traced."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
      f"{owner}: {name} sets a loop length and must be a Python int, got {value!r}; with "
      f"optax.inject_hyperparams pass static_args=({name!r},)."
    )
  check_at_least_one(owner, name, value)


def check_momentum(owner: str, momentum) -> None:
  """Raises ValueError unless a concrete ``momentum`` lies in [0, 1) (traced values pass)."""
  number = concrete_float(momentum, owner, "momentum")
  if number is not None and not 0 <= number < 1:
    hint = _narrow_cast_hint(momentum, number)
    raise ValueError(f"{owner}: momentum must be in [0, 1), got {momentum}.{hint}")


def checked_learning_rate(owner: str, learning_rate):
  """The learning rate, refused unless a concrete one is finite and >= 0 (tracers pass), or a
  schedule whose values out of that range are NaN, so that the updates are NaN (and
  ``optax.apply_if_finite`` skips them) rather than a step uphill: a negative value is known
  only once the schedule runs under ``update``'s trace."""
  if not callable(learning_rate):
    check_nonnegative(owner, "learning_rate", learning_rate)
    return learning_rate

  def schedule(count):
    value = jnp.asarray(learning_rate(count))
    return jnp.where((value >= 0) & (value < jnp.inf), value, jnp.nan)

  return schedule


def learning_rate_at(learning_rate, count: jax.Array):
  """The step size at step ``count`` of a float or an optax schedule."""
  return learning_rate(count) if callable(learning_rate) else learning_rate


def check_float_leaves(
  tree, owner: str, operation: str = "noise", *, leaves: str = "parameter", remedy: str = ""
) -> None:
  """Raises TypeError naming the first leaf that is not a real floating-point array.

  ``leaves`` says what the tree holds ("parameter", "update" for gradients, or another name
  with its own ``remedy``).
  """
  for path, leaf in jax.tree.leaves_with_path(tree):
    # result_type: Python floats are leaves optax accepts too.
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      if leaves == "parameter":
        remedy = (
          "Keep integer, boolean and complex arrays out of this tree: with flax, hold them in "
          "an nnx.Variable type other than nnx.Param, which wrt=nnx.Param leaves out."
        )
      elif leaves == "update":
        truncated = jnp.issubdtype(dtype, jnp.integer)
        remedy = "Pass real floating-point gradients" + (
          ": in an integer dtype the update would be truncated toward zero." if truncated else "."
        )
      raise TypeError(
        f"{owner}: the {leaves} at {jax.tree_util.keystr(path) or '<root>'} has dtype "
        f"{dtype}; {operation} is defined only for real floating-point {leaves}s. {remedy}"
      )


def check_updates(owner: str, updates, params, operation: str) -> None:
  """Raises unless ``updates`` is shaped like ``params`` with real floating-point leaves."""
  check_tree_like(owner, updates, params, what="updates", like="params")
  check_float_leaves(updates, owner, operation, leaves="update")


def has_elements(tree) -> bool:
  """Whether any leaf of ``tree`` has an element (known at trace time: shapes are static)."""
  return any(jnp.size(leaf) for leaf in jax.tree.leaves(tree))


def pass_empty(updates, state):
  """What a curvature transform returns for params without elements: the (empty) updates and
  its state one update older, as any optax transform would; there is no Hessian to estimate."""
  return updates, state._replace(count=optax.safe_increment(state.count))


def compute_dtype(dtype) -> jnp.dtype:
  """float32, or float64 for float64 input: the precision internal sums and solves use."""
  return jnp.promote_types(dtype, jnp.float32)


def check_tree_like(owner: str, tree, reference, *, what: str, like: str) -> None:
  """Raises ValueError unless ``tree`` has the tree structure and leaf shapes of ``reference``.

  ``what`` and ``like`` name the two trees in the message. Callers combine the trees leaf by
  leaf; a mismatch would otherwise fail deep inside ``jax.linearize`` or a tree map, or, where
  shapes broadcast, not fail at all.
  """
  if jax.tree.structure(tree) != jax.tree.structure(reference):
    raise ValueError(
      f"{owner}: {what} must have the tree structure of {like}, {jax.tree.structure(reference)};"
      f" got {jax.tree.structure(tree)}."
    )
  leaves = zip(jax.tree.leaves_with_path(reference), jax.tree.leaves(tree), strict=True)
  for (path, expected), leaf in leaves:
    if jnp.shape(leaf) != jnp.shape(expected):
      raise ValueError(
        f"{owner}: the leaf of {what} at {jax.tree_util.keystr(path) or '<root>'} has shape "
        f"{jnp.shape(leaf)}, that of {like} {jnp.shape(expected)}."
      )


def require_value_fn(
  owner: str, value_fn, params, *, uses: str = "takes Hessian-vector products of the loss"
) -> None:
  """Raises ValueError, saying how to pass them, unless ``value_fn`` and ``params`` are given.

  Transforms that read the loss (``uses`` says how, for the message) take it as an extra
  argument of ``update``; optax's ``GradientTransformationExtraArgs`` forwards it through
  ``optax.chain`` and ``nnx.Optimizer.update`` forwards keyword arguments to ``update``.
  """
  if value_fn is None:
    raise ValueError(
      f"{owner} {uses} and needs it as `value_fn`, a "
      "function of the parameters returning the scalar loss: call "
      "`tx.update(grads, state, params, value_fn=loss_fn)`, or with flax "
      "`optimizer.update(model, grads, value_fn=jaxsaddle.flax.make_value_fn(model, loss, "
      "*batch))` (after `import jaxsaddle.flax`)."
    )
  if not callable(value_fn):
    raise ValueError(f"{owner}: value_fn must be callable, got {type(value_fn).__name__}.")
  if params is None:
    raise ValueError(
      f"{owner} needs the current parameters, where value_fn is read: call "
      "`tx.update(grads, state, params, value_fn=loss_fn)`."
    )
  is_masked = lambda leaf: isinstance(leaf, optax.MaskedNode)
  if any(map(is_masked, jax.tree.leaves(params, is_leaf=is_masked))):
    raise ValueError(
      f"{owner} does not combine with optax.masked, nor with optax.partition or "
      "optax.multi_transform, which mask: value_fn is a function of the whole parameter tree, "
      "and masking hands the transform only the selected leaves. Optimize the "
      "selected leaves alone instead (nnx.Optimizer's wrt, or a value_fn of that subtree that "
      "closes over the rest)."
    )
  reject_module(owner, params)
  check_scalar_loss(owner, value_fn, params)


def is_scalar_float(shaped) -> bool:
  """Whether an abstract value (from ``jax.eval_shape``) is one floating-point number."""
  return (
    isinstance(shaped, jax.ShapeDtypeStruct)
    and shaped.shape == ()
    and jnp.issubdtype(shaped.dtype, jnp.floating)
  )


def reject_module(owner: str, params) -> None:
  """Raises ValueError when ``params`` is a flax ``nnx.Module`` rather than the state of its
  parameters.

  A module is a pytree too, so it would be differentiated whole, its batch-norm statistics and
  rng counts with its parameters: a Hessian over variables no optimizer moves. flax is looked
  up only if the caller has imported it.
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(params, nnx.Module):
    raise ValueError(
      f"{owner}: params is an nnx.Module ({type(params).__name__}), which would be "
      "differentiated with its other variables (batch-norm statistics, rng counts). Pass the "
      "state of its parameters, nnx.state(model, nnx.Param), and a value_fn of that state: "
      "jaxsaddle.flax.make_value_fn(model, loss_fn, *batch)."
    )


def check_scalar_loss(owner: str, value_fn, params) -> None:
  """Raises ValueError unless ``value_fn(params)`` is a floating-point scalar.

  Traced abstractly, so a wrong return is named here rather than deep inside a product.
  """
  try:
    loss = jax.eval_shape(value_fn, params)
  except (TypeError, AttributeError, KeyError, IndexError) as error:
    if isinstance(error, (jax.errors.JAXTypeError, jax.errors.JAXIndexError)):
      raise  # JAX's tracing errors (a Python branch on a traced value) explain themselves.
    # The common slip with flax: a loss of the model, handed the nnx.State of its params.
    if type(params).__module__.startswith("flax."):
      raise ValueError(
        f"{owner}: value_fn failed on the nnx.State of params it is given ({error!r}). If it is "
        "a loss of the model: value_fn takes the params, not the model; build it with "
        "jaxsaddle.flax.make_value_fn(model, loss_fn, *batch)."
      ) from error
    # The other: a wrapper (optax.flatten, a partition) that hands a transform params unlike
    # the tree value_fn reads. The user's own error stays as it is, with the possibility noted.
    error.add_note(
      f"{owner}: value_fn failed on the params it was given ({len(jax.tree.leaves(params))} "
      "leaves). If it is called by a transform inside optax.flatten, optax.masked or a "
      "partition, those params are not the tree value_fn reads: keep the transforms that read "
      "value_fn outside such wrappers."
    )
    raise
  if not is_scalar_float(loss):
    raise ValueError(
      f"{owner}: value_fn must return the scalar floating-point loss, got {loss}. Reduce "
      "per-example losses (e.g. with jnp.mean) and drop auxiliary outputs."
    )


def as_arrays(tree):
  """Python numbers and NumPy arrays as JAX arrays; JAX arrays (sharded ones keep their
  sharding) and ShapeDtypeStructs unchanged."""
  if tree is None:
    return None
  return jax.tree.map(lambda leaf: leaf if hasattr(leaf, "sharding") else jnp.asarray(leaf), tree)


# Inputs that jax.jit takes as arrays: anything else (a callable, a string) keeps an eager call
# on the direct path.
_EAGER_ARRAYS = (jax.Array, np.ndarray, np.generic, int, float, complex)


def within_ranges(positive, nonnegative, fractions, counts=()) -> jax.Array | None:
  """Whether the traced values lie in their ranges (finite, and > 0, >= 0, in [0, 1), or
  integers >= 1); None when none is traced, since the factories have checked concrete values."""
  traced = lambda values: [v for v in values if isinstance(v, jax.core.Tracer)]  # noqa: E731
  conditions = (
    [(v > 0) & (v < jnp.inf) for v in traced(positive)]
    + [(v >= 1) & (v == jnp.floor(v)) for v in traced(counts)]
    + [(v >= 0) & (v < jnp.inf) for v in traced(nonnegative)]
    + [(v >= 0) & (v < 1) for v in traced(fractions)]
  )
  return jnp.all(jnp.stack(conditions)) if conditions else None


def public_transform(
  tx: optax.GradientTransformationExtraArgs,
  *,
  positive=(),
  nonnegative=(),
  fractions=(),
  counts=(),
) -> optax.GradientTransformationExtraArgs:
  """``tx`` as jaxsaddle returns it, with two guards every transform shares.

  - Python numbers among the params and updates are read as arrays: optax's own transforms
    accept ``{"w": 1.0}``; jaxsaddle's read leaves' dtypes and sizes.
  - The factories check concrete hyperparameters, but a traced one (``optax.inject_hyperparams``
    under ``jit``) reaches ``update`` unchecked. When one of those in ``positive``,
    ``nonnegative``, ``fractions`` (in [0, 1), momenta) or ``counts`` (integers >= 1) is out
    of its range, NaN or infinite, the updates are NaN, every leaf of them, instead of a step
    that silently stalls or explodes; ``optax.apply_if_finite`` then skips them. None entries
    (an optional hyperparameter left out) are ignored.

  Other leaves pass through unchanged, and with no traced hyperparameter nothing is added, so
  under ``jit`` this costs nothing.
  """
  positive, nonnegative, fractions, counts = (
    [v for v in values if v is not None and not callable(v)]
    for values in (positive, nonnegative, fractions, counts)
  )

  def init_fn(params):
    return tx.init(as_arrays(params))

  def guarded_update(updates, state, params=None, **extra_args):
    updates, state = tx.update(as_arrays(updates), state, as_arrays(params), **extra_args)
    valid = within_ranges(positive, nonnegative, fractions, counts)
    if valid is not None:
      updates = jax.tree.map(lambda u: jnp.where(valid, u, jnp.nan).astype(u.dtype), updates)
    return updates, state

  compiled_update = jax.jit(guarded_update)

  def update_fn(updates, state, params=None, **extra_args):
    # Called eagerly, a transform's lax.cond or scan compiles its branches at every call, since
    # their closures are new each time: 0.2-0.45 s a step on a two-parameter problem. One
    # jitted update compiles once. A call already being traced (the user's jit or vmap) runs
    # as it is, and so does one with a callable among its extra arguments (value_fn): jit
    # would bake in whatever the callable reads besides its arguments (a global batch, say),
    # which an eager caller may change between calls.
    leaves = jax.tree.leaves((updates, state, params, extra_args))
    if all(isinstance(x, _EAGER_ARRAYS) and not isinstance(x, jax.core.Tracer) for x in leaves):
      return compiled_update(updates, state, params, **extra_args)
    return guarded_update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
