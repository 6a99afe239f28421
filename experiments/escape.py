r"""Escape from an exact saddle: plain GD stays, PGD, noisy GD and perturbed SGD leave.

Every method starts *exactly* at a critical point that is not a minimum, where
the gradient is exactly zero, so plain gradient descent never moves. Each unit
is one method on one problem, with all seeds ``jax.vmap``-ped inside one
``jit``; the seed only selects the optimizer's PRNG key (the start, data and
problem are the same for every seed).

Problems:

- ``quadratic``: :math:`f(x) = \tfrac12 x^\top Q \Lambda Q^\top x + c \sum_i x_i^4`
  on :math:`\mathbb R^{100}`, from :func:`jaxsaddle.problems.quadratic_saddle`
  with a few negative eigenvalues and a random rotation :math:`Q`, started at
  the origin. A pure quadratic saddle is unbounded below, so the quartic
  confinement (:math:`c = 1/4`) gives it minima; it has no effect on the
  value, gradient or Hessian at the origin, which stays a strict saddle with
  value 0.
- ``mlp``: a bias-free tanh MLP (flax.nnx, 2-16-16-1) with every weight zero,
  fitting a synthetic odd regression target by mean squared error. With zero
  weights every hidden activation and every gradient is exactly zero, so the
  origin is a critical point. With two hidden layers the network output is
  cubic in the weights near zero, so the Hessian vanishes too: a degenerate
  (third-order) saddle, which the summary certifies by the loss going down
  along one of :math:`\pm t d`. ``nnx.split`` turns the model into a pure
  params pytree that the seeds vmap over.

Each problem also gets a ``saddle_check`` unit, computed once and kept on
resume: the loss, gradient norm and dense Hessian spectrum at the start.

A seed has *escaped* at the first step ``t`` whose loss is below
``saddle value - escape_drop``; the summary reports the fraction of seeds that
escaped and the median escape step over all seeds (a seed that never escapes
counts as infinitely late, so the median is "never" when half of them stay).
"""

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

import jaxsaddle
from experiments import _plots
from experiments import _runner
from jaxsaddle import problems

NAME = "escape"
SADDLE_CHECK = "saddle_check"
PROBLEMS = ("quadratic", "mlp")
METHODS = ("gd", "pgd", "noisy_gd", "perturbed_sgd")


@dataclasses.dataclass(frozen=True)
class QuadraticConfig:
  """The rotated quadratic saddle with quartic confinement.

  The Hessian at the origin has ``negative_eigenvalues`` and ``dim -
  len(negative_eigenvalues)`` positive ones evenly spaced over
  ``positive_eigenvalue_range``.
  """

  dim: int = 100
  negative_eigenvalues: tuple[float, ...] = (-1.0, -0.5, -0.25)
  positive_eigenvalue_range: tuple[float, float] = (0.5, 2.0)
  rotation_key: int = 0
  quartic_coefficient: float = 0.25
  learning_rate: float = 0.1
  escape_drop: float = 1e-2


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """The bias-free tanh MLP from all-zero weights on ``y = sin(2 x_1) - x_2 / 2``.

  The inputs are ``num_examples`` standard normal points in the plane drawn from
  ``data_key``. A network without biases and with an odd activation is an odd
  function of its input, so the target is odd too.
  """

  layer_sizes: tuple[int, ...] = (2, 16, 16, 1)
  num_examples: int = 256
  data_key: int = 0
  learning_rate: float = 0.2
  escape_drop: float = 1e-2


@dataclasses.dataclass(frozen=True)
class Config:
  """The escape experiment; the learning rate is per problem, shared by all methods.

  ``noise_scale`` is the radius of ``noisy_gd``'s sphere noise (1 is Ge et
  al.'s unit sphere) and the root-mean-square norm of ``perturbed_sgd``'s
  Gaussian noise, so the two inject noise of the same size.
  """

  seeds: int = 8
  steps: int = 400
  problems: tuple[str, ...] = PROBLEMS
  methods: tuple[str, ...] = METHODS
  pgd_perturbation_radius: float = 0.5
  pgd_gradient_threshold: float = 1e-3
  pgd_escape_steps: int = 50
  pgd_escape_threshold: float = 1e-3
  noise_scale: float = 1.0
  quadratic: QuadraticConfig = QuadraticConfig()
  mlp: MLPConfig = MLPConfig()
  band: _plots.Band = "minmax"
  fast_compile: bool = False  # XLA without optimisations (see experiments._runner)


