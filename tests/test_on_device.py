"""benchmarks/on_device.sh, the accelerator check, run here as it runs there: the same
script with --platform=cpu at the tiny size, end to end, and what it reports checked."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import aol_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_on_device_script_at_tiny_size_on_cpu(tmp_path):
  out = tmp_path / "on_device.json"
  env = dict(os.environ, PYTHON=sys.executable)
  proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "on_device.sh"), "--platform=cpu",
                         "--size=tiny", "--json", str(out)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "| measurement | value | baseline | ratio |" in proc.stdout
  rows = json.loads(out.read_text())["results"]
  train = [r for r in rows if "train step" in r["what"]]
  assert [("Small" in r["what"], "'highest'" in r["what"]) for r in train] == [
      (True, False), (True, True), (False, False), (False, True)]
  for r in train:
    assert r["value"] > 0 and r["base"] > 0
    assert r["ratio"] == pytest.approx(r["value"] / r["base"])
    assert r["flops_ratio"] > 1 and r["memory_ratio"] > 1  # the Gram costs something
  certify, = [r for r in rows if "certify_dataset" in r["what"]]
  assert certify["rounding"] == aol_jax.certification.DEFAULT_ROUNDING == "float32"
  assert certify["agrees_with_forward"] == 1.0  # labelled by the forward pass's predictions
  assert certify["ratio"] == pytest.approx(certify["value"] / certify["base"])
  radii, = [r for r in rows if "artifact" in r["what"]]
  # Both sides on the CPU here: the same artifact, the same radii.
  assert radii["backend"] == "cpu" and radii["artifact_runs_on_cpu"] == "yes"
  assert radii["predictions_agree"] == 1.0 and radii["value"] == 0.0
  assert radii["certified_here"] == radii["certified_cpu"] > 0
