r"""Escape time against dimension on toy saddles, for every escape method in jaxsaddle.

Two problems in float64, each in dimensions ``dims``:

- ``quadratic``: :math:`f(x) = \tfrac12 x^\top \Lambda x + c \sum_i x_i^4` with
  :math:`\Lambda = \mathrm{diag}(-1, 1, \dots, 1)` (quartic confinement gives it
  minima; the origin stays a strict saddle with value 0). A seed has escaped at
  the first step whose loss is below ``-escape_drop``.
- ``octopus``: the function of Du et al. (2017), on which gradient descent needs
  time exponential in :math:`d` to pass its chain of :math:`d` saddles. A seed
  has escaped when every :math:`|x_j|` is within 0.1 of :math:`4\tau` (the global
  minimum, after the last saddle).

Every method starts from the same points: the saddle at the origin plus a
uniform draw from the box :math:`[-s, s]^d` (``start_spread``, per problem;
Du et al. start the octopus in :math:`[-1, 1]^d`), one per seed. The seed also
keys the method's noise. Each unit is one (problem, dimension, method) with the
seeds vmapped inside one ``jit``; the loop stops when every seed has escaped or
after ``max_steps`` steps, and a seed that has not escaped by then is *censored*
(reported as "> max_steps"). ``oracle_calls`` in the closing records holds each
seed's oracle calls up to its escape (or the censoring): one gradient per step,
plus :func:`experiments._oracle.curvature_call_cost` per curvature call: a
Lanczos call of ``d`` steps (``sfn`` makes one every step, ``ncd`` where the
gradient is small) or a gradient-difference search of ``d`` steps (``neon`` and
``neon2``, where the gradient is small).

Methods: ``gd`` (``optax.sgd``), ``pgd``, ``noisy_gd``, ``perturbed_sgd``,
``lsgd`` (Laplacian smoothing, deterministic), ``ncd``
(:func:`jaxsaddle.negative_curvature_descent`), ``neon`` and ``neon2`` (the same
curvature steps, their directions from gradient differences: the power method
and Chebyshev's recurrence) and ``sfn`` (:func:`jaxsaddle.saddle_free_newton`),
all with the same learning rate per problem except ``sfn``, whose step
:math:`|H|^{-1} g` is already scaled by the curvature and takes
``sfn_learning_rate``. ``neon`` and ``neon2`` take the largest Hessian
eigenvalue at the saddle as their ``smoothness``.

The octopus's saddles have the spectrum :math:`\{-2, 2e\}` exactly, with
:math:`\ell = 2e`: one power step on :math:`I - H/\ell` annihilates the curvature
:math:`2e`, so ``neon`` finds the negative direction exactly and escapes with
``ncd``, while :math:`|T_K(-1)| = 1` leaves some of it in ``neon2``'s direction
after :math:`d` steps, whose curvature steps then go partly astray (a full run:
median escape at step 114 against 98 at :math:`d = 2`, equal at :math:`d = 10`).
Chebyshev's advantage is on spectra spread over :math:`[0, \ell]`.
"""

import dataclasses
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsaddle
from experiments import _oracle
from experiments import _plots
from experiments import _runner
from jaxsaddle import problems
from jaxsaddle import smoothing

NAME = "escape-toy"
METHODS = ("gd", "pgd", "noisy_gd", "perturbed_sgd", "lsgd", "ncd", "neon", "neon2", "sfn")
# The state field counting the curvature calls of the methods that make them only where the
# gradient is small.
CALL_COUNTERS = {"ncd": "num_lanczos_calls", "neon": "num_searches", "neon2": "num_searches"}
PROBLEMS = ("quadratic", "octopus")


