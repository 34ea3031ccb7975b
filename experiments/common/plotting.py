"""PNG plots of a run: training curves, and certified accuracy against the l2 radius."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aol_jax import STANDARD_RADII
from experiments.common.storage import write_atomic

if TYPE_CHECKING:
  from matplotlib.figure import Figure


@functools.cache
def _pyplot():
  """matplotlib's pyplot on its non-interactive backend, imported and chosen once, at the
  first plot: a run that stops before its plots (a bad flag, a signal) does not wait 0.7 s
  for it."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig: Figure, path: str) -> None:
  """Write ``fig`` as a PNG to ``path`` (local or ``gs://``) all at once (:func:`write_atomic`)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
  _pyplot().close(fig)
  write_atomic(path, buffer.getvalue())


def plot_training_curves(history: Sequence[dict], path: str) -> None:
  """Loss (left) and accuracies (right) per epoch, from the records of ``metrics.jsonl``."""
  epochs = [r["epoch"] for r in history]
  evaluated = [r for r in history if "test_accuracy" in r]
  fig, (ax_loss, ax_acc) = _pyplot().subplots(1, 2, figsize=(10, 4))
  ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train loss")
  ax_loss.set(xlabel="epoch", ylabel="offset cross-entropy", title="Loss")
  ax_acc.plot(epochs, [100 * r["train_accuracy"] for r in history],
              label="train accuracy")
  ax_acc.plot([r["epoch"] for r in evaluated], [100 * r["test_accuracy"] for r in evaluated],
              "o-", label="test accuracy")
  ax_acc.plot([r["epoch"] for r in evaluated], [100 * r["test_cra_36"] for r in evaluated],
              "s-", label="test CRA at 36/255")
  ax_acc.set(xlabel="epoch", ylabel="%", title="Accuracy", ylim=(0, 100))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  save_figure(fig, path)


def plot_certified_accuracy(radii: Sequence[float], accuracy: Sequence[float], path: str, *,
                            title: str = "") -> None:
  """Certified robust accuracy (%) against the l2 radius; radius 0 is the clean accuracy."""
  fig, ax = _pyplot().subplots(figsize=(6, 4))
  ax.plot(radii, [100 * a for a in accuracy], "-")
  for r in STANDARD_RADII:
    ax.axvline(r, color="grey", lw=0.5, ls=":")
  ax.set(xlabel="l2 radius", ylabel="certified robust accuracy (%)", ylim=(0, 100),
         xlim=(0, max(radii)), title=title)
  ax.grid(alpha=0.3)
  save_figure(fig, path)
