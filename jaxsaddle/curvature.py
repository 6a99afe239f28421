r"""Hessian-vector products and a pytree-native Lanczos method.

**Hessian-vector products.** :func:`hvp` is forward-over-reverse differentiation,
:math:`H v = \partial_t \nabla f(x + t v)|_{t=0}`, which costs about one gradient
evaluation and works on any pytree of parameters. :func:`linearize_hvp` linearises
:math:`\nabla f` once at a point, so many products at that point reuse the forward pass.

**Lanczos.** For a symmetric operator :math:`A` and a unit start vector :math:`q_0`,
Lanczos (1950) builds an orthonormal basis :math:`Q_m = [q_0, \dots, q_{m-1}]` of the
Krylov space :math:`\mathcal{K}_m(A, q_0)` together with the tridiagonal
:math:`T_m = Q_m^\top A Q_m`,

.. math::

  A Q_m = Q_m T_m + \beta_{m-1} q_m e_{m-1}^\top, \qquad
  T_m = \mathrm{tridiag}(\beta_{0:m-1}; \alpha_{0:m}; \beta_{0:m-1}).

The eigenpairs :math:`(\theta_i, s_i)` of the small :math:`T_m` give Ritz pairs
:math:`(\theta_i, Q_m s_i)` whose residuals are :math:`\|A Q_m s_i - \theta_i Q_m s_i\| =
\beta_{m-1} |e_{m-1}^\top s_i|` (Paige 1972). In floating point the basis loses
orthogonality as Ritz values converge (Paige 1972), which produces spurious copies of
converged eigenvalues. Partial reorthogonalisation (Simon 1984) aims to keep it
semi-orthogonal, which is enough for accurate Ritz values, by reorthogonalising only when
estimates of the loss ask for it. Full reorthogonalisation keeps :math:`Q_m` orthonormal to working
precision: after the three-term recurrence, one pass of classical Gram-Schmidt against all
previous vectors, and a second pass only when the first removed more than half of the
vector's squared norm (Kahan's "twice is enough" criterion, Parlett 1980; Parlett & Scott
1979 on selective reorthogonalisation).

**Breakdown.** When :math:`q_0` lies in an invariant subspace of dimension :math:`d < m`
(for instance when :math:`A` has only :math:`d` distinct eigenvalues reachable from
:math:`q_0`), :math:`\beta_{d-1} = 0` in exact arithmetic. In floating point it is round-off,
and normalising that round-off produces a vector that is not orthogonal to the basis and
Ritz values *outside* the spectrum (matfree 0.6.3 returns -13.7 and 19.6 for the spectrum
{-1, 0.5, 3} with 8 steps). Here, once :math:`\beta_j \le \tau \max_{i \le j}
\max(|\alpha_i|, \beta_i)` the recursion stops: later coefficients and basis vectors are
zero and :attr:`LanczosResult.num_valid` counts the valid steps, so Ritz values come from
the valid leading block only. The test can miss a breakdown, in every mode, when the final
:math:`\beta`'s round-off exceeds :math:`\tau \|A\|`, which grows with the number of
distinct eigenvalues and with :math:`\|A\|` over :math:`\max_i(|\alpha_i|, \beta_i)`: 15
of them, each repeated 10 times, ran all 40 steps in float32 and float64, and so did 10 of
them (-2 to 5, each 4 times) in float32, where another 10 stopped. ``num_valid`` then exceeds
the Krylov dimension. Reorthogonalised, the recursion goes on in the rest of the eigenspaces
and finds a repeated eigenvalue again: the extra Ritz values repeat converged ones (genuine
eigenpairs of an eigenvalue of multiplicity more than one, with small residuals) or carry
large residuals.

**Layout and precision.** Vectors are pytrees. The basis is a stacked pytree whose leaves have
shape ``(num_steps, *leaf.shape)``, so a sharded leaf stays sharded the same way and nothing is
ravelled into one vector (except on a GPU with one device: see below). Inner products are sums
over leaves; the reorthogonalisation coefficients are one contraction of the stacked basis per
leaf, and their subtraction reads only the rows filled so far (in a loop, a ``lax.cond`` per
group of rows). The basis and the tridiagonal are kept in float32, or float64 when a leaf is
float64; bfloat16 and float16 leaves are upcast (the operator still receives vectors in the
leaves' own dtypes). The loop has a fixed trip count under ``lax.fori_loop``, so everything jits
and vmaps.

**Branches on a GPU.** XLA on a GPU reads each ``lax.cond`` predicate and loop condition on
the host, a round trip of 50-90 µs on an H100. There a stopped product is discarded with a
select, and when the whole basis is at most 128 MiB (what the card reads in less than a round
trip) the loop subtracts every row (unfilled rows are zero) instead of branching on groups of
rows, leaving one ``lax.cond`` a step with full reorthogonalisation (whether a second
Gram-Schmidt pass is needed) and two with partial (whether to reorthogonalise at all); on an
H100 that took 20 steps with full reorthogonalisation from 5.3x to 3.1x the cost of 20
Hessian-vector products on a 670k-parameter MLP (a 54 MB basis). A larger basis keeps the
groups' conds: the rows they skip would then cost more to read than their round trips (by
this arithmetic; not measured). The size is one start vector's: under ``vmap`` the whole
batch's basis is read. Unrolled steps keep the groups too, whose loop compiles once. Each leaf
also costs every pass a few kernel launches of its own, so on a GPU with one device, where
there is no sharding to keep, vectors of several leaves of one dtype are ravelled into one
array for the run and the basis is unravelled at the end: on the MLP, full reorthogonalisation
went from 3.1x to 2.4x its products, partial from 2.5x to 2.0x and none from 1.5x to 1.4x.

**Convolutions on the CPU.** XLA on the CPU runs a convolution's products far slower inside a
loop body than in straight-line code (jax-ml/jax#12868): ten Hessian-vector products of a
two-layer conv net took 2.4 s in a ``fori_loop`` (``unroll=True`` included) and 0.23 s
unrolled in Python. So on the CPU, when the operator convolves (its jaxpr, traced once, holds
a ``conv_general_dilated``), the steps are unrolled in Python instead; ``lanczos(...,
unroll=...)`` forces either. Unrolled programs take longer to compile, about in proportion
to the steps.

**Random starts.** With a Gaussian start vector, :math:`m` steps find the largest
eigenvalue :math:`\lambda_1` of a positive semi-definite :math:`A` of size :math:`n` to
relative accuracy :math:`\varepsilon`, :math:`\theta_{\max} \ge (1 - \varepsilon)\lambda_1`,
except with probability at most :math:`1.648 \sqrt{n}\, e^{-\sqrt{\varepsilon}(2m - 1)}`
(Kuczyński & Woźniakowski 1992, Theorem 4.2), independently of the eigenvalue gap. Lanczos
is shift invariant, so the same holds for the smallest eigenvalue of any symmetric
:math:`A` with spectrum in :math:`[\lambda_{\min}, \ell]` applied to :math:`\ell I - A`.

References:
  C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
  differential and integral operators", J. Res. Nat. Bur. Standards 45 (1950).
  C. C. Paige, "Computational variants of the Lanczos method for the eigenproblem",
  IMA J. Appl. Math. 10 (1972).
  H. D. Simon, "The Lanczos algorithm with partial reorthogonalization", Math. Comp. 42
  (1984); "Analysis of the symmetric Lanczos algorithm with reorthogonalization methods",
  Linear Algebra Appl. 61 (1984).
  B. N. Parlett and D. S. Scott, "The Lanczos algorithm with selective orthogonalization",
  Math. Comp. 33 (1979); B. N. Parlett, "The Symmetric Eigenvalue Problem" (1980), §6.9.
  J. Kuczyński and H. Woźniakowski, "Estimating the largest eigenvalue by the power and
  Lanczos algorithms with a random start", SIAM J. Matrix Anal. Appl. 13 (1992).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxsaddle import curvature
  >>> def value_fn(params):
  ...   return params["x"][0] ** 2 - params["x"][1] ** 2 + 3 * params["y"] ** 2
  >>> params = {"x": jnp.ones(2), "y": jnp.array(0.5)}
  >>> matvec = lambda v: curvature.hvp(value_fn, params, v)
  >>> pairs = curvature.extreme_eigenpairs(
  ...   matvec, params, num_steps=5, k=1, which="both", key=jax.random.key(0))
  >>> [round(float(x), 4) for x in pairs.eigenvalues]
  [-2.0, 6.0]
"""

import functools
import math
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.extend.core
import jax.flatten_util
import jax.numpy as jnp

from jaxsaddle import _backend
from jaxsaddle import _checks
from jaxsaddle import _sharding
from jaxsaddle._random import canonicalize_key
from jaxsaddle._random import tree_standard_normal

PyTree = Any
Which = Literal["smallest", "largest", "both"]
Reorthogonalization = bool | Literal["partial"]


def _any_equation(jaxpr: jax.extend.core.Jaxpr, predicate: Callable[[Any], bool]) -> bool:
  """Whether ``predicate`` holds for an equation of ``jaxpr`` or of a jaxpr nested in one."""

  def nested(value) -> list:
    if isinstance(value, jax.extend.core.ClosedJaxpr):
      return [value.jaxpr]
    if isinstance(value, jax.extend.core.Jaxpr):
      return [value]
    if isinstance(value, (tuple, list)):
      return [jaxpr for item in value for jaxpr in nested(item)]
    return []

  return any(
    predicate(equation)
    or any(_any_equation(inner, predicate) for v in equation.params.values() for inner in nested(v))
    for equation in jaxpr.eqns
  )


