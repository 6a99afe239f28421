"""Validation shared by the transforms: clear errors for bad input."""

import jax
import jax.numpy as jnp
import numpy as np


def _concrete_float(value) -> float | None:
  """The value as a float, or None when it is traced (e.g. under inject_hyperparams)."""
  if isinstance(value, jax.core.Tracer):
    return None
  array = np.asarray(value)
  if array.ndim:
    raise ValueError(f"expected a scalar, got an array of shape {array.shape}")
  return float(array)


def check_positive(owner: str, name: str, value) -> None:
  """Raises ValueError naming ``name`` unless ``value`` is > 0 (traced values pass)."""
  number = _concrete_float(value)
  if number is not None and not number > 0:
    raise ValueError(f"{owner}: {name} must be positive, got {value}.")


def check_nonnegative(owner: str, name: str, value) -> None:
  """Raises ValueError naming ``name`` unless ``value`` is >= 0 (traced values pass)."""
  number = _concrete_float(value)
  if number is not None and not number >= 0:
    raise ValueError(f"{owner}: {name} must be non-negative, got {value}.")


def check_at_least_one(owner: str, name: str, value) -> None:
  """Raises ValueError naming ``name`` unless ``value`` is an integer >= 1."""
  number = _concrete_float(value)
  if number is not None and not (number >= 1 and number == int(number)):
    raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value}.")


def check_float_leaves(tree, owner: str) -> None:
  """Raises TypeError naming the first leaf that is not a real floating-point array."""
  for path, leaf in jax.tree.leaves_with_path(tree):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
        f"{owner}: the parameter at {jax.tree_util.keystr(path) or '<root>'} has dtype "
        f"{leaf.dtype}; noise is defined only for real floating-point parameters. Keep "
        "integer, boolean and complex arrays out of the optimized tree (e.g. "
        "nnx.Optimizer(model, tx, wrt=nnx.Param) or optax.masked)."
      )
