r"""Attraction regions of saddle points: how many starting points converge to a saddle.

Near a critical point :math:`x^\star` an optimizer step is, to first order, a
linear map of the displacement :math:`x_t - x^\star`:

.. math::

  x_{t+1} - x^\star \approx M_t \, (x_t - x^\star), \qquad
  M_t = \partial_x \operatorname{step}_t(x^\star),

where :math:`\operatorname{step}_t` may depend on :math:`t` through the
optimizer state (a step-size or smoothing schedule). The set of starting points
from which the linear iteration :math:`x_{t+1} = M_t x_t` converges to 0 is a
linear subspace, the *stable subspace*; its dimension is the **attraction
dimension** of the saddle for that iteration (the dimension of the "attraction
region" of Kreusser, Osher and Wang). Gradient descent on
:math:`f(x) = \tfrac12 x^\top H x` has :math:`M_t = I - \eta H`; with
:math:`k` negative eigenvalues of :math:`H` and :math:`0 < \eta < 2/\rho(H)`
the attraction dimension is :math:`n - k`, so GD converges to the saddle only
from a set of measure zero (Lee et al.), yet from a subspace of dimension
:math:`n - 1` when :math:`k = 1`. Methods that avoid saddles by design aim at a
smaller attraction dimension.

The dimension is read from the **growth exponents**
:math:`\chi_1 \ge \dots \ge \chi_n` of the iteration, in nats per step: the
asymptotic rates :math:`\lim_T \tfrac1T \log \|M_{T-1} \cdots M_0 v\|` realised
by the directions :math:`v`. Directions with :math:`\chi_i < 0` converge, so the
attraction dimension is the number of negative exponents.

- Constant iteration (:math:`M_t = M`): :math:`\chi_i = \log|\lambda_i(M)|`.
- Periodic with period :math:`p`: :math:`\chi_i = \tfrac1p \log|\mu_i|`, with
  :math:`\mu_i` the Floquet multipliers, i.e. the eigenvalues of the monodromy
  matrix :math:`\Phi = M_{p-1} \cdots M_0`. See :func:`floquet_exponents`.
- General time-varying: the Lyapunov exponents, estimated over the finite
  horizon by QR iteration (Benettin et al.). See :func:`lyapunov_exponents`.

**Neutral directions.** An exponent within ``tol`` of 0 (e.g. a zero Hessian
eigenvalue under GD gives :math:`\lambda = 1`) is *neutral*: the linear
iteration neither converges nor diverges along it, and whether the nonlinear
iteration converges along it depends on higher-order terms (a centre manifold).
Neutral directions are not counted in the dimension, so for the nonlinear
iteration the attraction region has dimension between ``dimension`` and
``dimension + num_neutral`` (stable manifold theorem; with at least one positive
exponent it has measure zero either way, as Lee et al. use).

**Precision.** Use float64 (``with jax.enable_x64(True):``): eigenvalue and
Lyapunov-exponent counts near the unit circle need it, and the Monte-Carlo check
needs it to follow a trajectory inside the stable subspace for long (rounding
errors of size :math:`\epsilon` excite the unstable directions).

Example:

  >>> import jax.numpy as jnp
  >>> import optax
  >>> from jaxsaddle import analysis
  >>> hessian = jnp.diag(jnp.array([-1.0, 1.0, 2.0]))  # a saddle with one negative eigenvalue
  >>> matrices = analysis.iteration_matrices(optax.sgd(0.3), hessian, num_steps=4)
  >>> result = analysis.attraction_dimension(matrices)
  >>> result.dimension, result.method
  (2, 'constant')
  >>> [round(float(rate), 3) for rate in jnp.exp(result.exponents)]  # |1 - 0.3 lambda|
  [1.3, 0.7, 0.4]

References:
  Lee, Simchowitz, Jordan and Recht, `Gradient descent converges to minimizers
  <https://arxiv.org/abs/1602.04915>`_, COLT 2016.

  Kreusser, Osher and Wang, `A deterministic gradient-based approach to avoid
  saddle points <https://arxiv.org/abs/1901.06827>`_, European Journal of
  Applied Mathematics, 2022.

  Benettin, Galgani, Giorgilli and Strelcyn, Lyapunov characteristic exponents
  for smooth dynamical systems and for Hamiltonian systems; a method for
  computing all of them, Meccanica 15, 1980.
"""

import functools
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsaddle import _checks
from jaxsaddle import _random

Kind = Literal["auto", "constant", "periodic", "general"]
KINDS = ("auto", "constant", "periodic", "general")

_HIGHEST = jax.lax.Precision.HIGHEST