def _calls_custom_vjp(jaxpr: jax.extend.core.Jaxpr) -> bool:
  """Whether ``jaxpr``, or a jaxpr nested in one of its equations, calls a custom_vjp function."""
  return _any_equation(jaxpr, lambda equation: "custom_vjp" in equation.primitive.name)


def _forward_differentiable(value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> bool:
  """Whether forward mode differentiates ``value_fn``'s gradient at ``params``: not when the
  gradient goes through a ``jax.custom_vjp`` function whose backward pass reads its input.

  Decided by an abstract trace of the product, where such a call stays (forward mode fails on
  it only once lowered; one whose backward pass does not read its input leaves none).
  """
  traced = jax.make_jaxpr(lambda p, t: jax.jvp(jax.grad(value_fn), (p,), (t,)))(params, params)
  return not _calls_custom_vjp(traced.jaxpr)


def _check_hvp_arguments(owner: str, value_fn, params: PyTree, tangent: PyTree = None) -> None:
  """Raises, naming the argument, unless ``value_fn`` maps ``params`` (real floating leaves) to a
  real scalar and ``tangent``, when given, has the structure, shapes and dtypes of ``params``.

  An abstract evaluation of ``value_fn``: JAX's own errors for these (float0 tangents, a
  non-scalar output of ``grad``) name neither the argument nor the fix.
  """
  _checks.reject_module(owner, params)
  _checks.check_float_leaves(params, owner, "a Hessian")
  _checks.check_scalar_loss(owner, value_fn, params)
  if tangent is None:
    return
  _checks.check_tree_like(owner, tangent, params, what="tangent", like="params")
  for (path, leaf), expected in zip(
    jax.tree.leaves_with_path(tangent), jax.tree.leaves(params), strict=True
  ):
    if jnp.result_type(leaf) != jnp.result_type(expected):
      raise TypeError(
        f"{owner}: the leaf of tangent at {jax.tree_util.keystr(path) or '<root>'} has dtype "
        f"{jnp.result_type(leaf)}, that of params {jnp.result_type(expected)}; cast the "
        "tangent to the params' dtypes."
      )


def hvp(value_fn: Callable[[PyTree], jax.Array], params: PyTree, tangent: PyTree) -> PyTree:
  """Returns the Hessian of ``value_fn`` at ``params`` applied to ``tangent``.

  Forward-over-reverse, ``jax.jvp(jax.grad(value_fn), (params,), (tangent,))[1]``: about the
  cost of one gradient. Where forward mode cannot differentiate the gradient (``value_fn``
  calls a ``jax.custom_vjp`` function whose backward pass reads its input), it is
  reverse-over-reverse instead, ``jax.vjp(jax.grad(value_fn), params)`` applied to ``tangent``
  (the Hessian is symmetric), which differentiates the custom rule's backward pass. ``tangent``
  must have the structure and dtypes of ``params``.

  Args:
    value_fn: a scalar function of a pytree.
    params: the point at which the Hessian is taken.
    tangent: the vector, a pytree like ``params``.

  Returns:
    ``H(params) @ tangent`` as a pytree like ``params``.

  Raises:
    TypeError: a leaf of ``params`` is not real floating point, or one of ``tangent`` has
      another dtype than the matching leaf of ``params``.
    ValueError: ``value_fn`` does not return a real scalar, ``params`` is an ``nnx.Module``,
      or ``tangent`` is not shaped like ``params``.
  """
  _check_hvp_arguments("hvp", value_fn, params, tangent)
  if _forward_differentiable(value_fn, params):
    return jax.jvp(jax.grad(value_fn), (params,), (tangent,))[1]
  return jax.vjp(jax.grad(value_fn), params)[1](tangent)[0]


def _linearize_value_and_hvp(
  value_fn: Callable[[PyTree], jax.Array], params: PyTree
) -> tuple[jax.Array, PyTree, Callable[[PyTree], PyTree]]:
  """``(value, grad, hvp_fn)`` at ``params``, from one forward and one backward pass.

  ``jax.linearize(jax.value_and_grad(value_fn), params)``, so that each product costs only the
  linearised (tangent) computation; where forward mode cannot differentiate the gradient (see
  :func:`hvp`), ``jax.vjp`` of the same function, each product then a reverse pass. The
  returned function keeps the residuals of those passes alive in memory.
  """
  value_and_grad = jax.value_and_grad(value_fn)
  if _forward_differentiable(value_fn, params):
    (value, gradient), linear = jax.linearize(value_and_grad, params)
    return value, gradient, lambda tangent: linear(tangent)[1]
  (value, gradient), vjp_fn = jax.vjp(value_and_grad, params)
  # The cotangent (0, v) gives 0 * grad + H v.
  return value, gradient, lambda tangent: vjp_fn((jnp.zeros_like(value), tangent))[0]


def linearize_hvp(
  value_fn: Callable[[PyTree], jax.Array], params: PyTree
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
  """Returns the gradient at ``params`` and a function computing Hessian-vector products there.

  ``jax.linearize(jax.grad(value_fn), params)`` runs the forward pass once; each product then
  costs only the linearised (tangent) computation, which pays off when many products are taken
  at the same point, as in :func:`lanczos`. The returned function keeps the residuals of the
  forward pass alive in memory. Where forward mode cannot differentiate the gradient (see
  :func:`hvp`), products are reverse passes through ``jax.vjp(jax.grad(value_fn), params)``.

  Args:
    value_fn: a scalar function of a pytree.
    params: the point at which the Hessian is taken.

  Returns:
    ``(grad, hvp_fn)`` with ``hvp_fn(tangent) == hvp(value_fn, params, tangent)``.

  Raises:
    TypeError, ValueError: as :func:`hvp`, for ``value_fn`` and ``params``.
  """
  _check_hvp_arguments("linearize_hvp", value_fn, params)
  _, gradient, hvp_fn = _linearize_value_and_hvp(value_fn, params)
  return gradient, hvp_fn


class LanczosResult(NamedTuple):
  """The output of :func:`lanczos`.

  Attributes:
    alphas: diagonal of the tridiagonal, shape ``(num_steps,)``; zero past ``num_valid``.
    betas: ``betas[j]`` is the norm of the residual after step ``j``, so ``betas[:m-1]`` with
      ``m = num_valid`` is the off-diagonal of the valid tridiagonal and ``betas[m-1]`` the
      norm of the final residual (at most ``breakdown_tol`` times ``||A||`` when the recursion
      broke down); zero past ``num_valid``.
    basis: the Lanczos vectors as a stacked pytree, each leaf of shape
      ``(num_steps, *leaf.shape)``; rows past ``num_valid`` are zero. ``None`` when
      :func:`lanczos` ran with ``return_basis=False``.
    num_valid: the number of valid steps, an int32 scalar, ``num_steps`` unless the Krylov
      space was found invariant (breakdown; see the module docstring for when that is
      missed) or a ``converged`` test stopped the recursion.
  """

  alphas: jax.Array
  betas: jax.Array
  basis: PyTree
  num_valid: jax.Array


class RitzPairs(NamedTuple):
  """Ritz values, vectors and residual norms.

  Attributes:
    eigenvalues: Ritz values; NaN where there is none (see the producing function).
    eigenvectors: a pytree whose leaves have a leading axis indexing the Ritz vectors; zero
      where there is no Ritz value.
    residual_norms: ``||A v - theta v||`` per pair; NaN where there is no Ritz value.
    num_steps: the Lanczos steps that produced them (int32), as
      :attr:`LanczosResult.num_valid`: fewer than asked after a breakdown or an early stop at
      ``tol``; the matrix-vector products taken, those for exact residuals aside.
  """

  eigenvalues: jax.Array
  eigenvectors: PyTree
  residual_norms: jax.Array
  num_steps: jax.Array


def _compute_dtype(tree: PyTree) -> jnp.dtype:
  """float64 when any leaf is float64, else float32 (bfloat16 and float16 are upcast)."""
  return jnp.result_type(jnp.float32, *(jnp.result_type(leaf) for leaf in jax.tree.leaves(tree)))


def _cast(tree: PyTree, dtype) -> PyTree:
  return jax.tree.map(lambda leaf: leaf.astype(dtype), tree)


def _tree_vdot(left: PyTree, right: PyTree, dtype) -> jax.Array:
  """Sum over leaves of the full contraction of two real pytrees, accumulated in ``dtype``."""
  # A fused multiply-reduce rather than vdot, which ravels and so breaks on leaves sharded with
  # Explicit mesh axes; the reduction is memory-bound either way.
  products = jax.tree.map(lambda a, b: jnp.sum(a.astype(dtype) * b.astype(dtype)), left, right)
  return sum(jax.tree.leaves(products), jnp.zeros((), dtype))


def _exponent(magnitude: jax.Array) -> jax.Array:
  r"""The power of two :math:`e` of ``magnitude`` :math:`= m 2^e`, :math:`1/2 \le m < 1`, within
  the range where :math:`2^{\pm e}` is a normal number; 0 for 0, infinity or NaN."""
  _, exponent = jnp.frexp(jax.lax.stop_gradient(jnp.where(jnp.isfinite(magnitude), magnitude, 0)))
  limit = jnp.finfo(magnitude.dtype).maxexp - 2
  return jnp.clip(exponent, -limit, limit)


def _power_of_two(exponent: jax.Array, dtype) -> jax.Array:
  r""":math:`2^{\text{exponent}}` in the float32 or float64 ``dtype``, built from its bits, so
  exactly, for the exponents where it is a normal number."""
  finfo = jnp.finfo(dtype)
  bits = jnp.int64 if finfo.bits == 64 else jnp.int32
  biased = (exponent.astype(bits) + (finfo.maxexp - 1)) << finfo.nmant
  return jax.lax.bitcast_convert_type(biased, dtype)


def _scaled(tree: PyTree, exponent: jax.Array) -> PyTree:
  r"""``tree`` times :math:`2^{\text{exponent}}`: exact, one multiplication per entry."""
  return jax.tree.map(lambda leaf: leaf * _power_of_two(exponent, leaf.dtype), tree)


def _largest_magnitude(tree: PyTree) -> jax.Array:
  return functools.reduce(
    jnp.maximum, [jnp.max(jnp.abs(leaf), initial=0) for leaf in jax.tree.leaves(tree)]
  )


def _scaled_norm(tree: PyTree, dtype) -> jax.Array:
  """The Euclidean norm of ``tree`` in ``dtype``, its squares taken after scaling by a power of
  two near its largest entry, so that neither under- nor overflows where the norm does not.

  Not by the entry's reciprocal: a subnormal entry (kept on a GPU, flushed on the CPU) has an
  infinite one, which gave an H200 NaN and infinite residuals at ``||A|| = 1e-34``.
  """
  tree = _cast(tree, dtype)
  exponent = _exponent(_largest_magnitude(tree))
  return _scaled(jnp.sqrt(_tree_vdot(*(_scaled(tree, -exponent),) * 2, dtype)), exponent)


def _reciprocal_where(mask: jax.Array, x: jax.Array) -> jax.Array:
  """``1 / x`` where ``mask`` holds and 0 elsewhere, with no division by the masked-out ``x``
  (so neither its value nor its gradient is ever inf or NaN)."""
  return jnp.where(mask, 1 / jnp.where(mask, x, 1), 0)


def _tree_axpy(scale: jax.Array, x: PyTree, y: PyTree) -> PyTree:
  return jax.tree.map(lambda a, b: b + scale.astype(b.dtype) * a, x, y)


@jax.custom_jvp
def _normalized(vector: PyTree, norm: jax.Array, inverse: jax.Array) -> PyTree:
  """``vector * inverse``, where ``inverse`` is ``1 / norm`` (or 0, to stop the recursion).

  One multiplication per entry by a scalar: scaling the entries first, to keep the
  derivative's terms in range, made a Lanczos step without reorthogonalisation 2.7 times
  slower on the CPU. The derivative keeps them in range instead (below).
  """
  return jax.tree.map(lambda leaf: leaf * inverse.astype(leaf.dtype), vector)


@_normalized.defjvp
def _normalized_jvp(primals, tangents):
  vector, norm, inverse = primals
  vector_dot, norm_dot, _ = tangents
  normalized = _normalized(vector, norm, inverse)
  # d(w / beta) = (dw - q dbeta) / beta with q = w / beta, formed without beta^2 and without
  # products of two of w's entries: both leave float32's range for operators far from norm 1
  # (gradients of Ritz values were 0.78 off at 1e-21 and NaN at 1e20).
  normalized_dot = jax.tree.map(
    lambda q, dw: (dw - q * norm_dot.astype(q.dtype)) * inverse.astype(q.dtype),
    normalized,
    vector_dot,
  )
  return normalized, normalized_dot


def _coefficients(basis: PyTree, vector: PyTree, dtype) -> jax.Array:
  """``Q^T vector``, one matrix-vector product with each stacked basis leaf."""

  def per_leaf(stacked, leaf):
    return jnp.tensordot(
      stacked,
      leaf,
      axes=leaf.ndim,
      precision=jax.lax.Precision.HIGHEST,
      out_sharding=_sharding.replicated_if_explicit(leaf),
    )

  per_leaf_coefficients = jax.tree.map(per_leaf, basis, vector)
  return sum(
    jax.tree.leaves(per_leaf_coefficients), jnp.zeros(jax.tree.leaves(basis)[0].shape[:1], dtype)
  )


def _subtract_rows(
  basis: PyTree, coefficients: jax.Array, vector: PyTree, rows: list[jax.Array]
) -> PyTree:
  """``vector - sum_{i in rows} coefficients[i] basis[i]``, reading only those rows.

  ``coefficients`` may be longer than the basis: rows past its end are read clamped to the last
  row and must have zero coefficients.
  """
  last_row = jax.tree.leaves(basis)[0].shape[0] - 1

  # One elementwise pass that reads the rows where they are: XLA fuses a dynamic row index into
  # the loop, whereas the operand of a matrix product would be copied out first.
  def per_leaf(stacked, leaf):
    for i in rows:
      row = jax.lax.dynamic_index_in_dim(stacked, jnp.minimum(i, last_row), keepdims=False)
      leaf = leaf - coefficients[i].astype(leaf.dtype) * row
    return leaf

  return jax.tree.map(per_leaf, basis, vector)


def _contains_convolution(jaxpr: jax.extend.core.Jaxpr) -> bool:
  """Whether ``jaxpr`` or any jaxpr nested in its equations' parameters convolves."""
  return _any_equation(jaxpr, lambda equation: equation.primitive.name == "conv_general_dilated")


def unroll_by_default(fn: Callable, *example_args) -> bool:
  """Whether loops over ``fn`` run unrolled: on the CPU, when ``fn`` convolves.

  ``fn`` is traced once, abstractly, on ``example_args``; see the module docstring.
  """
  if not _backend.loops_slow_down_convolutions():
    return False
  return _contains_convolution(jax.make_jaxpr(fn)(*example_args).jaxpr)


# About what an H100 reads (3.35 TB/s) in 40 µs, below the 50-90 µs one host round trip for a
# branch was measured to cost there.
_BYTES_READ_IN_A_ROUND_TRIP = 128 * 2**20


def reading_beats_branching(num_bytes: int) -> bool:
  """Whether reading ``num_bytes`` more costs less than a ``lax.cond`` that would skip them.

  On a GPU, up to 128 MiB: the device reads that in less time than the cond's host round trip.
  On other backends a cond costs next to nothing.
  """
  return _backend.branches_wait_on_host() and num_bytes <= _BYTES_READ_IN_A_ROUND_TRIP


def fori_loop(num_steps: int, body: Callable[[Any, Any], Any], carry, *, unroll: bool):
  """``lax.fori_loop(0, num_steps, body, carry)``, or the same steps unrolled in Python."""
  if not unroll:
    return jax.lax.fori_loop(0, num_steps, body, carry)
  for step in range(num_steps):
    carry = body(step, carry)
  return carry


def _stop(decision) -> jax.Array:
  """The boolean scalar a ``converged`` test returned, or a ValueError naming the test."""
  decision = jnp.asarray(decision)
  if decision.shape != () or decision.dtype != jnp.bool_:
    raise ValueError(
      "lanczos: converged(alphas, betas, num_valid) must return a boolean scalar, got "
      f"{decision.dtype}{list(decision.shape)}; reduce with jnp.all or jnp.any."
    )
  return decision


def _reorthogonalization_mode(reorthogonalize: Reorthogonalization, owner: str = "lanczos") -> str:
  """``"full"``, ``"partial"`` or ``"none"`` for the ``reorthogonalize`` argument of lanczos."""
  if isinstance(reorthogonalize, str):
    if reorthogonalize != "partial":
      raise ValueError(
        f"{owner}: reorthogonalize must be True, False or 'partial', got {reorthogonalize!r}."
      )
    return "partial"
  return "full" if reorthogonalize else "none"


def _unit_row(index, size: int, dtype) -> jax.Array:
  """The ``index``-th unit vector of length ``size`` (zero when ``index >= size``)."""
  return (jnp.arange(size) == index).astype(dtype)


_ROUNDING_FACTOR = 10.0  # Simon's rounding term in units of eps * ||A||: see below.


def _next_orthogonality(omega, omega_prev, alphas, betas, beta, beta_prev, j, scale, eps):
  r"""Simon's recurrence for :math:`\omega_{j+1,k} \approx q_{j+1}^\top q_k`, :math:`k \le j`.

  From the three-term recurrence at steps :math:`j` and :math:`k` (Simon 1984),

  .. math::

    \beta_j \omega_{j+1,k} = \beta_k \omega_{j,k+1} + (\alpha_k - \alpha_j) \omega_{j,k}
      + \beta_{k-1} \omega_{j,k-1} - \beta_{j-1} \omega_{j-1,k} \pm \vartheta,

  with the rounding of step :math:`j` modelled as :math:`\vartheta = 10 \epsilon \|A\|`
  (taken with the sign that makes the estimate grow), and :math:`\omega_{j+1,j} = \vartheta /
  \beta_j`, what the local orthogonalisation against :math:`q_j` leaves. Entries for
  :math:`k > j` are zero. The factor 10 is empirical: with :math:`\vartheta = \epsilon
  \|A\|` float32 runs on a spectrum with a bulk near zero and outliers up to 100 (the shape
  of a network's Hessian) lost orthogonality entirely in 5 of 20 start vectors and rotations
  and returned Ritz values 40 to 100 times too large; with 10 every one stayed within 3e-5 of
  orthogonal. (SLEPc takes :math:`\sqrt{n} \epsilon / 2` and a threshold of
  :math:`\sqrt{\epsilon / m}`, which on a 670k-parameter model reorthogonalises every step.)
  """
  size = omega.shape[0]
  index = jnp.arange(size)
  shift_down = lambda x: jnp.concatenate([jnp.zeros(1, x.dtype), x[:-1]])  # noqa: E731
  shift_up = lambda x: jnp.concatenate([x[1:], jnp.zeros(1, x.dtype)])  # noqa: E731
  propagated = (
    betas * shift_up(omega)
    + (alphas - alphas[j]) * omega
    + shift_down(betas) * shift_down(omega)
    - beta_prev * omega_prev
  )
  rounding = _ROUNDING_FACTOR * eps * scale
  inv_beta = _reciprocal_where(beta > 0, beta)
  estimate = (propagated + jnp.where(propagated >= 0, rounding, -rounding)) * inv_beta
  return jnp.where(index < j, estimate, jnp.where(index == j, rounding * inv_beta, 0))


def _checked_image(image: PyTree, vector: PyTree) -> PyTree:
  """``matvec``'s output ``image`` of ``vector``, or a ValueError saying how it is malformed."""
  _checks.check_tree_like("lanczos", image, vector, what="matvec's output", like="its input vector")
  _checks.check_float_leaves(
    image,
    "lanczos",
    "Lanczos",
    leaves="matvec output",
    remedy="Return the product in a real floating dtype, as its input vector has.",
  )
  return image


def _ravels_basis(init_vector: PyTree) -> bool:
  """Whether :func:`lanczos` runs on ``init_vector`` ravelled into one vector: on a GPU, with
  one device, when its several leaves share a dtype.

  On a GPU each leaf costs every step's passes a few kernel launches of their own; one leaf
  has no sharding to lose where there is only one device, and a shared dtype keeps the
  operator's inputs what they would be.
  """
  leaves = jax.tree.leaves(init_vector)
  return (
    _backend.branches_wait_on_host()
    and jax.device_count() == 1
    and len(leaves) > 1
    and len({leaf.dtype for leaf in leaves}) == 1
  )


def _ravelled(run: Callable, matvec: Callable[[PyTree], PyTree], init_vector: PyTree):
  """``run(flat_matvec, flat_start)`` on ``init_vector`` ravelled, its basis unravelled."""
  flat_start, unravel = jax.flatten_util.ravel_pytree(init_vector)

  def flat_matvec(flat_vector):
    vector = unravel(flat_vector)
    return jax.flatten_util.ravel_pytree(_checked_image(matvec(vector), vector))[0]

  result = run(flat_matvec, flat_start)
  basis = None if result.basis is None else jax.vmap(unravel)(result.basis)
  return result._replace(basis=basis)


def lanczos(
  matvec: Callable[[PyTree], PyTree],
  init_vector: PyTree,
  num_steps: int,
  *,
  reorthogonalize: Reorthogonalization = True,
  return_basis: bool = True,
  breakdown_tol: float | None = None,
  converged: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
  unroll: bool | None = None,
) -> LanczosResult:
  r"""Runs ``num_steps`` Lanczos steps on a symmetric operator from ``init_vector``.

  Step :math:`j` applies the three-term recurrence, which touches only :math:`q_j` and
  :math:`q_{j-1}`,

  .. math::

    \alpha_j = q_j^\top A q_j, \qquad w = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1},

  then, with ``reorthogonalize``, one pass of classical Gram-Schmidt against the basis,
  :math:`h = Q^\top w` and :math:`w \leftarrow w - Q h`, and sets :math:`\beta_j = \|w\|` and
  :math:`q_{j+1} = w / \beta_j`. After the recurrence :math:`w` is orthogonal to the basis up to
  round-off, so the pass removes little and one pass leaves it orthogonal to working precision.
  A second pass runs, under ``lax.cond``, only when the first removed more than half of the
  squared norm, :math:`\|h\|^2 > \|w - Q h\|^2` (Kahan's criterion, "twice is enough"; Parlett
  1980, §6.9).

  With ``reorthogonalize="partial"`` (Simon 1984) the pass runs only when it is needed. Simon's
  recurrence, which costs a few operations on vectors of length ``num_steps``, estimates the
  inner products :math:`\omega_{j+1,k} \approx q_{j+1}^\top q_k` from the tridiagonal alone;
  when the largest exceeds :math:`\sqrt{\epsilon}` the new vector is reorthogonalised, and so
  is the one after it (the recurrence carries :math:`q_j`'s loss of orthogonality into it).
  The aim is a semi-orthogonal basis, :math:`|q_j^\top q_k| \lesssim \sqrt{\epsilon}` (3e-4
  in float32, 1e-8 in float64) rather than one orthonormal to working precision, which is
  enough for the tridiagonal to be the projection of :math:`A` onto the Krylov space up to
  :math:`\epsilon \|A\|`, so that its Ritz values are as accurate as with full
  reorthogonalisation and have no ghosts (Simon, Linear Algebra Appl. 1984). The estimates are
  a model, not a bound: their rounding term is set ten times above Simon's, which kept every
  float32 test spectrum within 3e-5 of orthogonal, and when :math:`\beta_j` is so small
  against :math:`\|A\|` that one step's rounding alone crosses the threshold, every step is
  reorthogonalised. On the Hessian of a 670k-parameter MLP, 20 steps reorthogonalised 8 times
  instead of 20. Under ``vmap`` the cond becomes a select and every step pays for a pass: map
  over start vectors with ``lax.map`` to keep the savings.

  Cost of a step: one ``matvec``, a few passes over single vectors and, with
  ``reorthogonalize``, one product of the stacked basis with a vector (all ``num_steps`` rows,
  for :math:`h`) and a subtraction that reads only the rows filled so far (on a GPU, with a
  basis of at most 128 MiB, every row: see the module docstring). The basis is the
  returned array, written in place, so memory is one basis. With neither ``reorthogonalize`` nor
  ``return_basis`` no basis is stored at all: the recurrence keeps the last two Lanczos vectors
  and one step's work vectors, so memory and traffic per step do not grow with ``num_steps``
  (the mode for eigenvalue estimates and spectral densities). Under ``vmap`` the second pass's
  ``lax.cond`` becomes a ``select`` that always runs it. The loop runs a fixed number of
  times: after a breakdown the remaining steps apply ``matvec`` to zero vectors, discard the
  result and record nothing, so shapes stay static and the function jits and vmaps (over start
  vectors, or over operators closed over batched arrays). With vectors sharded over Explicit mesh
  axes, map over start vectors with a plain ``lax.map`` instead: batching turns the loop's
  ``lax.cond`` calls into selects whose predicate JAX broadcasts without the operands' sharding,
  which raises a ``ShardingTypeError``.

  Args:
    matvec: the symmetric linear operator, a function from pytrees like ``init_vector`` to
      pytrees like ``init_vector`` (for instance ``lambda v: hvp(f, params, v)``). It receives
      unit vectors (zero vectors after a breakdown, whose products are discarded) in the dtypes
      of ``init_vector``'s leaves.
    init_vector: the start vector, a pytree; it need not be normalised. A zero vector gives
      ``num_valid == 0``.
    num_steps: the number of Lanczos steps, the size of the tridiagonal (static).
    reorthogonalize: ``True`` reorthogonalises each new vector against the whole basis (the
      basis is orthonormal to working precision), ``"partial"`` only when Simon's estimates
      say orthogonality is being lost (a semi-orthogonal basis and, in the tests, the same
      Ritz values for fewer passes; float16 and bfloat16 leaves get full reorthogonalisation,
      since the operator's own rounding there is beyond Simon's model), ``False`` never.
      Without it the basis loses orthogonality once Ritz values converge and duplicate
      ("ghost") Ritz values appear; that mode is meant for spectral-density estimates, where
      the duplicates carry little weight. The extreme Ritz values converge first and are not
      affected: the duplicates are copies of converged values. Their derivatives through the
      recursion are, though, once they converge: differentiate a run with ``True`` or
      ``"partial"`` (:func:`jaxsaddle.spectrum.hessian_extreme_eigenvalues` does).
    return_basis: whether to return the basis. Without it and without ``reorthogonalize``,
      only the last two Lanczos vectors are kept.
    converged: an optional stopping test, ``converged(alphas, betas, num_valid)`` on the
      coefficients so far (zero past ``num_valid``), returning a boolean scalar. It is
      evaluated after every step; once it holds the recursion stops: ``num_valid`` counts the
      steps taken and ``betas[num_valid - 1]`` keeps the final residual norm. The loop is
      then a ``lax.while_loop``, which skips the remaining steps (under ``vmap``, once every
      lane has stopped) but cannot be differentiated in reverse mode.
      :func:`extreme_eigenpairs` builds one from a residual tolerance.
    breakdown_tol: the recursion stops when :math:`\beta_j \le` ``breakdown_tol`` times the
      largest :math:`|\alpha_i|` or :math:`\beta_i` seen so far, an estimate of
      :math:`\|A\|`. Defaults to 100 times the compute dtype's machine epsilon (1.2e-5 in
      float32, 2.2e-14 in float64): above the round-off of a few :math:`\epsilon \|A\|` left
      after an exact breakdown, and no larger, because a relative test cannot tell an exhausted
      Krylov space from a bulk of eigenvalues much narrower than the outliers that set
      :math:`\|A\|` (a network's Hessian): at :math:`\sqrt{\epsilon}` a bulk in
      :math:`[-0.05, 0.05]` under an outlier at 100 stopped the recursion after three steps.
      The stop keeps :math:`\beta_j` as the final residual norm, so the Ritz residuals still
      bound each Ritz value's distance to an eigenvalue.
    unroll: run the steps unrolled in Python instead of in a loop. None (the default) unrolls
      on the CPU when ``matvec`` convolves, where a loop makes XLA's convolutions many times
      slower (see the module docstring). Unrolled, a ``converged`` stop still stops the
      recursion, but the remaining steps' products are computed and discarded.

  Returns:
    A :class:`LanczosResult`.

  The recursion squares the entries of each vector it takes the norm of after scaling them by
  a power of two near the running estimate of :math:`\|A\|` (exact, and fused into the
  reduction), so the squares neither underflow nor overflow wherever the entries themselves are
  normal numbers. Unscaled, float32's squares underflowed from :math:`\|A\| \approx
  10^{-18}` and overflowed above :math:`10^{19}`: a :math:`\beta_j` read orders of magnitude
  too small made the next basis vector far longer than 1, and a positive definite operator got
  a Ritz value of -2e-11 with a residual of 1e-12. What remains is the range of the entries: the
  reorthogonalisation coefficients of a nearly orthogonal vector are about :math:`\epsilon
  \|A\| / n` apart from rounding, and below float32's smallest normal number accuracy fades
  (measured on :math:`n` = 10 to 100 with spectra in [-1, 10] scaled: extreme Ritz values to
  4e-7 relative down to :math:`\|A\| = 10^{-2}\, \text{tiny}\, n / \epsilon`, 2e-5 at
  :math:`10^{-4}` of it, 0.4 at :math:`10^{-6}`). :func:`extreme_eigenpairs` keeps its
  residuals honest there: exact ones are computed scaled, and where :math:`\|T\|` is below
  :math:`\text{tiny}\, n / \epsilon` (3e-30 for 30 elements in float32) every residual,
  estimated or exact, is floored at that scale, so a wrong Ritz value, or a Rayleigh quotient
  after a false breakdown, never comes with a small residual. XLA on the CPU flushes subnormal
  numbers to zero, so the fading is abrupt; an H200 kept them. Scale such an operator by a power of
  two, which is exact, or compute in float64. Three limits remain: the squares' scale starts from
  :math:`|\alpha_0|`, so a start vector with :math:`q_0^\top A q_0` far below :math:`\|A\|` takes
  its first norm at the wrong scale: with :math:`q_0^\top A q_0 = 0` exactly it is unscaled (in
  float32 a false breakdown below :math:`\|A\| \approx 10^{-19}`), and where the squares overflow (a
  quotient :math:`10^{19}` times below :math:`\|A\|` in float32, at any step) :math:`\beta` is NaN,
  never a short run, as are the Ritz values where :math:`\beta` exceeds :math:`2^{126} \approx 8.5
  \cdot 10^{37}` in float32 on the CPU (its reciprocal flushes to zero; an H200, which keeps the
  subnormal reciprocal, gave the right values); the start vector is scaled before it is normalised
  but must hold normal numbers on the CPU (a subnormal one reads as zero); and leaves narrower than
  float32 have their own range, which the underflow scale, set in the compute dtype, does not see
  (float16 products lose accuracy as their entries approach its smallest normal number, 6e-5).
  """
  _checks.check_loop_length("lanczos", "num_steps", num_steps)
  init_vector = _checks.as_arrays(init_vector)
  if not _checks.has_elements(init_vector):
    raise ValueError("lanczos: init_vector has no array elements; there is no vector to iterate.")
  # An integer start vector would be truncated, and the operator would only ever see zeros.
  _checks.check_float_leaves(
    init_vector,
    "lanczos",
    "Lanczos",
    leaves="start vector",
    remedy="Pass a real floating-point init_vector.",
  )
  if breakdown_tol is not None:
    _checks.check_nonnegative("lanczos", "breakdown_tol", breakdown_tol)
  mode = _reorthogonalization_mode(reorthogonalize)
  dtype = _compute_dtype(init_vector)
  eps = float(jnp.finfo(dtype).eps)
  if mode == "partial" and any(
    jnp.finfo(leaf.dtype).eps > eps for leaf in jax.tree.leaves(init_vector)
  ):
    # The operator sees vectors rounded to the narrow leaves' precision: the loss of
    # orthogonality then grows far faster than Simon's recurrence models in the compute dtype.
    mode = "full"
  if breakdown_tol is None:
    breakdown_tol = 100 * eps
  if _ravels_basis(init_vector):
    return _ravelled(
      lambda flat_matvec, flat_start: lanczos(
        flat_matvec,
        flat_start,
        num_steps,
        reorthogonalize=reorthogonalize,
        return_basis=return_basis,
        breakdown_tol=breakdown_tol,
        converged=converged,
        unroll=unroll,
      ),
      matvec,
      init_vector,
    )
  leaf_dtypes = jax.tree.map(lambda leaf: leaf.dtype, init_vector)

  def apply(vector):
    as_input = jax.tree.map(lambda leaf, d: leaf.astype(d), vector, leaf_dtypes)
    return _cast(_checked_image(matvec(as_input), vector), dtype)

  def norm(vector, exponent):
    """The norm of ``vector``, whose entries are squared after scaling by ``2**-exponent``."""
    # Exact and fused into the reduction; unscaled squares under- or overflow (see above).
    squared = _tree_vdot(*(_scaled(vector, -exponent),) * 2, dtype)
    positive = squared > 0
    # sqrt with a finite derivative at 0: once the Krylov space is exhausted w is zero, and
    # sqrt's infinite slope there made gradients through the whole run NaN. Otherwise squared
    # is 0, or NaN, which must stay NaN.
    root = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1)), squared)
    return _scaled(root, exponent)

  start = _cast(init_vector, dtype)
  # Scaled first, so that neither the norm nor its reciprocal leaves the range.
  start = _scaled(start, -_exponent(_largest_magnitude(start)))
  start_norm = norm(start, jnp.zeros((), jnp.int32))
  # Not `> 0`: a NaN start must give NaN coefficients, not the empty result of a zero start.
  has_start = start_norm != 0
  inv_norm = _reciprocal_where(has_start, start_norm)
  start = jax.tree.map(lambda leaf: leaf * inv_norm, start)

  # In a loop, unless the whole basis is cheaper to read than the branches, the subtraction
  # reads the basis in groups of about sqrt(num_steps) rows, and a group only once it holds a
  # filled row: a lax.cond on j, which stays a cond under vmap.
  group = math.ceil(num_steps / math.ceil(math.sqrt(num_steps)))
  num_groups = math.ceil(num_steps / group)

  host_branches = _backend.branches_wait_on_host()
  basis_bytes = num_steps * sum(leaf.size for leaf in jax.tree.leaves(start)) * dtype.itemsize

  def project_out(basis, w, j):
    """One pass of classical Gram-Schmidt: ``(w - Q h, h)`` with ``h = Q^T w``."""
    coefficients = _coefficients(basis, w, dtype)
    # Unrolled (j a Python int), reading rows one by one in every step would make compilation
    # quadratic in the steps (reading the filled ones: 60 steps compiled 50% slower), so
    # unrolled steps keep the groups' loop, compiled once.
    if not isinstance(j, int) and reading_beats_branching(basis_bytes):
      # Unfilled rows and their coefficients are zero.
      return _subtract_rows(basis, coefficients, w, list(range(num_steps))), coefficients
    padded = jnp.pad(coefficients, (0, num_groups * group - num_steps))

    def subtract_group(g, w):
      rows = [g * group + i for i in range(group)]
      subtract = functools.partial(_subtract_rows, basis, padded, rows=rows)
      return jax.lax.cond(g * group <= j, subtract, lambda w: w, w)

    return jax.lax.fori_loop(0, num_groups, subtract_group, w), coefficients

  keeps_basis = mode != "none" or return_basis
  # Without a basis, the last two vectors live in a two-row ring rather than in two carries
  # that swap every step, which XLA would copy. The current vector is also carried: reading it
  # from the ring instead saves a buffer but measured 7% slower (XLA copies the row out).
  num_rows = num_steps if keeps_basis else 2
  # Building the rows from the start vector lets a sharded leaf's sharding carry over. Each step
  # writes the *next* vector after the reads that produced it, so XLA writes it in place.
  vectors = jax.tree.map(
    lambda leaf: jnp.zeros_like(leaf)[None].repeat(num_rows, axis=0).at[0].set(leaf), start
  )

  def row_of(index):
    """The row that holds Lanczos vector ``index``: its own, or its slot in the ring."""
    return index if keeps_basis else index % 2

  def previous_vector(vectors, j):
    # At j = 0 this reads q_0, which beta_{-1} = 0 multiplies.
    row = row_of(jnp.maximum(j - 1, 0))
    return jax.tree.map(
      lambda stacked: jax.lax.dynamic_index_in_dim(stacked, row, keepdims=False), vectors
    )

  def remember(vectors, j, q_next):
    # With a basis, the last step's q_next is not part of it: mode="drop" skips the write at
    # row num_steps. In the ring it overwrites q_{j-1}, which the step has read.
    return jax.tree.map(
      lambda stacked, leaf: stacked.at[row_of(j + 1)].set(leaf, mode="drop"), vectors, q_next
    )

  init_carry = (
    vectors,
    jnp.zeros(num_steps, dtype),  # alphas
    jnp.zeros(num_steps, dtype),  # betas
    start,  # q_j
    jnp.zeros((), dtype),  # beta_{j-1}
    jnp.zeros((), dtype),  # largest |alpha| or beta seen, an estimate of ||A||
    has_start,  # whether the recursion is still going
    jnp.zeros((), jnp.int32),  # num_valid
    _unit_row(0, num_steps, dtype),  # omega_j: estimates of q_j . q_k, k < num_steps
    jnp.zeros(num_steps, dtype),  # omega_{j-1}
    jnp.zeros((), bool),  # whether this step must reorthogonalise (partial: the second of two)
  )

  def reorthogonalized(basis, w, j, exponent):
    """``w`` after Gram-Schmidt against the basis, a second pass if Kahan's test asks, and its
    norm (squares scaled by ``2**-exponent``)."""
    w, coefficients = project_out(basis, w, j)
    beta = norm(w, exponent)

    def project_again(w):
      w, _ = project_out(basis, w, j)
      return w, norm(w, exponent)

    scaled_coefficients, scaled_beta = _scaled((coefficients, beta), -exponent)
    return jax.lax.cond(
      jnp.sum(scaled_coefficients**2) > scaled_beta**2, project_again, lambda w: (w, beta), w
    )

  def step(j, carry):
    (vectors, alphas, betas, q, beta_prev, scale, active, num_valid, omega, omega_prev, forced) = (
      carry
    )
    # The cond discards the product after a breakdown or a stop, whatever the operator returns
    # for a zero vector. It also has XLA write the product out once, in the layout the passes
    # below read: fused into them, a product in a transposed layout (a weight's, from reverse
    # mode) made the step several times slower. The product itself stays outside the cond, so
    # that XLA can hoist out of the loop what does not depend on the vector (the forward pass
    # of a plain hvp). The layout trap was the CPU's; on a GPU a select does the discarding
    # without the cond's host round trip.
    product = apply(q)
    if host_branches:
      w = jax.tree.map(lambda leaf: jnp.where(active, leaf, 0), product)
    else:
      w = jax.lax.cond(active, lambda w: w, lambda w: jax.tree.map(jnp.zeros_like, w), product)
    alpha = _tree_vdot(q, w, dtype)
    # q_{j-1} is read where it is stored, inside the fused update.
    w = jax.tree.map(
      lambda product, leaf, prev: (
        product - alpha.astype(product.dtype) * leaf - beta_prev.astype(product.dtype) * prev
      ),
      w,
      q,
      previous_vector(vectors, j),
    )
    alphas = alphas.at[j].set(jnp.where(active, alpha, 0))
    scale = jnp.where(active, jnp.maximum(scale, jnp.abs(alpha)), scale)
    # The norms' squares are taken at the scale of ||A|| estimated so far, where w's norm lies.
    exponent = _exponent(scale)
    if mode == "full":
      w, beta = reorthogonalized(vectors, w, j, exponent)
    elif mode == "partial":
      beta = norm(w, exponent)
      omega_next = _next_orthogonality(
        omega, omega_prev, alphas, betas, beta, beta_prev, j, scale, eps
      )
      lost = jnp.max(jnp.abs(omega_next)) > math.sqrt(eps)
      reorthogonalize_now = active & (forced | lost) & (j < num_steps - 1)
      # j is closed over, not an operand, so that unrolled it stays a Python int.
      w, beta = jax.lax.cond(
        reorthogonalize_now,
        lambda w: reorthogonalized(vectors, w, j, exponent),
        lambda w: (w, beta),
        w,
      )
      # After a pass q_{j+1} is orthogonal to working precision; the next vector is
      # reorthogonalised too, since the recurrence carries q_j's loss of orthogonality into it.
      # The last step's vector is not kept, so its orthogonality does not matter.
      reset = jnp.where(jnp.arange(num_steps) <= j, eps, 0).astype(dtype)
      omega_next = jnp.where(reorthogonalize_now, reset, omega_next)
      omega_prev, omega = omega, omega_next + _unit_row(j + 1, num_steps, dtype)
      forced = reorthogonalize_now & ~forced
    else:
      beta = norm(w, exponent)
    # A vector far above the scale its squares were taken at overflows them (q_j'Aq_j about 0
    # with ||A q_j|| far above every earlier coefficient: a start e_0 with q_0'Aq_0 = 1e-30
    # against ||A|| = 1). Beta is then NaN, in a valid slot, which makes every Ritz value NaN
    # (_padded_eigh): an inf beta had ended the run with a Ritz value of 1e-30.
    beta = jnp.where(jnp.isinf(beta), jnp.nan, beta)
    scale = jnp.where(active, jnp.maximum(scale, beta), scale)
    continues = active & (beta > breakdown_tol * scale)
    betas = betas.at[j].set(jnp.where(active, beta, 0))
    num_valid = num_valid + active.astype(jnp.int32)
    if converged is not None:
      continues = continues & ~_stop(converged(alphas, betas, num_valid))
    # After a breakdown or a stop the next vector, and so the basis row, is zero.
    # One scalar factor; _normalized's derivative stays in range for operators far from norm 1.
    inv_beta = _reciprocal_where(continues, beta)
    # 1 / beta below the smallest normal number (beta above 2^126, 8.5e37, in float32) flushes
    # to zero on the CPU, which would zero the next vector: NaN instead.
    inv_beta = jnp.where(continues & (inv_beta == 0), jnp.nan, inv_beta)
    q_next = _normalized(w, beta, inv_beta)
    return (
      remember(vectors, j, q_next),
      alphas,
      betas,
      q_next,
      jnp.where(continues, beta, 0),
      scale,
      continues,
      num_valid,
      omega,
      omega_prev,
      forced,
    )

  if unroll is None:
    unroll = unroll_by_default(apply, start)
  if converged is None or unroll:
    final = fori_loop(num_steps, step, init_carry, unroll=unroll)
  else:
    _, final = jax.lax.while_loop(
      lambda indexed: (indexed[0] < num_steps) & indexed[1][6],
      lambda indexed: (indexed[0] + 1, step(indexed[0], indexed[1])),
      (jnp.zeros((), jnp.int32), init_carry),
    )
  vectors, alphas, betas, *_ = final
  num_valid = final[7]
  return LanczosResult(alphas, betas, vectors if return_basis else None, num_valid)


