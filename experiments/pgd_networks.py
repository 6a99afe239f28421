r"""Perturbed gradient descent against gradient descent on real networks and data.

"Can theoretical algorithms efficiently escape saddle points in deep learning?"
(2021) trained networks with PGD (Jin et al. 2017) and GD and found that PGD
helps only for small, shallow networks. This experiment asks the same of every
architecture in :mod:`experiments.models` on the bundled datasets of
:mod:`experiments.data`:

- **regimes**: full-batch or mini-batch gradients, crossed with the standard
  initialisation or a *small* one (all weights scaled by ``small_init_scale``),
  which starts training next to the saddle at zero weights;
- **methods**: ``gd`` (``optax.sgd``; SGD in the mini-batch regime) and ``pgd``
  (:func:`jaxsaddle.pgd`, which perturbs when the gradient of the batch it sees is
  small);
- **fairness**: every method gets the same number of gradient evaluations (one
  per step; PGD's perturbing steps also cost one), the same initialisations, the
  same mini-batches and the same seeds. Each method's learning rate is chosen
  from ``learning_rates`` by the lowest median final training loss; all the
  candidates run as one ``vmap`` and are recorded, so the tuning can be checked.

One unit is one (dataset, architecture, regime, method) with every learning rate
and seed vmapped inside one ``jit``. Every ``log_every`` steps the full-batch
training loss and gradient norm, the oracle calls (gradients of the batch size
used, in units of one full-batch gradient), the wall time and PGD's perturbation
count are logged per seed. A seed has *escaped* at the first logged step whose
loss is ``escape_drop`` below its initial loss. Final losses get 95% Student-t
confidence intervals over seeds; PGD's advantage is the paired difference of
final losses (GD minus PGD, same seed), and the summary reports how it varies
with the number of parameters.
"""

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import optax
import scipy.stats
from flax import nnx

import jaxsaddle
from experiments import _plots
from experiments import _runner
from experiments import _training
from experiments import data
from experiments import models

NAME = "pgd-networks"
METHODS = ("gd", "pgd")


@dataclasses.dataclass(frozen=True)
class Config:
  """The PGD-versus-GD grid.

  ``architectures`` are strings: ``logistic``, ``shallow-W`` (one hidden layer
  of width W), ``deep-DxW`` (D weight layers, D - 1 hidden layers of width W),
  ``linear-DxW`` (a deep linear network of D layers) and ``cnn-W`` (two
  convolutions of W channels). ``regimes`` are ``"<batch>/<init>"`` with batch
  ``full`` or ``mini`` and init ``standard`` or ``small``. CIFAR-10 runs only
  when ``cifar10_path`` is a directory of its python pickle batches (default:
  the ``JAXSADDLE_CIFAR10`` environment variable); otherwise it is skipped and
  the summary says so.
  """

  seeds: int = 8
  steps: int = 1000
  datasets: tuple[str, ...] = ("digits", "mnist", "mnist1d", "cifar10")
  architectures: tuple[str, ...] = (
    "logistic",
    "shallow-8",
    "shallow-32",
    "shallow-256",
    "deep-3x32",
    "deep-5x32",
    "deep-8x32",
    "linear-3x32",
    "cnn-8",
  )
  regimes: tuple[str, ...] = ("full/standard", "full/small", "mini/standard", "mini/small")
  learning_rates: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
  batch_size: int = 64
  small_init_scale: float = 1e-3
  pgd_perturbation_radius: float = 0.1
  pgd_gradient_threshold: float = 1e-3
  pgd_escape_steps: int = 50
  log_every: int = 25
  escape_drop: float = 0.05
  min_effect: float = 1e-3  # the smallest final-loss difference the summary calls a difference
  max_train_examples: int = 5000
  cifar10_path: str | None = None
  fast_compile: bool = False  # XLA without optimisations (see experiments._runner)