class AttractionDimension(NamedTuple):
  """The result of :func:`attraction_dimension`.

  Attributes:
    dimension: the number of exponents below ``-tol``: the dimension of the
      stable subspace, i.e. of the set of starting points from which the linear
      iteration converges to the saddle.
    num_neutral: the number of exponents with ``|chi| <= tol``, which neither
      converge nor diverge to first order (see the module docstring).
    exponents: the growth exponents in nats per step, shape ``(n,)``, sorted in
      decreasing order (``-inf`` for an exactly singular direction).
    method: ``"constant"``, ``"periodic"`` or ``"general"``: how the exponents
      were computed.
    period: the period used (1 for ``"constant"``), or None for ``"general"``.
    tol: the neutral tolerance that was applied.
    transient: the number of leading matrices (a warmup) that ``"auto"`` read as a
      transient before a constant or periodic tail; 0 otherwise.
  """

  dimension: int
  num_neutral: int
  exponents: jax.Array
  method: str
  period: int | None
  tol: float
  transient: int = 0


class MonteCarloAttraction(NamedTuple):
  """The result of :func:`monte_carlo_attraction`.

  Attributes:
    fraction: the fraction of starts with ``log_contraction <= log(tol)``.
    log_contraction: ``log(|x_T| / |x_0|)`` for every start, shape
      ``(num_starts,)``: very negative for starts that converge to the saddle,
      large for starts that leave it.
  """

  fraction: jax.Array
  log_contraction: jax.Array


def _check_symmetric(hessian) -> None:
  """Raises ValueError unless a concrete ``hessian`` is finite and symmetric up to rounding.

  A non-symmetric matrix is no Hessian: :math:`Hx` would not be the gradient of
  :math:`x^\top H x / 2`. Rounding is judged in the dtype the matrix was computed in, before
  any cast to ``params_dtype``.
  """
  concrete = np.asarray(hessian, np.float64)
  if not np.all(np.isfinite(concrete)):
    raise ValueError("iteration_matrices: hessian contains NaN or infinite entries.")
  dtype = jnp.result_type(hessian)
  eps = jnp.finfo(dtype).eps if jnp.issubdtype(dtype, jnp.floating) else 0.0
  asymmetry = np.max(np.abs(concrete - concrete.T), initial=0.0)
  # 100 ulps, but at most 1%: bfloat16's 100 ulps would pass an asymmetry of 78%.
  if asymmetry > min(100 * eps, 1e-2) * np.max(np.abs(concrete), initial=0.0):
    raise ValueError(
      f"iteration_matrices: hessian must be symmetric; |H - H^T| reaches {asymmetry:.3g}. "
      "Symmetrise it, (H + H.T) / 2, if the asymmetry is rounding."
    )


