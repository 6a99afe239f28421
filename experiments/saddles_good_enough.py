r"""Where does training end? The Hessian spectrum after GD, SGD, PGD and NC descent.

Sankar and Balasubramanian, "Are saddles good enough for deep learning?"
(arXiv:1706.02052), report that networks trained by gradient methods end at
saddle points with a highly degenerate Hessian ("good saddles"), that escape
methods end there too, and that the spectrum's bulk follows Wigner's semicircle
law. This experiment trains each method (learning rate tuned per method on a
small grid, every candidate recorded) and then measures, per seed, at the final
parameters and on the whole training set:

- the spectral density by stochastic Lanczos quadrature
  (:func:`jaxsaddle.spectrum.hessian_density`), plotted per method;
- the ``top_k`` largest and the smallest eigenvalues by Lanczos, with residuals;
- the degeneracy (mass with :math:`|\lambda| \le` ``relative_tol``
  :math:`\cdot \lambda_{\max}`) and the negative mass (the index);
- the semicircle fit of :func:`jaxsaddle.spectrum.semicircle_fit` (KS distance)
  and the number of top eigenvalues outside the fitted bulk, set against the
  number of classes (Sagun et al. and Papyan find about one outlier per class);
- the classification of :func:`jaxsaddle.spectrum.classify_critical_point`, with
  ``gradient_tol`` for "critical" and the eigenvalue tolerance above.

When the model has at most ``dense_check_params`` parameters the top and bottom
eigenvalues of seed 0 are checked against the dense Hessian (``jax.hessian`` and
``eigh``), and the difference is reported.

**Equal oracle budgets.** Every method gets ``steps`` gradients of the whole
training set (:mod:`experiments._oracle`): a gradient costs one, a mini-batch
gradient its fraction of the data, and each Lanczos call of NC descent (run
where the gradient norm is at most ``ncd_gradient_threshold``) costs
:func:`experiments._oracle.lanczos_call_cost` of ``ncd_lanczos_steps``, one
gradient per Hessian-vector product (:data:`experiments._oracle.HVP_COST`, with
the measurements that justify it). Every optimizer runs inside
:func:`experiments._oracle.with_oracle_budget`, so a method whose next step would
take it past the budget stops there and keeps its parameters. GD and PGD spend
exactly the budget in ``steps`` steps; SGD takes ``n // batch_size`` steps for each of
them (:func:`steps_per_gradient`), so it spends the budget up to the remainder of
that division, and its logs fall at the same oracle calls as the others'; NC descent
stops early when its Lanczos calls use the budget up before the steps run out;
its spectrum is then measured where it stopped. Metrics log every method's oracle calls, steps taken
and Lanczos calls; the closing records and the summary hold the budget, the
calls spent and the steps taken. NC descent's tie-break (two loss evaluations,
only when the gradient is exactly orthogonal to the negative direction) is not
counted.
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
from jax.flatten_util import ravel_pytree

import jaxsaddle
from experiments import _oracle
from experiments import _plots
from experiments import _runner
from experiments import _training
from experiments import data
from experiments import models
from jaxsaddle import spectrum

NAME = "saddles-good-enough"
METHODS = ("gd", "sgd", "pgd", "ncd")


@dataclasses.dataclass(frozen=True)
class Config:
  """Training and spectrum settings.

  ``gradient_tol`` decides "critical" for :func:`classify_critical_point`: a
  network trained for a finite budget never has a zero gradient, so it is the
  gradient norm below which training is considered finished (the summary
  reports every seed's norm). The eigenvalue tolerance is ``relative_tol``
  times the largest eigenvalue. ``ncd_gradient_threshold`` is the gradient norm
  below which NC descent runs Lanczos (None: ``ncd_epsilon``).
  """

  seeds: int = 8
  steps: int = 3000
  datasets: tuple[str, ...] = ("digits", "mnist")
  width: int = 32
  methods: tuple[str, ...] = METHODS
  learning_rates: tuple[float, ...] = (0.1, 0.3, 1.0)
  batch_size: int = 64
  log_every: int = 100
  max_train_examples: int = 2000
  pgd_perturbation_radius: float = 0.1
  pgd_gradient_threshold: float = 1e-3
  pgd_escape_steps: int = 100
  ncd_hessian_lipschitz: float = 1.0
  ncd_epsilon: float = 1e-3
  ncd_lanczos_steps: int = 10
  ncd_gradient_threshold: float | None = None
  num_probes: int = 8
  lanczos_steps: int = 80
  top_k: int = 12
  relative_tol: float = 1e-3
  gradient_tol: float = 1e-2
  dense_check_params: int = 1500
  fast_compile: bool = False  # XLA without optimisations (see experiments._runner)


def default_config(quick: bool = False) -> Config:
  """The full study, or a CI-sized one (digits, a width-8 MLP, few steps) when ``quick``.

  The quick run's gradients stay above ``ncd_epsilon``, so NC descent runs Lanczos
  below a gradient norm of 0.05 instead: the run then shows its curvature search
  using up its budget.
  """
  if quick:
    return Config(
      seeds=2,
      steps=200,
      datasets=("digits",),
      width=8,
      learning_rates=(0.3, 1.0),
      log_every=50,
      max_train_examples=500,
      ncd_gradient_threshold=0.05,
      num_probes=2,
      lanczos_steps=30,
      fast_compile=True,
    )
  return Config()


def check_config(config: Config) -> None:
  """Raises ValueError for a config the run would fail on; the CLI calls it before writing."""
  _runner.check_seeds_and_steps(config)
  _runner.check_positive_integers(config, "batch_size", "max_train_examples")
  _runner.check_known("methods", config.methods, METHODS)
  _runner.check_log_every(config)


@functools.cache
def load_dataset(name: str, config: Config) -> data.Dataset:
  return data.load(name, max_train_examples=config.max_train_examples)


def build_model(dataset: data.Dataset, config: Config, key) -> nnx.Module:
  return models.make_model(
    "mlp",
    input_shape=dataset.input_shape,
    num_classes=dataset.num_classes,
    width=config.width,
    rngs=nnx.Rngs(key),
  )


def batch_size(method: str, config: Config) -> int | None:
  """SGD's mini-batch size; None (the whole training set) for the other methods."""
  return config.batch_size if method == "sgd" else None


def gradient_cost(method: str, dataset: data.Dataset, config: Config) -> float:
  """The oracle cost of one step's gradient: the fraction of the training set it sees."""
  size = batch_size(method, config)
  num_examples = dataset.x_train.shape[0]
  return 1.0 if size is None else size / num_examples


def steps_per_gradient(method: str, dataset: data.Dataset, config: Config) -> int:
  """The steps a method takes for each gradient of the whole training set in its budget: one,
  or for SGD as many whole mini-batches as the training set holds."""
  size = batch_size(method, config)
  num_examples = dataset.x_train.shape[0]
  return 1 if size is None else num_examples // size


def oracle_budget(config: Config) -> float:
  """Every method's budget: ``steps`` gradients of the whole training set."""
  return float(config.steps)


def make_optimizer(method: str, learning_rate, key, config: Config, step_cost: float):
  """The method, held to :func:`oracle_budget` when each step's gradient costs ``step_cost``."""
  if method in ("gd", "sgd"):
    inner = optax.sgd(learning_rate)
  elif method == "pgd":
    inner = jaxsaddle.pgd(
      learning_rate,
      perturbation_radius=config.pgd_perturbation_radius,
      gradient_threshold=config.pgd_gradient_threshold,
      escape_steps=config.pgd_escape_steps,
      key=key,
    )
  else:
    inner = jaxsaddle.negative_curvature_descent(
      learning_rate,
      hessian_lipschitz=config.ncd_hessian_lipschitz,
      epsilon=config.ncd_epsilon,
      num_lanczos_steps=config.ncd_lanczos_steps,
      gradient_threshold=config.ncd_gradient_threshold,
      key=key,
    )
  return _oracle.with_oracle_budget(
    inner,
    budget=oracle_budget(config),
    gradient_cost=step_cost,
    lanczos_cost=_oracle.lanczos_call_cost(config.ncd_lanczos_steps),
  )


@functools.cache
def measure_spectrum(dataset_name: str, config: Config):
  """Jitted ``(params, key) -> measurements`` and ``params -> dense Hessian`` of the loss.

  Both on the full-training-set loss, and cached per dataset, so every method's
  unit reuses one compiled measurement and one compiled dense Hessian.
  """
  dataset = load_dataset(dataset_name, config)
  graphdef, _ = nnx.split(build_model(dataset, config, jax.random.key(0)))
  x, y = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)

  def value_fn(params):
    return models.cross_entropy_loss(nnx.merge(graphdef, params), x, y)

  def measure(params, key):
    density_key, top_key, classify_key = jax.random.split(key, 3)
    density = spectrum.hessian_density(
      value_fn,
      params,
      key=density_key,
      num_probes=config.num_probes,
      num_steps=config.lanczos_steps,
    )
    top = spectrum.hessian_extreme_eigenvalues(
      value_fn, params, num_steps=config.lanczos_steps, key=top_key, k=config.top_k
    )
    largest = jnp.nanmax(top.eigenvalues)
    tolerance = config.relative_tol * largest
    mass = spectrum.degeneracy(density, tol=0.0, atol=tolerance)
    fit = spectrum.semicircle_fit(density)
    bulk_edge = fit.center + fit.radius * 1.1
    report = spectrum.classify_critical_point(
      value_fn,
      params,
      gradient_tol=config.gradient_tol,
      eigenvalue_tol=tolerance,
      num_steps=config.lanczos_steps,
      key=classify_key,
    )
    return {
      "grid": density.grid,
      "density": density.density,
      "top_eigenvalues": top.eigenvalues,
      "top_residuals": top.residual_norms,
      # The classification's own Lanczos estimate: a second run would repeat it.
      "smallest_eigenvalue": report.smallest_eigenvalue,
      "smallest_residual": report.smallest_residual,
      "near_zero_mass": mass.near_zero_mass,
      "negative_mass": mass.negative_mass,
      "semicircle_ks": fit.ks_distance,
      "semicircle_bulk_ks": fit.bulk_ks_distance,
      "outliers_above_bulk": jnp.sum(top.eigenvalues > bulk_edge),
      "kind": report.kind,
      "gradient_norm": report.gradient_norm,
      "probe_decrease": report.probe_decrease,
    }

  def dense_hessian(params):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda v: value_fn(unravel(v)))(flat)

  return jax.jit(measure), jax.jit(dense_hessian)