@dataclasses.dataclass(frozen=True)
class Config:
  """Escape time against dimension.

  The learning rates are ``1 / (4 L)`` with ``L`` the largest Hessian
  eigenvalue at the saddle (1 for the quadratic, ``2e`` for the octopus), which
  keeps float64 GD on the octopus from underflowing its trailing coordinates in
  the dimensions where it can escape at all.
  """

  seeds: int = 8
  steps: int = 100_000  # the most steps per seed (censoring)
  dims: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9, 10)
  problems: tuple[str, ...] = PROBLEMS
  methods: tuple[str, ...] = METHODS
  quadratic_start_spread: float = 1e-6
  quadratic_quartic: float = 0.25
  octopus_start_spread: float = 1.0
  escape_drop: float = 1e-2
  pgd_radius_factor: float = 0.1  # radius = factor * length scale (1 or tau)
  pgd_gradient_threshold: float = 1e-2
  pgd_escape_time: float = 10.0  # escape_steps = escape_time / learning_rate
  noise_scale: float = 0.1
  lsgd_sigma: float = 1.0
  hessian_lipschitz: float = 1.0
  ncd_epsilon: float = 1e-2
  sfn_damping: float = 0.1
  sfn_learning_rate: float = 0.5  # a damped Newton step: |H|^-1 sets its scale, not 1 / L
  fast_compile: bool = False  # XLA without optimisations (see experiments._runner)


def default_config(quick: bool = False) -> Config:
  """The full sweep, or a CI-sized one (d = 2 and 4, fewer seeds and steps) when ``quick``."""
  if quick:
    return Config(seeds=3, steps=20_000, dims=(2, 4), fast_compile=True)
  return Config()


class ToyProblem:
  """A problem at one dimension: its value, start box, step size and escape test."""

  def __init__(self, name: str, dim: int, config: Config):
    self.name, self.dim = name, dim
    if name == "quadratic":
      eigenvalues = np.concatenate([[-1.0], np.ones(dim - 1)])
      quadratic = problems.quadratic_saddle(eigenvalues)
      quartic = config.quadratic_quartic
      self.value_fn = lambda x: quadratic.value_fn(x) + quartic * jnp.sum(x**4)
      self.spread, self.scale, self.smoothness = config.quadratic_start_spread, 1.0, 1.0
      self.saddle_value = 0.0
      self.minimum = None
    elif name == "octopus":
      octopus = problems.octopus(dim)
      self.value_fn = octopus.value_fn
      self.spread, self.scale = config.octopus_start_spread, math.e
      self.smoothness = float(np.max(octopus.critical_points[0].hessian_eigenvalues))
      self.saddle_value = float(octopus.critical_points[0].value)
      self.minimum = np.abs(octopus.critical_points[-1].point)
    else:
      raise ValueError(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}.")
    self.learning_rate = 1 / (4 * self.smoothness)
    self.escape_drop = config.escape_drop

  def escaped(self, x: jax.Array) -> jax.Array:
    if self.minimum is None:
      return self.value_fn(x) < self.saddle_value - self.escape_drop
    return jnp.max(jnp.abs(jnp.abs(x) - self.minimum)) <= 0.1