def iteration_matrices(
  tx: optax.GradientTransformation,
  hessian: jax.Array,
  num_steps: int,
  *,
  params_dtype: jnp.dtype | None = None,
) -> jax.Array:
  r"""The Jacobians of ``num_steps`` steps of an optax transform at a saddle.

  For the quadratic :math:`f(x) = \tfrac12 x^\top H x`, whose critical point is
  the origin, one step of ``tx`` is

  .. math::

    x \mapsto x + u_t(x), \qquad (u_t(x), s_{t+1}) =
      \texttt{tx.update}(H x, s_t, x, \text{value}=f(x), \text{grad}=Hx,
      \text{value\_fn}=f),

  and this returns :math:`M_t = I + \partial_x u_t(0)` for
  :math:`t = 0, \dots, T-1`, computed with ``jax.jacfwd``. The state
  :math:`s_t` is threaded along the trajectory that stays at the saddle,
  starting from ``tx.init(0)``, so schedules (step sizes, smoothing strengths)
  that depend on the step count make :math:`M_t` time-varying. For a general
  objective pass its Hessian at the saddle: the step's Jacobian there is the
  same, with the saddle moved to the origin (so transforms that read the params
  themselves, like weight decay, see the saddle at 0).

  Only transforms whose step is a map of the params alone are supported:

  - the saddle must be a fixed point (zero update at zero gradient), which
    rules out noise injection and perturbations (:func:`jaxsaddle.pgd`,
    :func:`jaxsaddle.noisy_gd`): they have no linearisation there;
  - the floating-point state must not depend on the gradient to first order,
    which rules out momentum and gradient averages (``optax.sgd(..., momentum=)``,
    ``optax.adam``). Their linearisation is a map of the joint (params, state)
    vector, and since the starting points form the slice ``state = init(x_0)``
    of that space, the attraction dimension of starting points is not the
    stable dimension of the joint matrices. Counters, keys, schedules and
    second moments (quadratic in the gradient) are fine.

  The step must also be differentiable at the saddle (no square root of a zero
  second moment, no Krylov space built from the zero gradient: for
  :func:`jaxsaddle.saddle_free_newton` pass the linearisation of its full-space form,
  :math:`I - \eta (|H| + \lambda I)^{-1} H`, to :func:`attraction_dimension` directly).
  A ``ValueError`` names the violated condition when the Jacobian comes out NaN or infinite.
  A step that JAX differentiates to 0 where it has no derivative is not detected:
  ``optax.scale_by_sign()`` gives :math:`M = I`, every direction neutral. The checks need
  concrete values, so
  call this outside ``jax.jit`` (it jits its own loop); under an outer ``jit`` they are
  skipped.

  Example:

    >>> import jax.numpy as jnp
    >>> import optax
    >>> from jaxsaddle import analysis
    >>> schedule = optax.linear_schedule(0.1, 0.3, transition_steps=2)
    >>> matrices = analysis.iteration_matrices(optax.sgd(schedule), jnp.eye(2), 3)
    >>> [round(float(entry), 3) for entry in matrices[:, 0, 0]]  # 1 - learning_rate(t)
    [0.9, 0.8, 0.7]

  Args:
    tx: any optax ``GradientTransformation`` (extra arguments are passed only
      to transforms that accept them).
    hessian: the symmetric Hessian :math:`H` at the saddle, shape ``(n, n)``.
      The params are the flat vector of shape ``(n,)``.
    num_steps: the number of steps :math:`T` (at least 1).
    params_dtype: the dtype of the params; defaults to the dtype of
      ``hessian``. float64 is recommended.

  Returns:
    The stacked Jacobians :math:`M_0, \dots, M_{T-1}`, shape ``(T, n, n)``.

  Raises:
    ValueError: for a non-square or non-symmetric ``hessian``, ``num_steps < 1``, or a
      ``tx`` that breaks one of the conditions above.
  """
  # Nested lists as arrays of their own precision (jnp.result_type cannot read them).
  hessian = hessian if hasattr(hessian, "dtype") else np.asarray(hessian)
  if params_dtype is not None and not jnp.issubdtype(params_dtype, jnp.floating):
    # Casting the Hessian to an integer dtype would truncate it.
    raise ValueError(f"iteration_matrices: params_dtype must be floating, got {params_dtype}.")
  if jnp.issubdtype(jnp.result_type(hessian), jnp.complexfloating):
    # Dropping the imaginary part would change the iteration.
    raise ValueError(f"iteration_matrices: hessian must be real, got {jnp.result_type(hessian)}.")
  given = hessian
  hessian = jnp.asarray(hessian, dtype=params_dtype)
  if not jnp.issubdtype(hessian.dtype, jnp.floating):
    hessian = hessian.astype(jnp.result_type(float))
  if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
    raise ValueError(f"iteration_matrices: hessian must be square, got shape {hessian.shape}.")
  if not isinstance(given, jax.core.Tracer):
    _check_symmetric(given)
  if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
    raise ValueError(f"iteration_matrices: num_steps must be an integer >= 1, got {num_steps}.")
  tx = optax.with_extra_args_support(tx)
  matrices, drifts, couplings = jax.jit(_linearise, static_argnums=(0, 2))(tx, hessian, num_steps)
  if isinstance(matrices, jax.core.Tracer):
    return matrices
  drifts, couplings = np.asarray(drifts), np.asarray(couplings)
  if np.any(np.isnan(drifts)):
    step = int(np.flatnonzero(np.isnan(drifts))[0])
    raise ValueError(
      f"iteration_matrices: at step {step} the update at the saddle is NaN: a NaN "
      "hyperparameter, or a traced one out of its range (jaxsaddle's transforms then make "
      "their updates NaN)?"
    )
  if np.any(drifts != 0):
    step = int(np.flatnonzero(drifts)[0])
    raise ValueError(
      "iteration_matrices: the saddle is not a fixed point of tx: at step "
      f"{step} its update at zero params and zero gradient has norm {drifts[step]:.3g}. "
      "Transforms that move the params without a gradient (noise, perturbations) have "
      "no linearisation at the saddle; analyse their deterministic part instead."
    )
  if np.any(couplings != 0):
    step = int(np.flatnonzero(couplings)[0])
    raise ValueError(
      "iteration_matrices: the floating-point state of tx depends on the params or the "
      f"gradient to first order (from step {step}), e.g. momentum or a gradient average. "
      "One step is then a linear map of the joint (params, state) vector, and the "
      "starting points (state = init(params)) are a slice of that space, so the stable "
      "dimension of a params-only Jacobian would be meaningless. Only transforms whose "
      "step is a map of the params alone are supported."
    )
  if not np.all(np.isfinite(matrices)):
    step = int(np.flatnonzero(~np.all(np.isfinite(matrices), axis=(1, 2)))[0])
    raise ValueError(
      f"iteration_matrices: the Jacobian of step {step} has NaN or Inf entries: tx is not "
      "differentiable at the saddle. Common causes: the square root of a zero second moment, "
      "as in optax.scale_by_rms(eps_in_sqrt=False) (put eps inside the square root); a Krylov "
      "method started from the zero gradient, as in jaxsaddle.saddle_free_newton (its "
      "full-space form linearises to I - learning_rate (|H| + damping I)^-1 H: build that "
      "matrix directly); or a NaN hyperparameter."
    )
  return matrices