def default_config(quick: bool = False) -> Config:
  """The full demo, or a CI-sized one (fewer seeds and steps) when ``quick``."""
  if quick:
    return Config(seeds=4, steps=150, fast_compile=True)
  return Config()


class EscapeProblem(NamedTuple):
  """A problem as the experiment uses it: an objective, its saddle, its step size."""

  name: str
  title: str
  value_fn: Callable[[Any], jax.Array]
  saddle: Any  # the params pytree at the saddle, where every seed starts
  learning_rate: float
  escape_drop: float


def quadratic_problem(config: QuadraticConfig) -> EscapeProblem:
  num_positive = config.dim - len(config.negative_eigenvalues)
  eigenvalues = np.concatenate(
    [config.negative_eigenvalues, np.linspace(*config.positive_eigenvalue_range, num_positive)]
  )
  saddle = problems.quadratic_saddle(eigenvalues, rotation_key=config.rotation_key)

  def value_fn(x: jax.Array) -> jax.Array:
    return saddle.value_fn(x) + config.quartic_coefficient * jnp.sum(x**4)

  return EscapeProblem(
    name="quadratic",
    title=(
      f"rotated quadratic saddle + {config.quartic_coefficient:g}·Σx⁴, d={config.dim}, "
      f"{len(config.negative_eigenvalues)} negative eigenvalues"
    ),
    value_fn=value_fn,
    saddle=jnp.zeros(saddle.init_shape),
    learning_rate=config.learning_rate,
    escape_drop=config.escape_drop,
  )


class BiasFreeMLP(nnx.Module):
  """A tanh MLP without biases whose weights all start at zero."""

  def __init__(self, layer_sizes: tuple[int, ...]):
    rngs = nnx.Rngs(0)  # unused by the zero initialiser, but nnx.Linear requires one
    self.layers = nnx.List(
      [
        nnx.Linear(fan_in, fan_out, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=rngs)
        for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:], strict=True)
      ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x)


def mlp_problem(config: MLPConfig) -> EscapeProblem:
  inputs = jax.random.normal(jax.random.key(config.data_key), (config.num_examples, 2))
  targets = jnp.sin(2 * inputs[:, :1]) - 0.5 * inputs[:, 1:]
  graphdef, params = nnx.split(BiasFreeMLP(config.layer_sizes), nnx.Param)

  def value_fn(params) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return 0.5 * jnp.mean((model(inputs) - targets) ** 2)

  sizes = "-".join(map(str, config.layer_sizes))
  return EscapeProblem(
    name="mlp",
    title=f"bias-free tanh MLP {sizes} from zero weights, {config.num_examples} examples",
    value_fn=value_fn,
    saddle=params,
    learning_rate=config.learning_rate,
    escape_drop=config.escape_drop,
  )


@functools.cache
def build_problem(name: str, config: Config) -> EscapeProblem:
  if name == "quadratic":
    return quadratic_problem(config.quadratic)
  if name == "mlp":
    return mlp_problem(config.mlp)
  raise ValueError(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}.")


def make_optimizer(
  method: str, learning_rate: float, key: jax.Array, config: Config
) -> optax.GradientTransformationExtraArgs:
  """The optimizer of ``method``; ``key`` may be traced (one per vmapped seed)."""
  if method == "gd":
    return optax.with_extra_args_support(optax.sgd(learning_rate))
  if method == "pgd":
    return jaxsaddle.pgd(
      learning_rate,
      perturbation_radius=config.pgd_perturbation_radius,
      gradient_threshold=config.pgd_gradient_threshold,
      escape_steps=config.pgd_escape_steps,
      escape_threshold=config.pgd_escape_threshold,
      key=key,
    )
  if method == "noisy_gd":
    return jaxsaddle.noisy_gd(learning_rate, noise_scale=config.noise_scale, key=key)
  if method == "perturbed_sgd":
    return jaxsaddle.perturbed_sgd(learning_rate, noise_scale=config.noise_scale, key=key)
  raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}.")


