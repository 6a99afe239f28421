r"""Do the Hessian's outliers number the classes, does the gradient live among them, and does
BatchNorm remove them?

Three published observations about the Hessian of a classifier's loss, measured here during
training rather than only at its end:

- **Outliers.** Sagun et al. (arXiv:1706.04454) and Papyan (2019) find a bulk of eigenvalues
  near zero and about one large outlier per class, :math:`C` in all, separated from the bulk by
  a gap.
- **A tiny subspace.** Gur-Ari, Roberts and Dyer, "Gradient descent happens in a tiny
  subspace" (arXiv:1812.04754), find that after a short initial phase the gradient lies
  mostly in the span of the top :math:`C` Hessian eigenvectors, far above the :math:`C/n` of
  a random subspace of that dimension.
- **BatchNorm.** Ghorbani, Krishnan and Xiao (ICML 2019) find that BatchNorm removes the large
  isolated eigenvalues.

A one-hidden-layer tanh MLP (``mlp``) and the same MLP with BatchNorm before its activation
(``mlp-bn``, :func:`experiments.models.make_model` with ``batch_norm=True``, normalising by
the statistics of the whole training set it is given) run full-batch gradient descent, so
that the function trained is the one whose Hessian is measured; ``seeds`` initialisations are
vmapped. At each of :func:`checkpoints` (step 0 and log-spaced fractions of ``steps``) every
seed is measured on the whole training set:

- the ``top_k`` (default :math:`2C`) largest eigenpairs by Lanczos with full
  reorthogonalisation (:func:`jaxsaddle.spectrum.hessian_extreme_eigenvalues`), with their
  residuals;
- the share of the squared gradient norm in the span of the top :math:`j` eigenvectors,
  :math:`\sum_{i \le j} (v_i^\top g)^2 / \|g\|^2`, for every :math:`j \le` ``top_k``; the
  summary quotes it at :math:`j = C` against :math:`C / n`;
- the largest gap: the :math:`i` that maximises :math:`\lambda_i / \lambda_{i+1}` among the
  positive top eigenvalues (the number of eigenvalues above it), and :math:`\lambda_C /
  \lambda_{C+1}`.

When the model has at most ``dense_check_params`` parameters, seed 0 at the last checkpoint is
checked against the dense Hessian (``jax.hessian``, ``eigh`` in float64): its top eigenvalues
and its gradient share at :math:`C`.
"""

import dataclasses
import functools
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

import jaxsaddle.flax
from experiments import _plots
from experiments import _runner
from experiments import data
from experiments import models
from jaxsaddle import spectrum

NAME = "hessian-outliers"
DATASETS = ("digits", "mnist")
MODELS = ("mlp", "mlp-bn")
CLASSES = 10  # in every dataset of DATASETS
# The checkpoints past step 0, as fractions of the steps.
CHECKPOINT_FRACTIONS = (0.003, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.6, 1.0)


@dataclasses.dataclass(frozen=True)
class Config:
  """Full-batch gradient descent on the first ``max_train_examples`` training examples."""

  seeds: int = 4
  steps: int = 3000
  datasets: tuple[str, ...] = DATASETS
  models: tuple[str, ...] = MODELS
  width: int = 32
  learning_rates: tuple[float, ...] = (0.3, 2.0)
  max_train_examples: int = 2000
  top_k: int = 20
  lanczos_steps: int = 100
  dense_check_params: int = 1500
  fast_compile: bool = False  # XLA without optimisations (see experiments._runner)


def default_config(quick: bool = False) -> Config:
  """Digits, 2 seeds, 300 steps of a width-16 MLP (1,210 parameters, checked densely), when
  ``quick``."""
  if quick:
    return Config(
      seeds=2,
      steps=300,
      datasets=("digits",),
      width=16,
      max_train_examples=500,
      lanczos_steps=60,
      fast_compile=True,
    )
  return Config()


