"""Losses to study: the loss restricted to part of the params, and over a whole dataset."""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsaddle import _checks
from jaxsaddle import _sharding
from jaxsaddle.spectrum._common import PyTree
from jaxsaddle.spectrum._common import ValueFn


class Restriction(NamedTuple):
  """The output of :func:`restrict`: the loss as a function of part of the parameters."""

  value_fn: ValueFn
  params: PyTree


def _path_names(path) -> tuple[str, ...]:
  names = []
  for entry in path:
    for attribute in ("key", "idx", "name"):
      if hasattr(entry, attribute):
        names.append(str(getattr(entry, attribute)))
        break
    else:
      names.append(str(entry))
  return tuple(names)


def restrict(
  value_fn: ValueFn,
  params: PyTree,
  select: str | Sequence[Any] | Callable[[Any, jax.Array], bool],
) -> Restriction:
  r"""Restricts the loss to some leaves of the parameters, for per-layer spectra.

  The restricted loss :math:`g(y) = f(x \text{ with the selected leaves set to } y)` has
  Hessian :math:`\nabla^2 g(y) = [\nabla^2 f(x)]_{SS}`, the diagonal block of the selected
  leaves :math:`S`, so every function of this module applied to it gives that layer's
  spectrum (the per-layer eigenvalues and traces PyHessian users ask for). Products cost what
  they cost for the whole model.

  Args:
    value_fn: the loss, a function of ``params``.
    params: the point; leaves that are not selected stay fixed at their values here.
    select: which leaves; one of

      - a string of path names joined by ``/``, e.g. ``"layers/0/kernel"`` or ``"Linear_0"``,
        selecting every leaf whose path starts with those names (dict keys, sequence indices
        and attribute names, as ``jax.tree_util`` paths spell them);
      - a sequence of such names, e.g. ``("layers", 0)``;
      - a callable ``select(path, leaf) -> bool`` on ``jax.tree_util`` key paths.

  Returns:
    A :class:`Restriction` ``(value_fn, params)``: ``params`` has the structure of the input
    with ``None`` in place of the leaves not selected, and ``value_fn`` takes a pytree of
    that structure.

  Raises:
    ValueError: when ``select`` matches no leaf.
  """
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  if callable(select):
    keep = [bool(select(path, leaf)) for path, leaf in with_paths]
  else:
    prefix = tuple(select.split("/")) if isinstance(select, str) else tuple(map(str, select))
    keep = [_path_names(path)[: len(prefix)] == prefix for path, _ in with_paths]
  if not any(keep):
    available = ", ".join("/".join(_path_names(path)) for path, _ in with_paths[:20])
    raise ValueError(f"restrict: {select!r} selects no parameter; the leaves are {available}.")
  full_leaves = [leaf for _, leaf in with_paths]
  sub_params = treedef.unflatten(
    [leaf if kept else None for kept, leaf in zip(keep, full_leaves, strict=True)]
  )

  def restricted_value_fn(sub: PyTree) -> jax.Array:
    # Another tree (the full params, or a subtree of another leaf) would be spliced in silently.
    _checks.check_tree_like(
      "restrict", sub, sub_params, what="the restricted value_fn's argument", like="sub_params"
    )
    selected = iter(jax.tree.leaves(sub))
    merged = [
      next(selected) if kept else leaf for kept, leaf in zip(keep, full_leaves, strict=True)
    ]
    return value_fn(treedef.unflatten(merged))

  return Restriction(restricted_value_fn, sub_params)