def dense_extremes(hessian: jax.Array) -> tuple[float, float]:
  """The smallest and largest eigenvalue of a dense Hessian, in float64 numpy."""
  eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
  return float(eigenvalues[0]), float(eigenvalues[-1])


def compute_unit(config: Config, unit: str) -> tuple[list[dict], dict[str, Any]]:
  dataset_name, method = unit.split("/")
  dataset = load_dataset(dataset_name, config)
  step_cost = gradient_cost(method, dataset, config)
  repeats = steps_per_gradient(method, dataset, config)
  start = time.perf_counter()
  result = _training.train(
    dataset,
    lambda key: build_model(dataset, config, key),
    lambda rate, key: make_optimizer(method, rate, key, config, step_cost),
    learning_rates=config.learning_rates,
    seeds=config.seeds,
    steps=config.steps * repeats,
    log_every=config.log_every * repeats,
    batch_size=batch_size(method, config),
    # Batched, NC descent would run Lanczos at every step of every lane; unbatched, only where
    # the gradient is small (the oracle accounting counts only those calls either way).
    vmap_lanes=method != "ncd",
  )
  final = result.loss[:, :, -1]
  best = int(np.argmin(np.nanmedian(np.where(np.isfinite(final), final, np.inf), axis=1)))
  records = [
    {
      "learning_rate": rate,
      "step": log * config.log_every * repeats,
      "wall_time": round(wall, 4),
      "loss": _runner.to_json_floats(result.loss[i, :, log]),
      "grad_norm": _runner.to_json_floats(result.grad_norm[i, :, log]),
      **{
        name: _runner.to_json_numbers(values[i, :, log]) for name, values in result.counters.items()
      },
    }
    for i, rate in enumerate(config.learning_rates)
    for log, wall in enumerate(result.wall)
  ]

  measure, dense_hessian = measure_spectrum(dataset_name, config)
  seed_params = [
    jax.tree.map(lambda leaf, s=seed: leaf[best, s], result.params) for seed in range(config.seeds)
  ]
  measured = [
    jax.tree.map(np.asarray, measure(params, jax.random.key(1000 + seed)))
    for seed, params in enumerate(seed_params)
  ]
  final_counters = {name: values[best, :, -1] for name, values in result.counters.items()}
  closing = {
    "dataset": dataset_name,
    "method": method,
    "num_params": result.num_params,
    "num_classes": dataset.num_classes,
    "learning_rate": config.learning_rates[best],
    "final_loss_by_rate": {
      str(rate): float(np.median(final[i])) for i, rate in enumerate(config.learning_rates)
    },
    "final_loss": _runner.to_json_floats(result.loss[best, :, -1]),
    "test_accuracy": _runner.to_json_floats(result.test_metric[best]),
    "oracle_budget": oracle_budget(config),
    "gradient_cost": step_cost,
    "steps": config.steps * repeats,
    "lanczos_call_cost": _oracle.lanczos_call_cost(config.ncd_lanczos_steps),
    **{name: _runner.to_json_numbers(values) for name, values in final_counters.items()},
    "density": [
      {"grid": _runner.to_json_floats(m["grid"]), "density": _runner.to_json_floats(m["density"])}
      for m in measured
    ],
    **{
      name: [_runner.to_json_floats(m[name]) for m in measured]
      for name in (
        "top_eigenvalues",
        "top_residuals",
        "smallest_eigenvalue",
        "smallest_residual",
        "near_zero_mass",
        "negative_mass",
        "semicircle_ks",
        "semicircle_bulk_ks",
        "gradient_norm",
        "probe_decrease",
      )
    },
    "outliers_above_bulk": [int(m["outliers_above_bulk"]) for m in measured],
    "classification": [spectrum.CRITICAL_POINT_KINDS[int(m["kind"])] for m in measured],
  }
  if result.num_params <= config.dense_check_params:
    smallest, largest = dense_extremes(dense_hessian(seed_params[0]))
    closing["dense_check"] = {
      "smallest": smallest,
      "largest": largest,
      "lanczos_smallest": float(measured[0]["smallest_eigenvalue"]),
      "lanczos_largest": float(np.nanmax(measured[0]["top_eigenvalues"])),
    }
  closing["seconds"] = round(time.perf_counter() - start, 3)
  return records, closing


