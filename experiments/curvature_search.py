r"""How many oracle calls a negative-curvature search needs on a network's Hessian, on real data.

Three searches for a direction of negative curvature, each run as one update of its jaxsaddle
transform at a point of a one-hidden-layer tanh MLP on scikit-learn's digits (the whole
training set, float64):

- ``ncd``: Lanczos on Hessian-vector products (:func:`jaxsaddle.negative_curvature_descent`);
  ``K`` steps cost :func:`experiments._oracle.lanczos_call_cost` = ``K + 1`` gradients.
- ``neon``: the power method on :math:`I - H/\ell` with each product replaced by a gradient
  difference (:func:`jaxsaddle.neon`); ``K + 3`` gradients.
- ``neon2``: Chebyshev's recurrence on :math:`I - 2H/\ell` in its place
  (:func:`jaxsaddle.neon2`); ``K + 3`` gradients.

The searches are asked at two points: ``near-origin``, flax's initialisation scaled by
``near_origin_scale`` (a spectrum spread symmetrically around 0: negative curvature as large
as the positive), and ``trained``, ``steps`` steps of gradient descent from the standard
initialisation (a most negative curvature :math:`-\gamma` tiny against the largest,
:math:`\ell`: where the methods part). The theory: to find curvature near :math:`-\gamma`, the
power method needs about :math:`(\ell/\gamma) \log(n/\delta)` steps, Chebyshev's recurrence
and Lanczos about :math:`\sqrt{\ell/\gamma} \log(n/\delta)`, and Lanczos does at least as well
as any polynomial of its degree (Kuczyński and Woźniakowski 1992; Allen-Zhu and Li's Neon2
2018 for the Chebyshev acceleration of Neon).

Every update searches (``gradient_threshold`` huge) and steps along any negative bound
(``epsilon`` tiny), so the step's direction :math:`v` is read back from the update and its
exact curvature :math:`v^\top H v` taken with the dense Hessian (``jax.hessian``, ``eigh``).
Per seed (the transform's key, which draws its start) and number of steps ``K``, a record
holds the *found fraction* :math:`v^\top H v / \lambda_{\min}` (1: the most negative
curvature; 0 where the search reported none) and the curvature the method reported (the Ritz
value, or neon's upper bound). ``neon`` and ``neon2`` run once per entry of
``smoothness_scales``, with ``smoothness`` that multiple of the exact largest eigenvalue: a
user estimates it (with :func:`jaxsaddle.hessian_extreme_eigenvalues`, whose Lanczos estimate
lies below it, or a Lipschitz bound above it), and ``neon2`` needs it at least the largest
curvature. ``hessian_lipschitz`` only sets the step length and the slack :math:`\rho r / 2` of
the gradient-difference bound, nominal here since the comparison is of directions.

``K`` Lanczos steps build a polynomial of degree :math:`K - 1` in :math:`H` (the Krylov space
of dimension :math:`K`), ``K`` power or Chebyshev steps one of degree :math:`K`: at the
smallest ``K`` the gradient-difference searches can come out ahead.
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

import jaxsaddle
from experiments import _oracle
from experiments import _plots
from experiments import _runner
from experiments import data
from experiments import models

NAME = "curvature-search"
METHODS = ("ncd", "neon", "neon2")
POINTS = ("near-origin", "trained")
SPECTRUM = "spectrum"
# The found fraction that counts as having found the negative curvature.
FOUND = 0.5
# The searches that need the Hessian's largest eigenvalue, run once per smoothness scale.
NEEDS_SMOOTHNESS = ("neon", "neon2")


@dataclasses.dataclass(frozen=True)
class Config:
  """The searches' settings; ``steps`` is the gradient descent that makes the trained point."""

  seeds: int = 8
  steps: int = 300
  search_steps: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)
  points: tuple[str, ...] = POINTS
  methods: tuple[str, ...] = METHODS
  width: int = 16
  model_seed: int = 0
  near_origin_scale: float = 0.1
  learning_rate: float = 0.5
  smoothness_scales: tuple[float, ...] = (0.97, 1.0, 2.0)
  hessian_lipschitz: float = 1.0
  difference_radius: float = 1e-4
  fast_compile: bool = False  # XLA without optimisations (see experiments._runner)


def default_config(quick: bool = False) -> Config:
  """Every point and method at 2 and 64 steps with 3 seeds, and the exact and a 3% low
  smoothness, when ``quick``."""
  if quick:
    return Config(seeds=3, search_steps=(2, 64), smoothness_scales=(0.97, 1.0), fast_compile=True)
  return Config()