def dataset_value_fn(
  loss_fn: Callable[[PyTree, PyTree], jax.Array],
  batches: PyTree,
  *,
  weights: jax.Array | None = None,
) -> ValueFn:
  r"""The mean loss over a dataset of batches, evaluated one batch at a time.

  .. math::

    f(x) = \frac{\sum_{b=1}^B w_b\, \ell(x, \text{batch}_b)}{\sum_{b=1}^B w_b},

  computed with ``jax.lax.map`` over the leading axis of ``batches`` and ``jax.checkpoint``
  on each term, so gradients and Hessian-vector products also run batch by batch: the
  activations of one batch are alive at a time, and memory does not grow with the number of
  batches beyond the data itself. With a per-batch mean loss and each batch weighted by its
  number of examples this is the full-batch loss, whose Hessian has far less sampling noise
  than one batch's (the variance PyHessian and pytorch-hessian-eigenthings users report).

  A dataset that does not split evenly: pad the last batch to the common size, pass a mask
  with the batch and have ``loss_fn`` average over the masked examples only, and give each
  batch its number of real examples as weight (10 examples in batches of 4 here):

  >>> import jax.numpy as jnp
  >>> from jaxsaddle import spectrum
  >>> inputs = jnp.linspace(-1.0, 1.0, 10)
  >>> padded, mask = jnp.pad(inputs, (0, 2)).reshape(3, 4), (jnp.arange(12) < 10).reshape(3, 4)
  >>> def loss_fn(w, batch):
  ...   x, real = batch
  ...   return jnp.sum(jnp.where(real, (w * x - 1.0) ** 2, 0.0)) / jnp.sum(real)
  >>> value_fn = spectrum.dataset_value_fn(loss_fn, (padded, mask), weights=mask.sum(axis=1))
  >>> bool(jnp.allclose(value_fn(2.0), jnp.mean((2.0 * inputs - 1.0) ** 2)))
  True

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, where ``batch`` is one slice of
      ``batches``.
    batches: a pytree (e.g. ``(inputs, labels)``) whose leaves all have the number of
      batches :math:`B \ge 1` as leading axis, e.g. inputs of shape ``(B, batch_size, ...)``.
    weights: :math:`w`, one non-negative weight per batch, shape ``(B,)``, not all zero
      (booleans select batches); a batch of weight 0 does not count even where its loss is
      NaN, as a masked mean over a batch of padding only is (0 / 0); masking the examples
      with ``jnp.where``, as above, keeps its gradient out too. None (the default) weighs
      the batches equally. Traced weights that are negative or not finite give a NaN loss.

  Returns:
    ``value_fn(params)``, a function usable with every function of this module.
  """
  owner = "dataset_value_fn"
  leading = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(batches)}
  if len(leading) != 1 or None in leading or 0 in leading:
    raise ValueError(
      f"{owner}: every leaf of batches needs the same leading axis (the number of batches, at "
      f"least 1); got leading sizes {sorted(map(str, leading))}."
    )
  (num_batches,) = leading
  for path, leaf in jax.tree.leaves_with_path(batches):
    spec = _sharding.explicit_spec(leaf) if isinstance(leaf, jax.Array) else None
    if spec is not None and spec[0] is not None:
      # lax.map runs the batches one after another: each device would hold only its own.
      raise ValueError(
        f"{owner}: the leading axis of batches{jax.tree_util.keystr(path)}, the batches that "
        f"are evaluated one after another, is split over the mesh axes {spec[0]!r}; leave it "
        "whole and split the examples inside each batch instead, e.g. "
        f"PartitionSpec(None, {spec[0]!r})."
      )
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.shape != (num_batches,):
      raise ValueError(
        f"{owner}: weights must hold one number per batch, shape ({num_batches},); got shape "
        f"{weights.shape}."
      )
    if not (jnp.issubdtype(weights.dtype, jnp.number) or weights.dtype == jnp.bool_) or (
      jnp.issubdtype(weights.dtype, jnp.complexfloating)
    ):
      raise TypeError(f"{owner}: weights must be real numbers or booleans, got {weights.dtype}.")
    if not isinstance(weights, jax.core.Tracer):
      concrete = np.asarray(weights, np.float64)
      if not (np.all(np.isfinite(concrete)) and np.all(concrete >= 0) and concrete.sum() > 0):
        raise ValueError(
          f"{owner}: weights must be finite, non-negative and not all zero, got {weights}."
        )
  checkpointed = jax.checkpoint(loss_fn)

  def value_fn(params: PyTree) -> jax.Array:
    first = jax.tree.map(lambda leaf: leaf[0], batches)
    out = jax.eval_shape(loss_fn, params, first)
    # jnp.mean would also average a vector of per-example losses into a plausible scalar.
    # And it would turn an integer loss, whose Hessian is not defined, into a float one.
    if not _checks.is_scalar_float(out):
      raise ValueError(
        f"{owner}: loss_fn(params, batch) must return the scalar floating-point loss, "
        f"got {out}. Reduce per-example losses within the batch (e.g. with jnp.mean)."
      )
    losses = jax.lax.map(lambda batch: checkpointed(params, batch), batches)
    if weights is None:
      return jnp.mean(losses)
    # Accumulated in float32 at least (weights in the tens of thousands overflow float16), and
    # a batch of weight 0, all padding, may well have a NaN loss (0 / 0): it must not count.
    dtype = jnp.promote_types(losses.dtype, jnp.float32)
    weight = weights.astype(dtype)
    terms = jnp.where(weight > 0, weight * losses.astype(dtype), 0)
    # Traced weights escape the checks above: out of range, they give a NaN loss, which every
    # function of this module reports, rather than a mean over some other set of batches.
    valid = jnp.all((weight >= 0) & jnp.isfinite(weight))
    loss = jnp.where(valid, jnp.sum(terms) / jnp.sum(weight), jnp.nan)
    return loss.astype(losses.dtype)

  return value_fn