def check_config(config: Config) -> None:
  """Raises ValueError for a config the run would fail on; the CLI calls it before writing."""
  _runner.check_seeds_and_steps(config)
  _runner.check_known("datasets", config.datasets, DATASETS)
  _runner.check_known("models", config.models, MODELS)
  _runner.check_positive_integers(config, "width", "max_train_examples", "top_k")
  if not config.learning_rates or not all(rate > 0 for rate in config.learning_rates):
    raise ValueError(f"learning_rates must be positive, got {config.learning_rates}.")
  if config.top_k <= CLASSES:
    raise ValueError(
      f"top_k must exceed the {CLASSES} classes, so that the gap after them is seen; got "
      f"{config.top_k}."
    )
  if config.lanczos_steps < config.top_k:
    raise ValueError(
      f"lanczos_steps ({config.lanczos_steps}) must be at least top_k ({config.top_k})."
    )


def checkpoints(config: Config) -> list[int]:
  """Step 0 and ``CHECKPOINT_FRACTIONS`` of ``steps``, rounded, without repeats."""
  return sorted({0, *(max(1, round(config.steps * f)) for f in CHECKPOINT_FRACTIONS)})


def unit_name(dataset: str, model: str, learning_rate: float) -> str:
  return f"{dataset}/{model}/lr={learning_rate:g}"


def unit_settings(config: Config) -> dict[str, tuple[str, str, float]]:
  """Unit name -> ``(dataset, model, learning_rate)``, in the order the units run."""
  return {
    unit_name(dataset, model, rate): (dataset, model, rate)
    for dataset in config.datasets
    for rate in config.learning_rates
    for model in config.models
  }


def unit_names(config: Config) -> list[str]:
  return list(unit_settings(config))


@functools.cache
def load_dataset(name: str, config: Config) -> data.Dataset:
  return data.load(name, max_train_examples=config.max_train_examples)


def build_model(dataset: data.Dataset, model: str, config: Config, seed: int) -> nnx.Module:
  return models.make_model(
    "mlp",
    input_shape=dataset.input_shape,
    num_classes=dataset.num_classes,
    width=config.width,
    batch_norm=model == "mlp-bn",
    rngs=nnx.Rngs(seed),
  )


def largest_gap(eigenvalues: np.ndarray) -> tuple[int, float]:
  r"""``(i, ratio)``: the largest :math:`\lambda_i / \lambda_{i+1}` among the positive values
  of a descending sequence, and how many lie above it; ``(0, nan)`` with fewer than two."""
  positive = eigenvalues[np.isfinite(eigenvalues) & (eigenvalues > 0)]
  if positive.size < 2:
    return 0, float("nan")
  ratios = positive[:-1] / positive[1:]
  index = int(np.argmax(ratios))
  return index + 1, float(ratios[index])


@functools.cache
def _programs(dataset_name: str, model: str, config: Config):
  """Jitted ``(params, num_steps, learning_rate) -> params`` (gradient descent) and ``(params,
  keys) -> measurements``, both over stacked seeds, with the seeds' initial params; cached, so
  that every learning rate's unit reuses them compiled."""
  dataset = load_dataset(dataset_name, config)
  x, y = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
  seed_models = [build_model(dataset, model, config, seed) for seed in range(config.seeds)]
  # Only the params differ between seeds; BatchNorm's statistics are recomputed at every call.
  value_fn = jaxsaddle.flax.make_value_fn(seed_models[0], models.cross_entropy_loss, x, y)
  accuracy_fn = jaxsaddle.flax.make_value_fn(seed_models[0], models.accuracy, x, y)
  params = jax.tree.map(
    lambda *leaves: jnp.stack(leaves),
    *(nnx.as_pure(nnx.split(m, nnx.Param, ...)[1]) for m in seed_models),
  )
  grad_fn = jax.grad(value_fn)

  def descend_one(p, num_steps, learning_rate):
    def step(_, p):
      return jax.tree.map(lambda leaf, g: leaf - learning_rate * g, p, grad_fn(p))

    return jax.lax.fori_loop(0, num_steps, step, p)

  def measure_one(p, key):
    pairs = spectrum.hessian_extreme_eigenvalues(
      value_fn,
      p,
      num_steps=config.lanczos_steps,
      key=key,
      k=config.top_k,
      which="largest",
      reorthogonalize=True,
    )
    loss, grad = jax.value_and_grad(value_fn)(p)
    flat_grad = ravel_pytree(grad)[0]
    vectors = jax.vmap(lambda v: ravel_pytree(v)[0])(pairs.eigenvectors)
    squared_norm = jnp.sum(flat_grad**2)
    return {
      "loss": loss,
      "accuracy": accuracy_fn(p),
      "gradient_norm": jnp.sqrt(squared_norm),
      "top_eigenvalues": pairs.eigenvalues,
      "top_residuals": pairs.residual_norms,
      "gradient_share": jnp.cumsum((vectors @ flat_grad) ** 2) / squared_norm,
    }

  descend = jax.jit(jax.vmap(descend_one, in_axes=(0, None, None)))
  measure = jax.jit(jax.vmap(measure_one))
  return value_fn, params, descend, measure