def default_config(quick: bool = False) -> Config:
  """The full grid, or a CI-sized one (digits, three small models, few steps) when ``quick``."""
  cifar10_path = data.cifar10_path()
  if quick:
    return Config(
      seeds=3,
      steps=150,
      datasets=("digits",),
      architectures=("shallow-8", "deep-3x16"),
      regimes=("full/small", "mini/standard"),
      learning_rates=(0.3, 1.0),
      log_every=25,
      max_train_examples=600,
      cifar10_path=cifar10_path,
      fast_compile=True,
    )
  return Config(cifar10_path=cifar10_path)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A parsed architecture string (see :class:`Config`): keyword arguments of ``make_model``."""

  name: str
  width: int | None = None
  depth: int | None = None


def parse_architecture(spec: str) -> Architecture:
  name, _, size = spec.partition("-")
  if name == "logistic" and not size:
    return Architecture("logistic")
  if name in ("shallow", "cnn") and size.isdigit():
    return Architecture("mlp" if name == "shallow" else "cnn", width=int(size))
  if name in ("deep", "linear"):
    depth, _, width = size.partition("x")
    if depth.isdigit() and width.isdigit():
      model = "deep_mlp" if name == "deep" else "deep_linear"
      return Architecture(model, width=int(width), depth=int(depth))
  raise ValueError(
    f"unknown architecture {spec!r}; use logistic, shallow-W, deep-DxW, linear-DxW or cnn-W."
  )


def parse_regime(regime: str) -> tuple[str, str]:
  batch, _, init = regime.partition("/")
  if batch not in ("full", "mini") or init not in ("standard", "small"):
    raise ValueError(f"unknown regime {regime!r}; use <full|mini>/<standard|small>.")
  return batch, init


def check_config(config: Config) -> None:
  """Raises ValueError for a config the run would fail on; the CLI calls it before writing."""
  _runner.check_seeds_and_steps(config)
  _runner.check_positive_integers(config, "batch_size", "max_train_examples")
  for spec in config.architectures:
    parse_architecture(spec)
  for regime in config.regimes:
    parse_regime(regime)
  if not config.learning_rates or min(config.learning_rates) <= 0:
    raise ValueError(f"learning_rates must be positive, got {config.learning_rates}.")
  _runner.check_log_every(config)
  _runner.check_known("datasets", config.datasets, sorted(data.LOADERS))
  # CIFAR-10 units run last: a bad path would otherwise end a full run hours in.
  if "cifar10" in runnable_datasets(config):
    try:
      data.cifar10_directory(config.cifar10_path)
    except FileNotFoundError as error:
      raise ValueError(f"cifar10_path (from {data.CIFAR10_ENV}): {error}") from error


def runnable_datasets(config: Config) -> tuple[str, ...]:
  """The datasets this run can use: CIFAR-10 only with a path."""
  return tuple(name for name in config.datasets if name != "cifar10" or config.cifar10_path)


def unit_names(config: Config) -> list[str]:
  names = []
  for dataset in runnable_datasets(config):
    for spec in config.architectures:
      names += [f"{dataset}/{spec}/{regime}/{m}" for regime in config.regimes for m in METHODS]
  return names


@functools.cache
def load_dataset(name: str, config: Config) -> data.Dataset:
  kwargs = {"path": config.cifar10_path} if name == "cifar10" else {}
  return data.load(name, max_train_examples=config.max_train_examples, **kwargs)


def build_model(spec: str, dataset: data.Dataset, init: str, config: Config, key) -> nnx.Module:
  architecture = parse_architecture(spec)
  return models.make_model(
    architecture.name,
    input_shape=dataset.input_shape,
    num_classes=dataset.num_classes,
    width=architecture.width,
    depth=architecture.depth,
    init_scale=config.small_init_scale if init == "small" else 1.0,
    rngs=nnx.Rngs(key),
  )


def make_optimizer(method: str, learning_rate, key, config: Config):
  if method == "gd":
    return optax.with_extra_args_support(optax.sgd(learning_rate))
  return jaxsaddle.pgd(
    learning_rate,
    perturbation_radius=config.pgd_perturbation_radius,
    gradient_threshold=config.pgd_gradient_threshold,
    escape_steps=config.pgd_escape_steps,
    key=key,
  )


def train(config: Config, dataset_name: str, spec: str, regime: str, method: str):
  dataset = load_dataset(dataset_name, config)
  batch, init = parse_regime(regime)
  return _training.train(
    dataset,
    lambda key: build_model(spec, dataset, init, config, key),
    lambda rate, key: make_optimizer(method, rate, key, config),
    learning_rates=config.learning_rates,
    seeds=config.seeds,
    steps=config.steps,
    log_every=config.log_every,
    batch_size=None if batch == "full" else config.batch_size,
  )


def first_escape_logs(losses: np.ndarray, drop: float) -> list[int | None]:
  """Per seed (rows), the first log index whose loss is ``drop`` below the initial loss."""
  below = losses < losses[:, :1] - drop
  return [int(np.argmax(row)) if row.any() else None for row in below]


def confidence_interval(values) -> tuple[float, float]:
  """The mean and the half-width of its 95% Student-t interval (0 for one value)."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    return float(values.mean()), 0.0
  half = scipy.stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
  return float(values.mean()), float(half)


