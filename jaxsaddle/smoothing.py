r"""Laplacian smoothing of gradients (Osher et al. 2018), solved exactly and fast.

Laplacian smoothing gradient descent (LSGD) replaces the gradient :math:`g` by
:math:`A_\sigma^{-1} g` with

.. math::

  A_\sigma = I + (-1)^p \sigma L^p, \qquad
  (L x)_i = x_{i-1} - 2 x_i + x_{i+1} \quad (\text{indices mod } n),

the order-:math:`p` power of the periodic 1-D discrete Laplacian. :math:`A_\sigma`
is circulant, with eigenvalues :math:`1 + \sigma (2 - 2\cos(2\pi k/n))^p`,
:math:`k = 0, \dots, n-1`, on the Fourier modes, so it preserves the mean,
damps high frequencies by up to :math:`1/(1 + 4^p \sigma)` and is symmetric
positive definite.

**How it is solved.** The reference code (BaoWangMath/LaplacianSmoothing-
GradientDescent) divides in Fourier space. On a CPU that costs several SGD
steps, so this module uses the closed form of :math:`A_\sigma^{-1}` instead.
With :math:`w = 2 - z - z^{-1}` the symbol of :math:`-L`,
:math:`1 + \sigma w^p = \sigma \prod_r (w - w_r)` with
:math:`w_r^p = -1/\sigma`, and each factor is
:math:`w - w_r = \rho_r^{-1} (1 - \rho_r z)(1 - \rho_r z^{-1})` where
:math:`\rho_r + 1/\rho_r = 2 - w_r` and :math:`|\rho_r| < 1`. Partial fractions
give the periodic inverse kernel exactly,

.. math::

  (A_\sigma^{-1} g)_i = \sum_j c_j\, g_{i-j}, \qquad
  c_j = \sum_r \frac{\rho_r}{\sigma p\, w_r^{p-1} (1 - \rho_r^2)}
        \frac{\rho_r^{j} + \rho_r^{n-j}}{1 - \rho_r^n}, \quad 0 \le j < n,

which decays like :math:`\max_r |\rho_r|^{|j|}`: beyond :math:`K` taps, where the
dropped kernel mass is below a quarter of the compute dtype's machine epsilon,
truncating it changes nothing at that precision. For order 1,
:math:`\rho = 2 / (a + \sqrt{a^2 - 4})` with :math:`a = 2 + 1/\sigma`.

Three exact solvers, picked per leaf when the function is traced, from the
length :math:`n`, :math:`\sigma`, the order and the dtype:

- ``"recursive"`` (order 1): the inverse is
  :math:`(\rho/\sigma)\,(1 - \rho Z)^{-1}(1 - \rho Z^{-1})^{-1}` with :math:`Z`
  the cyclic shift. The geometric series :math:`\sum_{m < 2^\ell} \rho^m Z^m`
  factors as :math:`\prod_{s<\ell}(1 + \rho^{2^s} Z^{2^s})`, so the symmetric
  filter is :math:`\ell` passes of the 3-tap filter
  :math:`(1 + \rho^{2^{s+1}}) x_i + \rho^{2^s}(x_{i - 2^s} + x_{i + 2^s})`, with
  :math:`\ell = \lceil \log_2 (\log(\epsilon/8) / \log\rho) \rceil`: 5 passes
  for :math:`\sigma = 1` in float32, 6 for :math:`\sigma = 10`. Since
  :math:`1 - \rho \approx \sigma^{-1/2}`, one more pass is needed each time
  :math:`\sigma` grows about fourfold.
- ``"direct"``: the truncated kernel as :math:`\min(n, 2K + 1)` shifted
  multiply-adds in one fused pass, for higher orders and for short rows and
  small :math:`\sigma` where it beats the passes above.
- ``"fft"``: ``irfft(rfft(g) / d)`` with the denominators
  :math:`d_k = 1 + \sigma (2 - 2\cos(2\pi k/n))^p` as a compile-time constant.
  It is the fallback for kernels too long to convolve directly (high order
  with large :math:`\sigma`) and the only solver when :math:`\sigma` is traced
  (``optax.inject_hyperparams``), since the others need :math:`\sigma` to size
  themselves.

Both convolution solvers read a copy of the row padded periodically (or with
its neighbours' ends, in ``"global"`` mode) and use only slices: XLA's CPU
backend ran a concatenation of unaligned pieces ten times slower than a pad.
On a 2-core CPU, an rfft plus irfft of a flattened 784x512 leaf took 11 to 12 ms,
the recursive solver 0.6 ms at :math:`\sigma` = 1 and 10, the direct one 0.4 ms
at :math:`\sigma` = 0.05 (order 1) and 1.2 to 2.4 ms at order 2; a whole LSGD
step of a 784-512-512-10 MLP cost 1.16 SGD steps (``benchmarks/smoothing.py``).

References:
  Osher, Wang, Yin, Luo, Barekat, Pham, Lin, `Laplacian Smoothing Gradient
  Descent <https://arxiv.org/abs/1806.06317>`_, 2018 (Research in the
  Mathematical Sciences 9, 2022).

Example::

  import jax, jax.numpy as jnp, optax, jaxsaddle

  tx = optax.chain(jaxsaddle.laplacian_smoothing(1.0), optax.sgd(0.1))
  params = {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}
  grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params)
  updates, state = tx.update(grads, tx.init(params), params)
"""