def make_optimizer(method: str, problem: ToyProblem, key, config: Config):
  """The optimizer of ``method`` and its curvature calls per step (None: read from its state,
  under ``CALL_COUNTERS[method]``)."""
  rate, dim = problem.learning_rate, problem.dim
  if method == "gd":
    return optax.with_extra_args_support(optax.sgd(rate)), 0
  if method == "pgd":
    tx = jaxsaddle.pgd(
      rate,
      perturbation_radius=config.pgd_radius_factor * problem.scale,
      gradient_threshold=config.pgd_gradient_threshold,
      escape_steps=max(1, round(config.pgd_escape_time / rate)),
      key=key,
    )
    return tx, 0
  if method == "noisy_gd":
    return jaxsaddle.noisy_gd(rate, noise_scale=config.noise_scale, key=key), 0
  if method == "perturbed_sgd":
    return jaxsaddle.perturbed_sgd(rate, noise_scale=config.noise_scale, key=key), 0
  if method == "lsgd":
    return jaxsaddle.lsgd(rate, sigma=config.lsgd_sigma), 0
  if method == "ncd":
    tx = jaxsaddle.negative_curvature_descent(
      rate,
      hessian_lipschitz=config.hessian_lipschitz,
      epsilon=config.ncd_epsilon,
      num_lanczos_steps=dim,
      key=key,
    )
    return tx, None  # Lanczos runs only where the gradient is small: its state counts the calls
  if method in ("neon", "neon2"):
    tx = getattr(jaxsaddle, method)(
      rate,
      hessian_lipschitz=config.hessian_lipschitz,
      epsilon=config.ncd_epsilon,
      smoothness=problem.smoothness,
      num_search_steps=dim,
      key=key,
    )
    return tx, None
  if method == "sfn":
    # Deterministic: it needs no key, and from an exact saddle (zero gradient) it does not move.
    tx = jaxsaddle.saddle_free_newton(
      config.sfn_learning_rate, num_lanczos_steps=dim, damping=config.sfn_damping
    )
    return tx, 1
  raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}.")


def escape_steps(problem: ToyProblem, method: str, config: Config) -> dict[str, np.ndarray]:
  """Runs every seed until all escaped or ``config.steps``; returns per-seed steps and costs."""
  value_and_grad = jax.value_and_grad(problem.value_fn)

  def run_seed(seed):
    key = jax.random.key(seed)
    start_key, optimizer_key = jax.random.split(key)
    start = jax.random.uniform(
      start_key, (problem.dim,), jnp.float64, -problem.spread, problem.spread
    )
    tx, _ = make_optimizer(method, problem, optimizer_key, config)
    return start, tx.init(start)

  def step(params, state):
    tx, _ = make_optimizer(method, problem, 0, config)
    value, grads = value_and_grad(params)
    updates, state = tx.update(grads, state, params, value=value, value_fn=problem.value_fn)
    return optax.apply_updates(params, updates), state

  def curvature_calls(state):
    no_calls = jnp.zeros(config.seeds, jnp.int32)
    if method not in CALL_COUNTERS:
      return no_calls
    return optax.tree.get(state, CALL_COUNTERS[method], default=no_calls)

  def run_all(seeds):
    params, state = jax.vmap(run_seed)(seeds)
    done = jax.vmap(problem.escaped)(params)
    steps = jnp.where(done, 0, -1)

    def unfinished(carry):
      _, _, steps, _, count = carry
      return jnp.any(steps < 0) & (count < config.steps)

    def body(carry):
      params, state, steps, calls, count = carry
      params, state = jax.vmap(step)(params, state)
      count = count + 1
      running = steps < 0
      # A seed's curvature calls up to its escape; those made while others run on are not its
      # cost.
      calls = jnp.where(running, curvature_calls(state), calls)
      steps = jnp.where(running & jax.vmap(problem.escaped)(params), count, steps)
      return params, state, steps, calls, count

    carry = (params, state, steps, curvature_calls(state), 0)
    params, state, steps, calls, _ = jax.lax.while_loop(unfinished, body, carry)
    return steps, jax.vmap(problem.value_fn)(params), calls

  with jax.enable_x64(True):
    steps, final_values, calls = jax.jit(run_all)(jnp.arange(config.seeds))
    steps, final_values, calls = np.asarray(steps), np.asarray(final_values), np.asarray(calls)
  _, calls_per_step = make_optimizer(method, problem, 0, config)
  taken = np.where(steps < 0, config.steps, steps)
  if calls_per_step is not None:
    calls = taken * calls_per_step
  oracle = taken + _oracle.curvature_call_cost(method, problem.dim) * calls
  return {"steps": steps, "final_value": final_values, "oracle_calls": oracle}


