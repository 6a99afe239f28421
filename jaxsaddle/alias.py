r"""Ready-made saddle-escaping optimizers built from jaxsaddle's transforms.

Example::

  import jax, jax.numpy as jnp, optax, jaxsaddle

  value_fn = lambda p: 0.5 * p[0] ** 2 + 0.25 * p[1] ** 4 - 0.5 * p[1] ** 2
  tx = jaxsaddle.pgd(0.1, perturbation_radius=0.1, gradient_threshold=1e-3,
                     escape_steps=50, escape_threshold=1e-4, key=0)
  params = jnp.zeros(2)
  state = tx.init(params)
  for _ in range(300):
    value, grads = jax.value_and_grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, value=value)
    params = optax.apply_updates(params, updates)
"""

import math
from typing import NamedTuple

import jax
import numpy as np
import optax

from jaxsaddle import _checks
from jaxsaddle import perturbation
from jaxsaddle import smoothing
from jaxsaddle.smoothing import Mode


def pgd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  perturbation_radius: float | jax.Array,
  gradient_threshold: float | jax.Array,
  escape_steps: int | jax.Array,
  escape_threshold: float | jax.Array | None = None,
  key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Perturbed gradient descent (Jin et al., ICML 2017, arXiv:1703.00887).

  .. math::

    x_t \leftarrow x_t + \xi_t,\ \xi_t \sim \mathcal U(B_0(r))
      \quad\text{if } \|\nabla f(x_t)\| \le g_{\rm thres}
      \text{ and } t - t_{\rm noise} > t_{\rm thres};
    \qquad x_{t+1} = x_t - \eta \nabla f(x_t),

  with :math:`t_{\rm noise}` the step of the last perturbation. The
  perturbation is applied as a call of its own, followed by the gradient step
  at the perturbed point on the next call. This is
  :func:`jaxsaddle.perturb_near_saddle` around
  ``optax.scale_by_learning_rate(learning_rate)``; read its docstring for the
  exact step accounting and the escape check (pass ``value=`` to ``update``).
  :func:`pgd_hyperparameters` gives the paper's constants.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule. A schedule passed here counts
      gradient steps only (the inner state stands still on perturbing calls); one injected by
      ``optax.inject_hyperparams`` counts every call, perturbing ones included.
    perturbation_radius: :math:`r`.
    gradient_threshold: :math:`g_{\rm thres}`.
    escape_steps: :math:`t_{\rm thres}`.
    escape_threshold: :math:`f_{\rm thres}`, or None to skip the escape check. When set,
      every ``update`` needs the loss as ``value=`` (a ``ValueError`` says so).
    key: a typed key, a raw uint32 key or an int seed.

  Returns:
    A ``GradientTransformationExtraArgs``.
  """
  learning_rate = _checks.checked_learning_rate("pgd", learning_rate)
  tx = perturbation._perturb_near_saddle(
    optax.scale_by_learning_rate(learning_rate),
    perturbation_radius=perturbation_radius,
    gradient_threshold=gradient_threshold,
    escape_steps=escape_steps,
    escape_threshold=escape_threshold,
    key=key,
    owner="pgd",
  )
  return _checks.public_transform(tx, nonnegative=[learning_rate])


def noisy_gd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  noise_scale: float | jax.Array,
  key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Noisy (stochastic) gradient descent of Ge, Huang, Jin and Yuan (COLT 2015).

  *Escaping From Saddle Points — Online Stochastic Gradient for Tensor
  Decomposition*, arXiv:1503.02101, Algorithm 1:

  .. math::

    x_{t+1} = x_t - \eta\,(g_t + \xi_t), \qquad
    \xi_t \sim \mathcal U(r\,S^{d-1}),

  noise uniform on the sphere of radius :math:`r` = ``noise_scale`` over the
  whole parameter vector, drawn afresh at every step. Descriptions of the
  paper's Algorithm 1 give noise uniform on the unit sphere (the algorithm box
  itself could not be checked), so ``noise_scale=1.0`` is that choice. The
  sphere, unlike a Gaussian, gives every step the same noise magnitude; use
  :func:`perturbed_sgd` for Gaussian noise.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    noise_scale: :math:`r \ge 0`.
    key: a typed key, a raw uint32 key or an int seed.

  Returns:
    A ``GradientTransformationExtraArgs``.
  """
  learning_rate = _checks.checked_learning_rate("noisy_gd", learning_rate)
  tx = optax.chain(
    perturbation._add_isotropic_noise(
      noise_scale, distribution="sphere", key=key, owner="noisy_gd"
    ),
    optax.scale_by_learning_rate(learning_rate),
  )
  return _checks.public_transform(tx, nonnegative=[learning_rate])