def unit_names(config: Config) -> list[str]:
  return [f"{dataset}/{method}" for dataset in config.datasets for method in config.methods]


def _finite_mean(values) -> tuple[float, str]:
  """The mean over the finite values, and a note of how many there are when some are not.

  A seed that diverged at the chosen learning rate (picked by the median) has NaN losses and
  spectra: it is counted, not dropped silently.
  """
  values = np.asarray(values, np.float64)
  finite = np.isfinite(values)
  note = "" if finite.all() else f" ({int(finite.sum())}/{finite.size} finite)"
  return (float(np.mean(values[finite])) if finite.any() else float("nan")), note


def _mean(values) -> str:
  mean, note = _finite_mean(values)
  return f"{mean:.3g}{note}"


def _percent(values, digits: int) -> str:
  mean, note = _finite_mean(values)
  return f"{mean:.{digits}%}{note}"


def _outliers(closing: dict, config: Config) -> str:
  """The median outlier count; all ``top_k`` outside the bulk means there may be more."""
  median = float(np.median(closing["outliers_above_bulk"]))
  return f"{'≥' if median >= config.top_k else ''}{median:g}"


def summary_table(run: _runner.RunDirectory, config: Config) -> str:
  units = run.finished_units()
  header = [
    "dataset",
    "method",
    "lr",
    "final loss",
    "oracle calls / budget (steps taken)",
    "gradient norm",
    "λ_max",
    "λ_min",
    "degeneracy",
    "negative mass",
    "semicircle KS (bulk)",
    "outliers / classes",
    "classification",
  ]
  rows = []
  for unit in unit_names(config):
    c = units[unit]
    kinds = {kind: c["classification"].count(kind) for kind in dict.fromkeys(c["classification"])}
    rows.append(
      [
        c["dataset"],
        c["method"],
        f"{c['learning_rate']:g}",
        _mean(c["final_loss"]),
        f"{_mean(c['oracle_calls'])} / {c['oracle_budget']:g} ({_mean(c['num_steps_taken'])})",
        _mean(c["gradient_norm"]),
        _mean([np.nanmax(t) for t in c["top_eigenvalues"]]),
        _mean(c["smallest_eigenvalue"]),
        _mean(c["near_zero_mass"]),
        _mean(c["negative_mass"]),
        f"{_mean(c['semicircle_ks'])} ({_mean(c['semicircle_bulk_ks'])})",
        f"{_outliers(c, config)} / {c['num_classes']}",
        ", ".join(f"{n}× {kind}" for kind, n in kinds.items()),
      ]
    )
  return _runner.markdown_table(header, rows)


