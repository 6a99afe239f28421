"""Checks, probes and estimates shared by the spectrum functions."""

import math
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsaddle import _checks
from jaxsaddle import _random
from jaxsaddle import curvature

PyTree = Any
ValueFn = Callable[[PyTree], jax.Array]
ProbeDistribution = Literal["rademacher", "gaussian"]
_compute_dtype = curvature._compute_dtype


def _check_params(owner: str, params: PyTree) -> None:
  """Raises unless ``params`` has array elements, all of them real floating point."""
  _checks.reject_module(owner, params)
  if not _checks.has_elements(params):
    raise ValueError(f"{owner}: params has no array elements; there is no Hessian to study.")
  _checks.check_float_leaves(params, owner, "a Hessian")


def _check_value_fn(owner: str, value_fn: ValueFn, params: PyTree) -> PyTree:
  """Raises unless ``value_fn`` maps ``params`` (real floating leaves) to a real scalar; returns
  ``params`` with Python numbers made arrays.

  Every public function calls it once, before anything is traced: the scalar-loss check is an
  abstract evaluation of ``value_fn``, paid at every eager call.
  """
  if not callable(value_fn):
    raise TypeError(f"{owner}: value_fn must be callable, got {type(value_fn).__name__}.")
  params = _checks.as_arrays(params)
  _check_params(owner, params)
  _checks.check_scalar_loss(owner, value_fn, params)
  return params


def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _linearize(value_fn: ValueFn, params: PyTree):
  """The loss, gradient, an HVP function and a finiteness flag, for a checked ``value_fn``."""
  value, gradient, hvp_fn = curvature._linearize_value_and_hvp(value_fn, params)
  return value, gradient, hvp_fn, jnp.isfinite(value) & _all_finite(gradient)


def _checked(owner: str, finite: jax.Array, result):
  """Raises when ``finite`` is concretely False; otherwise NaN-fills float outputs where it is."""
  if not isinstance(finite, jax.core.Tracer) and not bool(finite):
    raise ValueError(
      f"{owner}: the loss, its gradient or its curvature (a Hessian-vector product or "
      "quadratic form) at params is NaN or infinite; no spectrum is computed from it. (With "
      "a finite loss, the curvature may have overflowed: Hessian-vector products in the params' "
      "dtype (float16 beyond 65504), or the Hessian's norm beyond the compute dtype's range "
      "(float32: 3e38); scale the loss or use a wider dtype.)"
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


def _mean_and_standard_error(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The mean of i.i.d. samples and its standard error; infinite for a single sample."""
  count = samples.shape[0]
  if count < 2:
    return jnp.mean(samples), jnp.full((), jnp.inf, samples.dtype)
  return jnp.mean(samples), jnp.std(samples, ddof=1) / math.sqrt(count)


class Estimate(NamedTuple):
  """A Monte-Carlo estimate and its standard error (the standard deviation of the estimate)."""

  value: jax.Array
  standard_error: jax.Array