def tridiagonal(result: LanczosResult) -> jax.Array:
  """Returns the dense ``(num_steps, num_steps)`` tridiagonal, zero outside the valid block."""
  # After a stop by ``converged`` betas[num_valid - 1] is the residual norm, not a coupling.
  num_steps = result.alphas.shape[0]
  off_diagonal = jnp.where(jnp.arange(num_steps - 1) < result.num_valid - 1, result.betas[:-1], 0)
  return jnp.diag(result.alphas) + jnp.diag(off_diagonal, k=1) + jnp.diag(off_diagonal, k=-1)


def _largest_entry(result: LanczosResult) -> jax.Array:
  r"""The largest :math:`|\alpha_i|` or :math:`\beta_i`, an estimate of :math:`\|A\|`."""
  return jnp.maximum(jnp.max(jnp.abs(result.alphas)), jnp.max(result.betas))


def ritz_pairs(result: LanczosResult) -> RitzPairs:
  r"""Returns the Ritz pairs of a Lanczos run, in ascending order of Ritz value.

  The eigenpairs :math:`(\theta_i, s_i)` of the valid leading block of the tridiagonal give
  Ritz values :math:`\theta_i` and Ritz vectors :math:`Q s_i` (the stacked basis contracted
  with :math:`s_i`, leaf by leaf), each signed so that its component along the start vector
  :math:`q_0` is nonnegative. (``eigh``'s own signs are arbitrary and rounding decides them,
  so that programs running the same steps, a plain call and its gradient's, say, could return
  a vector and its negative.) Shapes are static: there are always ``num_steps`` slots, the
  first ``num_valid`` hold the Ritz pairs in ascending order and the rest hold NaN values and
  residuals and zero vectors. (The invalid block is decoupled from the valid one, since
  :func:`tridiagonal` keeps only the valid block's couplings, and is given a diagonal above the
  valid block's spectrum so that its eigenvalues sort last.)

  Residual norms come from the Lanczos relation, :math:`\|A Q s_i - \theta_i Q s_i\| =
  \beta_{m-1} |s_{m-1,i}|`, which the computed quantities satisfy up to
  :math:`O(\epsilon \|A\|)` with full reorthogonalisation, up to round-off growing with the
  steps (about ``num_steps`` :math:`\epsilon \|A\|`) without any (Paige 1972: the loss of
  orthogonality does not break the relation), and only up to
  :math:`O(\sqrt{\epsilon} \|A\|)` with partial reorthogonalisation, whose passes remove
  components of that size that the tridiagonal does not record. They are residuals of
  :math:`Q s_i`, whose norm is 1 only for an orthonormal basis, and never reported below
  :math:`\epsilon \max_i(|\alpha_i|, \beta_i)`, the round-off of the relation itself
  (:func:`extreme_eigenpairs` floors them at :math:`\sqrt{\epsilon}` times that with partial
  reorthogonalisation).

  Args:
    result: the output of :func:`lanczos`.

  Returns:
    :class:`RitzPairs` whose ``eigenvectors`` leaves have shape ``(num_steps, *leaf.shape)``;
    ``eigenvectors`` is ``None`` when the run kept no basis.
  """
  values, coefficients, residual_norms = _tridiagonal_eigenpairs(result)
  return RitzPairs(
    eigenvalues=values,
    eigenvectors=None
    if result.basis is None
    else _signed_by_start(_combine(result.basis, coefficients), result.basis),
    residual_norms=residual_norms,
    num_steps=result.num_valid,
  )


