"""jaxsaddle: optax-compatible optimizers that escape saddle points, and curvature tools."""

from jaxsaddle import analysis
from jaxsaddle import curvature
from jaxsaddle import problems
from jaxsaddle import spectrum
from jaxsaddle.alias import PGDHyperparameters
from jaxsaddle.alias import lsgd
from jaxsaddle.alias import noisy_gd
from jaxsaddle.alias import perturbed_sgd
from jaxsaddle.alias import pgd
from jaxsaddle.alias import pgd_hyperparameters
from jaxsaddle.curvature import LanczosResult
from jaxsaddle.curvature import extreme_eigenpairs
from jaxsaddle.curvature import hvp
from jaxsaddle.curvature import lanczos
from jaxsaddle.curvature import linearize_hvp
from jaxsaddle.curvature import ritz_pairs
from jaxsaddle.negative_curvature import NegativeCurvatureDescentState
from jaxsaddle.negative_curvature import PAGDState
from jaxsaddle.negative_curvature import negative_curvature_descent
from jaxsaddle.negative_curvature import neon
from jaxsaddle.negative_curvature import neon2
from jaxsaddle.negative_curvature import pagd
from jaxsaddle.perturbation import AddIsotropicNoiseState
from jaxsaddle.perturbation import PerturbNearSaddleState
from jaxsaddle.perturbation import add_isotropic_noise
from jaxsaddle.perturbation import perturb_near_saddle
from jaxsaddle.second_order import CubicRegularizationState
from jaxsaddle.second_order import SaddleFreeNewtonState
from jaxsaddle.second_order import cubic_regularization
from jaxsaddle.second_order import saddle_free_newton
from jaxsaddle.smoothing import laplacian_smoothing
from jaxsaddle.spectrum import MonitorCurvatureState
from jaxsaddle.spectrum import monitor_curvature

__version__ = "0.1.0"

__all__ = (
  "AddIsotropicNoiseState",
  "CubicRegularizationState",
  "LanczosResult",
  "MonitorCurvatureState",
  "NegativeCurvatureDescentState",
  "PAGDState",
  "PGDHyperparameters",
  "PerturbNearSaddleState",
  "SaddleFreeNewtonState",
  "add_isotropic_noise",
  "analysis",
  "cubic_regularization",
  "curvature",
  "extreme_eigenpairs",
  "hvp",
  "lanczos",
  "laplacian_smoothing",
  "linearize_hvp",
  "monitor_curvature",
  "lsgd",
  "negative_curvature_descent",
  "neon",
  "neon2",
  "noisy_gd",
  "pagd",
  "perturb_near_saddle",
  "perturbed_sgd",
  "pgd",
  "pgd_hyperparameters",
  "problems",
  "ritz_pairs",
  "saddle_free_newton",
  "spectrum",
)
