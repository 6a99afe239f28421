"""Figures shared by the experiments (matplotlib, Agg backend: no display needed)."""

from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

Band = Literal["minmax", "quantile"]
# Several methods can coincide (e.g. a method stuck at the saddle and the saddle
# level itself), so each curve gets a line style as well as a colour.
_LINE_STYLES = ("-", "--", "-.", ":")
_LEVEL_STYLES = ("--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")
# A log axis spans at least this factor: the matplotlib default zooms a loss flat at ln 10 until
# noise in its sixth digit fills the panel, under tick labels like 2.30259e0.
_MIN_LOG_SPAN = 1.25


def _save(figure, path: str | Path, dpi: int) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=dpi)
  plt.close(figure)
  return path


def _panel_grid(count: int, columns: int, panel_size: tuple[float, float]):
  """A figure with ``count`` panels in rows of ``columns``; the unused cells are hidden."""
  rows = -(-count // columns)
  columns = min(columns, count)
  figure, grid = plt.subplots(
    rows,
    columns,
    figsize=(panel_size[0] * columns, panel_size[1] * rows),
    layout="constrained",
    squeeze=False,
  )
  for axes in list(grid.flat)[count:]:
    axes.set_visible(False)
  return figure, grid


def band_limits(values: np.ndarray, band: Band) -> tuple[np.ndarray, np.ndarray]:
  """The lower and upper edge over seeds (axis 0): min–max or the 10–90% quantiles."""
  if band == "minmax":
    return np.nanmin(values, axis=0), np.nanmax(values, axis=0)
  if band == "quantile":
    return tuple(np.nanquantile(values, [0.1, 0.9], axis=0))
  raise ValueError(f"band must be 'minmax' or 'quantile', got {band!r}.")


XCoordinates = np.ndarray | Mapping[str, np.ndarray] | None


def _draw_curves(axes, curves: Mapping[str, np.ndarray], x: XCoordinates, band: Band) -> None:
  """Per curve, the median over seeds (axis 0) as a line and the ``band`` as a shaded area.

  ``x`` is shared by every curve, given per curve label, or None for ``0, 1, ...``.
  """
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for index, (label, values) in enumerate(curves.items()):
    values = np.asarray(values, dtype=np.float64)
    if x is None:
      points = np.arange(values.shape[1])
    else:
      points = np.asarray(x[label] if isinstance(x, Mapping) else x)
    color = colors[index % len(colors)]
    lower, upper = band_limits(values, band)
    axes.fill_between(points, lower, upper, color=color, alpha=0.2, linewidth=0)
    axes.plot(
      points,
      np.nanmedian(values, axis=0),
      color=color,
      linestyle=_LINE_STYLES[index % len(_LINE_STYLES)],
      linewidth=1.8,
      label=f"{label} (n={values.shape[0]})",
    )


def plot_curves_over_seeds(
  curves: Mapping[str, np.ndarray],
  path: str | Path,
  *,
  title: str,
  ylabel: str = "loss",
  xlabel: str = "step",
  band: Band = "minmax",
  yscale: Literal["linear", "log", "symlog"] = "linear",
  levels: Sequence[tuple[float, str]] = (),
) -> Path:
  """Plots one median line and one band over seeds per curve, and saves a PNG.

  Args:
    curves: label -> array of shape ``(num_seeds, num_steps)``; step ``t`` is
      column ``t``.
    path: where to write the PNG.
    title: the figure title.
    ylabel: the y-axis label.
    xlabel: the x-axis label.
    band: ``"minmax"`` for the range over seeds, ``"quantile"`` for 10–90%.
    yscale: a matplotlib y scale; ``"log"`` needs positive values.
    levels: horizontal reference lines, ``(y, label)``, drawn thin and grey.

  Returns:
    The path of the PNG.
  """
  band_label = "min–max" if band == "minmax" else "10–90%"
  figure, axes = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
  for index, (level, label) in enumerate(levels):
    # Drawn above the curves, so a method that stays at the saddle does not hide the level.
    style = _LEVEL_STYLES[index % len(_LEVEL_STYLES)]
    axes.axhline(level, color="0.25", linestyle=style, linewidth=1.0, label=label, zorder=3)
  _draw_curves(axes, curves, None, band)
  _set_yscale(axes, yscale)
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  axes.set_title(title)
  axes.grid(alpha=0.3)
  axes.legend(title=f"median over seeds, band {band_label}", fontsize="small")
  return _save(figure, path, dpi=120)


def _set_yscale(axes, yscale: str) -> None:
  """``axes.set_yscale``; a log axis spans at least ``_MIN_LOG_SPAN`` (then with 3-digit
  labels on its ticks, which lie within one decade)."""
  axes.set_yscale(yscale)
  low, high = axes.get_ylim()
  if yscale == "log" and high < low * _MIN_LOG_SPAN:
    centre = np.sqrt(low * high)
    axes.set_ylim(centre / np.sqrt(_MIN_LOG_SPAN), centre * np.sqrt(_MIN_LOG_SPAN))
    for set_formatter in (axes.yaxis.set_major_formatter, axes.yaxis.set_minor_formatter):
      set_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))