def compute_unit(config: Config, unit: str) -> tuple[list[dict], dict[str, Any]]:
  dataset, spec, batch, init, method = unit.split("/")
  regime = f"{batch}/{init}"
  result = train(config, dataset, spec, regime, method)
  perturbations = result.counters["num_perturbations"]
  final = result.loss[:, :, -1]
  best = int(np.argmin(np.nanmedian(np.where(np.isfinite(final), final, np.inf), axis=1)))
  records = []
  for rate_index, rate in enumerate(config.learning_rates):
    for log, wall in enumerate(result.wall):
      step = log * config.log_every
      records.append(
        {
          "learning_rate": rate,
          "step": step,
          "oracle_calls": step * result.oracle_per_step,
          "wall_time": round(wall, 4),
          "loss": _runner.to_json_floats(result.loss[rate_index, :, log]),
          "grad_norm": _runner.to_json_floats(result.grad_norm[rate_index, :, log]),
          "num_perturbations": perturbations[rate_index, :, log].tolist(),
        }
      )
  losses = np.asarray(_runner.to_json_floats(result.loss[best]))
  escapes = first_escape_logs(losses, config.escape_drop)
  closing = {
    "dataset": dataset,
    "architecture": spec,
    "regime": regime,
    "method": method,
    "num_params": result.num_params,
    "learning_rate": config.learning_rates[best],
    "final_loss_by_rate": {
      str(rate): float(np.median(final[i])) for i, rate in enumerate(config.learning_rates)
    },
    "final_loss": losses[:, -1].tolist(),
    "escape_step": [None if e is None else e * config.log_every for e in escapes],
    "test_loss": _runner.to_json_floats(result.test_loss[best]),
    "test_accuracy": _runner.to_json_floats(result.test_metric[best]),
    "num_perturbations": perturbations[best, :, -1].tolist(),
    "oracle_calls": config.steps * result.oracle_per_step,
    "seconds": round(result.wall[-1], 3),
  }
  return records, closing


def curves(run: _runner.RunDirectory, unit: str, learning_rate: float) -> np.ndarray:
  """The ``(seeds, logs)`` losses of one unit at one learning rate."""
  rows = sorted(
    (r["step"], r["loss"])
    for r in run.records()
    if r.get("unit") == unit and "step" in r and r["learning_rate"] == learning_rate
  )
  return np.asarray([loss for _, loss in rows]).T