def method_hyperparameters(method: str, learning_rate: float, config: Config) -> dict[str, Any]:
  """The arguments ``make_optimizer`` passes, for the record."""
  if method == "gd":
    return {"optimizer": "optax.sgd", "learning_rate": learning_rate}
  if method == "pgd":
    return {
      "optimizer": "jaxsaddle.pgd",
      "learning_rate": learning_rate,
      "perturbation_radius": config.pgd_perturbation_radius,
      "gradient_threshold": config.pgd_gradient_threshold,
      "escape_steps": config.pgd_escape_steps,
      "escape_threshold": config.pgd_escape_threshold,
    }
  return {
    "optimizer": f"jaxsaddle.{method}",
    "learning_rate": learning_rate,
    "noise_scale": config.noise_scale,
  }


def train(
  problem: EscapeProblem, method: str, config: Config
) -> tuple[np.ndarray, np.ndarray | None, float]:
  """Runs every seed from the saddle for ``config.steps`` steps in one vmapped, jitted scan.

  Returns:
    ``(losses, num_perturbations, compile_seconds)``: the loss of every seed
    before step 0 and after each step, shape ``(seeds, steps + 1)``; PGD's
    perturbation count per seed at the end (None for the other methods); and
    the compile time.
  """

  def run_seed(seed: jax.Array):
    tx = make_optimizer(method, problem.learning_rate, jax.random.key(seed), config)
    value_and_grad = jax.value_and_grad(problem.value_fn)

    def step(carry, _):
      params, state = carry
      value, grads = value_and_grad(params)
      updates, state = tx.update(grads, state, params, value=value)
      return (optax.apply_updates(params, updates), state), value

    (params, state), losses = jax.lax.scan(
      step, (problem.saddle, tx.init(problem.saddle)), length=config.steps
    )
    losses = jnp.append(losses, problem.value_fn(params))
    return losses, optax.tree.get(state, "num_perturbations")

  seeds = jnp.arange(config.seeds)
  start = time.perf_counter()
  compiled = jax.jit(jax.vmap(run_seed)).lower(seeds).compile()
  compile_seconds = time.perf_counter() - start
  losses, num_perturbations = jax.block_until_ready(compiled(seeds))
  if num_perturbations is not None:
    num_perturbations = np.asarray(num_perturbations)
  return np.asarray(losses), num_perturbations, compile_seconds


def first_escape_steps(losses: np.ndarray, escape_level: float) -> list[int | None]:
  """Per seed, the first step whose loss is below ``escape_level``, or None."""
  below = losses < escape_level
  return [int(np.argmax(row)) if row.any() else None for row in below]


def median_escape_step(escape_steps: list[int | None]) -> float:
  """The median over seeds, with a seed that never escaped counting as infinitely late."""
  return float(np.median([math.inf if step is None else step for step in escape_steps]))


def compute_unit(config: Config, unit: str) -> tuple[list[dict], dict[str, Any]]:
  """Computes one ``problem/method`` or ``problem/saddle_check`` unit.

  Returns:
    The unit's per-step records and the fields of its closing record.
  """
  problem_name, method = unit.split("/")
  problem = build_problem(problem_name, config)
  if method == SADDLE_CHECK:
    # The figures and the summary read the title from here, so they need not rebuild the problem.
    return [], {"problem": problem_name, "title": problem.title, **saddle_facts(problem)}
  start = time.perf_counter()
  losses, num_perturbations, compile_seconds = train(problem, method, config)
  seconds = time.perf_counter() - start
  # Escapes are found on the values as they are stored (the shortest decimals of the float32
  # losses), so that anyone reading metrics.jsonl finds exactly the same escape steps.
  losses = np.asarray(_runner.to_json_floats(losses))
  saddle_value = _runner.to_json_floats(problem.value_fn(problem.saddle))
  escape_level = saddle_value - problem.escape_drop
  escape_steps = first_escape_steps(losses, escape_level)
  records = [{"step": step, "loss": losses[:, step].tolist()} for step in range(losses.shape[1])]
  median = median_escape_step(escape_steps)
  closing = {
    "problem": problem_name,
    "method": method,
    "hyperparameters": method_hyperparameters(method, problem.learning_rate, config),
    "seeds": list(range(config.seeds)),
    "saddle_value": saddle_value,
    "escape_level": escape_level,
    "escape_step": escape_steps,
    "escaped_fraction": sum(step is not None for step in escape_steps) / len(escape_steps),
    "median_escape_step": None if math.isinf(median) else median,
    "final_loss": losses[:, -1].tolist(),
    "compile_seconds": round(compile_seconds, 3),
    "seconds": round(seconds, 3),
  }
  if num_perturbations is not None:
    closing["num_perturbations"] = num_perturbations.tolist()
  return records, closing