@functools.cache
def _point(config: Config, point: str) -> tuple[jax.Array, Any, np.ndarray, np.ndarray]:
  """The flat float64 params of ``point``, the loss of flat params, the dense Hessian there
  and its eigenvalues (ascending)."""
  dataset = data.load_digits()
  inputs = jnp.asarray(dataset.x_train, jnp.float64)
  labels = jnp.asarray(dataset.y_train)
  model = models.make_model(
    "mlp",
    input_shape=dataset.input_shape,
    num_classes=dataset.num_classes,
    width=config.width,
    init_scale=config.near_origin_scale if point == "near-origin" else 1.0,
    rngs=nnx.Rngs(config.model_seed),
  )
  graphdef, params = nnx.split(model, nnx.Param)
  flat, unravel = ravel_pytree(jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params))

  def value_fn(flat_params):
    return models.cross_entropy_loss(nnx.merge(graphdef, unravel(flat_params)), inputs, labels)

  if point == "trained":

    def descend(_, p):
      return p - config.learning_rate * jax.grad(value_fn)(p)

    flat = jax.jit(lambda p: jax.lax.fori_loop(0, config.steps, descend, p))(flat)
  hessian = np.asarray(jax.jit(jax.hessian(value_fn))(flat))
  return flat, value_fn, hessian, np.linalg.eigvalsh(hessian)


def make_search(method: str, num_steps: int, smoothness: float, key, config: Config):
  """The transform of ``method`` with ``num_steps`` steps, set to search at every update and to
  step along any negative curvature it reports."""
  common = dict(
    hessian_lipschitz=config.hessian_lipschitz, epsilon=1e-24, gradient_threshold=1e30, key=key
  )
  if method == "ncd":
    return jaxsaddle.negative_curvature_descent(1.0, num_lanczos_steps=num_steps, **common)
  return getattr(jaxsaddle, method)(
    1.0,
    smoothness=smoothness,
    num_search_steps=num_steps,
    difference_radius=config.difference_radius,
    **common,
  )


def search_labels(config: Config) -> list[str]:
  """``ncd``, and ``<method>@<scale>`` for each search that needs a smoothness."""
  return [
    label
    for method in config.methods
    for label in (
      [f"{method}@{scale:g}" for scale in config.smoothness_scales]
      if method in NEEDS_SMOOTHNESS
      else [method]
    )
  ]


def unit_names(config: Config) -> list[str]:
  return [
    name
    for point in config.points
    for name in (f"{point}/{SPECTRUM}", *(f"{point}/{label}" for label in search_labels(config)))
  ]


def _spectrum_facts(point, flat, value_fn, eigenvalues) -> dict[str, Any]:
  return {
    "point": point,
    "num_params": int(flat.size),
    "loss": float(value_fn(flat)),
    "gradient_norm": float(jnp.linalg.norm(jax.grad(value_fn)(flat))),
    "smallest_eigenvalue": float(eigenvalues[0]),
    "largest_eigenvalue": float(eigenvalues[-1]),
    "num_negative": int(np.sum(eigenvalues < 0)),
  }


def _search(config: Config, method: str, num_steps: int, smoothness: float, flat, value_fn):
  """Every seed's update, reported curvature and whether it stepped, for one search setting."""
  grads = jax.grad(value_fn)(flat)

  def one(seed):
    tx = make_search(method, num_steps, smoothness, seed, config)
    updates, state = tx.update(grads, tx.init(flat), flat, value_fn=value_fn)
    return updates, state.last_smallest_eigenvalue, state.num_curvature_steps

  return map(np.asarray, jax.jit(jax.vmap(one))(jnp.arange(config.seeds)))


def compute_unit(config: Config, unit: str) -> tuple[list[dict], dict[str, Any]]:
  point, label = unit.split("/")
  start = time.perf_counter()
  with jax.enable_x64(True):
    flat, value_fn, hessian, eigenvalues = _point(config, point)
    if label == SPECTRUM:
      return [], _spectrum_facts(point, flat, value_fn, eigenvalues)
    method, _, scale = label.partition("@")
    smallest = float(eigenvalues[0])
    smoothness = float(scale or 1) * float(eigenvalues[-1])
    records, fractions_per_steps = [], []
    for num_steps in config.search_steps:
      updates, reported, stepped = _search(config, method, num_steps, smoothness, flat, value_fn)
      directions = updates / np.linalg.norm(updates, axis=1, keepdims=True)
      curvatures = np.einsum("si,ij,sj->s", directions, hessian, directions)
      fractions = np.where(stepped == 1, curvatures / smallest, 0.0)
      fractions_per_steps.append(fractions)
      records += [
        {
          "seed": seed,
          "search_steps": num_steps,
          "found_fraction": float(fractions[seed]),
          "reported_curvature": float(reported[seed]),
          "stepped": bool(stepped[seed]),
        }
        for seed in range(config.seeds)
      ]
  closing = {
    "point": point,
    "method": method,
    "smoothness": smoothness if method in NEEDS_SMOOTHNESS else None,
    "search_steps": list(config.search_steps),
    "oracle_calls": [_oracle.curvature_call_cost(method, k) for k in config.search_steps],
    "median_found_fraction": _runner.to_json_floats(np.median(fractions_per_steps, axis=1)),
    "seconds": round(time.perf_counter() - start, 3),
  }
  return records, closing


