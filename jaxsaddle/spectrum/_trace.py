"""The Hessian's trace by Hutchinson's estimator or Hutch++, with a standard error."""

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from jaxsaddle import _checks
from jaxsaddle import _random
from jaxsaddle import _sharding
from jaxsaddle import curvature
from jaxsaddle.spectrum._common import Estimate
from jaxsaddle.spectrum._common import PyTree
from jaxsaddle.spectrum._common import ValueFn
from jaxsaddle.spectrum._common import _check_value_fn
from jaxsaddle.spectrum._common import _checked
from jaxsaddle.spectrum._common import _compute_dtype
from jaxsaddle.spectrum._common import _linearize
from jaxsaddle.spectrum._common import _map_probes
from jaxsaddle.spectrum._common import _mean_and_standard_error
from jaxsaddle.spectrum._common import _probe


def _quadratic_form(hvp_fn: Callable, vector: PyTree, dtype) -> jax.Array:
  """``v . (H v)``, accumulated in ``dtype``."""
  return curvature._tree_vdot(vector, hvp_fn(vector), dtype)


def _second_derivative_form(value_fn: ValueFn, params: PyTree, dtype):
  r"""``v -> (v^T H v, finite)`` without a reverse pass, or None where that is not done.

  :math:`v^\top \nabla^2 f(x) v = \frac{d^2}{dt^2} f(x + t v)|_{t=0}`, the second directional
  derivative, by forward-over-forward differentiation: the tangent and second-order passes
  run forward beside the loss's own (which XLA hoists out of a loop over probes). On a ReLU
  MLP that is about 0.6x the work of a Hessian-vector product, which also needs the backward
  pass and its tangent. ``finite`` says whether the loss and the first directional
  derivative :math:`\nabla f(x)^\top v` are finite, as forward mode computes them.

  None, and the caller takes Hessian-vector products, when forward mode cannot differentiate
  ``value_fn`` twice (it calls a ``jax.custom_vjp`` function, or a primitive lacks a rule), and
  when the loss or a leaf is narrower than float32: the form then comes out in that dtype,
  summed over every parameter inside ``value_fn`` (float16 overflows at 65504), where the
  products' inner product accumulates in ``dtype``.
  """
  leaf_dtypes = jax.tree.map(lambda leaf: jnp.result_type(leaf), params)
  traced = jax.make_jaxpr(value_fn)(params)
  narrow = any(
    jnp.finfo(d).bits < 32 for d in [*jax.tree.leaves(leaf_dtypes), traced.out_avals[0].dtype]
  )
  if narrow or curvature._calls_custom_vjp(traced.jaxpr):
    return None

  def form(vector):
    vector = jax.tree.map(lambda leaf, d: leaf.astype(d), vector, leaf_dtypes)

    def directional(point):
      return jax.jvp(value_fn, (point,), (vector,))

    (value, slope), (_, second) = jax.jvp(directional, (params,), (vector,))
    return second.astype(dtype), jnp.isfinite(value) & jnp.isfinite(slope)

  try:
    jax.eval_shape(form, params)
  except (TypeError, NotImplementedError):
    return None
  return form


def _stacked_coefficients(left: PyTree, right: PyTree, dtype) -> jax.Array:
  """``C[i, j] = <left_i, right_j>`` for two stacks of vectors."""

  def leaf_products(a, b):
    axes = tuple(range(1, a.ndim))
    return jnp.tensordot(
      a.astype(dtype),
      b.astype(dtype),
      axes=(axes, axes),
      precision=jax.lax.Precision.HIGHEST,
      out_sharding=_sharding.replicated_if_explicit(a, b),
    )

  return sum(jax.tree.leaves(jax.tree.map(leaf_products, left, right)))


def _combine(coefficients: jax.Array, stacked: PyTree) -> PyTree:
  """``b_i = sum_j coefficients[i, j] a_j`` for stacked vectors ``a``."""
  return jax.tree.map(
    lambda leaf: jnp.tensordot(
      coefficients.astype(leaf.dtype), leaf, axes=1, precision=jax.lax.Precision.HIGHEST
    ),
    stacked,
  )