def saddle_facts(problem: EscapeProblem, probe_distance: float = 0.5) -> dict[str, Any]:
  """Checks that the start is a critical point and not a minimum.

  The Hessian is dense (the problems are small). When it has no negative
  eigenvalue, the saddle is certified by a loss below the saddle value at
  ``saddle ± probe_distance * d`` for a random unit direction ``d``: near a
  degenerate saddle the leading term is odd in the displacement, so one of the
  two sides goes down.
  """
  flat_saddle, unravel = ravel_pytree(problem.saddle)

  def flat_value_fn(flat_params):
    return problem.value_fn(unravel(flat_params))

  @jax.jit
  def evaluate(flat_params, direction):
    value, gradient = jax.value_and_grad(flat_value_fn)(flat_params)
    probes = jnp.stack([flat_value_fn(flat_params + t * direction) for t in (1.0, -1.0)])
    return value, jnp.linalg.norm(gradient), jax.hessian(flat_value_fn)(flat_params), probes - value

  direction = jax.random.normal(jax.random.key(0), flat_saddle.shape)
  direction = probe_distance * direction / jnp.linalg.norm(direction)
  value, gradient_norm, hessian, probes = evaluate(flat_saddle, direction)
  eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
  probes = np.asarray(probes).tolist()
  tolerance = 1e-5 * max(1.0, float(np.abs(eigenvalues).max()))
  if eigenvalues[0] < -tolerance:
    classification = "strict saddle"
  elif min(probes) < 0:
    classification = "degenerate saddle (no negative curvature, but the loss goes down along ±t·d)"
  else:
    classification = "not shown to be a saddle"
  return {
    "value": float(value),
    "gradient_norm": float(gradient_norm),
    "num_params": int(flat_saddle.size),
    "hessian_min": float(eigenvalues[0]),
    "hessian_max": float(eigenvalues[-1]),
    "num_negative": int(np.sum(eigenvalues < -tolerance)),
    "probe_distance": probe_distance,
    "probes": probes,
    "classification": classification,
  }


def method_units(config: Config) -> list[str]:
  return [f"{problem}/{method}" for problem in config.problems for method in config.methods]


def unit_names(config: Config) -> list[str]:
  """Per problem: the check of its saddle (recorded once, reused on resume), then each method."""
  return [
    unit
    for problem in config.problems
    for unit in [f"{problem}/{SADDLE_CHECK}"] + [f"{problem}/{method}" for method in config.methods]
  ]


def losses_by_unit(run: _runner.RunDirectory) -> dict[str, np.ndarray]:
  """Each unit's ``(seeds, steps + 1)`` losses, read back from ``metrics.jsonl``."""
  steps: dict[str, dict[int, list[float]]] = {}
  for record in run.records():
    if "step" in record:
      steps.setdefault(record["unit"], {})[record["step"]] = record["loss"]
  return {
    unit: np.asarray([by_step[step] for step in sorted(by_step)]).T
    for unit, by_step in steps.items()
  }