def plot_panels(
  panels: Mapping[str, Mapping[str, np.ndarray]],
  path: str | Path,
  *,
  title: str,
  ylabel: str = "loss",
  xlabel: str = "step",
  x: XCoordinates = None,
  band: Band = "minmax",
  yscale: Literal["linear", "log", "symlog"] = "linear",
  xscale: Literal["linear", "log", "symlog"] = "linear",
  columns: int = 3,
) -> Path:
  """One panel per entry of ``panels``, each with a median line and a band over seeds per curve.

  Args:
    panels: panel title -> (curve label -> array of shape ``(num_seeds, num_points)``).
    path: where to write the PNG.
    title: the figure title.
    ylabel: the y-axis label.
    xlabel: the x-axis label.
    x: the x coordinates of the points, shared or per curve label (default ``0, 1, ...``).
    band: ``"minmax"`` for the range over seeds, ``"quantile"`` for 10–90%.
    yscale: a matplotlib y scale.
    xscale: a matplotlib x scale; ``"log"`` needs positive x, ``"symlog"`` takes 0 too (the
      axis then starts there: x must not be negative).
    columns: panels per row.

  Returns:
    The path of the PNG.
  """
  figure, grid = _panel_grid(len(panels), columns, (4.2, 3.2))
  for axes, (panel_title, curves) in zip(grid.flat, panels.items(), strict=False):
    _draw_curves(axes, curves, x, band)
    _set_yscale(axes, yscale)
    axes.set_xscale(xscale)
    if xscale == "symlog":
      axes.set_xlim(left=0)
    axes.set_title(panel_title, fontsize="medium")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small")
  band_label = "min–max" if band == "minmax" else "10–90%"
  figure.suptitle(f"{title} (median over seeds, band {band_label})", wrap=True)
  return _save(figure, path, dpi=110)


def plot_advantage(
  sizes: Sequence[int],
  intervals: Sequence[tuple[float, float]],
  groups: Sequence[str],
  path: str | Path,
  *,
  title: str = "PGD's advantage (GD − PGD final loss) against model size",
) -> Path:
  """A scatter of mean paired differences with 95% error bars, one colour and marker per group."""
  figure, axes = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for index, group in enumerate(dict.fromkeys(groups)):
    chosen = [i for i, g in enumerate(groups) if g == group]
    # Past the colour cycle the marker changes, so no two groups look alike.
    axes.errorbar(
      [sizes[i] for i in chosen],
      [intervals[i][0] for i in chosen],
      yerr=[intervals[i][1] for i in chosen],
      fmt=_MARKERS[index // len(colors) % len(_MARKERS)],
      color=colors[index % len(colors)],
      capsize=3,
      label=group,
    )
  axes.axhline(0.0, color="0.25", linewidth=1.0)
  axes.set_xscale("log")
  axes.set_xlabel("parameters")
  axes.set_ylabel("GD − PGD final training loss")
  axes.set_title(title)
  axes.grid(alpha=0.3)
  axes.legend(fontsize="small")
  return _save(figure, path, dpi=120)


def plot_densities(
  panels: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
  path: str | Path,
  *,
  title: str,
  columns: int = 2,
) -> Path:
  """One panel per entry, one line per ``(grid, density)`` (a seed), on a log density axis."""
  figure, grid = _panel_grid(len(panels), columns, (4.8, 3.4))
  for axes, (panel_title, lines) in zip(grid.flat, panels.items(), strict=False):
    for index, (points, density) in enumerate(lines):
      # A density is zero far from the nodes; the floor keeps the log axis finite.
      axes.plot(points, np.maximum(density, 1e-8), linewidth=1.0, label=f"seed {index}")
    axes.set_yscale("log")
    axes.set_title(panel_title, fontsize="medium")
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small")
  figure.suptitle(title)
  return _save(figure, path, dpi=110)