def found_fractions(run: _runner.RunDirectory, point: str, label: str) -> np.ndarray:
  """``(seeds, len(search_steps))`` found fractions of one unit, from its records."""
  config: Config = run.config
  unit = f"{point}/{label}"
  rows = {
    (r["seed"], r["search_steps"]): r["found_fraction"]
    for r in run.records()
    if r.get("unit") == unit and "seed" in r
  }
  return np.asarray(
    [[rows[seed, k] for k in config.search_steps] for seed in range(config.seeds)], np.float64
  )


def fewest_steps_to_find(run: _runner.RunDirectory, point: str, label: str) -> int | None:
  """The fewest steps whose median found fraction reaches :data:`FOUND`; None if none does."""
  closing = run.finished_units()[f"{point}/{label}"]
  for num_steps, fraction in zip(
    closing["search_steps"], closing["median_found_fraction"], strict=True
  ):
    if fraction >= FOUND:
      return num_steps
  return None


def make_figures(run: _runner.RunDirectory, config: Config) -> list[str]:
  panels = {
    point: {label: found_fractions(run, point, label) for label in search_labels(config)}
    for point in config.points
  }
  path = _plots.plot_panels(
    panels,
    run.figures / "found_fraction.png",
    title="curvature found along the search's direction, v'Hv / lambda_min (method@smoothness "
    "/ lambda_max)",
    ylabel="found fraction",
    xlabel="steps per search K",
    x=np.asarray(config.search_steps),
    xscale="log",
    columns=2,
  )
  return [str(path.relative_to(run.path))]


def summary_table(run: _runner.RunDirectory, config: Config) -> str:
  units = run.finished_units()
  header = ["point", "search", *[f"K={k}" for k in config.search_steps]]
  rows = [
    [point, label, *[f"{f:.2f}" for f in units[f"{point}/{label}"]["median_found_fraction"]]]
    for point in config.points
    for label in search_labels(config)
  ]
  return _runner.markdown_table(header, rows)


def summary(run: _runner.RunDirectory, config: Config, figures: list[str]) -> str:
  units = run.finished_units()
  lanczos_extra = _oracle.curvature_call_cost("ncd", 0)
  difference_extra = _oracle.curvature_call_cost("neon", 0)
  lines = [
    "# Negative-curvature searches on an MLP's Hessian",
    "",
    f"A tanh MLP of width {config.width} on scikit-learn's digits (the whole training set, "
    f"float64), {config.seeds} seeds (start vectors) per search. Cells: the median over seeds "
    "of the found fraction v'Hv / lambda_min of the search's direction v (1: the most negative "
    f"curvature, 0: none reported). A search of K steps costs K + {lanczos_extra:g} gradients "
    "for ncd (Lanczos, counting a Hessian-vector product as one gradient) and "
    f"K + {difference_extra:g} for neon and neon2; `method@s` ran with smoothness s times the "
    "largest eigenvalue. K Lanczos steps make a polynomial of degree K - 1 in H, K power or "
    "Chebyshev steps one of degree K.",
    "",
    summary_table(run, config),
    "",
    "## The points",
    "",
  ]
  for point in config.points:
    facts = units[f"{point}/{SPECTRUM}"]
    ratio = -facts["smallest_eigenvalue"] / facts["largest_eigenvalue"]
    lines.append(
      f"- **{point}**: {facts['num_params']} parameters, loss {facts['loss']:.4g}, gradient "
      f"norm {facts['gradient_norm']:.3g}; Hessian eigenvalues in "
      f"[{facts['smallest_eigenvalue']:.3g}, {facts['largest_eigenvalue']:.3g}], "
      f"{facts['num_negative']} negative; gamma / ell = {ratio:.3g}, "
      f"sqrt(ell / gamma) = {np.sqrt(1 / ratio) if ratio > 0 else float('inf'):.3g}."
    )
  lines += ["", f"## Fewest steps to a median found fraction of {FOUND:g}", ""]
  for point in config.points:
    cells = []
    for label in search_labels(config):
      steps = fewest_steps_to_find(run, point, label)
      cells.append(f"{label} {'> ' + str(max(config.search_steps)) if steps is None else steps}")
    lines.append(f"- {point}: " + ", ".join(cells) + ".")
  lines += ["", *(f"![{figure}]({figure})\n" for figure in figures)]
  return "\n".join(lines)


def check_config(config: Config) -> None:
  """Raises ValueError for a config the run would fail on; the CLI calls it before writing."""
  _runner.check_seeds_and_steps(config)
  _runner.check_known("points", config.points, POINTS)
  _runner.check_known("methods", config.methods, METHODS)
  if not config.search_steps or any(
    isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in config.search_steps
  ):
    raise ValueError(f"search_steps must be integers of at least 1, got {config.search_steps}.")
  if not config.smoothness_scales or not all(scale > 0 for scale in config.smoothness_scales):
    raise ValueError(f"smoothness_scales must be positive, got {config.smoothness_scales}.")


def run(run_dir: _runner.RunDirectory) -> str:
  """Computes the missing units, then writes the figures and summary; returns the table."""
  return _runner.run_experiment(run_dir, sys.modules[__name__])
