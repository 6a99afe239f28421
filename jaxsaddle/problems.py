"""Test objectives whose critical points are known in closed form.

Every constructor returns a :class:`Problem`: a pure, jit-, grad- and vmap-able
``value_fn`` on a single array of shape ``init_shape``, together with the
critical points that are known exactly (location, value, sorted Hessian
spectrum and kind). The reference data are host-side float64 so that they can
be checked to full precision; ``value_fn`` computes in the dtype of its input.

Example:

  >>> import jax
  >>> import jax.numpy as jnp
  >>> from jaxsaddle import problems
  >>> problem = problems.strict_saddle()
  >>> saddle = problem.critical_points[0]
  >>> saddle.kind, saddle.hessian_eigenvalues.tolist()
  ('strict_saddle', [-1.0, 1.0])
  >>> float(problem.value_fn(jnp.asarray(saddle.point)))
  0.0
  >>> jax.grad(problem.value_fn)(jnp.array([1.0, 0.0]))  # descent stays on the x-axis
  Array([1., 0.], dtype=float32)
"""

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsaddle import _checks
from jaxsaddle import _random

_HIGHEST = jax.lax.Precision.HIGHEST


class CriticalPoint(NamedTuple):
  """A critical point of a :class:`Problem`, known in closed form.

  Attributes:
    point: the location, a float64 NumPy array of the problem's ``init_shape``
      (host float64 so that it is exact; cast it to the dtype you compute in).
    value: the objective at ``point``.
    hessian_eigenvalues: the eigenvalues of the Hessian at ``point`` with the
      parameters flattened, float64, sorted ascending.
    kind: one of ``"minimum"``, ``"strict_saddle"``, ``"degenerate_saddle"``
      or ``"maximum"``. A strict saddle has a negative Hessian eigenvalue and is
      not a local maximum; a degenerate saddle is a saddle whose Hessian has no
      negative eigenvalue.
  """

  point: np.ndarray
  value: float
  hessian_eigenvalues: np.ndarray
  kind: str


class Problem(NamedTuple):
  """An objective together with its known critical points.

  Attributes:
    name: a short human-readable name.
    value_fn: maps params of shape ``init_shape`` to a scalar in the params'
      dtype; jit-, grad- and vmap-able.
    init_shape: the shape of the params array.
    critical_points: the critical points known in closed form, saddles (and
      maxima) first, minima last. Not necessarily all critical points: each
      constructor documents which are listed.
    minimum_value: the global minimum of ``value_fn``, ``-inf`` when it is
      unbounded below.
  """

  name: str
  value_fn: Callable[[jax.Array], jax.Array]
  init_shape: tuple[int, ...]
  critical_points: tuple[CriticalPoint, ...]
  minimum_value: float


def _host_key(owner: str, key: jax.Array | int) -> jax.Array:
  """``key`` as a typed key, refused when traced: the problems are built with host NumPy."""
  if isinstance(key, jax.core.Tracer):
    raise TypeError(
      f"{owner}: the key must be concrete, not traced (under jax.vmap or jit): the problem is "
      "built on the host, in float64, once. Build one problem per seed in a Python loop, or "
      "one problem and vmap the optimizer over its keys."
    )
  return _random.canonicalize_key(
    key, many_seeds=f"{owner}: build one problem per seed in a Python loop"
  )


def _random_orthonormal_columns(key: jax.Array, rows: int, cols: int) -> np.ndarray:
  r"""A ``rows x cols`` matrix Q with orthonormal columns and a uniformly random column space.

  Q is the QR factor of a Gaussian matrix. Correcting the column signs by those
  of R's diagonal would make Q itself Haar-distributed (Mezzadri 2007, "How to
  generate random matrices from the classical compact groups"); it is left out
  because column signs cancel in :math:`Q \operatorname{diag}(\lambda) Q^\top`,
  which is all the problems use, so that matrix is already distributed as for a
  Haar-random Q. The Gaussian is drawn in float32 so that the result does not
  depend on whether x64 is enabled, and the QR runs in float64 so that the
  columns are orthonormal to float64 accuracy.
  """
  gaussian = jax.random.normal(key, (rows, cols), dtype=jnp.float32)
  return np.linalg.qr(np.asarray(gaussian, dtype=np.float64))[0]