def _linearise(
  tx: optax.GradientTransformationExtraArgs, hessian: jax.Array, num_steps: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Jacobians of the steps at the saddle, with the fixed-point and state-coupling defects."""
  saddle = jnp.zeros(hessian.shape[0], hessian.dtype)

  def value_fn(params: jax.Array) -> jax.Array:
    return 0.5 * jnp.vdot(params, jnp.matmul(hessian, params, precision=_HIGHEST))

  def linearise_step(state, _):
    def step(params):
      grad = jnp.matmul(hessian, params, precision=_HIGHEST)
      updates, new_state = tx.update(
        grad, state, params, value=value_fn(params), grad=grad, value_fn=value_fn
      )
      next_params = optax.apply_updates(params, updates)
      float_state = [
        leaf
        for leaf in jax.tree.leaves(new_state)
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact)
      ]
      return (next_params, float_state), (next_params, new_state)

    (jacobian, state_jacobians), (next_params, new_state) = jax.jacfwd(step, has_aux=True)(saddle)
    drift = jnp.linalg.norm(next_params)
    coupling = sum((jnp.sum(jnp.abs(j)) for j in state_jacobians), jnp.zeros((), hessian.dtype))
    return new_state, (jacobian, drift, coupling)

  _, outputs = jax.lax.scan(linearise_step, tx.init(saddle), length=num_steps)
  return outputs


@jax.jit
def floquet_exponents(matrices: jax.Array) -> jax.Array:
  r"""Per-step growth exponents of a periodic linear iteration, from one period.

  For :math:`x_{t+1} = M_{t \bmod p} x_t` these are
  :math:`\chi_i = \tfrac1p \log|\mu_i|`, with :math:`\mu_i` the eigenvalues of
  the monodromy matrix :math:`\Phi = M_{p-1} \cdots M_0` (the Floquet
  multipliers); for :math:`p = 1`, :math:`\chi_i = \log|\lambda_i(M_0)|`.

  The product :math:`\Phi` is never formed: its entries can over- or underflow,
  and even rescaled, rounding errors of relative size :math:`\epsilon` swamp
  every multiplier smaller than :math:`\epsilon \max_i |\mu_i|` (next to a
  multiplier :math:`3^{40}`, one of :math:`0.5^{40}` can come out with modulus
  above 1). Instead this takes the eigenvalues of the block-cyclic
  lifted matrix

  .. math::

    C = \begin{pmatrix} 0 & & & M_{p-1} \\ M_0 & 0 & & \\ & \ddots & \ddots & \\
      & & M_{p-2} & 0 \end{pmatrix} \in \mathbb R^{pn \times pn},

  whose :math:`p`-th power is block diagonal with blocks similar to
  :math:`\Phi`: its eigenvalues are the :math:`p`-th roots of the
  :math:`\mu_i`, so :math:`\log|\lambda(C)|` is the per-step exponent itself,
  at the scale of one factor. Each exponent appears :math:`p` times; the
  average of each group is returned. Cost: one nonsymmetric eigenvalue problem
  of size :math:`pn` (for long periods :func:`lyapunov_exponents` is cheaper),
  with ``jnp.linalg.eigvals``, which JAX implements on CPU and GPU but not TPU.

  Args:
    matrices: one period :math:`M_0, \dots, M_{p-1}`, shape ``(p, n, n)``, or
      a single matrix of shape ``(n, n)``.

  Returns:
    The exponents in nats per step, shape ``(n,)``, in decreasing order.
  """
  matrices = _as_stack(matrices, "floquet_exponents")
  period, dim, _ = matrices.shape
  lifted = jnp.zeros((period, dim, period, dim), matrices.dtype)
  steps = jnp.arange(period)
  lifted = lifted.at[(steps + 1) % period, :, steps, :].set(matrices)
  eigenvalues = jnp.linalg.eigvals(lifted.reshape(period * dim, period * dim))
  exponents = jnp.sort(jnp.log(jnp.abs(eigenvalues)))[::-1]
  return jnp.mean(exponents.reshape(dim, period), axis=1)


@jax.jit
def lyapunov_exponents(matrices: jax.Array) -> jax.Array:
  r"""Finite-horizon Lyapunov exponents of :math:`x_{t+1} = M_t x_t` by QR iteration.

  The QR method of Benettin et al.: with :math:`Q_0 = I`,

  .. math::

    Q_{t+1} R_{t+1} = M_t Q_t, \qquad
    \chi_i = \frac1T \sum_{t=1}^{T} \log |(R_t)_{ii}|,

  so that :math:`\sum_{i \le k} \chi_i` is the average growth rate of
  :math:`k`-dimensional volumes along the trajectory of the first :math:`k`
  columns. Re-orthonormalising at every step keeps all directions resolved
  (a plain product would collapse onto the fastest one) and never over- or
  underflows. As :math:`T \to \infty` the exponents converge to the Lyapunov
  spectrum (for a constant or periodic iteration, to the exponents of
  :func:`floquet_exponents`); at finite :math:`T` they carry a bias of order
  :math:`1/T` from the initial basis and transients.

  Jit-able; the loop is a ``jax.lax.scan`` over the matrices.

  Args:
    matrices: :math:`M_0, \dots, M_{T-1}`, shape ``(T, n, n)``.

  Returns:
    The exponents in nats per step, shape ``(n,)``, in decreasing order
    (``-inf`` where a matrix is exactly singular on the tracked subspace).
  """
  matrices = _as_stack(matrices, "lyapunov_exponents")

  def qr_step(basis, matrix):
    orthonormal, triangular = jnp.linalg.qr(jnp.matmul(matrix, basis, precision=_HIGHEST))
    return orthonormal, jnp.log(jnp.abs(jnp.diagonal(triangular)))

  identity = jnp.eye(matrices.shape[-1], dtype=matrices.dtype)
  _, log_growth = jax.lax.scan(qr_step, identity, matrices)
  return jnp.sort(jnp.mean(log_growth, axis=0))[::-1]


def attraction_dimension(
  matrices: jax.Array,
  *,
  kind: Kind = "auto",
  period: int | None = None,
  tol: float | None = None,
) -> AttractionDimension:
  r"""The dimension of the set of starting points from which a linear iteration converges to 0.

  For :math:`x_{t+1} = M_t x_t` (the linearisation of an optimizer at a saddle,
  e.g. from :func:`iteration_matrices`), computes the growth exponents
  :math:`\chi_i` and returns the number of exponents below ``-tol``: the
  dimension of the stable subspace.

  - ``"constant"``: :math:`\chi_i = \log|\lambda_i(M_0)|`; only
    ``matrices[0]`` is used.
  - ``"periodic"``: Floquet exponents of one period ``matrices[:period]`` (see
    :func:`floquet_exponents`); the rest of the stack is not read. With
    ``period=None`` the period is detected as for ``"auto"``.
  - ``"general"``: the Lyapunov exponents of the whole stack by QR iteration
    (see :func:`lyapunov_exponents`); use many steps.
  - ``"auto"``: ``"constant"`` when all matrices are equal, else
    ``"periodic"`` with the smallest period :math:`p` for which the stack
    repeats exactly (:math:`M_{t+p} = M_t` bitwise, with at least two full
    periods present). Otherwise, a stack that becomes constant or periodic after a
    transient (a learning-rate warmup) is read as that tail, when the transient's product
    is invertible, since it then maps the tail's stable subspace to one of the same
    dimension (``transient`` in the result says how many matrices were set aside); a
    singular one would add converging starts. Else ``"general"``.

  An exponent with :math:`|\chi_i| \le` ``tol`` is *neutral* and not counted:
  see the module docstring for what that means for the nonlinear iteration.

  Runs eagerly (it inspects the matrices); inside ``jax.jit`` use
  :func:`floquet_exponents` or :func:`lyapunov_exponents` directly.

  Example:

    >>> import jax.numpy as jnp
    >>> from jaxsaddle import analysis
    >>> expand_then_contract = jnp.stack([jnp.diag(jnp.array([2.0, 0.1])),
    ...                                   jnp.diag(jnp.array([0.1, 2.0]))])
    >>> result = analysis.attraction_dimension(jnp.tile(expand_then_contract, (3, 1, 1)))
    >>> result.dimension, result.method, result.period  # monodromy diag(0.2, 0.2)
    (2, 'periodic', 2)

  Args:
    matrices: the iteration matrices, shape ``(T, n, n)``, or one constant
      matrix of shape ``(n, n)``.
    kind: ``"auto"``, ``"constant"``, ``"periodic"`` or ``"general"``.
    period: the period for ``kind="periodic"``; must be None for other kinds.
    tol: the neutral tolerance on the exponents, in nats per step. Defaults to
      :math:`\epsilon^{1/3}` of the matrices' dtype (bfloat16 and float16 ones are
      analysed in float32 with their own tolerance) for the eigenvalue methods: rounding
      moves a semisimple eigenvalue on the unit circle by about :math:`\epsilon`
      and one in a Jordan block of size :math:`k` by about :math:`c\,
      \epsilon^{1/k}`, with :math:`c` the block's conditioning, so well-conditioned
      blocks of size 2 stay neutral but blocks of size 3 may not (16 of 100 random similarity
      transforms of one were miscounted in float64): pass a larger ``tol`` for
      defective iterations. Gradient descent and LSGD iterations are
      diagonalisable, but the default cannot resolve a step below about
      :math:`\epsilon^{1/3}` per unit of curvature (5e-3 in float32: gradient descent at
      a learning rate of 1e-3 reads neutral): analyse in float64
      (``iteration_matrices(..., params_dtype=jnp.float64)``, 6e-6) or pass a smaller
      ``tol`` when the matrices are accurate to their dtype.
      Defaults to :math:`1/T` for ``"general"``: over the horizon a neutral direction
      changes by less than a factor :math:`e`, which a finite-horizon estimate cannot tell
      from 0.

  Returns:
    An :class:`AttractionDimension`.

  Raises:
    ValueError: for bad shapes or arguments, a ``"periodic"`` stack without a
      detectable period, or matrices with NaN or Inf entries.
  """
  # The tolerance follows the precision the matrices were computed in, before any upcast.
  matrices = matrices if hasattr(matrices, "dtype") else np.asarray(matrices)
  given_dtype = jnp.result_type(matrices)
  matrices = _as_stack(matrices, "attraction_dimension")
  precision = given_dtype if jnp.issubdtype(given_dtype, jnp.floating) else matrices.dtype
  if kind not in KINDS:
    raise ValueError(f"attraction_dimension: kind must be one of {KINDS}, got {kind!r}.")
  if period is not None and kind != "periodic":
    raise ValueError(
      f"attraction_dimension: period is only used with kind='periodic', not {kind!r}."
    )
  host_matrices = np.asarray(matrices)
  if not np.all(np.isfinite(host_matrices)):
    raise ValueError("attraction_dimension: the matrices contain NaN or Inf entries.")
  num_steps = matrices.shape[0]
  transient = 0
  if kind == "auto":
    transient, period = _detect_period(host_matrices)
    kind = "general" if period is None else "constant" if period == 1 else "periodic"
  elif kind == "constant":
    period = 1
  elif kind == "periodic":
    if period is None:
      start, period = _detect_period(host_matrices)
      if period is None or start:
        raise ValueError(
          "attraction_dimension: no period found (M[t + p] == M[t] exactly, with at least two "
          "periods in the stack); pass period=, or use kind='general'."
        )
    if (
      isinstance(period, bool)
      or not isinstance(period, int | np.integer)
      or not 1 <= period <= num_steps
    ):
      raise ValueError(
        f"attraction_dimension: period must be an integer in [1, {num_steps}], got {period}."
      )
  if kind == "general":
    period = None
    exponents = lyapunov_exponents(matrices)
    default_tol = 1.0 / num_steps
  else:
    exponents = floquet_exponents(host_matrices[transient : transient + period])
    default_tol = float(jnp.finfo(precision).eps) ** (1 / 3)
  if tol is not None:
    _checks.check_nonnegative("attraction_dimension", "tol", tol)
  tol = default_tol if tol is None else float(tol)
  host_exponents = np.asarray(exponents)
  return AttractionDimension(
    dimension=int(np.sum(host_exponents < -tol)),
    num_neutral=int(np.sum(np.abs(host_exponents) <= tol)),
    exponents=exponents,
    method=kind,
    period=period,
    tol=tol,
    transient=transient,
  )


def monte_carlo_attraction(
  matrices: jax.Array,
  key: jax.Array | int,
  *,
  num_starts: int = 1024,
  slice_dim: int | None = None,
  slice_basis: jax.Array | None = None,
  slice_offset: jax.Array | None = None,
  tol: float = 1e-6,
) -> MonteCarloAttraction:
  r"""The fraction of random starts in a slice that a linear iteration brings to the saddle.

  Starts are :math:`x_0 = c + B u` with :math:`u \sim \mathcal N(0, I_k)`, in
  the affine slice :math:`c + \operatorname{span}(B)`; each is iterated through
  all the matrices (``(T, n, n)``, applied in order) and counts as converged
  when :math:`\|x_T\| \le \mathrm{tol} \, \|x_0\|`. The iterates are
  renormalised at every step, so diverging starts never overflow.

  This is an independent, sampling-based cross-check of
  :func:`attraction_dimension`. For a linear iteration the converging starts
  form the stable subspace :math:`W` exactly, so:

  - when :math:`\dim W < n`, a slice in general position (the default: a
    uniformly random :math:`k`-dimensional slice through a random point, for
    any :math:`k`) meets :math:`W` in a null set of the slice, and the fraction
    is 0. A fraction of 1 on the whole space (``slice_dim = n``) means
    :math:`\dim W = n`: the saddle attracts everything.
  - for a ``slice_basis`` of vectors in :math:`W` (and ``slice_offset`` in
    :math:`W`, by default the origin), the fraction is 1. A :math:`d`-dimensional
    subspace of :math:`W` found independently (e.g. the eigenvectors of
    :math:`H` with positive eigenvalues, for GD) certifies
    :math:`\dim W \ge d`.

  Together the two pin the dimension down. Finite-horizon caveat: rounding
  errors of size :math:`\epsilon` put every start slightly off :math:`W`, and
  the unstable directions amplify that by :math:`e^{\chi_1 T}`; a start in
  :math:`W` is seen to converge only when :math:`\epsilon e^{\chi_1 T}` stays
  below ``tol``, so choose :math:`T` long enough for the stable directions to
  contract and short enough for this, in float64. The actual saddle is just as
  unstable: a floating-point run of the optimizer drifts away from its stable
  set.

  Jit-able with ``num_starts`` and ``slice_dim`` static.

  Args:
    matrices: :math:`M_0, \dots, M_{T-1}`, shape ``(T, n, n)``.
    key: a typed key, a raw uint32 key or an int seed.
    num_starts: the number of random starts.
    slice_dim: :math:`k`, the dimension of a random slice (default :math:`n`);
      only when ``slice_basis`` is None.
    slice_basis: :math:`B`, shape ``(n, k)``, the directions of the slice; None
      for a uniformly random :math:`k`-dimensional subspace.
    slice_offset: :math:`c`, shape ``(n,)``. Default: a standard normal point
      when ``slice_basis`` is None (a random affine slice), the origin otherwise
      (the subspace spanned by ``slice_basis``).
    tol: the relative contraction below which a start counts as converged.

  Returns:
    A :class:`MonteCarloAttraction`.
  """
  owner = "monte_carlo_attraction"
  matrices = _as_stack(matrices, owner)
  dim = matrices.shape[-1]
  _checks.check_positive(owner, "tol", tol)
  _checks.check_loop_length(owner, "num_starts", num_starts)
  if not isinstance(matrices, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(matrices))):
    raise ValueError(f"{owner}: the matrices contain NaN or Inf entries.")
  if slice_dim is not None:
    _checks.check_loop_length(owner, "slice_dim", slice_dim)
  for name, value in (("slice_basis", slice_basis), ("slice_offset", slice_offset)):
    if value is not None and jnp.issubdtype(jnp.result_type(value), jnp.complexfloating):
      raise ValueError(f"{owner}: {name} must be real, got dtype {jnp.result_type(value)}.")
    if not isinstance(value, (type(None), jax.core.Tracer)) and not np.all(np.isfinite(value)):
      raise ValueError(f"{owner}: {name} contains NaN or Inf entries.")
  if slice_basis is None:
    slice_dim = dim if slice_dim is None else slice_dim
    if not 1 <= slice_dim <= dim:
      raise ValueError(f"monte_carlo_attraction: slice_dim must be in [1, {dim}], got {slice_dim}.")
  else:
    slice_basis = jnp.asarray(slice_basis, matrices.dtype)
    if slice_basis.ndim != 2 or slice_basis.shape[0] != dim or not 1 <= slice_basis.shape[1] <= dim:
      raise ValueError(
        f"monte_carlo_attraction: slice_basis must have shape ({dim}, k) with 1 <= k <= {dim}, "
        f"got {slice_basis.shape}."
      )
    rank = (
      None
      if isinstance(slice_basis, jax.core.Tracer)
      else np.linalg.matrix_rank(np.asarray(slice_basis, np.float64))
    )
    if rank is not None and rank < slice_basis.shape[1]:
      # Dependent columns span a smaller slice than its coordinates pretend: a zero basis put
      # every start at the origin and reported that all of them converge.
      raise ValueError(
        f"{owner}: the columns of slice_basis must be linearly independent, got rank {rank} "
        f"for {slice_basis.shape[1]} columns."
      )
    if slice_dim is not None and slice_dim != slice_basis.shape[1]:
      raise ValueError(
        f"monte_carlo_attraction: slice_dim={slice_dim} but slice_basis has "
        f"{slice_basis.shape[1]} columns; pass one of them."
      )
  if slice_offset is not None:
    slice_offset = jnp.asarray(slice_offset, matrices.dtype)
    if slice_offset.shape != (dim,):
      raise ValueError(
        f"monte_carlo_attraction: slice_offset must have shape ({dim},), got {slice_offset.shape}."
      )
  # The sampler draws for the whole space and does not depend on the slice, so it compiles
  # once per (num_starts, n); the slice is cut from the draw afterwards.
  directions, random_offset, coordinates = _random_slice(
    _random.canonicalize_key(key), num_starts=num_starts, dim=dim, dtype=matrices.dtype
  )
  return _monte_carlo_fraction(
    matrices,
    directions[:, :slice_dim] if slice_basis is None else slice_basis,
    random_offset if slice_basis is None else jnp.zeros_like(random_offset),
    coordinates,
    slice_offset,
    tol,
  )


@functools.partial(jax.jit, static_argnames=("num_starts", "dim", "dtype"))
def _random_slice(
  key: jax.Array, *, num_starts: int, dim: int, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """An orthonormal basis, a standard normal point and standard normal coordinates.

  For every k the first k columns of the basis span a uniformly random k-dimensional subspace:
  QR orthonormalises the Gaussian columns in order, so they are the QR factor of the first k
  Gaussian columns alone. One normal draw is cut into the three (one threefry call compiles
  several times faster than three).
  """
  draws = jax.random.normal(key, (dim * dim + dim + num_starts * dim,), dtype)
  directions = jnp.linalg.qr(draws[: dim * dim].reshape(dim, dim))[0]
  offset = draws[dim * dim : dim * dim + dim]
  coordinates = draws[dim * dim + dim :].reshape(num_starts, dim)
  return directions, offset, coordinates


@jax.jit
def _monte_carlo_fraction(
  matrices: jax.Array,
  slice_basis: jax.Array,
  default_offset: jax.Array,
  coordinates: jax.Array,
  slice_offset: jax.Array | None,
  tol: float,
) -> MonteCarloAttraction:
  offset = default_offset if slice_offset is None else slice_offset
  slice_coordinates = coordinates[:, : slice_basis.shape[1]]
  starts = offset + jnp.matmul(slice_coordinates, slice_basis.T, precision=_HIGHEST)
  log_contraction = _log_contraction(matrices, starts)
  fraction = jnp.mean((log_contraction <= jnp.log(tol)).astype(matrices.dtype))
  return MonteCarloAttraction(fraction=fraction, log_contraction=log_contraction)


def _log_contraction(matrices: jax.Array, starts: jax.Array) -> jax.Array:
  """``log(|M_{T-1} ... M_0 x| / |x|)`` for every row ``x`` of ``starts``, overflow-free."""

  def step(carry, matrix):
    directions, log_norm = carry
    images = jnp.matmul(directions, matrix.T, precision=_HIGHEST)
    norms = jnp.linalg.norm(images, axis=1)
    # An exactly annihilated start has converged: log 0 = -inf, and its direction stays 0.
    directions = images / jnp.where(norms > 0, norms, 1)[:, None]
    return (directions, log_norm + jnp.log(norms)), None

  norms = jnp.linalg.norm(starts, axis=1)
  # A start at the fixed point itself stays there: converged, log 0 = -inf (not 0 / 0).
  initial = (
    starts / jnp.where(norms > 0, norms, 1)[:, None],
    jnp.where(norms > 0, 0, -jnp.inf).astype(norms.dtype),
  )
  (_, log_contraction), _ = jax.lax.scan(step, initial, matrices)
  return log_contraction


def _as_stack(matrices: jax.Array, owner: str) -> jax.Array:
  """The matrices as a float ``(T, n, n)`` array; a single ``(n, n)`` matrix becomes ``T = 1``.

  Integers become the default float, and bfloat16 or float16 become float32: the
  eigenvalue and QR routines have no narrower kernels.
  """
  matrices = jnp.asarray(matrices)
  if jnp.issubdtype(matrices.dtype, jnp.complexfloating):
    # Dropping the imaginary part would change every modulus.
    raise ValueError(f"{owner}: the matrices must be real, got dtype {matrices.dtype}.")
  if not jnp.issubdtype(matrices.dtype, jnp.floating):
    matrices = matrices.astype(jnp.result_type(float))
  elif jnp.finfo(matrices.dtype).bits < 32:
    matrices = matrices.astype(jnp.float32)
  if matrices.ndim == 2:
    matrices = matrices[None]
  if matrices.ndim != 3 or matrices.shape[1] != matrices.shape[2] or matrices.shape[0] < 1:
    raise ValueError(
      f"{owner}: expected square matrices of shape (T, n, n) or (n, n), got {matrices.shape}."
    )
  return matrices


def _detect_period(matrices: np.ndarray) -> tuple[int, int | None]:
  """``(s, p)``: the fewest leading matrices ``s`` after which the stack repeats with period
  ``p`` (``M[t + p] == M[t]`` bitwise for ``t >= s``, with at least two full periods
  and two matrices following; ``(0, 1)`` for a single matrix), the smallest ``p`` for that
  ``s``; ``(0, None)`` when there is none, or when ``s > 0`` and the leading matrices' product
  is singular to working precision.

  A singular transient maps a subspace to 0, which would add converging starts that the
  tail's exponents do not count; with an invertible one the dimension is the tail's.
  """
  num_steps = matrices.shape[0]
  if num_steps == 1:
    return 0, 1
  # One integer per distinct matrix (bitwise), so that shifts compare integers, not matrices.
  first_seen: dict[bytes, int] = {}
  ids = np.array([first_seen.setdefault(matrix.tobytes(), len(first_seen)) for matrix in matrices])
  best = None
  for period in range(1, num_steps // 2 + 1):
    mismatches = np.flatnonzero(ids[:-period] != ids[period:])
    start = 0 if mismatches.size == 0 else int(mismatches[-1]) + 1
    if num_steps - start >= max(2 * period, 2) and (best is None or start < best[0]):
      best = (start, period)
  if best is None:
    return 0, None
  product = np.eye(matrices.shape[1])
  for matrix in matrices[: best[0]]:
    product = matrix.astype(np.float64) @ product
    product /= max(np.max(np.abs(product)), np.finfo(np.float64).tiny)  # cond is scale-free
  if best[0] and np.linalg.cond(product) > 1 / np.sqrt(np.finfo(matrices.dtype).eps):
    return 0, None
  return best