def verdict(run: _runner.RunDirectory, config: Config) -> list[str]:
  units = [run.finished_units()[u] for u in unit_names(config)]
  lines = []
  for c in units:
    seeds = len(c["classification"])
    saddles = sum(kind.endswith("saddle") for kind in c["classification"])
    degenerate = sum(kind == "degenerate saddle" for kind in c["classification"])
    undetermined = sum(kind == "undetermined" for kind in c["classification"])
    critical = sum(kind != "not critical" for kind in c["classification"])
    lines.append(
      f"- {c['dataset']}, {c['method']}: {critical}/{seeds} seeds end within the gradient "
      f"tolerance {config.gradient_tol:g}; {saddles}/{seeds} are classified saddles "
      f"({degenerate} degenerate)"
      + (
        f" and {undetermined} undetermined (Lanczos not converged enough to tell)"
        if undetermined
        else ""
      )
      + f"; on average {_percent(c['near_zero_mass'], 0)} of "
      f"the spectral mass is within {config.relative_tol:g}·λ_max of zero and "
      f"{_percent(c['negative_mass'], 1)} is negative; the median number of top "
      f"eigenvalues outside the semicircle bulk is {_outliers(c, config)} "
      f"for {c['num_classes']} classes."
    )
  for c in units:
    stopped = [taken for taken in c["num_steps_taken"] if taken < c["steps"]]
    if stopped:
      lines.append(
        f"- {c['dataset']}, {c['method']}: the oracle budget ran out on {len(stopped)}/"
        f"{len(c['num_steps_taken'])} seeds, after {_mean(stopped)} of {c['steps']} steps "
        f"on average; its {_mean(c['num_lanczos_calls'])} Lanczos calls per seed cost "
        f"{c['lanczos_call_cost']:g} gradients each, and the spectrum is measured where it "
        "stopped."
      )
  escape = [c for c in units if c["method"] in ("pgd", "ncd")]
  if escape:
    mean_degeneracy, degeneracy_note = _finite_mean([c["near_zero_mass"] for c in escape])
    negative, negative_note = _finite_mean([c["negative_mass"] for c in escape])
    critical = sum(k != "not critical" for c in escape for k in c["classification"])
    seeds = sum(len(c["classification"]) for c in escape)
    perturbations = sum(sum(c["num_perturbations"]) for c in escape)
    curvature_steps = sum(sum(c["num_curvature_steps"]) for c in escape)
    # An escape method whose mechanism never fired ran as gradient descent: nothing it ends
    # with can be credited to escaping.
    methods = (
      f"The escape methods (PGD, NC descent; {perturbations:g} perturbations and "
      f"{curvature_steps:g} curvature steps over all seeds)"
      if perturbations + curvature_steps
      else "PGD and NC descent, whose escape steps never fired in this run (no perturbation, "
      "no curvature step: they ran as gradient descent),"
    )
    lines.append(
      f"- {methods} end with {mean_degeneracy:.0%}{degeneracy_note} "
      f"of the mass near zero and {negative:.1%}{negative_note} negative on average: "
      + (
        "the spectrum where they stop is highly degenerate, as Sankar and Balasubramanian report"
        if mean_degeneracy > 0.5
        else "this run does not show the high degeneracy Sankar and Balasubramanian report"
      )
      + f"; {critical} of their {seeds} final points are within the gradient tolerance, so "
      + (
        "the classification above says which of those are saddles."
        if critical
        else "none is a critical point yet by that standard: training had not converged."
      )
    )
  ks, ks_note = _finite_mean([c["semicircle_bulk_ks"] for c in units])
  near_zero, _ = _finite_mean([c["near_zero_mass"] for c in units])
  lines.append(
    f"- The semicircle fits the bulk with a mean KS distance of {ks:.2f}{ks_note} "
    + (
      "(close: the semicircle law is plausible for the bulk)."
      if ks < 0.1
      else "(far: the bulk is not a semicircle here"
      + (f"; {near_zero:.0%} of the mass is near zero on average)." if near_zero > 0.5 else ").")
    )
  )
  return lines