import functools
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxsaddle import _checks
from jaxsaddle import _sharding

Mode = Literal["leaf", "global", "axis"]
MODES = ("leaf", "global", "axis")
Method = Literal["recursive", "direct", "fft"]

# Rows shorter than this are returned unchanged, as in the reference code.
MIN_LENGTH = 3

# Per-element costs of the solvers in units of one multiply-add of the direct
# solver, measured for n = 401,408 on a 2-core x86 CPU (benchmarks/smoothing.py):
# 4 to 5 per recursive pass, and for an rfft plus irfft 11 to 28 per factor of 2
# in the length, depending on the load (XLA's CPU FFT runs on one core, the
# slices on both), more for lengths with large prime factors.
_RECURSIVE_PASS_COST = 5.0
_FFT_COST_PER_OCTAVE = 20.0


def _tolerance(dtype) -> float:
  """Kernel mass that may be dropped: a quarter of the compute dtype's epsilon."""
  return float(np.finfo(_checks.compute_dtype(dtype)).eps) / 4


@functools.cache
def _poles(sigma: float, order: int) -> tuple[np.ndarray, np.ndarray]:
  r"""The :math:`\rho_r` and partial-fraction weights of the inverse kernel (module docstring)."""
  r = np.arange(order)
  roots = sigma ** (-1 / order) * np.exp(1j * np.pi * (2 * r + 1) / order)  # w_r^p = -1/sigma
  a = 2 - roots
  # a^2 - 4 = -w (4 - w): the difference form cancels when sigma is large and w small.
  s = np.sqrt(-roots * (4 - roots) + 0j)
  # Of the two roots of rho + 1/rho = a take the one inside the unit circle, written
  # without the cancellation of a - sqrt(a^2 - 4) when sigma is large.
  s = np.where((a.conj() * s).real >= 0, s, -s)
  rho = 2 / (a + s)
  weights = rho / (sigma * order * roots ** (order - 1) * (1 - rho * rho))
  return rho, weights


def _negligible(sigma: float, order: int, dtype) -> bool:
  r"""Whether :math:`A_\sigma^{-1}` is the identity to working precision (as for sigma = 0):
  :math:`\|\sigma L^p\| \le 4^p \sigma`. Below about 1e-154 the poles' formulas fail."""
  return sigma == 0 or math.log(sigma) + order * math.log(4) <= math.log(_tolerance(dtype))