def make_figures(run: _runner.RunDirectory, config: Config) -> list[str]:
  units = run.finished_units()
  losses = losses_by_unit(run)
  paths = []
  for problem in config.problems:
    closing = units[f"{problem}/{config.methods[0]}"]
    path = _plots.plot_curves_over_seeds(
      {method: losses[f"{problem}/{method}"] for method in config.methods},
      run.figures / f"{problem}.png",
      title=units[f"{problem}/{SADDLE_CHECK}"]["title"],
      band=config.band,
      levels=[
        (closing["saddle_value"], f"saddle value {closing['saddle_value']:.4g}"),
        (closing["escape_level"], f"escaped below {closing['escape_level']:.4g}"),
      ],
    )
    paths.append(str(path.relative_to(run.path)))
  return paths


def _format_step(step: float | None) -> str:
  return "never" if step is None else f"{step:g}"


def summary_table(run: _runner.RunDirectory, config: Config) -> str:
  units = run.finished_units()
  rows = []
  for unit in method_units(config):
    closing = units[unit]
    escaped = sum(step is not None for step in closing["escape_step"])
    perturbations = closing.get("num_perturbations")
    rows.append(
      [
        closing["method"],
        closing["problem"],
        f"{escaped}/{len(closing['escape_step'])}",
        _format_step(closing["median_escape_step"]),
        f"{np.median(closing['final_loss']):.4g}",
        "–" if perturbations is None else f"{np.median(perturbations):g}",
        f"{closing['seconds']:.1f} ({closing['compile_seconds']:.1f})",
      ]
    )
  header = [
    "method",
    "problem",
    "seeds escaped",
    "median escape step",
    "median final loss",
    "median perturbations",
    "seconds (compile)",
  ]
  return _runner.markdown_table(header, rows)


def summary(run: _runner.RunDirectory, config: Config, figures: list[str]) -> str:
  lines = [
    "# Escape from an exact saddle",
    "",
    f"{config.seeds} seeds x {config.steps} steps per method and problem; every seed starts "
    "exactly at the saddle, and the seed only selects the optimizer's key. A seed has escaped "
    "at the first step whose loss is below (saddle value - escape_drop); the median escape "
    "step is over all seeds, a seed that never escapes counting as infinitely late. "
    "Hyperparameters: config.json and the closing record of each unit in metrics.jsonl.",
    "",
    summary_table(run, config),
    "",
    "## The saddles",
    "",
  ]
  units = run.finished_units()
  for problem in config.problems:
    facts = units[f"{problem}/{SADDLE_CHECK}"]
    problem_config = getattr(config, problem)
    lines += [
      f"- **{problem}**: {facts['title']}; learning rate {problem_config.learning_rate:g}, "
      f"escape_drop {problem_config.escape_drop:g}. At the start: loss {facts['value']:.6g}, "
      f"gradient norm {facts['gradient_norm']:g}, Hessian eigenvalues in "
      f"[{facts['hessian_min']:.3g}, {facts['hessian_max']:.3g}] "
      f"({facts['num_negative']} of {facts['num_params']} negative); loss change at "
      f"±{facts['probe_distance']:g}·d along a random unit direction d: "
      f"{facts['probes'][0]:+.3g} / {facts['probes'][1]:+.3g}. "
      f"Classification: {facts['classification']}.",
    ]
  lines += ["", "## Figures", ""]
  lines += [f"![{path}]({path})" for path in figures]
  lines += [
    "",
    "## Notes",
    "",
    "- `noisy_gd` (sphere) and `perturbed_sgd` (Gaussian) draw the same standard normals for "
    "the same key and differ only in normalising them (by their norm, or by sqrt(d)), which "
    "agree closely in high dimension; with equal `noise_scale` their curves nearly coincide.",
    "- PGD perturbs whenever the gradient norm is at most `gradient_threshold` and more than "
    "`escape_steps` steps have passed since its last jump, wherever it is; the perturbation "
    "column counts every jump, the first one (at the saddle, step 0) included.",
    "",
  ]
  return "\n".join(lines)


def check_config(config: Config) -> None:
  """Raises ValueError for a config the run would fail on; the CLI calls it before writing."""
  _runner.check_seeds_and_steps(config)
  _runner.check_known("problems", config.problems, PROBLEMS)
  _runner.check_known("methods", config.methods, METHODS)


def run(run_dir: _runner.RunDirectory) -> str:
  """Computes the missing units, then writes the figures and summary; returns the table."""
  return _runner.run_experiment(run_dir, sys.modules[__name__])