def dense_check(value_fn, params, num_classes: int, top_k: int) -> dict[str, Any]:
  """The top eigenvalues and the gradient share at ``num_classes`` of the dense Hessian."""
  flat, unravel = ravel_pytree(params)

  def flat_loss(v):
    return value_fn(unravel(v))

  hessian = np.asarray(jax.jit(jax.hessian(flat_loss))(flat), np.float64)
  gradient = np.asarray(jax.grad(flat_loss)(flat), np.float64)
  eigenvalues, eigenvectors = np.linalg.eigh(hessian)
  top_vectors = eigenvectors[:, ::-1][:, :num_classes]
  return {
    "top_eigenvalues": eigenvalues[::-1][:top_k].tolist(),
    "gradient_share_at_classes": float(
      np.sum((top_vectors.T @ gradient) ** 2) / np.sum(gradient**2)
    ),
  }


def compute_unit(config: Config, unit: str) -> tuple[list[dict], dict[str, Any]]:
  dataset_name, model, learning_rate = unit_settings(config)[unit]
  dataset = load_dataset(dataset_name, config)
  num_classes = dataset.num_classes
  start = time.perf_counter()
  value_fn, params, descend, measure = _programs(dataset_name, model, config)
  num_params = sum(leaf[0].size for leaf in jax.tree.leaves(params))
  records, done = [], 0
  for index, step in enumerate(checkpoints(config)):
    params = descend(params, step - done, learning_rate)
    done = step
    keys = jax.random.split(jax.random.fold_in(jax.random.key(0), index), config.seeds)
    measured = jax.tree.map(np.asarray, measure(params, keys))
    for seed in range(config.seeds):
      top = measured["top_eigenvalues"][seed].astype(np.float64)
      gap_index, gap_ratio = largest_gap(top)
      records.append(
        {
          "step": step,
          "seed": seed,
          "loss": float(measured["loss"][seed]),
          "accuracy": float(measured["accuracy"][seed]),
          "gradient_norm": float(measured["gradient_norm"][seed]),
          "top_eigenvalues": _runner.to_json_floats(top),
          "top_residuals": _runner.to_json_floats(measured["top_residuals"][seed]),
          "gradient_share": _runner.to_json_floats(measured["gradient_share"][seed]),
          "largest_gap_index": gap_index,
          "largest_gap_ratio": gap_ratio,
          "class_gap_ratio": float(top[num_classes - 1] / top[num_classes]),
        }
      )
  closing = {
    "dataset": dataset_name,
    "model": model,
    "learning_rate": learning_rate,
    "num_params": int(num_params),
    "num_classes": num_classes,
    "random_share": num_classes / num_params,
    "checkpoints": checkpoints(config),
  }
  if num_params <= config.dense_check_params:
    seed_zero = jax.tree.map(lambda leaf: leaf[0], params)
    closing["dense_check"] = dense_check(value_fn, seed_zero, num_classes, config.top_k)
  closing["seconds"] = round(time.perf_counter() - start, 3)
  return records, closing


