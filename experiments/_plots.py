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


def band_limits(values: np.ndarray, band: Band) -> tuple[np.ndarray, np.ndarray]:
  """The lower and upper edge over seeds (axis 0): min–max or the 10–90% quantiles."""
  if band == "minmax":
    return np.nanmin(values, axis=0), np.nanmax(values, axis=0)
  if band == "quantile":
    return tuple(np.nanquantile(values, [0.1, 0.9], axis=0))
  raise ValueError(f"band must be 'minmax' or 'quantile', got {band!r}.")


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
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for index, (label, values) in enumerate(curves.items()):
    values = np.asarray(values, dtype=np.float64)
    steps = np.arange(values.shape[1])
    color = colors[index % len(colors)]
    lower, upper = band_limits(values, band)
    axes.fill_between(steps, lower, upper, color=color, alpha=0.2, linewidth=0)
    axes.plot(
      steps,
      np.nanmedian(values, axis=0),
      color=color,
      linestyle=_LINE_STYLES[index % len(_LINE_STYLES)],
      linewidth=1.8,
      label=f"{label} (n={values.shape[0]})",
    )
  axes.set_yscale(yscale)
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  axes.set_title(title)
  axes.grid(alpha=0.3)
  axes.legend(title=f"median over seeds, band {band_label}", fontsize="small")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path
