"""Writing results: Markdown tables, JSON and PNG plots, each written all at once
(:mod:`experiments.common.storage`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

from experiments.common.labels import radius_label  # noqa: E402,F401  (the tables' column names)
from experiments.common import storage  # noqa: E402
from experiments.common.plotting import save_figure  # noqa: E402,F401  (the checks' plots)


def write_json(path: str, data: object) -> None:
  """Write ``data`` as indented JSON to ``path`` all at once (:func:`storage.write_atomic`)."""
  storage.write_atomic(path, json.dumps(data, indent=2) + "\n")


def publish(workdir: str, name: str, results: dict, markdown: Callable[[dict], str],
            plot: Callable[[dict, str], None]) -> dict:
  """Writes ``<name>.md``, ``.json`` and ``.png`` into ``workdir`` (each atomically) and
  prints the Markdown; returns ``results``."""
  storage.makedirs(workdir)
  text = markdown(results)
  storage.write_atomic(storage.join(workdir, f"{name}.md"), text)
  write_json(storage.join(workdir, f"{name}.json"), results)
  plot(results, storage.join(workdir, f"{name}.png"))
  print(text, flush=True)
  return results


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value), in the units given."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def pct(value: float, spread: float | None = None) -> str:
  """A fraction as a percentage with one decimal, with ``± spread`` when given."""
  text = f"{100 * value:.1f}"
  return text if spread is None else f"{text} ± {100 * spread:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A Markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def figure(ncols: int, *, width: float = 5.0, height: float = 4.0):
  """``(fig, axes)`` with ``ncols`` panels side by side (``axes`` always a list)."""
  fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
  return fig, list(axes[0])
