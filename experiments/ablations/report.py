"""Writing results: Markdown tables, JSON and PNG plots, each written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)


def _atomic(path: str, write) -> None:
  """Call ``write(tmp_path)``, then rename the temporary file over ``path``; on an error the
  temporary file is removed and ``path`` is left as it was."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """Write ``text`` to ``path`` atomically."""
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  _atomic(path, write)


def write_json(path: str, data: object) -> None:
  """Write ``data`` as indented JSON to ``path`` atomically."""
  write_text(path, json.dumps(data, indent=2) + "\n")


def save_figure(fig: plt.Figure, path: str) -> None:
  """Write ``fig`` as a PNG to ``path`` atomically and close it."""
  try:
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
  finally:
    plt.close(fig)


def publish(out_dir: str, name: str, results: dict, markdown: Callable[[dict], str],
            plot: Callable[[dict, str], None]) -> dict:
  """Writes ``<name>.md``, ``.json`` and ``.png`` into ``out_dir`` (each atomically) and
  prints the Markdown; returns ``results``."""
  text = markdown(results)
  write_text(os.path.join(out_dir, f"{name}.md"), text)
  write_json(os.path.join(out_dir, f"{name}.json"), results)
  plot(results, os.path.join(out_dir, f"{name}.png"))
  print(text, flush=True)
  return results


def radius_label(eps: float) -> str:
  """``36/255`` for multiples of 1/255 (except 1), else ``1``, ``1.58``."""
  k = eps * 255
  if eps != 1.0 and abs(k - round(k)) < 1e-6:
    return f"{round(k)}/255"
  return f"{eps:g}"


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