def perturbed_sgd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  noise_scale: float | jax.Array,
  key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Perturbed SGD of Jin, Netrapalli, Ge, Kakade and Jordan (J. ACM 2021).

  *On Nonconvex Optimization for Machine Learning: Gradients, Stochasticity,
  and Saddle Points*, arXiv:1902.04811:

  .. math::

    x_{t+1} = x_t - \eta\,(g(x_t; \theta_t) + \xi_t), \qquad
    \xi_t \sim \mathcal N\!\left(0, \tfrac{r^2}{d} I_d\right),

  Gaussian noise with :math:`\mathbb E\|\xi_t\|^2 = r^2` at every step, over
  the whole parameter vector of dimension :math:`d`.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    noise_scale: :math:`r \ge 0`.
    key: a typed key, a raw uint32 key or an int seed.

  Returns:
    A ``GradientTransformationExtraArgs``.
  """
  learning_rate = _checks.checked_learning_rate("perturbed_sgd", learning_rate)
  tx = optax.chain(
    perturbation._add_isotropic_noise(
      noise_scale, distribution="gaussian", key=key, owner="perturbed_sgd"
    ),
    optax.scale_by_learning_rate(learning_rate),
  )
  return _checks.public_transform(tx, nonnegative=[learning_rate])


class PGDHyperparameters(NamedTuple):
  """The constants of Jin et al. 2017, Algorithm 2 (names match :func:`pgd`)."""

  chi: float
  learning_rate: float
  perturbation_radius: float
  gradient_threshold: float
  escape_threshold: float
  escape_steps: int

  def pgd_kwargs(self) -> dict:
    """The arguments of :func:`pgd` (all fields but ``chi``).

    They include ``escape_threshold``, so the transform runs the escape check and its
    ``update`` needs the loss as ``value=``; drop the key to train without the check (inside
    a wrapper that does not forward ``value``, such as ``optax.lookahead``).
    """
    return {name: value for name, value in self._asdict().items() if name != "chi"}


def pgd_hyperparameters(
  *,
  smoothness: float,
  hessian_lipschitz: float,
  epsilon: float,
  failure_probability: float,
  loss_gap: float,
  dim: int,
  c: float = 1.0,
) -> PGDHyperparameters:
  r"""The hyperparameters of perturbed gradient descent from its theory.

  Jin et al. 2017, Algorithm 2, for an :math:`\ell`-smooth,
  :math:`\rho`-Hessian-Lipschitz :math:`f` with
  :math:`\Delta_f \ge f(x_0) - f^*`, target :math:`\epsilon`, failure
  probability :math:`\delta` and absolute constant :math:`c`:

  .. math::

    \chi = 3 \max\{\ln(d \ell \Delta_f / (c \epsilon^2 \delta)), 4\},\quad
    \eta = c/\ell,\quad
    r = \frac{\sqrt c}{\chi^2}\frac{\epsilon}{\ell},\quad
    g_{\rm thres} = \frac{\sqrt c}{\chi^2}\epsilon,\quad
    f_{\rm thres} = \frac{c}{\chi^3}\sqrt{\epsilon^3/\rho},\quad
    t_{\rm thres} = \frac{\chi}{c^2}\frac{\ell}{\sqrt{\rho\epsilon}}.

  ``escape_steps`` is :math:`\lceil t_{\rm thres} \rceil`, since the algorithm
  compares it with whole step counts.

  Example::

    import jaxsaddle

    hp = jaxsaddle.pgd_hyperparameters(smoothness=1.0, hessian_lipschitz=1.0,
        epsilon=1e-2, failure_probability=0.1, loss_gap=10.0, dim=100)
    tx = jaxsaddle.pgd(**hp.pgd_kwargs(), key=0)
  """
  owner = "pgd_hyperparameters"
  for name, value in [
    ("smoothness", smoothness),
    ("hessian_lipschitz", hessian_lipschitz),
    ("epsilon", epsilon),
    ("loss_gap", loss_gap),
    ("c", c),
  ]:
    _checks.check_positive(owner, name, value)
  # dim only enters a logarithm: no int32 cap (models pass 2**31 parameters).
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
    raise ValueError(f"{owner}: dim must be a positive integer, got {dim!r}.")
  failure_probability = _checks.concrete_float(failure_probability, owner, "failure_probability")
  if failure_probability is None or not 0 < failure_probability < 1:
    raise ValueError(f"{owner}: failure_probability must lie in (0, 1), got {failure_probability}.")
  try:
    chi = 3 * max(
      math.log(dim * smoothness * loss_gap / (c * epsilon**2 * failure_probability)), 4.0
    )
    t_thres = chi / c**2 * smoothness / math.sqrt(hessian_lipschitz * epsilon)
    hyperparameters = PGDHyperparameters(
      chi=chi,
      learning_rate=c / smoothness,
      perturbation_radius=math.sqrt(c) / chi**2 * epsilon / smoothness,
      gradient_threshold=math.sqrt(c) / chi**2 * epsilon,
      escape_threshold=c / chi**3 * math.sqrt(epsilon**3 / hessian_lipschitz),
      escape_steps=math.ceil(t_thres),
    )
  except (ZeroDivisionError, OverflowError, ValueError) as error:
    raise ValueError(
      f"{owner}: the constants are so extreme that the formulas over- or underflow ({error}); "
      "rescale the problem so that smoothness, hessian_lipschitz and epsilon are moderate."
    ) from error
  if not all(0 < value < math.inf for value in hyperparameters):
    raise ValueError(
      f"{owner}: the constants give hyperparameters that are zero or infinite in float64, "
      f"{hyperparameters}; rescale the problem."
    )
  if hyperparameters.escape_steps >= 2**31 - 1:
    # pgd counts steps in int32: a longer escape window could not be passed on to it.
    raise ValueError(
      f"{owner}: the constants give an escape window of {hyperparameters.escape_steps} steps, "
      "beyond the int32 step counter of pgd (2**31 - 1); rescale the problem."
    )
  return hyperparameters


def lsgd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  sigma: float | jax.Array = 1.0,
  order: int = 1,
  mode: Mode = "leaf",
  momentum: float | jax.Array | None = None,
  nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Laplacian smoothing (stochastic) gradient descent (Osher et al. 2018, arXiv:1806.06317).

  .. math::

    d_t = A_\sigma^{-1} g_t, \quad A_\sigma = I + (-1)^p \sigma L^p, \qquad
    m_{t+1} = \mu\, m_t + d_t, \qquad x_{t+1} = x_t - \eta\, m_{t+1},

  with :math:`L` the periodic 1-D discrete Laplacian and :math:`m` the momentum
  of ``optax.sgd`` (none when ``momentum`` is None, Nesterov's when
  ``nesterov``). The gradient is smoothed before the momentum, as in the
  reference code. :math:`A_\sigma^{-1}` damps the high-frequency components of
  the gradient, which reduces its variance and lets a larger step stay stable;
  :func:`jaxsaddle.laplacian_smoothing` describes the modes, the solvers and
  sharding.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    sigma: :math:`\sigma \ge 0` (0 gives ``optax.sgd``). The reference code's
      default for networks is 0.05. Injected by ``optax.inject_hyperparams``
      it is traced, which forces the slower FFT solver; list it in
      ``static_args`` unless it changes during training.
    order: :math:`p \ge 1`, a Python integer; list it in ``static_args`` of
      ``optax.inject_hyperparams``.
    mode: ``"leaf"`` (each parameter tensor flattened, the reference code's
      choice), ``"global"`` or ``"axis"``.
    momentum: :math:`\mu`, or None for plain gradient descent.
    nesterov: use Nesterov momentum.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Example::

    import jax, jax.numpy as jnp, optax, jaxsaddle

    value_fn = lambda x: 0.5 * jnp.sum(x * (2 * x - jnp.roll(x, 1) - jnp.roll(x, -1)))
    tx = jaxsaddle.lsgd(1.0, sigma=1.0)  # plain GD diverges at this step
    params = jnp.cos(jnp.arange(32.0))
    state = tx.init(params)
    for _ in range(100):
      updates, state = tx.update(jax.grad(value_fn)(params), state, params)
      params = optax.apply_updates(params, updates)
  """
  learning_rate = _checks.checked_learning_rate("lsgd", learning_rate)
  if momentum is not None:
    _checks.check_momentum("lsgd", momentum)
  elif nesterov:
    raise ValueError("lsgd: nesterov=True needs a momentum; pass momentum=0.9, for instance.")
  tx = optax.chain(
    smoothing._laplacian_smoothing(sigma, order=order, mode=mode, owner="lsgd"),
    optax.trace(decay=momentum, nesterov=nesterov) if momentum is not None else optax.identity(),
    optax.scale_by_learning_rate(learning_rate),
  )
  return _checks.public_transform(tx, nonnegative=[learning_rate], fractions=[momentum])