def make_figures(run: _runner.RunDirectory, config: Config) -> list[str]:
  units = run.finished_units()
  paths = []
  for dataset in config.datasets:
    panels = {
      f"{m} (lr {units[f'{dataset}/{m}']['learning_rate']:g})": [
        (np.asarray(d["grid"]), np.asarray(d["density"]))
        for d in units[f"{dataset}/{m}"]["density"]
      ]
      for m in config.methods
    }
    path = _plots.plot_densities(
      panels, run.figures / f"{dataset}-spectrum.png", title=f"{dataset}: Hessian density (SLQ)"
    )
    paths.append(str(path.relative_to(run.path)))
    curves, oracle_calls = {}, {}
    for m in config.methods:
      rate = units[f"{dataset}/{m}"]["learning_rate"]
      rows = sorted(
        (r["step"], r["loss"], r["oracle_calls"])
        for r in run.records()
        if r.get("unit") == f"{dataset}/{m}" and "step" in r and r["learning_rate"] == rate
      )
      curves[m] = np.asarray([loss for _, loss, _ in rows]).T
      # NC descent's Lanczos calls make its spending differ from seed to seed and from the
      # other methods', which log at equal gradient counts: each curve gets its own x.
      oracle_calls[m] = np.median(np.asarray([calls for *_, calls in rows], np.float64), axis=1)
    path = _plots.plot_panels(
      {dataset: curves},
      run.figures / f"{dataset}-loss.png",
      title=f"{dataset}: training loss",
      x=oracle_calls,
      xlabel="oracle calls (full-batch gradients)",
      yscale="log",
      columns=1,
    )
    paths.append(str(path.relative_to(run.path)))
  return paths