def advantage_rows(run: _runner.RunDirectory, config: Config) -> list[dict]:
  """Per (dataset, architecture, regime): GD's and PGD's final losses and the paired advantage."""
  units = run.finished_units()
  rows = []
  for unit in unit_names(config):
    if not unit.endswith("/gd"):
      continue
    gd, pgd = units[unit], units[unit[: -len("gd")] + "pgd"]
    advantage = np.asarray(gd["final_loss"]) - np.asarray(pgd["final_loss"])
    rows.append(
      {
        "dataset": gd["dataset"],
        "architecture": gd["architecture"],
        "regime": gd["regime"],
        "num_params": gd["num_params"],
        "gd": confidence_interval(gd["final_loss"]),
        "pgd": confidence_interval(pgd["final_loss"]),
        "advantage": confidence_interval(advantage),
        "gd_rate": gd["learning_rate"],
        "pgd_rate": pgd["learning_rate"],
        "gd_escaped": sum(e is not None for e in gd["escape_step"]),
        "pgd_escaped": sum(e is not None for e in pgd["escape_step"]),
        "perturbations": float(np.median(pgd["num_perturbations"])),
        "perturbed_seeds": int(sum(n > 0 for n in pgd["num_perturbations"])),
        "largest_difference": float(np.max(np.abs(advantage))),
        "gd_accuracy": float(np.mean(gd["test_accuracy"])),
        "pgd_accuracy": float(np.mean(pgd["test_accuracy"])),
      }
    )
  return rows


def _interval(pair: tuple[float, float]) -> str:
  return f"{pair[0]:.4f} ± {pair[1]:.4f}"


def summary_table(rows: list[dict], config: Config) -> str:
  header = [
    "dataset",
    "architecture",
    "regime",
    "params",
    "GD final loss",
    "PGD final loss",
    "GD − PGD (paired)",
    "lr GD / PGD",
    "escaped GD / PGD",
    "median perturbations",
    "test acc GD / PGD",
  ]
  table_rows = [
    [
      row["dataset"],
      row["architecture"],
      row["regime"],
      row["num_params"],
      _interval(row["gd"]),
      _interval(row["pgd"]),
      _interval(row["advantage"]),
      f"{row['gd_rate']:g} / {row['pgd_rate']:g}",
      f"{row['gd_escaped']}/{config.seeds} / {row['pgd_escaped']}/{config.seeds}",
      f"{row['perturbations']:g}",
      f"{row['gd_accuracy']:.3f} / {row['pgd_accuracy']:.3f}",
    ]
    for row in rows
  ]
  return _runner.markdown_table(header, table_rows)


def weight_layers(spec: str) -> int:
  """The number of weight layers: 1 for ``logistic``, 2 for ``shallow-W``, D for
  ``deep-DxW`` and ``linear-DxW``, 3 for ``cnn-W`` (two convolutions and a dense layer)."""
  architecture = parse_architecture(spec)
  if architecture.depth is not None:
    return architecture.depth
  return {"logistic": 1, "mlp": 2, "cnn": 3}[architecture.name]


def _helped_counts(rows: list[dict], helped: list[dict], key) -> str:
  """``"k1: a of n, ..."``: per value of ``key(row)``, how many of ``rows`` are in ``helped``."""
  helped_ids = {id(r) for r in helped}
  values = sorted({key(r) for r in rows})
  return ", ".join(
    f"{v}: {sum(key(r) == v for r in rows if id(r) in helped_ids)} of "
    f"{sum(key(r) == v for r in rows)}"
    for v in values
  )


