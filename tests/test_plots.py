"""The plotting helpers of the experiments keep figures readable."""

import matplotlib.axes
import matplotlib.pyplot as plt
import numpy as np

from experiments import _plots


def test_a_log_axis_on_a_flat_loss_is_not_zoomed_into_its_noise():
  # A loss flat at ln 10 filled the panel with sixth-digit noise, labelled 2.30259e0.
  figure, axes = plt.subplots()
  axes.plot(np.log(10.0) + 1e-6 * np.sin(np.arange(50)))
  _plots._set_yscale(axes, "log")
  low, high = axes.get_ylim()
  assert high / low >= _plots._MIN_LOG_SPAN * (1 - 1e-9)
  assert low < np.log(10.0) < high
  assert axes.yaxis.get_major_formatter()(2.302585, 0) == "2.3"
  plt.close(figure)


def test_advantage_groups_past_the_colour_cycle_get_other_markers(tmp_path, monkeypatch):
  styles = []
  errorbar = matplotlib.axes.Axes.errorbar

  def recording(self, *args, fmt, color, **kwargs):
    styles.append((fmt, color))
    return errorbar(self, *args, fmt=fmt, color=color, **kwargs)

  monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", recording)
  groups = [f"group {i}" for i in range(12)]
  _plots.plot_advantage(list(range(1, 13)), [(0.1, 0.05)] * 12, groups, tmp_path / "advantage.png")
  assert len(styles) == 12 and len(set(styles)) == 12