def _order_one_rho(sigma: float) -> float:
  # a^2 - 4 with a = 2 + 1/sigma, as (4 + 1/sigma) / sigma: no cancellation at large sigma.
  a = 2 + 1 / sigma
  return 2 / (a + math.sqrt((4 + 1 / sigma) / sigma))


@functools.cache
def _kernel_radius(sigma: float, order: int, tolerance: float) -> int:
  """The K beyond which the kernel taps on both sides carry less than ``tolerance`` mass."""
  rho, weights = _poles(sigma, order)
  magnitude = np.abs(rho)
  radius = 0
  # 2 sum_r |w_r| |rho_r|^(K+1) / (1 - |rho_r|) bounds the mass of the taps beyond K.
  while 2 * np.sum(np.abs(weights) * magnitude ** (radius + 1) / (1 - magnitude)) > tolerance:
    radius = max(1, 2 * radius)
  low, high = radius // 2, radius
  while low < high:
    middle = (low + high) // 2
    tail = 2 * np.sum(np.abs(weights) * magnitude ** (middle + 1) / (1 - magnitude))
    low, high = (middle + 1, high) if tail > tolerance else (low, middle)
  return high


def periodic_kernel(n: int, sigma: float, order: int, offsets: np.ndarray) -> np.ndarray:
  """The exact first column of the inverse, ``c[j mod n]`` for each offset ``j``, in float64."""
  rho, weights = _poles(sigma, order)
  j = np.mod(np.asarray(offsets), n)[:, None]
  # rho^n underflows to 0 for long rows, which is exact at float64.
  values = weights * (rho**j + rho ** (n - j)) / (1 - rho**n)
  return values.sum(axis=1).real


def _recursive_levels(sigma: float, tolerance: float) -> int:
  """Passes l such that the series truncated at 2^l terms drops at most ``tolerance`` mass."""
  # Dropped mass of the two truncated series: 2 rho^(2^l).
  terms = math.log(tolerance / 2) / math.log(_order_one_rho(sigma))
  return max(1, math.ceil(math.log2(terms)))