def _underflow_scale(like: PyTree, dtype) -> float:
  r""":math:`\text{tiny}\, n / \epsilon`: below this :math:`\|A\|` the recursion is unreliable.

  There the rounding-level reorthogonalisation coefficients, about :math:`\epsilon \|A\| / n`,
  fall below the smallest normal number; the extreme Ritz values were measured accurate to
  4e-7 relative down to a hundredth of this scale and off by 2e-5 at a ten-thousandth.
  """
  num_elements = sum(leaf.size for leaf in jax.tree.leaves(like))
  finfo = jnp.finfo(dtype)
  return float(finfo.smallest_normal) * num_elements / float(finfo.eps)


def _underflows(largest: jax.Array, like: PyTree) -> jax.Array:
  """Whether ``largest``, the largest entry of T, is nonzero but below
  :func:`_underflow_scale` (a zero operator is resolved exactly, every coefficient 0)."""
  return (largest > 0) & (largest < _underflow_scale(like, largest.dtype))


def _padded_eigh(result: LanczosResult) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``eigh`` of the whole static-size tridiagonal, and which slots are valid.

  The invalid block is decoupled from the valid one (:func:`tridiagonal` keeps only the valid
  block's couplings) and gets distinct diagonal entries above the valid block's Gershgorin
  bound, so its eigenvalues sort last and none repeats: a repeated one makes the derivative of
  ``eigh`` 0 * inf, which turned Ritz-vector gradients after a breakdown into NaN.
  """
  num_steps = result.alphas.shape[0]
  index = jnp.arange(num_steps)
  valid = index < result.num_valid
  # Solved scaled by a power of two near its largest entry, exactly: the padding below would
  # overflow for a huge operator (NaN Ritz values from 1e37 in float32).
  exponent = _exponent(_largest_entry(result))
  scaled = _scaled(tridiagonal(result), -exponent)
  # Gershgorin: the valid block's eigenvalues lie within 3 * max |entry| of zero.
  pad = (1 + 4 * jnp.max(jnp.abs(scaled))) * (1 + index)
  values, vectors = jnp.linalg.eigh(scaled + jnp.diag(jnp.where(valid, 0, pad)))
  # eigh on the CPU reads past a NaN on the diagonal ([[1, 1], [1, nan]] gave -1.41 and 1.41):
  # a NaN coefficient (NaN products, an overflowed beta) makes every value and vector NaN.
  corrupted = jnp.isnan(jnp.sum(jnp.where(valid, result.alphas + result.betas, 0)))
  values = jnp.where(corrupted, jnp.nan, values)
  vectors = jnp.where(corrupted, jnp.nan, vectors)
  return _scaled(values, exponent), vectors, valid


def _tridiagonal_eigenpairs(result: LanczosResult) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Ritz values, the tridiagonal's eigenvectors (columns) and the residual estimates.

  In ascending order, with NaN values and residuals and zero columns past ``num_valid``; see
  :func:`ritz_pairs`.
  """
  values, vectors, valid = _padded_eigh(result)
  vectors = jnp.where(valid[:, None] & valid[None, :], vectors, 0)
  last = jnp.maximum(result.num_valid - 1, 0)
  # A converged pair's estimate can underflow to zero; round-off in the relation is eps ||T||.
  round_off = jnp.finfo(result.alphas.dtype).eps * _largest_entry(result)
  residual_norms = jnp.maximum(jnp.abs(result.betas[last] * vectors[last]), round_off)
  return (
    jnp.where(valid, values, jnp.nan),
    vectors,
    jnp.where(valid, residual_norms, jnp.nan),
  )


def _combine(basis: PyTree, coefficients: jax.Array) -> PyTree:
  """The vectors ``Q c`` for the columns ``c`` of ``coefficients``, stacked leaf by leaf."""
  return jax.tree.map(
    lambda stacked: jnp.tensordot(
      coefficients.T.astype(stacked.dtype), stacked, axes=1, precision=jax.lax.Precision.HIGHEST
    ),
    basis,
  )


# How many Ritz values next to each wanted end are read as possible copies of it.
_COPY_CANDIDATES = 4


def _stacked_norms(vectors: PyTree) -> jax.Array:
  """The norm of each of the stacked ``vectors``."""
  dtype = _compute_dtype(vectors)
  return jax.vmap(lambda vector: jnp.sqrt(_tree_vdot(vector, vector, dtype)))(vectors)


def _unit_rows(vectors: PyTree) -> tuple[PyTree, jax.Array]:
  """The stacked ``vectors`` scaled to unit norm (zero ones stay zero), and the scales."""
  norms = _stacked_norms(vectors)
  inverse = _reciprocal_where(norms > 0, norms)
  scaled = jax.tree.map(
    lambda stacked: (
      stacked * inverse.reshape((-1,) + (1,) * (stacked.ndim - 1)).astype(stacked.dtype)
    ),
    vectors,
  )
  return scaled, inverse


def _least_residual_copies(
  result: LanczosResult,
  values: jax.Array,
  coefficients: jax.Array,
  residual_norms: jax.Array,
  slots: jax.Array,
  inward: jax.Array,
) -> tuple[jax.Array, PyTree]:
  """For each wanted slot, the copy of its Ritz value whose unit Ritz vector has the smallest
  residual estimate, among it and the next few slots (``inward``: +1 or -1 per slot), and that
  copy's Ritz vector :math:`Q s_i` (not normalised).

  Without reorthogonalisation a converged eigenvalue comes back as several Ritz values equal up
  to rounding, whose vectors :math:`Q s_i` share the eigenvector between them, and which of
  them sorts at the end is up to rounding. Over keys 0-7 of a 40 x 40 test matrix (20 float32
  steps) the end one's exact residual ranged from 3e-6 to 1.5e-3, and in four of the eight
  another copy's was 6 to 170 times smaller. A copy is a Ritz value within the two residuals of
  the end one; the estimates are the Lanczos ones over the vectors' norms, which came within
  6e-6 of the exact residuals there. One pass over the basis forms all the candidates.
  """
  num_slots = values.shape[0]
  candidates = slots[:, None] + inward[:, None] * jnp.arange(_COPY_CANDIDATES)
  exists = (candidates >= 0) & (candidates < result.num_valid)
  candidates = jnp.clip(candidates, 0, num_slots - 1)
  vectors = _combine(result.basis, coefficients[:, candidates.ravel()])
  norms = _stacked_norms(vectors).reshape(candidates.shape)
  estimates = residual_norms[candidates] * _reciprocal_where(norms > 0, norms)
  reach = estimates + estimates[:, :1]
  copies = exists & (jnp.abs(values[candidates] - values[slots][:, None]) <= reach)
  # No copies (a NaN pair, or a missing one) keeps the wanted slot itself.
  best = jnp.argmin(jnp.where(copies, estimates, jnp.inf), axis=1)
  best = jnp.where(jnp.any(copies, axis=1), best, 0)
  chosen = jnp.arange(candidates.shape[0]) * _COPY_CANDIDATES + best
  return candidates.ravel()[chosen], jax.tree.map(lambda stacked: stacked[chosen], vectors)


def _signed_by_start(vectors: PyTree, basis: PyTree) -> PyTree:
  """The stacked ``vectors``, each negated where its component along the start vector (the
  basis's first row) is negative.

  ``eigh``'s signs are arbitrary and rounding decides them, so programs running the same steps
  (a plain call and its gradient's, say) returned a vector and its negative. The component is
  read from the vector itself, not from the tridiagonal's eigenvector, which without
  reorthogonalisation does not give it: a converged value's copies split the eigenvector's
  coordinates between them, and the one that sorted last had a first coordinate of either
  sign.
  """
  dtype = _compute_dtype(vectors)
  start = jax.tree.map(lambda stacked: stacked[0], basis)
  overlaps = jax.vmap(lambda vector: _tree_vdot(vector, start, dtype))(vectors)
  signs = jnp.where(overlaps < 0, -1, 1)
  return jax.tree.map(
    lambda stacked: (
      stacked * signs.reshape((-1,) + (1,) * (stacked.ndim - 1)).astype(stacked.dtype)
    ),
    vectors,
  )


def check_extreme_arguments(owner: str, *, num_steps, k, which, tol, reorthogonalize) -> None:
  """Raises, naming ``owner``, unless the arguments of an extreme-eigenpair call are valid."""
  if which not in ("smallest", "largest", "both"):
    raise ValueError(f"{owner}: which must be 'smallest', 'largest' or 'both', got {which!r}.")
  _checks.check_loop_length(owner, "num_steps", num_steps)
  _checks.check_loop_length(owner, "k", k)
  if k > num_steps:
    raise ValueError(f"{owner}: k must be in [1, num_steps={num_steps}], got {k}.")
  if _reorthogonalization_mode(reorthogonalize, owner) == "none" and k > 1:
    raise ValueError(
      f"{owner}: k={k} needs reorthogonalize=True or 'partial'. Without reorthogonalisation, "
      "copies of converged Ritz values take the slots of the second and later eigenvalues at "
      "each end (the spectrum -5, -4.5, -4, ... gave -5, -5, -4.5); the first at each end stays "
      "accurate, so k=1 may go without."
    )
  if tol is not None:
    _checks.check_positive(owner, "tol", tol)


def extreme_eigenpairs(
  matvec: Callable[[PyTree], PyTree],
  like: PyTree,
  *,
  num_steps: int,
  key: jax.Array | int,
  k: int = 1,
  which: Which = "smallest",
  reorthogonalize: Reorthogonalization = True,
  eigenvectors: bool = True,
  exact_residuals: bool = True,
  tol: float | None = None,
) -> RitzPairs:
  r"""Estimates the ``k`` smallest and/or largest eigenpairs of a symmetric operator.

  Runs :func:`lanczos` from a Gaussian random start vector shaped like ``like`` (normalised)
  and keeps the extreme Ritz pairs. With ``num_steps`` chosen from the Kuczyński-Woźniakowski
  bound (see the module docstring), the extreme Ritz value is within a relative
  :math:`\varepsilon` of the extreme eigenvalue except with probability :math:`\delta` when

  .. math::

    \text{num\_steps} \ge \frac12 + \frac{\ln(1.648 \sqrt{n} / \delta)}{2 \sqrt{\varepsilon}}.

  Lanczos from one start vector sees each distinct eigenvalue once: a repeated eigenvalue
  fills one slot, and the next slot holds the next distinct one. At the saddle of
  ``problems.matrix_factorization(5, 2)``, whose smallest eigenvalues are -2.0418 twice and
  -2.0146 twice, ``k=2`` gives [-2.0418, -2.0146]. So ``k`` Ritz values do not count
  eigenvalues: a spectral density (:func:`jaxsaddle.spectrum.hessian_density`, with
  :func:`jaxsaddle.spectrum.degeneracy`'s negative mass) or a dense ``eigh`` does.

  Args:
    matvec: the symmetric operator on pytrees like ``like``.
    like: a pytree giving the structure, shapes and dtypes of the vectors.
    num_steps: the number of Lanczos steps (matrix-vector products).
    key: a PRNG key or an int seed for the start vector.
    k: the number of pairs at each requested end of the spectrum (static).
    which: ``"smallest"`` (ascending), ``"largest"`` (descending) or ``"both"`` (the ``k``
      smallest ascending, then the ``k`` largest descending; they overlap when fewer than
      ``2 k`` Ritz values exist).
    reorthogonalize: passed to :func:`lanczos` (``True``, ``"partial"`` or ``False``).
      ``False`` is refused for ``k > 1``: without reorthogonalisation, duplicates of converged
      Ritz values take the slots of the second and later pairs at each end. The first pair at
      each end stays accurate up to round-off of about ``num_steps`` :math:`\epsilon \|A\|`;
      with ``eigenvectors`` it is the duplicate whose unit Ritz vector has the smallest
      residual estimate (which duplicate sorts last is up to rounding, and their vectors'
      residuals differed up to 300-fold).
      Unless it is ``True`` the Ritz vectors are normalised explicitly.
    eigenvectors: whether to compute the Ritz vectors. Without them (and without
      ``reorthogonalize``) Lanczos stores no basis, only the last two vectors.
    tol: stop early, once every wanted Ritz pair's Lanczos residual estimate is at most
      ``tol`` times its Ritz value's magnitude (a bound on its relative distance to an
      eigenvalue); ``num_steps`` is then the most steps taken, and the number taken is
      :attr:`RitzPairs.num_steps`. Each step then also computes the Ritz values of the tridiagonal
      so far, an eigendecomposition of size ``num_steps``. An eigenvalue near zero may need
      every step. The loop is then a ``lax.while_loop``, which reverse-mode differentiation
      cannot go through. None (the default) runs all ``num_steps``.
    exact_residuals: compute ``||A v - theta v||`` with ``k`` (or ``2 k``) extra matvecs, one
      after another (``lax.map``); otherwise use the Lanczos estimate of :func:`ritz_pairs`,
      which is free and, divided by the Ritz vector's norm when the basis is not fully
      reorthogonalised, accurate to :math:`O(\epsilon \|A\|)` with ``True``, to about
      ``num_steps`` :math:`\epsilon \|A\|` with ``False``, but only to
      :math:`O(\sqrt{\epsilon} \|A\|)` with ``"partial"``, where it is
      floored at :math:`\sqrt{\epsilon} \max_i(|\alpha_i|, \beta_i)`. With a leaf
      narrower than the recursion's dtype (bfloat16, say) the estimate is floored at that leaf's
      epsilon times :math:`\max_i(|\alpha_i|, \beta_i)`, the rounding of the products the
      operator computes in it. Where :math:`\|T\|` lies below the underflow scale of
      :func:`lanczos`, every residual, exact ones too, is floored at that scale. Exact
      residuals need ``eigenvectors``.

  Returns:
    :class:`RitzPairs` with ``k`` (or ``2 k``) entries, each eigenvector leaf of shape
    ``(k, *leaf.shape)`` (``eigenvectors`` is ``None`` when not asked for). Each eigenvector's
    component along the start vector is nonnegative, as in :func:`ritz_pairs`. When the Krylov
    space broke down with fewer than ``k`` Ritz values, the missing entries are NaN (vectors
    zero).
  """
  check_extreme_arguments(
    "extreme_eigenpairs",
    num_steps=num_steps,
    k=k,
    which=which,
    tol=tol,
    reorthogonalize=reorthogonalize,
  )
  if exact_residuals and not eigenvectors:
    raise ValueError(
      "extreme_eigenpairs: exact_residuals=True needs the Ritz vectors: pass eigenvectors=True, or "
      "exact_residuals=False for the Lanczos estimate of the residuals."
    )
  like = _checks.as_arrays(like)
  if not _checks.has_elements(like):
    raise ValueError("extreme_eigenpairs: like has no array elements; there is no vector space.")
  _checks.check_float_leaves(like, "extreme_eigenpairs", "Lanczos")
  start = jax.tree.map(
    lambda noise, leaf: noise.astype(leaf.dtype),
    tree_standard_normal(canonicalize_key(key), like),
    like,
  )

  def wanted_slots(num_valid):
    """Indices of the wanted Ritz pairs among the ascending ones, and which exist."""
    ascending = jnp.arange(k)
    descending = num_valid - 1 - jnp.arange(k)
    if which == "smallest":
      slots = ascending
    elif which == "largest":
      slots = descending
    else:
      slots = jnp.concatenate([ascending, descending])
    present = (slots >= 0) & (slots < num_valid)
    return jnp.clip(slots, 0, num_steps - 1), present

  def converged(alphas, betas, num_valid):
    values, _, residual_norms = _tridiagonal_eigenpairs(
      LanczosResult(alphas, betas, None, num_valid)
    )
    slots, present = wanted_slots(num_valid)
    relative = residual_norms[slots] / jnp.abs(values[slots])
    return jnp.all(present & (relative <= tol))

  result = lanczos(
    matvec,
    start,
    num_steps,
    reorthogonalize=reorthogonalize,
    return_basis=eigenvectors,
    converged=None if tol is None else converged,
  )
  all_values, coefficients, all_residuals = _tridiagonal_eigenpairs(result)
  slots, present = wanted_slots(result.num_valid)
  mode = _reorthogonalization_mode(reorthogonalize)
  # Only the wanted Ritz vectors are formed: num_steps of them would each be a model's size.
  if eigenvectors and mode == "none":
    inward = {"smallest": [1], "largest": [-1], "both": [1, -1]}[which]
    slots, vectors = _least_residual_copies(
      result, all_values, coefficients, all_residuals, slots, jnp.array(inward)
    )
  elif eigenvectors:
    vectors = _combine(result.basis, coefficients[:, slots])
  values = jnp.where(present, all_values[slots], jnp.nan)
  # Missing pairs get zero vectors even when the basis is not finite.
  vectors = (
    jax.tree.map(
      lambda stacked: jnp.where(present.reshape((-1,) + (1,) * (stacked.ndim - 1)), stacked, 0),
      _signed_by_start(vectors, result.basis),
    )
    if eigenvectors
    else None
  )
  dtype = _compute_dtype(like)
  estimated_residuals = all_residuals[slots]
  if eigenvectors:
    # A Ritz vector Q s has unit norm only while the basis Q is orthonormal, which even full
    # reorthogonalisation loses below the underflow scale (norms of 0.05 gave exact residuals
    # 20 times too small); the Lanczos relation gives the residual of Q s, so the unit
    # vector's is that over its norm.
    vectors, inverse = _unit_rows(vectors)
    estimated_residuals = estimated_residuals * inverse
  norm_estimate = _largest_entry(result)
  if mode == "partial":
    # Partial passes remove components of up to sqrt(eps) ||A|| that T does not record.
    estimated_residuals = jnp.maximum(
      estimated_residuals, math.sqrt(float(jnp.finfo(dtype).eps)) * norm_estimate
    )
  # The operator takes and returns vectors in the leaves' own dtypes, so a leaf narrower than
  # the recursion rounds every product by about its epsilon times ||A||, which T cannot see:
  # bfloat16 leaves reported 7e-7 for eigenvalues 2e-3 off.
  operator_eps = max(float(jnp.finfo(leaf.dtype).eps) for leaf in jax.tree.leaves(like))
  if operator_eps > float(jnp.finfo(dtype).eps):
    estimated_residuals = jnp.maximum(estimated_residuals, operator_eps * norm_estimate)
  if exact_residuals:
    leaf_dtypes = jax.tree.map(lambda leaf: jnp.result_type(leaf), like)
    as_input = jax.tree.map(lambda stacked, d: stacked.astype(d), vectors, leaf_dtypes)
    images = _cast(jax.lax.map(matvec, as_input), dtype)

    def residual_norm(image, vector, value):
      residual = _tree_axpy(-value, vector, image)
      # Scaled, so that a tiny residual's squares cannot underflow into a zero residual, a
      # certificate of convergence.
      peak = _largest_magnitude(residual)
      return jnp.where(jnp.isfinite(peak), _scaled_norm(residual, dtype), peak)

    residual_norms = jax.vmap(residual_norm)(images, vectors, jnp.where(present, values, 0))
    residual_norms = jnp.where(present, residual_norms, jnp.nan)
  else:
    residual_norms = jnp.where(present, estimated_residuals, jnp.nan)
  # Below the underflow scale the recursion may have stopped at a false breakdown: a residual,
  # even an exact one, then tells how good its Ritz pair is but not that the pair is extreme,
  # so none certifies anything finer than that scale (before the norms were scaled, a one-step
  # "breakdown" gave a Rayleigh quotient of 4e-20 with an exact residual of 3e-20 for a
  # spectrum from -1e-20).
  residual_norms = jnp.where(
    _underflows(norm_estimate, like),
    jnp.maximum(residual_norms, _underflow_scale(like, dtype)),
    residual_norms,
  )
  return RitzPairs(values, vectors, residual_norms, result.num_valid)
