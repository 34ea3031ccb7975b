"""The certification table and its Markdown."""

import pytest

from aol_jax._src.certification.results import CertificationResult, certification_markdown

def test_markdown_table():
  result = CertificationResult(num_examples=200, num_correct=141, eps_list=(36 / 255, 1.0),
                               num_certified=(120, 7), lipschitz_constant=1.0,
                               max_allowance=(1e-4, 1e-4), rounding="float64")
  assert result.clean_accuracy == 141 / 200 and result.cra == (0.6, 0.035)
  lines = certification_markdown(result, name="aol_small").splitlines()
  assert lines[:3] == [
      "| model | n | clean | 36/255 | 1 |",
      "|---|---|---|---|---|",
      "| aol_small | 200 | 70.5 | 60.0 | 3.5 |",
  ]
  assert lines[4].startswith("Rounding: float64 on cpu, the float64 evaluation")
  with pytest.raises(ValueError, match="rounding must be one of"):
    CertificationResult(num_examples=1, num_correct=1, eps_list=(1.0,), num_certified=(1,),
                        lipschitz_constant=1.0, max_allowance=(0.0,), rounding="bf16")