def verdict(rows: list[dict], min_effect: float) -> str:
  """One paragraph on the 2021 claim, from the paired advantages.

  A difference counts when its 95% interval excludes zero *and* its mean exceeds
  ``min_effect`` in size: identical runs give intervals of zero width around
  round-off. The paragraph answers the claim's two questions separately: where
  PGD helps by depth (weight layers, all architectures) and by width (the
  one-hidden-layer MLPs, whose depth is fixed).
  """
  # Where PGD never perturbed it ran GD's algorithm: a difference there is not PGD's doing.
  perturbed = [r for r in rows if r["perturbed_seeds"]]
  significant = [r for r in perturbed if r["advantage"][0] - r["advantage"][1] > 0]
  better = [r for r in significant if r["advantage"][0] > min_effect]
  worse = [
    r
    for r in perturbed
    if r["advantage"][0] + r["advantage"][1] < 0 and -r["advantage"][0] > min_effect
  ]
  lines = [
    f"PGD's final training loss is lower than GD's by more than {min_effect:g} with the 95% "
    f"interval of the paired difference above zero in {len(better)} of {len(rows)} settings, "
    f"and higher in {len(worse)}; in the rest the difference is within noise or below "
    f"{min_effect:g}, or PGD never perturbed."
  ]
  unperturbed = [r for r in rows if not r["perturbed_seeds"]]
  if unperturbed:
    same_rate = [r for r in unperturbed if r["gd_rate"] == r["pgd_rate"]]
    differing = [r for r in same_rate if r["largest_difference"] > 0]
    lines.append(
      f" In {len(unperturbed)} setting{'s' * (len(unperturbed) != 1)} PGD perturbed on no seed, "
      "so it ran GD's algorithm; "
      + (
        f"at the same learning rate its final losses still differed from GD's in "
        f"{len(differing)} of {len(same_rate)}, by up to "
        f"{max(r['largest_difference'] for r in differing):.2g}: rounding-level differences "
        "(between the two compiled programs, or in a GPU's order of summation), amplified over "
        "the run. Differences of that size are not PGD's, and those settings count neither way."
        if differing
        else "at the same learning rate its final losses equal GD's."
      )
    )
  if better:
    described = ", ".join(f"{r['dataset']}/{r['architecture']}/{r['regime']}" for r in better[:12])
    more = f" and {len(better) - 12} more" if len(better) > 12 else ""
    lines.append(f" Where PGD helps: {described}{more}.")
    regimes = _helped_counts(rows, better, lambda r: r["regime"])
    lines.append(f" Settings where PGD helps, by regime: {regimes}.")
    depths = _helped_counts(rows, better, lambda r: weight_layers(r["architecture"]))
    lines.append(f" By depth (weight layers): {depths}.")
    shallow = [r for r in rows if parse_architecture(r["architecture"]).name == "mlp"]
    if shallow:
      widths = _helped_counts(
        shallow, better, lambda r: parse_architecture(r["architecture"]).width
      )
      lines.append(f" By width of the one-hidden-layer MLPs: {widths}.")
  if len(rows) >= 3:
    sizes = [r["num_params"] for r in rows]
    gains = [r["advantage"][0] for r in rows]
    correlation = scipy.stats.spearmanr(sizes, gains)
    if not np.isfinite(correlation.statistic):
      lines.append(
        " No trend with model size can be computed: the mean advantage is not finite in every "
        "setting, or does not vary."
      )
    else:
      if correlation.pvalue >= 0.05:
        trend = "shows no significant trend"
      else:
        trend = "shrinks" if correlation.statistic < 0 else "grows"
      lines.append(
        f" Across settings the advantage {trend} with model size (Spearman rank correlation "
        f"between parameter count and mean advantage {correlation.statistic:+.2f}, "
        f"p = {correlation.pvalue:.2g}, n = {len(rows)})."
      )
  small = [r for r in rows if r["regime"].endswith("small")]
  if small:
    gained = sum(r["pgd_escaped"] > r["gd_escaped"] for r in small)
    escapes = ", ".join(
      f"{depth}: {sum(r['gd_escaped'] for r in group)} / {sum(r['pgd_escaped'] for r in group)}"
      for depth in sorted({weight_layers(r["architecture"]) for r in small})
      for group in [[r for r in small if weight_layers(r["architecture"]) == depth]]
    )
    lines.append(
      f" From the small (near-saddle) initialisation, PGD escaped on more seeds than GD in "
      f"{gained} of {len(small)} settings; seeds escaped, GD / PGD, by depth: {escapes}."
    )
  helped_depths = sorted({weight_layers(r["architecture"]) for r in better})
  unhelped_depths = sorted({weight_layers(r["architecture"]) for r in rows} - set(helped_depths))
  lines.append(" The 2021 work found that PGD improves on GD only for small, shallow networks; ")
  if not better:
    lines.append(
      "here PGD helps nowhere beyond noise, so this run neither confirms nor refutes the size "
      "dependence."
    )
  elif all(r["architecture"].startswith(("logistic", "shallow")) for r in better):
    lines.append("here too every setting where PGD helps is a shallow model.")
  else:
    lines.append(
      f"here PGD helps at depth {', '.join(map(str, helped_depths))} and at no other depth "
      f"({', '.join(map(str, unhelped_depths)) or 'none'}), which reaches past the shallow "
      "models"
      + (
        f" but ends beyond depth {max(helped_depths)}: the advantage does not grow with depth."
        if unhelped_depths and max(unhelped_depths) > max(helped_depths)
        else "; that departs from the finding."
      )
    )
  return "".join(lines)