def summary(run: _runner.RunDirectory, config: Config, figures: list[str]) -> str:
  units = run.finished_units()
  checks = []
  for unit in unit_names(config):
    check = units[unit].get("dense_check")
    if check:
      checks.append(
        f"- {unit}: dense λ_min {check['smallest']:.5g}, λ_max {check['largest']:.5g}; "
        f"Lanczos λ_min {check['lanczos_smallest']:.5g}, λ_max {check['lanczos_largest']:.5g} "
        f"(seed 0)."
      )
  lines = [
    "# Are saddles good enough? The Hessian at the end of training",
    "",
    f"MLP with one hidden layer of {config.width} tanh units; {config.seeds} seeds x "
    f"{config.steps} steps per method (SGD: as many mini-batch steps as cost as much); "
    "learning rate per method from "
    f"{list(config.learning_rates)} by the lowest median final training loss. Every method "
    f"has the same oracle budget, {oracle_budget(config):g} gradients of the whole training "
    "set (a mini-batch gradient counts as its fraction of it, a Lanczos call of NC descent "
    f"as {_oracle.lanczos_call_cost(config.ncd_lanczos_steps):g}: one per Hessian-vector "
    "product and one for the linearisation), and stops where its next step would exceed it. "
    "Spectra on the "
    f"whole training set: {config.num_probes} SLQ probes x {config.lanczos_steps} Lanczos "
    f"steps; degeneracy and index with the tolerance {config.relative_tol:g}·λ_max; "
    f"'critical' means gradient norm <= {config.gradient_tol:g}. Means over seeds.",
    "",
    summary_table(run, config),
    "",
    "## What the numbers say",
    "",
    *verdict(run, config),
    "",
    *(["## Dense check", "", *checks, ""] if checks else []),
    "## Figures",
    "",
    *[f"![{path}]({path})" for path in figures],
    "",
  ]
  return "\n".join(lines)


def run(run_dir: _runner.RunDirectory) -> str:
  """Computes the missing units, then writes the figures and summary; returns the table."""
  return _runner.run_experiment(run_dir, sys.modules[__name__])
