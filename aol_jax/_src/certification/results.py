"""The certification table as data, and its Markdown rendering."""

from __future__ import annotations

import dataclasses

from aol_jax._src.certification.modes import get_mode


@dataclasses.dataclass(frozen=True)
class CertificationResult:
  """The certification table as data.

  Attributes:
    num_examples: examples evaluated (every one: the last partial batch is padded, masked).
    num_correct: examples with a strictly positive margin.
    eps_list: the radii.
    num_certified: per radius, examples certified at that radius.
    lipschitz_constant: the ``L`` used.
    max_allowance: the largest rounding allowance applied, per radius.
    rounding: the mode that produced the certificates, a key of
      :data:`aol_jax.ROUNDING_MODES`.
    platform: where the certified evaluation ran (``'cpu'``, ``'cuda'``).
  """
  num_examples: int
  num_correct: int
  eps_list: tuple[float, ...]
  num_certified: tuple[int, ...]
  lipschitz_constant: float
  max_allowance: tuple[float, ...]
  rounding: str
  platform: str = "cpu"

  def __post_init__(self):
    get_mode(self.rounding)

  @property
  def clean_accuracy(self) -> float:
    return self.num_correct / self.num_examples

  @property
  def cra(self) -> tuple[float, ...]:
    """Certified robust accuracy per radius."""
    return tuple(c / self.num_examples for c in self.num_certified)


def radius_label(eps: float) -> str:
  """``36/255`` for multiples of 1/255 (except 1), else ``1``, ``1.58``: a table's column."""
  k = eps * 255
  if eps != 1.0 and abs(k - round(k)) < 1e-6:
    return f"{round(k)}/255"
  return f"{eps:g}"


def certification_markdown(result: CertificationResult, *, name: str = "model",
                           digits: int = 1) -> str:
  """Renders a :class:`CertificationResult` as a Markdown table, accuracies in percent,
  followed by the line that says which rounding mode produced the certificates.

  Example::

    | model | n | clean | 36/255 | 72/255 | 108/255 | 1 |
    |---|---|---|---|---|---|---|
    | aol_small | 10000 | 70.3 | 62.9 | 55.0 | 47.7 | 22.3 |

    Rounding: float32 on cpu, the float32 evaluation of the frozen network: rigorous (...).
  """
  header = ["model", "n", "clean"] + [radius_label(e) for e in result.eps_list]
  pct = lambda v: f"{100 * v:.{digits}f}"
  row = [name, str(result.num_examples), pct(result.clean_accuracy)]
  row += [pct(v) for v in result.cra]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
           "| " + " | ".join(row) + " |", "",
           f"Rounding: {result.rounding} on {result.platform}, "
           f"{get_mode(result.rounding).describe()}."]
  return "\n".join(lines)