def unit_records(run: _runner.RunDirectory, unit: str) -> list[dict]:
  return [r for r in run.records() if r.get("unit") == unit and "seed" in r]


def final_records(run: _runner.RunDirectory, unit: str, config: Config) -> list[dict]:
  """The records of the last checkpoint, one per seed, in seed order."""
  last = checkpoints(config)[-1]
  return sorted((r for r in unit_records(run, unit) if r["step"] == last), key=lambda r: r["seed"])


def per_checkpoint(run: _runner.RunDirectory, unit: str, config: Config, value) -> np.ndarray:
  """``(seeds, checkpoints)`` array of ``value(record, num_classes)`` over one unit's records."""
  num_classes = run.finished_units()[unit]["num_classes"]
  rows = {(r["seed"], r["step"]): value(r, num_classes) for r in unit_records(run, unit)}
  return np.asarray(
    [[rows[seed, step] for step in checkpoints(config)] for seed in range(config.seeds)],
    np.float64,
  )


def share_at_classes(run: _runner.RunDirectory, unit: str, config: Config) -> np.ndarray:
  """``(seeds, checkpoints)`` gradient shares in the top-C eigenvectors' span."""
  return per_checkpoint(run, unit, config, lambda r, c: r["gradient_share"][c - 1])


def stability(run: _runner.RunDirectory, unit: str, config: Config) -> np.ndarray:
  r"""``(seeds, checkpoints)`` values of :math:`\eta \lambda_1`; GD is stable along the top
  eigenvector below 2."""
  rate = run.finished_units()[unit]["learning_rate"]
  return per_checkpoint(run, unit, config, lambda r, _: rate * r["top_eigenvalues"][0])


def _panels(config: Config, curve) -> dict[str, dict[str, np.ndarray]]:
  """A panel per dataset and learning rate, a curve per model: ``curve(unit)``."""
  return {
    f"{dataset}, lr {rate:g}": {
      model: curve(unit_name(dataset, model, rate)) for model in config.models
    }
    for dataset in config.datasets
    for rate in config.learning_rates
  }


def make_figures(run: _runner.RunDirectory, config: Config) -> list[str]:
  columns = len(config.learning_rates)
  common = dict(x=np.asarray(checkpoints(config)), xscale="symlog", columns=columns)
  share = _plots.plot_panels(
    _panels(config, lambda unit: share_at_classes(run, unit, config)),
    run.figures / "gradient_share.png",
    title="share of |g|^2 in the span of the top-C Hessian eigenvectors",
    ylabel="share",
    xlabel="gradient descent step",
    yscale="log",
    **common,
  )
  sharpness = _plots.plot_panels(
    _panels(config, lambda unit: stability(run, unit, config)),
    run.figures / "stability.png",
    title="learning rate x largest eigenvalue (GD is unstable along it above 2)",
    ylabel="lr * lambda_1",
    xlabel="gradient descent step",
    **common,
  )

  def top_eigenvalues(unit):
    final = final_records(run, unit, config)
    return np.asarray([np.asarray(r["top_eigenvalues"]) / r["top_eigenvalues"][0] for r in final])

  eigenvalues = _plots.plot_panels(
    _panels(config, top_eigenvalues),
    run.figures / "top_eigenvalues.png",
    title=f"top eigenvalues over the largest at step {config.steps}",
    ylabel="lambda_i / lambda_1",
    xlabel="i",
    x=np.arange(1, config.top_k + 1),
    yscale="log",
    columns=columns,
  )
  return [str(path.relative_to(run.path)) for path in (share, sharpness, eigenvalues)]


