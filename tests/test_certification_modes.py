"""The table of modes: what each row says and holds, and that nothing else decides by a
mode's name."""

import pathlib
import re

import jax
import pytest

import aol_jax
from aol_jax.certification import DEFAULT_ROUNDING, FLOAT32, FLOAT64, ROUNDING_MODES

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_default_is_rigorous_and_every_name_says_what_it_certifies():
  assert not ROUNDING_MODES[DEFAULT_ROUNDING].statistical
  for name, mode in ROUNDING_MODES.items():
    assert mode.name == name and name.startswith(mode.fmt.name)
    # A statistical mode says so in its name; a rigorous one does not.
    assert mode.statistical == ("statistical" in name)
    assert "tpu" not in mode.platforms and "cpu" in mode.platforms
  assert ROUNDING_MODES["float32"].fmt == FLOAT32 and ROUNDING_MODES["float64"].fmt == FLOAT64
  assert [m for m, row in ROUNDING_MODES.items() if row.exportable] == [
      "float32", "float32_statistical"]


def test_a_float64_mode_enables_64_bit_types_only_inside_its_arithmetic():
  assert not jax.config.jax_enable_x64
  with ROUNDING_MODES["float64"].arithmetic():
    assert jax.config.jax_enable_x64
    assert jax.config.jax_default_matmul_precision == "highest"
  assert not jax.config.jax_enable_x64
  with ROUNDING_MODES["float32"].arithmetic():
    assert not jax.config.jax_enable_x64


def test_an_unknown_mode_is_refused_listing_the_table():
  for bad in ("probabilistic", "worst_case", "", None):
    with pytest.raises(ValueError, match="rounding must be one of float32, float64"):
      aol_jax.certification.prepare(aol_jax.AOLNetwork([aol_jax.Flatten()]), (2, 2, 1),
                                    rounding=bad)


def test_nothing_outside_the_table_branches_on_a_mode_name():
  """Only modes.py names the modes in the library; the experiments and benchmarks take
  them from the table."""
  pattern = re.compile(r"""(['"])(float32|float64|float32_statistical)\1""")
  offenders = []
  for path in [*ROOT.joinpath("aol_jax").rglob("*.py"), *ROOT.joinpath("experiments").rglob("*.py")]:
    if path.name == "modes.py":
      continue
    for line in path.read_text().splitlines():
      code = line.split("#", 1)[0]
      if pattern.search(code) and ("==" in code or " in (" in code or "if " in code):
        offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
  assert not offenders, offenders
