"""ROC curves as PNG files.

Drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global
backend switch), so plotting works on headless machines and in threads.
"""

from collections.abc import Mapping
import os

from matplotlib import figure as figure_lib
from matplotlib.backends import backend_agg
import numpy as np

from adaface_jax import verification

# Points kept per curve: plenty for a log axis, small for a million pairs.
_MAX_POINTS = 2000


def _log_thinned(roc: verification.Roc) -> tuple[np.ndarray, np.ndarray]:
  """The curve's points with FAR > 0, at most about `_MAX_POINTS`.

  A log axis cannot show FAR = 0. Of the points falling in the same
  log-spaced FAR bin, the last (highest TAR) is kept.
  """
  positive = roc.fpr > 0
  fpr, tpr = roc.fpr[positive], roc.tpr[positive]
  if fpr.size <= _MAX_POINTS:
    return fpr, tpr
  bins = np.floor(np.log10(fpr) * (_MAX_POINTS / 12)).astype(np.int64)
  last_in_bin = np.r_[np.flatnonzero(np.diff(bins)), bins.size - 1]
  return fpr[last_in_bin], tpr[last_in_bin]


def plot_rocs(path: str, rocs: Mapping[str, verification.Roc],
              title: str) -> str:
  """Writes the curves of `rocs` into one PNG, FAR on a log axis.

  Args:
    path: the PNG to write; its folder is created.
    rocs: legend label -> curve (from `verification.roc_curve`).
    title: the figure's title.

  Returns:
    `path`.
  """
  if not rocs:
    raise ValueError(f"no ROC curve to plot into {path!r}")
  figure = figure_lib.Figure(figsize=(6.4, 4.8), dpi=100)
  backend_agg.FigureCanvasAgg(figure)
  axes = figure.add_subplot()

  lowest = 1.0
  for label, roc in rocs.items():
    fpr, tpr = _log_thinned(roc)
    if fpr.size:
      lowest = min(lowest, float(fpr[0]))
    # The points include every corner, so straight segments draw the
    # curve exactly (ties make diagonal ones).
    axes.plot(fpr, tpr, linewidth=1.2, label=label)

  axes.set_xscale("log")
  # Down to the smallest measured FAR, and at least a decade wide.
  axes.set_xlim(min(max(lowest, 1e-7), 0.1), 1.0)
  axes.set_ylim(0.0, 1.01)
  axes.set_xlabel("false accept rate")
  axes.set_ylabel("true accept rate")
  axes.set_title(title)
  axes.grid(True, which="both", linestyle=":", linewidth=0.6)
  axes.legend(loc="lower right", fontsize="small")
  figure.tight_layout()

  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  figure.savefig(path)
  return path
