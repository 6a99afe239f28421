r"""Hessian-spectrum diagnostics: extreme eigenvalues, trace, density, degeneracy, saddles.

Everything here touches the Hessian :math:`H = \nabla^2 f(x)` of a scalar ``value_fn``
:math:`f` only through Hessian-vector products (:func:`jaxsaddle.curvature.hvp`) and, for the
trace, quadratic forms :math:`z^\top H z` taken as second directional derivatives, so it works
on any pytree of parameters, jits, and vmaps over random probes.

- :func:`hessian_extreme_eigenvalues`: the :math:`k` smallest and/or largest eigenvalues by
  Lanczos, with residual norms :math:`\|Hv - \theta v\|`.
- :func:`hessian_trace`: Hutchinson's estimator :math:`\operatorname{tr} H \approx \frac1m
  \sum_i z_i^\top H z_i` with Rademacher :math:`z_i`, or Hutch++, with a standard error.
- :func:`hessian_density`: stochastic Lanczos quadrature (SLQ). For a unit probe :math:`v`,
  :math:`m` Lanczos steps give the tridiagonal :math:`T_m = S \Theta S^\top`; the nodes
  :math:`\theta_j` and weights :math:`\tau_j = S_{0j}^2` form the Gauss quadrature rule of
  the spectral measure :math:`\mu_v = \sum_i (v^\top u_i)^2 \delta_{\lambda_i}`, exact for
  polynomials of degree :math:`< 2m` (Golub and Meurant). For normalised Rademacher or
  Gaussian probes :math:`\mathbb E\, v v^\top = I/n`, so :math:`\mathbb E \mu_v = \frac1n
  \sum_i \delta_{\lambda_i}`, the eigenvalue density; averaging over probes and smoothing
  with a Gaussian kernel gives

  .. math::

    \hat\phi(t) = \frac1P \sum_{p=1}^P \sum_{j=1}^m \tau_{pj}\,
      \frac{1}{\sqrt{2\pi}\sigma} e^{-(t - \theta_{pj})^2 / (2\sigma^2)}.

  :func:`spectral_moment` reads :math:`\operatorname{tr}(H^k)/n` off the nodes and weights.
- :func:`degeneracy`: the mass of the spectrum near zero and below zero, as in the
  "degenerate saddle" measurements of Sankar and Balasubramanian.
- :func:`semicircle_fit`: the Wigner semicircle that best fits the bulk of a spectrum, a
  Kolmogorov-Smirnov score, and the outliers (Sagun et al.'s bulk and outliers).
- :func:`classify_critical_point`: minimum, strict or degenerate saddle, not critical, or
  undetermined (too few Lanczos steps to tell).
- :func:`restrict` makes any of these per layer; :func:`dataset_value_fn` makes them use a
  whole dataset; :func:`monitor_curvature` tracks the extreme eigenvalues during training.

**Non-finite input.** A spectrum computed from a NaN or infinite loss, gradient,
Hessian-vector product or quadratic form is never returned as if it were valid. Called eagerly
(the check is concrete), the functions raise ``ValueError``; under ``jit`` or ``vmap``, every
floating-point output is NaN.

References:
  M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines", Comm. Statist. Simulation Comput. 19 (1990).
  R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: Optimal stochastic trace
  estimation", SOSA 2021 (arXiv:2010.09649).
  G. H. Golub and G. Meurant, "Matrices, Moments and Quadrature with Applications" (2010).
  S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
  quadrature", SIAM J. Matrix Anal. Appl. 38 (2017).
  L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large matrices", SIAM Review
  58 (2016).
  B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation into neural net optimization via
  Hessian eigenvalue density", ICML 2019 (arXiv:1901.10159).
  L. Sagun, U. Evci, V. U. Güney, Y. Dauphin, L. Bottou, "Empirical analysis of the Hessian of
  over-parametrized neural networks", arXiv:1706.04454 (2017).
  A. R. Sankar and V. N. Balasubramanian, "Are saddles good enough for deep learning?",
  arXiv:1706.02052 (2017).
  Y. Dauphin, R. Pascanu, C. Gulcehre, K. Cho, S. Ganguli, Y. Bengio, "Identifying and
  attacking the saddle point problem in high-dimensional non-convex optimization", NeurIPS
  2014 (arXiv:1406.2572).
  E. P. Wigner, "Characteristic vectors of bordered matrices with infinite dimensions", Ann.
  Math. 62 (1955).
  D. Féral and S. Péché, "The largest eigenvalue of rank one deformation of large Wigner
  matrices", Comm. Math. Phys. 272 (2007).
  R. Ge, F. Huang, C. Jin, Y. Yuan, "Escaping from saddle points: online stochastic gradient
  for tensor decomposition", COLT 2015 (arXiv:1503.02101).
  A. Anandkumar and R. Ge, "Efficient approaches for escaping higher order saddle points in
  non-convex optimization", COLT 2016 (arXiv:1602.05908).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxsaddle import spectrum
  >>> matrix = jnp.diag(jnp.array([-1.0, 0.0, 0.0, 2.0, 3.0]))
  >>> value_fn = lambda x: 0.5 * x @ matrix @ x
  >>> params = jnp.zeros(5)
  >>> pairs = spectrum.hessian_extreme_eigenvalues(
  ...   value_fn, params, num_steps=5, key=jax.random.key(0), which="both")
  >>> [round(float(x), 4) for x in pairs.eigenvalues]
  [-1.0, 3.0]
  >>> density = spectrum.hessian_density(
  ...   value_fn, params, key=jax.random.key(1), num_probes=64, num_steps=5)
  >>> mass = spectrum.degeneracy(density)
  >>> round(float(mass.near_zero_mass), 1), round(float(mass.negative_mass), 1)
  (0.4, 0.2)
  >>> result = spectrum.classify_critical_point(
  ...   lambda w: (w[0] * w[1] * w[2] - 1.0) ** 2, jnp.zeros(3), gradient_tol=1e-4,
  ...   eigenvalue_tol=1e-3, num_steps=3, key=jax.random.key(2))
  >>> result.kind_name
  'degenerate saddle'
"""

