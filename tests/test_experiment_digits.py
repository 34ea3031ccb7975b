"""The README's first command, ``make run``'s training on scikit-learn's digits, reaches the
accuracy and certified robust accuracy (CRA) of the README's table, quietly.

The README's table (``python -m experiments.digits_spread``) states the range over seeds 0-4
and XLA's instruction-set caps; the thresholds sit below its lower end, so that any x86 CPU
passes.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THRESHOLDS = {"clean": 0.93, "36/255": 0.88, "72/255": 0.80, "108/255": 0.68, "1": 0.09}


@pytest.mark.slow
def test_digits_preset_reaches_the_measured_accuracy(tmp_path):
  workdir = tmp_path / "digits"
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  proc = subprocess.run([sys.executable, "-m", "experiments.cifar", "--accelerator=cpu",
                         "--preset=digits", f"--workdir={workdir}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == ""  # no CUDA / libtpu start-up lines, no library warnings
  results = json.loads((workdir / "results.json").read_text())
  assert results["num_examples"] == 360 and results["epoch"] == 40
  assert results["clean_accuracy"] >= THRESHOLDS["clean"]
  assert list(results["cra"]) == [r for r in THRESHOLDS if r != "clean"]
  for radius, threshold in THRESHOLDS.items():
    if radius != "clean":
      got = results["cra"][radius]
      assert got >= threshold, f"CRA at {radius}: {got:.3f} < {threshold}"