def _orthonormal_range(stacked: PyTree, dtype) -> PyTree:
  """An orthonormal basis of the span of stacked vectors, padded with zero vectors.

  Two passes of Gram-matrix orthonormalisation (as in CholeskyQR2), through an eigen-
  decomposition so that rank deficiency is harmless: directions whose squared singular value
  is below sqrt(eps) of the largest become zero vectors. Dropping them only moves their part
  of the trace to the Hutchinson term of Hutch++, which stays unbiased for any orthonormal
  basis; keeping the condition number below eps^(-1/4) makes the second pass exact.
  """
  cutoff = math.sqrt(float(jnp.finfo(dtype).eps))
  for _ in range(2):
    values, vectors = jnp.linalg.eigh(_stacked_coefficients(stacked, stacked, dtype))
    keep = values > cutoff * jnp.max(values)
    scale = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, values, 1)), 0)
    stacked = _combine((vectors * scale).T, stacked)
  return stacked


def hessian_trace(
  value_fn: ValueFn,
  params: PyTree,
  *,
  key: jax.Array | int,
  num_probes: int,
  method: Literal["hutchinson", "hutch++"] = "hutchinson",
  probe_batch_size: int | None = 1,
) -> Estimate:
  r"""Estimates :math:`\operatorname{tr} \nabla^2 f(x)` from ``num_probes`` random quadratic forms.

  **Hutchinson** (1990): with i.i.d. Rademacher :math:`z_i \in \{\pm 1\}^n`,

  .. math::

    \widehat{\operatorname{tr}} = \frac1m \sum_{i=1}^m z_i^\top H z_i, \qquad
    \operatorname{Var} z^\top H z = 2 \Big(\|H\|_F^2 - \sum_i H_{ii}^2\Big).

  **Hutch++** (Meyer, Musco, Musco and Woodruff 2021, Algorithm 1): :math:`s = \lfloor m/3
  \rfloor` Hessian-vector products sketch the range, :math:`Q = \operatorname{orth}(H S)`;
  :math:`s` quadratic forms give :math:`\operatorname{tr}(Q^\top H Q)` exactly; the remaining
  :math:`r = m - 2s` run Hutchinson on the deflated :math:`(I - QQ^\top) H (I - QQ^\top)`. It
  is unbiased, and its variance is far lower when a few eigenvalues carry most of
  :math:`\|H\|_F`, as is typical of network Hessians (a bulk near zero and outliers); for a
  flat spectrum it is somewhat higher, since only a third of the probes sample the remainder.
  Derivatives of the estimate hold :math:`Q` fixed: the estimator is unbiased for any
  orthonormal :math:`Q`, so they are unbiased estimates of the trace's derivatives (through the
  orthonormalisation they would be NaN, from ``eigh``'s derivative at repeated eigenvalues).

  **Quadratic forms.** Each :math:`z^\top H z` is the second directional derivative
  :math:`\frac{d^2}{dt^2} f(x + t z)|_{t=0}`, by forward-over-forward differentiation
  (``jax.jvp`` of ``jax.jvp``): no backward pass and no Hessian-vector product, about 0.6x
  the work of one on a ReLU MLP, and nothing stored for a reverse pass. When ``value_fn``
  cannot be differentiated twice in forward mode (it calls a ``jax.custom_vjp`` function),
  the forms are :math:`z \cdot (H z)` from Hessian-vector products instead, with the same
  probes and the same result up to round-off; so are they when a leaf or the loss is narrower
  than float32, so that they accumulate in float32. Hutch++'s sketch :math:`H S` always takes
  products. With forward-over-forward forms the non-finite check (see the module docstring) is
  on the loss and the directional derivatives :math:`\nabla f(x)^\top z` as forward mode
  computes them, which do not see the NaN gradients reverse mode can give where ``jnp.where``
  guards a singular branch (Hutch++ and the product path also check the gradient).

  **Standard error.** :math:`\mathrm{SE} = s_q / \sqrt{r}` with :math:`s_q` the sample
  standard deviation (``ddof=1``) of the :math:`r` Rademacher quadratic forms (:math:`r = m`
  for Hutchinson). For Hutch++ it is the standard error conditional on the sketch
  :math:`Q`, whose term is exact. It is infinite when :math:`r = 1`. The estimate is a mean of
  independent terms, so for moderate :math:`r` it is within :math:`2\,\mathrm{SE}` of the
  trace about 95% of the time. With few probes the standard error is itself a noisy estimate
  from :math:`r - 1` degrees of freedom, and for Hutch++ :math:`r = m - 2s` is about a third
  of the probes: with :math:`m = 6`, two forms give both the remainder's estimate and its
  error, which then understates the error now and then by a large factor (Student's t with
  one degree of freedom has heavy tails). Use :math:`m \ge 30` for Hutch++ when the error
  matters.

  Args:
    value_fn: the loss, a function of a pytree returning a real scalar.
    params: the point at which the Hessian is taken.
    key: a PRNG key or an int seed.
    num_probes: the number of probes :math:`m`, each one quadratic form or Hessian-vector
      product (at least 3 for Hutch++).
    method: ``"hutchinson"`` or ``"hutch++"``.
    probe_batch_size: how many probes run at once (``lax.map`` in batches); None vmaps all
      of them. The default, one at a time, holds one probe in memory and is the fastest on
      CPUs, where a batch is not cheaper than its probes one by one and its probes and
      intermediate results must be written to memory; batches can pay on accelerators. Probes
      are drawn inside the loop, from a counter hash (``jaxsaddle._random``), so they are the
      same whatever the batch size. For a convolutional model on the CPU pass None: XLA runs
      convolutions inside a loop body many times slower (see :mod:`jaxsaddle.curvature`).

  Returns:
    An :class:`Estimate` of the trace and its standard error.
  """
  owner = "hessian_trace"
  _checks.check_loop_length(owner, "num_probes", num_probes)
  if method not in ("hutchinson", "hutch++"):
    raise ValueError(f"{owner}: method must be 'hutchinson' or 'hutch++', got {method!r}.")
  if method == "hutch++" and num_probes < 3:
    raise ValueError(f"{owner}: hutch++ needs num_probes >= 3, got {num_probes}.")
  if probe_batch_size is not None:
    _checks.check_loop_length(owner, "probe_batch_size", probe_batch_size)
  params = _check_value_fn(owner, value_fn, params)
  dtype = _compute_dtype(params)
  form = _second_derivative_form(value_fn, params, dtype)
  finite = jnp.array(True)
  if method == "hutch++" or form is None:
    _, _, hvp_fn, finite = _linearize(value_fn, params)
  if form is None:
    form = lambda vector: (_quadratic_form(hvp_fn, vector, dtype), jnp.array(True))  # noqa: E731
  keys = jax.random.split(_random.canonicalize_key(key), num_probes)

  if method == "hutchinson":
    forms, flags = _map_probes(
      lambda k: form(_probe(k, params, "rademacher")), keys, probe_batch_size
    )
    value, standard_error = _mean_and_standard_error(forms)
  else:
    sketch_size = num_probes // 3
    sketch = jax.vmap(lambda k: _probe(k, params, "rademacher"))(keys[:sketch_size])
    # Derivatives hold the sketched basis fixed: the estimator is unbiased for any orthonormal
    # basis, so they are unbiased estimates of the trace's, and eigh's derivative in the
    # orthonormalisation is NaN on its nearly identity second Gram matrix.
    basis = jax.lax.stop_gradient(
      _orthonormal_range(_map_probes(hvp_fn, sketch, probe_batch_size), dtype)
    )
    captured, captured_flags = _map_probes(form, basis, probe_batch_size)

    def deflated_form(k):
      # (I - Q Q^T) g: a Rademacher probe with the sketched range projected out.
      probe = jax.tree.map(lambda leaf: leaf[None], _probe(k, params, "rademacher"))
      coefficients = _stacked_coefficients(probe, basis, dtype)
      projected = jax.tree.map(
        lambda g, q: g[0] - _combine(coefficients, q)[0].astype(g.dtype), probe, basis
      )
      return form(projected)

    forms, flags = _map_probes(deflated_form, keys[2 * sketch_size :], probe_batch_size)
    residual, standard_error = _mean_and_standard_error(forms)
    value = jnp.sum(captured) + residual
    flags = jnp.concatenate([captured_flags, flags])
  finite = finite & jnp.all(flags) & jnp.isfinite(value)
  return _checked(owner, finite, Estimate(value, standard_error))