def compute_unit(config: Config, unit: str) -> tuple[list[dict], dict[str, Any]]:
  problem_name, dim, method = unit.split("/")
  problem = ToyProblem(problem_name, int(dim), config)
  start = time.perf_counter()
  result = escape_steps(problem, method, config)
  steps = [None if s < 0 else int(s) for s in result["steps"]]
  closing = {
    "problem": problem_name,
    "dim": int(dim),
    "method": method,
    "learning_rate": problem.learning_rate,
    "escape_step": steps,
    "escaped_fraction": sum(s is not None for s in steps) / len(steps),
    "median_escape_step": _median(steps),
    "oracle_calls": _runner.to_json_floats(result["oracle_calls"]),
    "final_value": _runner.to_json_floats(result["final_value"]),
    "seconds": round(time.perf_counter() - start, 3),
  }
  records = [
    {
      "seed": seed,
      "escape_step": step,
      "oracle_calls": closing["oracle_calls"][seed],
      "final_value": closing["final_value"][seed],
    }
    for seed, step in enumerate(steps)
  ]
  return records, closing


def _median(steps: list[int | None]) -> float | None:
  median = float(np.median([math.inf if s is None else s for s in steps]))
  return None if math.isinf(median) else median


def unit_names(config: Config) -> list[str]:
  return [f"{p}/{d}/{m}" for p in config.problems for d in config.dims for m in config.methods]


def censored(steps: list[int | None], limit: int) -> np.ndarray:
  return np.asarray([limit if s is None else s for s in steps], np.float64)


def make_figures(run: _runner.RunDirectory, config: Config) -> list[str]:
  """Escape steps and oracle calls against dimension; a censored seed is drawn at its count
  when the run stopped (``config.steps`` steps), so a censored median is a lower bound."""
  units = run.finished_units()
  measures = (
    (
      "escape_time.png",
      "escape time",
      "steps to escape",
      lambda closing: censored(closing["escape_step"], config.steps),
    ),
    (
      "escape_oracle_calls.png",
      "oracle calls to escape",
      "oracle calls (gradient = 1)",
      lambda closing: np.asarray(closing["oracle_calls"], np.float64),
    ),
  )
  figures = []
  for file_name, title, ylabel, measure in measures:
    panels = {
      problem: {
        method: np.stack(
          [measure(units[f"{problem}/{d}/{method}"]) for d in config.dims],
          axis=1,
        )
        for method in config.methods
      }
      for problem in config.problems
    }
    path = _plots.plot_panels(
      panels,
      run.figures / file_name,
      title=f"{title} against dimension (censored at {config.steps} steps)",
      ylabel=ylabel,
      xlabel="dimension d",
      x=np.asarray(config.dims),
      yscale="log",
      columns=2,
    )
    figures.append(str(path.relative_to(run.path)))
  return figures


def _table(run: _runner.RunDirectory, config: Config, cell) -> str:
  """Problems and methods against dimensions, each cell ``cell(closing record)``."""
  units = run.finished_units()
  header = ["problem", "method", *[f"d={d}" for d in config.dims]]
  rows = [
    [problem, method, *[cell(units[f"{problem}/{d}/{method}"]) for d in config.dims]]
    for problem in config.problems
    for method in config.methods
  ]
  return _runner.markdown_table(header, rows)


def summary_table(run: _runner.RunDirectory, config: Config) -> str:
  def cell(closing) -> str:
    median = closing["median_escape_step"]
    escaped = sum(s is not None for s in closing["escape_step"])
    shown = f">{config.steps}" if median is None else f"{median:g}"
    return f"{shown} ({escaped}/{config.seeds})"

  return _table(run, config, cell)


def oracle_table(run: _runner.RunDirectory, config: Config) -> str:
  """Median oracle calls up to the escape, a censored seed counting as infinitely many."""

  def cell(closing) -> str:
    calls = [
      calls if step is not None else math.inf
      for calls, step in zip(closing["oracle_calls"], closing["escape_step"], strict=True)
    ]
    median = float(np.median(calls))
    return "censored" if math.isinf(median) else f"{median:g}"

  return _table(run, config, cell)