from jaxsaddle.spectrum._common import Estimate
from jaxsaddle.spectrum._common import ProbeDistribution
from jaxsaddle.spectrum._common import PyTree
from jaxsaddle.spectrum._common import ValueFn
from jaxsaddle.spectrum._critical_point import CRITICAL_POINT_KINDS
from jaxsaddle.spectrum._critical_point import CriticalPointReport
from jaxsaddle.spectrum._critical_point import classify_critical_point
from jaxsaddle.spectrum._density import SpectralDensity
from jaxsaddle.spectrum._density import hessian_density
from jaxsaddle.spectrum._density import spectral_moment
from jaxsaddle.spectrum._extreme import hessian_extreme_eigenvalues
from jaxsaddle.spectrum._monitor import MonitorCurvatureState
from jaxsaddle.spectrum._monitor import monitor_curvature
from jaxsaddle.spectrum._shape import Degeneracy
from jaxsaddle.spectrum._shape import SemicircleFit
from jaxsaddle.spectrum._shape import degeneracy
from jaxsaddle.spectrum._shape import semicircle_fit
from jaxsaddle.spectrum._trace import hessian_trace
from jaxsaddle.spectrum._value_fns import Restriction
from jaxsaddle.spectrum._value_fns import dataset_value_fn
from jaxsaddle.spectrum._value_fns import restrict

__all__ = (
  "classify_critical_point",
  "CRITICAL_POINT_KINDS",
  "CriticalPointReport",
  "dataset_value_fn",
  "Degeneracy",
  "degeneracy",
  "Estimate",
  "hessian_density",
  "hessian_extreme_eigenvalues",
  "hessian_trace",
  "monitor_curvature",
  "MonitorCurvatureState",
  "ProbeDistribution",
  "PyTree",
  "restrict",
  "Restriction",
  "semicircle_fit",
  "SemicircleFit",
  "spectral_moment",
  "SpectralDensity",
  "ValueFn",
)