def summary_table(run: _runner.RunDirectory, config: Config) -> str:
  """At the last step: the loss, the spectrum's top and its gaps, and the gradient's share."""
  units = run.finished_units()
  header = [
    "unit",
    "params",
    "final loss",
    "lambda_1",
    "lambda_C / lambda_C+1",
    "eigenvalues above the largest gap",
    "gradient share in top C",
    "random C/n",
  ]
  rows = []
  for unit in unit_names(config):
    closing = units[unit]
    final = final_records(run, unit, config)
    rows.append(
      [
        unit,
        closing["num_params"],
        f"{np.median([r['loss'] for r in final]):.3g}",
        f"{np.median([r['top_eigenvalues'][0] for r in final]):.3g}",
        f"{np.median([r['class_gap_ratio'] for r in final]):.3g}",
        ", ".join(str(r["largest_gap_index"]) for r in final),
        f"{np.median(share_at_classes(run, unit, config)[:, -1]):.2g}",
        f"{closing['random_share']:.2g}",
      ]
    )
  return _runner.markdown_table(header, rows)


def trajectory_table(run: _runner.RunDirectory, config: Config) -> str:
  """Per checkpoint, medians over seeds: the gradient's share in the top C and lr * lambda_1."""
  header = ["unit", *(f"step {step}" for step in checkpoints(config))]
  rows = [
    [
      unit,
      *(
        f"{s:.2g} ({e:.2f})"
        for s, e in zip(
          np.median(share_at_classes(run, unit, config), axis=0),
          np.median(stability(run, unit, config), axis=0),
          strict=True,
        )
      ),
    ]
    for unit in unit_names(config)
  ]
  return _runner.markdown_table(header, rows)


def summary(run: _runner.RunDirectory, config: Config, figures: list[str]) -> str:
  units = run.finished_units()
  lines = [
    "# Hessian outliers, the gradient's subspace and BatchNorm",
    "",
    f"A tanh MLP with one hidden layer of {config.width} units, with and without BatchNorm, "
    f"{config.seeds} seeds of full-batch gradient descent ({config.steps} steps at each "
    f"learning rate) on the first {config.max_train_examples} training examples; the top "
    f"{config.top_k} Hessian eigenpairs by {config.lanczos_steps} Lanczos steps with full "
    f"reorthogonalisation at steps {', '.join(map(str, checkpoints(config)))}. C is the number "
    "of classes.",
    "",
    "## At the last step",
    "",
    "Medians over seeds, except the largest gap, given per seed (the number of eigenvalues "
    "above the largest ratio lambda_i / lambda_i+1 among the top ones).",
    "",
    summary_table(run, config),
    "",
    "## During training",
    "",
    "The share of the squared gradient norm in the span of the top C eigenvectors, and in "
    "brackets lr * lambda_1 (gradient descent is unstable along the top eigenvector above 2); "
    "medians over seeds.",
    "",
    trajectory_table(run, config),
    "",
  ]
  checks = [
    (unit, units[unit]["dense_check"])
    for unit in unit_names(config)
    if "dense_check" in units[unit]
  ]
  if checks:
    lines += ["## Against the dense Hessian (seed 0, last step)", ""]
    for unit, check in checks:
      final = final_records(run, unit, config)[0]
      num_classes = units[unit]["num_classes"]
      lanczos, dense = np.asarray(final["top_eigenvalues"]), np.asarray(check["top_eigenvalues"])
      lines.append(
        f"- {unit}: top {config.top_k} eigenvalues within a relative "
        f"{np.max(np.abs(lanczos - dense) / np.abs(dense)):.1e} of eigh's; gradient share in "
        f"the top C {final['gradient_share'][num_classes - 1]:.3g} (dense "
        f"{check['gradient_share_at_classes']:.3g})."
      )
    lines.append("")
  lines += [f"![{figure}]({figure})\n" for figure in figures]
  return "\n".join(lines)


def run(run_dir: _runner.RunDirectory) -> str:
  """Computes the missing units, then writes the figures and summary; returns the table."""
  return _runner.run_experiment(run_dir, sys.modules[__name__])