def fitted_dims(config: Config, method: str) -> tuple[int, ...]:
  """The dimensions where ``method`` is itself: LSGD smooths no vector shorter than 3, so
  there it is GD, and a slope through those points would be GD's."""
  if method == "lsgd":
    return tuple(d for d in config.dims if d >= smoothing.MIN_LENGTH)
  return config.dims


def growth(run: _runner.RunDirectory, config: Config, problem: str, method: str) -> float | None:
  """The least-squares slope of log(median escape step) against d, over uncensored dims."""
  units = run.finished_units()
  points = [
    (d, units[f"{problem}/{d}/{method}"]["median_escape_step"]) for d in fitted_dims(config, method)
  ]
  points = [(d, m) for d, m in points if m is not None and m > 0]
  if len(points) < 2:
    return None
  dims, medians = np.asarray(points, np.float64).T
  return float(np.polyfit(dims, np.log(medians), 1)[0])


def verdict(run: _runner.RunDirectory, config: Config) -> list[str]:
  units = run.finished_units()
  lines = []
  for problem in config.problems:
    for method in config.methods:
      stuck = [
        d for d in config.dims if units[f"{problem}/{d}/{method}"]["median_escape_step"] is None
      ]
      slope = growth(run, config, problem, method)
      slope_text = (
        "n/a" if slope is None else f"{slope:+.2f} (x{math.exp(slope):.2f} per dimension)"
      )
      lines.append(
        f"- {problem}, {method}: log-escape-time slope {slope_text}; median censored at "
        f"d = {stuck or 'none'}."
      )
  return lines


def summary(run: _runner.RunDirectory, config: Config, figures: list[str]) -> str:
  lines = [
    "# Escape time against dimension",
    "",
    f"{config.seeds} seeds per (problem, dimension, method), float64, at most {config.steps} "
    "steps. Cells: median escape step over seeds (a censored seed counts as infinitely late) "
    "and the number of seeds that escaped.",
    "",
    summary_table(run, config),
    "",
    "Steps favour the methods that take Hessian-vector products at some steps; their cost is "
    "in oracle calls, the median over seeds up to the escape (a censored seed counts as "
    f"infinitely many; a Hessian-vector product counts as {_oracle.HVP_COST:g} gradient, a "
    "Lanczos call of d steps as d + 1 products, a neon or neon2 search of d steps as d + 3 "
    "gradients; each seed's count is in the closing record):",
    "",
    oracle_table(run, config),
    "",
    *(
      [
        f"LSGD smooths no vector shorter than {smoothing.MIN_LENGTH}, so at d < "
        f"{smoothing.MIN_LENGTH} it is GD; its slope is fitted from d = {smoothing.MIN_LENGTH} on.",
        "",
      ]
      if "lsgd" in config.methods and min(config.dims) < smoothing.MIN_LENGTH
      else []
    ),
    "## What the numbers say",
    "",
    "Du et al. (2017) prove that GD can need time exponential in d on the octopus function "
    "while perturbed GD needs polynomial time. The slope of log(median escape time) against d, "
    "fitted where the median is not censored:",
    "",
    *verdict(run, config),
    "",
    *(f"![{figure}]({figure})\n" for figure in figures),
  ]
  return "\n".join(lines)


def check_config(config: Config) -> None:
  """Raises ValueError for a config the run would fail on; the CLI calls it before writing."""
  _runner.check_seeds_and_steps(config)
  _runner.check_known("problems", config.problems, PROBLEMS)
  _runner.check_known("methods", config.methods, METHODS)
  if min(config.dims) < 2:
    raise ValueError(f"dims must be at least 2 (a saddle needs two directions), got {config.dims}.")


def run(run_dir: _runner.RunDirectory) -> str:
  """Computes the missing units, then writes the figures and summary; returns the table."""
  return _runner.run_experiment(run_dir, sys.modules[__name__])