def make_figures(run: _runner.RunDirectory, config: Config, rows: list[dict]) -> list[str]:
  units = run.finished_units()
  paths = []
  x = np.arange(config.steps // config.log_every + 1) * config.log_every
  for dataset in runnable_datasets(config):
    for regime in config.regimes:
      panels = {}
      for spec in config.architectures:
        prefix = f"{dataset}/{spec}/{regime}"
        if f"{prefix}/gd" not in units:
          continue
        panels[spec] = {
          f"{m} (lr {units[f'{prefix}/{m}']['learning_rate']:g})": curves(
            run, f"{prefix}/{m}", units[f"{prefix}/{m}"]["learning_rate"]
          )
          for m in METHODS
        }
      name = f"{dataset}-{regime.replace('/', '-')}.png"
      path = _plots.plot_panels(
        panels,
        run.figures / name,
        title=f"{dataset}, {regime}: training loss",
        x=x,
        yscale="log",
      )
      paths.append(str(path.relative_to(run.path)))
  path = _plots.plot_advantage(
    [r["num_params"] for r in rows],
    [r["advantage"] for r in rows],
    [f"{r['dataset']}/{r['regime']}" for r in rows],
    run.figures / "advantage.png",
  )
  paths.append(str(path.relative_to(run.path)))
  return paths


def summary(run: _runner.RunDirectory, config: Config, rows: list[dict], figures: list[str]):
  skipped = []
  if "cifar10" in config.datasets and not config.cifar10_path:
    skipped.append(
      "CIFAR-10 was skipped: set JAXSADDLE_CIFAR10 to the directory of its python pickle "
      "batches (data_batch_1..5, test_batch) to include it."
    )
  lines = [
    "# PGD against GD on real networks",
    "",
    f"{config.seeds} seeds, {config.steps} steps (one gradient each) per method; learning "
    f"rates chosen per method from {list(config.learning_rates)} by the lowest median final "
    f"training loss (every candidate is in metrics.jsonl). Mini-batches of {config.batch_size} "
    f"drawn with replacement; small initialisation scales every weight by "
    f"{config.small_init_scale:g}. Losses are full-batch training losses; ± is the 95% "
    "Student-t half-width over seeds; a seed escaped when its loss fell "
    f"{config.escape_drop:g} below its initial loss.",
    *(["", *skipped] if skipped else []),
    "",
    summary_table(rows, config),
    "",
    "## What the numbers say",
    "",
    verdict(rows, config.min_effect),
    "",
    "## Figures",
    "",
    *[f"![{path}]({path})" for path in figures],
    "",
  ]
  return "\n".join(lines)


def run(run_dir: _runner.RunDirectory) -> str:
  config: Config = run_dir.config
  check_config(config)
  if "cifar10" in config.datasets and not config.cifar10_path:
    print("pgd-networks: CIFAR-10 skipped (set JAXSADDLE_CIFAR10 to its pickle batches).")
  _runner.run_units(run_dir, unit_names(config), functools.partial(compute_unit, config))
  rows = advantage_rows(run_dir, config)
  figures = make_figures(run_dir, config, rows)
  run_dir.write_summary(summary(run_dir, config, rows, figures))
  return summary_table(rows, config)
