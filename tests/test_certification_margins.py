"""Margins and the label check."""

import numpy as np
import pytest

from aol_jax._src.certification.rule import certify

def test_label_out_of_range_raises():
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    certify(np.zeros((2, 3), np.float32), np.array([0, 3]), 0.1, allowance=0.0)