def _direct_offsets(n: int, radius: int) -> np.ndarray:
  if 2 * radius + 1 >= n:
    # The kernel wraps around the whole row: one tap per element of the period.
    return np.arange(-(n // 2), n - n // 2)
  return np.arange(-radius, radius + 1)


def choose_method(n: int, sigma: float, order: int, dtype) -> Method:
  """The cheapest exact solver for rows of length ``n`` (see the module docstring).

  Costs per element, in multiply-adds of the direct solver: ``min(n, 2K + 1)``
  for ``"direct"``, 5 per pass over the padded row for ``"recursive"``, and
  20 per octave of ``n`` for ``"fft"``.
  """
  tolerance = _tolerance(dtype)
  if order == 1 and 2.0**-52 * math.sqrt(sigma) > 256 * tolerance:
    # The first-order pole's 1 - rho^2 and 1 - rho^n cancel in float64 as rho nears 1: the
    # kernel's mass drifts from 1 by about 2^-52 sqrt(sigma) (0.19 at sigma = 1e30). Past 64
    # ulps of the compute dtype (sigma above about 4e3 in float64, 1e21 in float32) the FFT's
    # closed form, which has no such cancellation, solves instead.
    return "fft"
  radius = _kernel_radius(sigma, order, tolerance)
  costs = {
    "direct": float(len(_direct_offsets(n, radius))),
    "fft": _FFT_COST_PER_OCTAVE * math.log2(n),
  }
  if order == 1:
    levels = _recursive_levels(sigma, tolerance)
    padding = 2**levels - 1
    costs["recursive"] = _RECURSIVE_PASS_COST * levels * (1 + 2 * padding / n)
  return min(costs, key=costs.get)


def _pad_last_axis(x: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
  """``concatenate([left, x, right], -1)``, written as a pad and two in-place updates.

  XLA's CPU concatenation of unaligned pieces ran 10 times slower than this.
  """
  zero = jnp.zeros((), x.dtype)
  widths = [(0, 0, 0)] * (x.ndim - 1) + [(left.shape[-1], right.shape[-1], 0)]
  padded = jax.lax.pad(x, zero, widths)
  padded = padded.at[..., : left.shape[-1]].set(left)
  return padded.at[..., padded.shape[-1] - right.shape[-1] :].set(right)


def _periodic_ends(x: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """The ``width`` elements before and after ``x`` along its last axis, periodically."""
  n = x.shape[-1]
  if width <= n:
    return x[..., n - width :], x[..., :width]
  left = jnp.take(x, np.arange(-width, 0) % n, axis=-1)
  right = jnp.take(x, np.arange(width) % n, axis=-1)
  return left, right


def _direct_padded(padded: jax.Array, offsets: np.ndarray, taps: np.ndarray) -> jax.Array:
  """``sum_j taps[j] x[i - offsets[j]]`` from a row padded by ``max |offset|`` on both sides."""
  width = int(np.max(np.abs(offsets)))
  n = padded.shape[-1] - 2 * width
  result = None
  for offset, tap in zip(offsets, taps, strict=True):
    start = width - int(offset)
    term = tap * padded[..., start : start + n]
    result = term if result is None else result + term
  return result


def _recursive_padded(padded: jax.Array, rho: float, scale: float, levels: int) -> jax.Array:
  """The passes of the order-1 recursive solver over a row padded by ``2**levels - 1``."""
  x = padded
  power = rho
  shift = 1
  for level in range(levels):
    length = x.shape[-1]
    centre, side = 1 + power * power, power
    if level == 0:
      centre, side = scale * centre, scale * side
    # XLA fuses a few consecutive passes, recomputing their inputs, which measured
    # faster than writing every pass out (an optimization_barrier per pass).
    x = centre * x[..., shift : length - shift] + side * (
      x[..., : length - 2 * shift] + x[..., 2 * shift :]
    )
    power *= power
    shift *= 2
  return x


def _fft_solve(x: jax.Array, sigma, order: int) -> jax.Array:
  """``irfft(rfft(x) / d)`` along the last axis; ``sigma`` may be traced."""
  n = x.shape[-1]
  symbol = (2 - 2 * np.cos(2 * np.pi * np.arange(n // 2 + 1) / n)) ** order
  if isinstance(sigma, jax.Array):
    # A traced sigma escapes the factory's check: a negative one would amplify (or divide by
    # zero), so it gives NaN.
    sigma = jnp.asarray(sigma, x.dtype)
    denominator = jnp.where(sigma >= 0, 1 + sigma * symbol.astype(x.dtype), jnp.nan)
  else:
    denominator = (1 + float(sigma) * symbol).astype(x.dtype)
  # As a matrix of rows: on 8 CPU devices with Auto axes, XLA gave a sharded rank-3 FFT
  # operand a layout its CPU FFT rejects at run time (fft_thunk.cc RET_CHECK
  # IsMonotonicWithDim0Major); the rank-2 FFT ran.
  rows = x.reshape(-1, n)
  smoothed = jnp.fft.irfft(jnp.fft.rfft(rows, axis=-1) / denominator, n=n, axis=-1)
  return smoothed.reshape(x.shape)


def _halo_width(method: Method, n: int, sigma: float, order: int, dtype) -> int:
  tolerance = _tolerance(dtype)
  if method == "recursive":
    return 2 ** _recursive_levels(sigma, tolerance) - 1
  offsets = _direct_offsets(n, _kernel_radius(sigma, order, tolerance))
  return int(np.max(np.abs(offsets)))


def _solve_padded(
  padded: jax.Array, period: int, method: Method, sigma: float, order: int, dtype
) -> jax.Array:
  """The inverse for vectors of length ``period``, on the middle of a row padded by the halo.

  The padded row is a piece of the periodic vector: the whole of it in
  ``"leaf"`` and ``"axis"`` modes, one leaf and its neighbours' ends in
  ``"global"`` mode.
  """
  tolerance = _tolerance(dtype)
  if method == "recursive":
    rho = _order_one_rho(sigma)
    return _recursive_padded(padded, rho, rho / sigma, _recursive_levels(sigma, tolerance))
  offsets = _direct_offsets(period, _kernel_radius(sigma, order, tolerance))
  return _direct_padded(padded, offsets, periodic_kernel(period, sigma, order, offsets))


def smooth_last_axis(
  x: jax.Array, sigma, order: int = 1, method: Method | None = None
) -> jax.Array:
  r"""Applies :math:`A_\sigma^{-1}` along the last axis of ``x`` (length at least 3).

  Computes in float32 (float64 for float64 input) and returns ``x``'s dtype.
  ``method`` overrides the automatic choice (:func:`choose_method`); a traced
  ``sigma`` always uses ``"fft"``. ``"recursive"`` solves order 1 only.
  """
  if method not in (None, "fft", "direct", "recursive"):
    raise ValueError(
      f"smooth_last_axis: method must be 'fft', 'direct', 'recursive' or None, got {method!r}."
    )
  if method == "recursive" and order != 1:
    raise ValueError(f"smooth_last_axis: the recursive solver is for order 1, got order {order}.")
  dtype = x.dtype
  n = x.shape[-1]
  x = x.astype(_checks.compute_dtype(dtype))
  concrete_sigma = _checks.concrete_float(sigma, "laplacian_smoothing", "sigma")
  if concrete_sigma is None:
    method = "fft"
  elif _negligible(concrete_sigma, order, x.dtype):
    return x.astype(dtype)
  elif method is None:
    method = choose_method(n, concrete_sigma, order, x.dtype)
  if method == "fft":
    return _fft_solve(x, sigma, order).astype(dtype)
  width = _halo_width(method, n, concrete_sigma, order, x.dtype)
  padded = _pad_last_axis(x, *_periodic_ends(x, width))
  return _solve_padded(padded, n, method, concrete_sigma, order, x.dtype).astype(dtype)


def _smooth_global(leaves: Sequence[jax.Array], sigma, order: int) -> list[jax.Array]:
  """Smooths the concatenation of the flattened leaves, without building it when possible.

  The convolution solvers need only the ``width`` elements on each side of a
  leaf, which come from its neighbours in the concatenation (cyclically), so
  every leaf is solved on its own with those ends as padding.
  """
  flat = [leaf.reshape(-1) for leaf in leaves]
  sizes = [v.size for v in flat]
  total = sum(sizes)
  if total < MIN_LENGTH:
    return list(leaves)
  dtype = _checks.compute_dtype(jnp.result_type(*leaves))
  flat = [v.astype(dtype) for v in flat]
  concrete_sigma = _checks.concrete_float(sigma, "laplacian_smoothing", "sigma")
  if concrete_sigma is not None and _negligible(concrete_sigma, order, dtype):
    return list(leaves)
  method = "fft" if concrete_sigma is None else choose_method(total, concrete_sigma, order, dtype)
  width = 0 if method == "fft" else _halo_width(method, total, concrete_sigma, order, dtype)
  if method == "fft" or 2 * width >= total:
    whole = smooth_last_axis(jnp.concatenate(flat), sigma, order, method)
    parts = jnp.split(whole, np.cumsum(sizes)[:-1])
  else:
    parts = []
    for i, v in enumerate(flat):
      if v.size == 0:
        parts.append(v)
        continue
      left = _neighbour_end(flat, i, width, before=True)
      right = _neighbour_end(flat, i, width, before=False)
      padded = _pad_last_axis(v, left, right)
      parts.append(_solve_padded(padded, total, method, concrete_sigma, order, dtype))
  return [
    part.reshape(leaf.shape).astype(leaf.dtype) for part, leaf in zip(parts, leaves, strict=True)
  ]


def _neighbour_end(flat: Sequence[jax.Array], index: int, width: int, *, before: bool):
  """The ``width`` elements just before (or after) ``flat[index]`` in the cyclic concatenation."""
  pieces = []
  needed = width
  j = index
  while needed > 0:
    j = (j - 1) % len(flat) if before else (j + 1) % len(flat)
    v = flat[j]
    take = min(needed, v.size)
    if take:
      pieces.append(v[v.size - take :] if before else v[:take])
    needed -= take
  if before:
    pieces.reverse()
  return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def _smooth_rows(leaf: jax.Array, sigma, order: int) -> jax.Array:
  """``"axis"`` mode for one leaf, solved shard by shard when the leaf is explicitly sharded."""
  spec = _sharding.explicit_spec(leaf)
  if spec is None:
    return smooth_last_axis(leaf, sigma, order)
  if spec[-1] is not None:
    # Rows split across devices: gather them, deliberately, and split the result again.
    rows_whole = P(*spec[:-1], None)
    smoothed = _smooth_rows(jax.sharding.reshard(leaf, rows_whole), sigma, order)
    return _sharding.sharded_like(smoothed, leaf)
  # Every row lies on one device: solve locally, with no communication even for the
  # FFT solver, which XLA would otherwise gather (jax-ml/jax#15680, openxla/xla#24).
  if _checks.concrete_float(sigma, "laplacian_smoothing", "sigma") is None:
    local = jax.shard_map(
      lambda x, s: smooth_last_axis(x, s, order), in_specs=(P(*spec), P()), out_specs=P(*spec)
    )
    return local(leaf, sigma)
  local = jax.shard_map(
    lambda x: smooth_last_axis(x, sigma, order), in_specs=P(*spec), out_specs=P(*spec)
  )
  return local(leaf)


def _check_order(owner: str, order) -> None:
  if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
    raise ValueError(
      f"{owner}: order must be a Python integer >= 1, got {order!r}; it sets the solver's shape, "
      "so with optax.inject_hyperparams pass static_args=('order',)."
    )


def _check_mode(owner: str, mode) -> None:
  if mode not in MODES:
    raise ValueError(f"{owner}: mode must be one of {MODES}, got {mode!r}.")


def laplacian_smoothing(
  sigma: float | jax.Array = 1.0, *, order: int = 1, mode: Mode = "leaf"
) -> optax.GradientTransformation:
  r"""Replaces the updates by their Laplacian smoothing :math:`A_\sigma^{-1} g`.

  .. math::

    g \leftarrow \left(I + (-1)^p \sigma L^p\right)^{-1} g,

  with :math:`L` the periodic 1-D discrete Laplacian (stencil
  :math:`[1, -2, 1]` with wrap-around) and :math:`p` = ``order``: the
  smoothing of Osher et al., *Laplacian Smoothing Gradient Descent*
  (arXiv:1806.06317). It preserves the mean of each smoothed vector and
  multiplies its :math:`k`-th Fourier mode by
  :math:`1 / (1 + \sigma (2 - 2\cos(2\pi k/n))^p)`; for order 1 every output
  lies between the smallest and the largest input. The solve is exact to the
  compute precision; the module docstring describes the three solvers and how
  one is picked.

  Which vectors are smoothed:

  - ``"leaf"``: each leaf flattened (row-major) on its own, as in the
    reference code.
  - ``"global"``: the concatenation of all flattened leaves, one periodic
    vector.
  - ``"axis"``: every row along the last axis of every leaf independently.
    The other axes may be sharded: the solve works on each row locally.

  Scalars and vectors shorter than 3 pass through unchanged (a choice: the
  periodic Laplacian of 1 or 2 points couples an element with itself or with its
  one neighbour twice, and smoothing them means little), as do leaves whose last
  axis is shorter than 3 in ``"axis"`` mode. In ``"global"`` mode every leaf,
  scalars included, is part of the one vector, and only a tree with fewer than 3
  elements in all passes through. bfloat16 and float16 updates are smoothed in float32 and cast
  back.

  Sharding: in ``"axis"`` mode every row is solved where it lies. Under an
  Explicit mesh a leaf sharded along other axes than the last is smoothed shard
  by shard inside ``jax.shard_map``, with no communication; a leaf whose last
  axis is sharded is resharded so that its rows are whole, smoothed, and
  resharded back (an all-gather along that axis and a slice, made explicitly).
  In ``"leaf"`` and ``"global"`` modes a vector is a whole leaf, so a sharded
  leaf is replicated, smoothed and resharded back under an Explicit mesh. The
  updates keep the leaf's sharding either way. Under Auto axes the sharding is
  not visible when tracing and XLA decides: it gathers whatever the solve needs
  whole, and gathers even batch-sharded FFTs (jax-ml/jax#15680, openxla/xla#24), which the
  FFT solver would hit in ``"axis"`` mode with a traced ``sigma``.

  Args:
    sigma: :math:`\sigma \ge 0`; 0 is the identity. A traced value (as under
      ``optax.inject_hyperparams``) is supported but always uses the FFT
      solver, about 5 times slower on a CPU; list ``sigma`` in
      ``static_args`` to keep the fast solvers when it does not change. A negative
      or NaN traced value makes every leaf of the updates NaN.
    order: :math:`p \ge 1`, a Python integer (static under
      ``inject_hyperparams``: it sets the solver's shape).
    mode: ``"leaf"``, ``"global"`` or ``"axis"``.

  Returns:
    A stateless ``GradientTransformationExtraArgs`` (extra arguments are ignored).

  Example::

    import jax.numpy as jnp, jaxsaddle

    tx = jaxsaddle.laplacian_smoothing(1.0)
    g = jnp.array([0.0, 0.0, 3.0, 0.0, 0.0])
    smoothed, _ = tx.update(g, tx.init(g))  # same mean, the spike spread out
  """
  return _laplacian_smoothing(sigma, order=order, mode=mode, owner="laplacian_smoothing")


def _laplacian_smoothing(
  sigma, *, order: int, mode: Mode, owner: str
) -> optax.GradientTransformationExtraArgs:
  """:func:`laplacian_smoothing`, its errors naming ``owner`` (an alias built on it)."""
  _checks.check_nonnegative(owner, "sigma", sigma)
  _check_order(owner, order)
  _check_mode(owner, mode)

  def init_fn(params):
    _checks.check_float_leaves(params, owner, "smoothing")
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args  # accepted as by every jaxsaddle transform, and unused
    # An integer gradient would be smoothed and truncated back to integers.
    _checks.check_float_leaves(updates, owner, "smoothing", leaves="update")
    if mode == "global":
      leaves, treedef = jax.tree.flatten(updates)
      smoothed = _smooth_global([_sharding.replicated(leaf) for leaf in leaves], sigma, order)
      smoothed = [_sharding.sharded_like(s, leaf) for s, leaf in zip(smoothed, leaves, strict=True)]
      return jax.tree.unflatten(treedef, smoothed), state

    def smooth(leaf):
      if mode == "axis":
        if leaf.ndim == 0 or leaf.shape[-1] < MIN_LENGTH:
          return leaf
        return _smooth_rows(leaf, sigma, order)
      if leaf.size < MIN_LENGTH:
        return leaf
      flat = _sharding.replicated(leaf).reshape(-1)
      return _sharding.sharded_like(smooth_last_axis(flat, sigma, order).reshape(leaf.shape), leaf)

    return jax.tree.map(smooth, updates), state

  return _checks.public_transform(
    optax.GradientTransformationExtraArgs(init_fn, update_fn), nonnegative=[sigma]
  )