def _checked_params(name: str, params: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``params`` as an array, or an error naming a non-float dtype or a wrong shape.

  The fixed data is cast to the params' dtype, so integer params would truncate it, and a
  short vector would broadcast silently. Shapes and dtypes are static: free under jit.
  """
  params = jnp.asarray(params)
  if not jnp.issubdtype(params.dtype, jnp.floating):
    raise TypeError(f"{name}: params must be floating point, got dtype {params.dtype}.")
  if params.shape != shape:
    raise ValueError(f"{name}: params must have shape {shape}, got {params.shape}.")
  return params


def _sorted_f64(values: Sequence[float] | np.ndarray) -> np.ndarray:
  return np.sort(np.asarray(values, dtype=np.float64))


def quadratic_saddle(
  eigenvalues: Sequence[float] | np.ndarray,
  *,
  rotation_key: jax.Array | int | None = None,
) -> Problem:
  r"""A quadratic with prescribed Hessian spectrum, optionally randomly rotated.

  .. math::

    f(x) = \tfrac12 x^\top Q \operatorname{diag}(\lambda) Q^\top x,

  where :math:`Q = I`, or a random orthogonal matrix drawn from
  ``rotation_key`` so that the eigenvectors are not the coordinate axes (the
  Hessian :math:`Q \operatorname{diag}(\lambda) Q^\top` is distributed as for
  a Haar-random :math:`Q`). The
  origin is the listed critical point, with Hessian eigenvalues ``eigenvalues``.
  Its stable set under gradient descent (with a step below
  :math:`2 / \max|\lambda|`) is the span of the columns of :math:`Q` that belong
  to the positive eigenvalues. Two classical instances are
  ``quadratic_saddle([2., -2.])`` (:math:`x^2 - y^2`) and
  ``quadratic_saddle([10., -2.])`` (:math:`5x^2 - y^2`, Dauphin et al. 2014).

  A quadratic has no degenerate saddles, so the origin's kind is decided from
  the signs of the eigenvalues alone: ``"minimum"`` if none is negative (a
  non-strict minimum when some are zero, since ``f`` is then flat along their
  eigenvectors), ``"maximum"`` if none is positive and some is negative, and
  ``"strict_saddle"`` otherwise. With zero eigenvalues every point of their
  eigenspace is also critical; only the origin is listed.

  Example:

    >>> import jax.numpy as jnp
    >>> from jaxsaddle import problems
    >>> problem = problems.quadratic_saddle([2.0, -2.0], rotation_key=0)
    >>> problem.critical_points[0].kind, problem.minimum_value
    ('strict_saddle', -inf)
    >>> float(problem.value_fn(jnp.zeros(2)))
    0.0

  Args:
    eigenvalues: the Hessian eigenvalues :math:`\lambda`, one per dimension.
    rotation_key: ``None`` for :math:`Q = I`, else a ``jax.random`` key or an
      integer seed for the random rotation.

  Returns:
    A :class:`Problem` on params of shape ``(len(eigenvalues),)``.
  """
  given = np.asarray(eigenvalues)
  # Strings and booleans convert to float64 silently ("1" to 1.0, True to 1.0); complex ones
  # fail with numpy's bare message.
  if given.dtype.kind not in "iuf":
    raise TypeError(
      f"quadratic_saddle: eigenvalues must be real numbers, got {eigenvalues!r} "
      f"(dtype {given.dtype})."
    )
  lam = given.astype(np.float64)
  if lam.ndim != 1 or lam.size == 0:
    raise ValueError(f"eigenvalues must be a non-empty 1-D sequence, got shape {lam.shape}.")
  if not np.all(np.isfinite(lam)):
    raise ValueError(f"eigenvalues must be finite, got {eigenvalues}.")
  dim = lam.size
  if rotation_key is None:
    rotation = np.eye(dim)
  else:
    rotation = _random_orthonormal_columns(_host_key("quadratic_saddle", rotation_key), dim, dim)

  def value_fn(x: jax.Array) -> jax.Array:
    x = _checked_params("quadratic_saddle", x, (dim,))
    coordinates = jnp.matmul(jnp.asarray(rotation, x.dtype).T, x, precision=_HIGHEST)
    return 0.5 * jnp.sum(jnp.asarray(lam, x.dtype) * coordinates**2)

  if lam.min() >= 0:
    kind = "minimum"
  elif lam.max() <= 0:
    kind = "maximum"
  else:
    kind = "strict_saddle"
  origin = CriticalPoint(np.zeros(dim), 0.0, _sorted_f64(lam), kind)
  return Problem(
    name="quadratic_saddle",
    value_fn=value_fn,
    init_shape=(dim,),
    critical_points=(origin,),
    minimum_value=-math.inf if lam.min() < 0 else 0.0,
  )


def strict_saddle() -> Problem:
  r"""The strict saddle :math:`f(x, y) = \tfrac12 x^2 + \tfrac14 y^4 - \tfrac12 y^2`.

  The origin is a strict saddle with Hessian :math:`\operatorname{diag}(1, -1)`;
  :math:`(0, \pm 1)` are the global minima, with value :math:`-\tfrac14` and
  Hessian :math:`\operatorname{diag}(1, 2)`. These are all its critical points.
  Gradient descent converges to the saddle exactly from the x-axis, a set of
  measure zero (Lee et al. 2016, "Gradient Descent Converges to Minimizers"),
  which makes it the smallest test of whether an optimizer escapes.

  Example:

    >>> from jaxsaddle import problems
    >>> problem = problems.strict_saddle()
    >>> [p.kind for p in problem.critical_points]
    ['strict_saddle', 'minimum', 'minimum']

  Returns:
    A :class:`Problem` on params of shape ``(2,)``.
  """

  def value_fn(xy: jax.Array) -> jax.Array:
    x, y = _checked_params("strict_saddle", xy, (2,))
    return 0.5 * x**2 + 0.25 * y**4 - 0.5 * y**2

  minimum_eigenvalues = _sorted_f64([1.0, 2.0])
  return Problem(
    name="strict_saddle",
    value_fn=value_fn,
    init_shape=(2,),
    critical_points=(
      CriticalPoint(np.zeros(2), 0.0, _sorted_f64([-1.0, 1.0]), "strict_saddle"),
      CriticalPoint(np.array([0.0, 1.0]), -0.25, minimum_eigenvalues, "minimum"),
      CriticalPoint(np.array([0.0, -1.0]), -0.25, minimum_eigenvalues.copy(), "minimum"),
    ),
    minimum_value=-0.25,
  )


def octopus_saddle_gap(
  positive_curvature: float = math.e,
  negative_curvature: float = 1.0,
  length_scale: float = math.e,
) -> float:
  r"""The drop :math:`\nu` in the octopus function from one saddle to the next.

  .. math::

    \nu = -g_1(2\tau) + 4L\tau^2 = \tfrac{13}{6}\gamma\tau^2 + \tfrac{37}{6}L\tau^2,

  with :math:`L` = ``positive_curvature``, :math:`\gamma` = ``negative_curvature``
  and :math:`\tau` = ``length_scale``; it is the constant that makes
  :func:`octopus` continuous where one coordinate hands over to the next.
  """
  return (13 * negative_curvature + 37 * positive_curvature) * length_scale**2 / 6


def octopus(
  dim: int,
  *,
  positive_curvature: float = math.e,
  negative_curvature: float = 1.0,
  length_scale: float = math.e,
) -> Problem:
  r"""The octopus function, on which gradient descent needs time exponential in ``dim``.

  Du, Jin, Lee, Jordan, Póczos and Singh, "Gradient Descent Can Take Exponential
  Time to Escape Saddle Points", NeurIPS 2017 (arXiv:1705.10412), equations
  (6)-(10) as transcribed in third-party MATLAB reference code. With
  :math:`L` = ``positive_curvature``, :math:`\gamma` = ``negative_curvature``,
  :math:`\tau` = ``length_scale``, :math:`\nu` from :func:`octopus_saddle_gap`
  and the splines

  .. math::

    g_1(a) &= -\gamma a^2 + \frac{-14L + 10\gamma}{3\tau}(a - \tau)^3
              + \frac{5L - 3\gamma}{2\tau^2}(a - \tau)^4, \\
    g_2(a) &= -\gamma - (L + \gamma)\left(10u^3 + 15u^4 + 6u^5\right),
              \quad u = (a - 2\tau)/\tau,

  let :math:`i` be the first (1-based) index with :math:`|x_i| \le 2\tau`. Then

  .. math::

    f(x) = \sum_{j<i} L(|x_j| - 4\tau)^2 + h(x_i, x_{i+1})
           + \sum_{j>i+1} L x_j^2 - (i-1)\nu,

  where :math:`h(x_i, x_{i+1}) = -\gamma x_i^2 + L x_{i+1}^2` if
  :math:`|x_i| \le \tau` and :math:`g_1(|x_i|) + g_2(|x_i|) x_{i+1}^2` if
  :math:`\tau < |x_i| \le 2\tau` (the :math:`x_{i+1}` term is absent when
  :math:`i = d`); if no coordinate has :math:`|x_i| \le 2\tau`,
  :math:`f(x) = \sum_j L(|x_j| - 4\tau)^2 - d\nu`.

  The paper defines :math:`f` on the tube where additionally
  :math:`|x_j| \le \tau` for all :math:`j > i`, and there it is :math:`C^2`
  (:math:`g_1` and :math:`g_2` match values, slopes and curvatures at
  :math:`\tau` and :math:`2\tau`). How the paper extends :math:`f` smoothly to
  :math:`\mathbb{R}^d` could not be checked. Here the formula above is used
  everywhere, except that :math:`x_{i+1}^2` in :math:`g_2(|x_i|) x_{i+1}^2` is
  capped at :math:`\tau^2`. Neither changes anything inside the tube. Outside it
  the result is finite, piecewise polynomial and bounded below by
  :math:`-d\nu`, but may jump where the index :math:`i` changes. In our float64
  runs with the defaults (:math:`L = \tau = e`, :math:`\gamma = 1`), starts in
  :math:`[-1, 1]^d`, :math:`d \le 6` and steps up to :math:`1/(2L)`, gradient
  descent never left the tube.

  Listed critical points (each has :math:`2^d` mirror images under
  :math:`x_j \to -x_j`): the chain of saddles
  :math:`4\tau(e_1 + \dots + e_k)`, :math:`k = 0, \dots, d - 1`, with value
  :math:`-k\nu` and Hessian eigenvalues :math:`-2\gamma` and :math:`2L`
  (:math:`d - 1` times), and the global minimum :math:`4\tau \mathbf{1}` with
  value :math:`-d\nu` and Hessian :math:`2L I`. For ``dim == 1`` the origin is
  a local maximum rather than a saddle.

  Near each saddle gradient descent contracts the trailing coordinates by
  :math:`1 - 2L\eta` per step while it escapes along one coordinate, so in
  float32 (and in float64 for larger ``dim``) they underflow to zero and
  descent stalls at a saddle for numerical, not geometric, reasons. Reproduce
  the exponential escape time in float64 with a moderate step.

  Example:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> from jaxsaddle import problems
    >>> problem = problems.octopus(3)
    >>> round(problem.minimum_value, 4)
    -419.6113
    >>> [round(p.value, 2) for p in problem.critical_points]
    [0.0, -139.87, -279.74, -419.61]
    >>> jax.jit(problem.value_fn)(jnp.zeros(3))
    Array(0., dtype=float32)

  Args:
    dim: the dimension :math:`d \ge 1` (the number of saddles in the chain).
    positive_curvature: :math:`L > 0`.
    negative_curvature: :math:`\gamma > 0`.
    length_scale: :math:`\tau > 0`.

  Returns:
    A :class:`Problem` on params of shape ``(dim,)``.
  """
  _checks.check_loop_length("octopus", "dim", dim)
  constants = {
    "positive_curvature": positive_curvature,
    "negative_curvature": negative_curvature,
    "length_scale": length_scale,
  }
  for name, value in constants.items():
    if _checks.concrete_float(value, "octopus", name) is None:
      # Its pieces and their constants are built on the host, as the problem is.
      raise TypeError(
        f"octopus: {name} must be concrete, got a traced value; build one problem per value "
        "in a Python loop."
      )
  if not all(math.isfinite(value) and value > 0 for value in constants.values()):
    raise ValueError(
      "positive_curvature, negative_curvature and length_scale must be positive and finite, got "
      f"{positive_curvature}, {negative_curvature} and {length_scale}."
    )
  big_l, gamma, tau = positive_curvature, negative_curvature, length_scale
  nu = octopus_saddle_gap(big_l, gamma, tau)

  def g1(a: jax.Array) -> jax.Array:
    s = a - tau
    return (
      -gamma * a**2
      + (-14 * big_l + 10 * gamma) / (3 * tau) * s**3
      + (5 * big_l - 3 * gamma) / (2 * tau**2) * s**4
    )

  def g2(a: jax.Array) -> jax.Array:
    u = (a - 2 * tau) / tau
    return -gamma - (big_l + gamma) * (10 * u**3 + 15 * u**4 + 6 * u**5)

  def value_fn(x: jax.Array) -> jax.Array:
    x = _checked_params("octopus", x, (dim,))
    a = jnp.abs(x)
    # The coordinates before the active index i have already escaped past 2 tau.
    num_escaped = jnp.sum(jnp.cumprod(a > 2 * tau))
    index = jnp.arange(dim)
    a_previous = jnp.concatenate([jnp.zeros_like(a[:1]), a[:-1]])
    # Squares are taken of x rather than |x| so that the Hessian at x = 0 is
    # exact under autodiff (the derivative of |x| at 0 is a convention).
    escaped = big_l * (a - 4 * tau) ** 2
    active = jnp.where(a <= tau, -gamma * x**2, g1(a))
    # Capped so that f stays bounded below off the tube, where |x_{i+1}| > tau
    # would otherwise let g2 < 0 drive f to -inf along x_{i+1}.
    after_active = jnp.where(
      a_previous <= tau, big_l * x**2, g2(a_previous) * jnp.minimum(x**2, tau**2)
    )
    waiting = big_l * x**2
    terms = jnp.where(
      index < num_escaped,
      escaped,
      jnp.where(
        index == num_escaped,
        active,
        jnp.where(index == num_escaped + 1, after_active, waiting),
      ),
    )
    return jnp.sum(terms) - num_escaped.astype(x.dtype) * nu

  saddle_kind = "strict_saddle" if dim > 1 else "maximum"
  saddle_eigenvalues = _sorted_f64([-2 * gamma] + [2 * big_l] * (dim - 1))
  saddles = tuple(
    CriticalPoint(
      point=np.concatenate([np.full(k, 4 * tau), np.zeros(dim - k)]),
      value=-k * nu,
      hessian_eigenvalues=saddle_eigenvalues.copy(),
      kind=saddle_kind,
    )
    for k in range(dim)
  )
  minimum = CriticalPoint(
    point=np.full(dim, 4 * tau),
    value=-dim * nu,
    hessian_eigenvalues=np.full(dim, 2 * big_l),
    kind="minimum",
  )
  return Problem(
    name=f"octopus(dim={dim})",
    value_fn=value_fn,
    init_shape=(dim,),
    critical_points=saddles + (minimum,),
    minimum_value=-dim * nu,
  )


def matrix_factorization(dim: int, rank: int, *, key: jax.Array | int = 0) -> Problem:
  r"""Symmetric low-rank matrix factorisation :math:`f(U) = \tfrac12 \|UU^\top - M\|_F^2`.

  Jin, Ge, Netrapalli, Kakade and Jordan, "How to Escape Saddle Points
  Efficiently", ICML 2017, section 4: all local minima are global and the
  strict-saddle assumptions of the paper hold. Here :math:`U \in \mathbb{R}^{d \times r}` and
  :math:`M = V \operatorname{diag}(s) V^\top`, where the orthonormal columns of
  :math:`V` span a uniformly random subspace and :math:`s` is uniform in
  :math:`[1, 2]`, sorted descending, both drawn from ``key``; so :math:`M` is
  PSD of rank :math:`r` with condition number at most 2 on its range.

  The factor :math:`\tfrac12` is our choice: the paper's exact scaling could
  not be checked. Using :math:`c \|UU^\top - M\|_F^2` instead multiplies every
  value and Hessian eigenvalue below by :math:`2c` and changes nothing else.

  Listed critical points:

  * :math:`U = 0`, with value :math:`\tfrac12 \sum_k s_k^2`. Its Hessian maps
    a direction :math:`H` to :math:`-2MH`, with eigenvalues :math:`-2 s_k`
    (each :math:`r` times) and :math:`0` (:math:`r(d - r)` times). It is a
    strict saddle when :math:`r < d`, since :math:`f` grows along
    :math:`V_\perp`; when :math:`r = d` the Hessian is negative definite and
    it is a local maximum.
  * :math:`U^\star = V \operatorname{diag}(\sqrt{s})`, a global minimum with
    value 0 (as is :math:`U^\star R` for every orthogonal :math:`R`). Writing
    a direction as :math:`VA + V_\perp B`, the Hessian quadratic form is
    :math:`\|U^\star H^\top + H U^\star{}^\top\|_F^2`, with eigenvalues
    :math:`2 s_k` (each :math:`d - r` times), :math:`4 s_k`,
    :math:`2(s_k + s_l)` for :math:`k < l`, and :math:`0`
    (:math:`r(r-1)/2` times, the rotations :math:`U^\star R`).

  The saddles :math:`V_S \operatorname{diag}(\sqrt{s_S})` for proper nonempty
  subsets :math:`S` of the columns are not listed.

  Example:

    >>> import jax.numpy as jnp
    >>> from jaxsaddle import problems
    >>> problem = problems.matrix_factorization(5, 2, key=0)
    >>> minimum = problem.critical_points[-1]
    >>> minimum.kind, abs(float(problem.value_fn(jnp.asarray(minimum.point)))) < 1e-5
    ('minimum', True)

  Args:
    dim: the size :math:`d` of :math:`M`.
    rank: the rank :math:`r` of :math:`M`, :math:`1 \le r \le d`.
    key: a ``jax.random`` key or an integer seed for :math:`V` and :math:`s`.

  Returns:
    A :class:`Problem` on params of shape ``(dim, rank)``.
  """
  _checks.check_loop_length("matrix_factorization", "dim", dim)
  _checks.check_loop_length("matrix_factorization", "rank", rank)
  if not 1 <= rank <= dim:
    raise ValueError(f"need 1 <= rank <= dim, got rank={rank}, dim={dim}.")
  basis_key, spectrum_key = jax.random.split(_host_key("matrix_factorization", key))
  basis = _random_orthonormal_columns(basis_key, dim, rank)
  uniform = jax.random.uniform(spectrum_key, (rank,), dtype=jnp.float32)
  spectrum = np.sort(1.0 + np.asarray(uniform, dtype=np.float64))[::-1]
  target = (basis * spectrum) @ basis.T

  def value_fn(u: jax.Array) -> jax.Array:
    u = _checked_params("matrix_factorization", u, (dim, rank))
    residual = jnp.matmul(u, u.T, precision=_HIGHEST) - jnp.asarray(target, u.dtype)
    return 0.5 * jnp.sum(residual**2)

  pair_sums = [spectrum[j] + spectrum[k] for j in range(rank) for k in range(j + 1, rank)]
  saddle = CriticalPoint(
    point=np.zeros((dim, rank)),
    value=0.5 * float(np.sum(spectrum**2)),
    hessian_eigenvalues=_sorted_f64(
      np.concatenate([np.repeat(-2 * spectrum, rank), np.zeros(rank * (dim - rank))])
    ),
    kind="strict_saddle" if rank < dim else "maximum",
  )
  minimum = CriticalPoint(
    point=basis * np.sqrt(spectrum),
    value=0.0,
    hessian_eigenvalues=_sorted_f64(
      np.concatenate(
        [
          np.repeat(2 * spectrum, dim - rank),
          4 * spectrum,
          2 * np.asarray(pair_sums),
          np.zeros(len(pair_sums)),
        ]
      )
    ),
    kind="minimum",
  )
  return Problem(
    name=f"matrix_factorization(dim={dim}, rank={rank})",
    value_fn=value_fn,
    init_shape=(dim, rank),
    critical_points=(saddle, minimum),
    minimum_value=0.0,
  )
