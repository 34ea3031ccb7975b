"""benchmarks.bound_speed at its tiny size: the table, the JSON, and that every timed call
bounded fresh kernels (no memoised repeat) of the perturbed model it describes."""

from __future__ import annotations

import json

import numpy as np

from aol_jax._src import spectral_bounds
from benchmarks import bound_speed


def test_bound_speed_tiny(capsys, tmp_path, monkeypatch):
  calls = []
  real = spectral_bounds._symbol_bound
  monkeypatch.setattr(spectral_bounds, "_symbol_bound",
                      lambda taps, *args: calls.append(taps.shape) or real(taps, *args))
  path = tmp_path / "out.json"
  bound_speed.main(["--size", "tiny", "--json", str(path)])
  out = capsys.readouterr().out
  for row in ("perturbed: freeze + lipschitz_bound()", "conv_norm_bound / conv_row_sum_bound",
              "dense_norm_bound(abs(W))", "process CPU time", "Load average"):
    assert row in out
  results = json.loads(path.read_text())["results"]
  layers = results["layers"]
  assert layers == {"conv3x3": 2, "dense": 2}
  # The symbol path ran for the 3x3 convs of the whole-model call and of the timed call: the
  # perturbation moved every kernel off its single-tap initialisation, and nothing was memoised.
  assert calls == [(3, 3, 16, 16)] * 2 * layers["conv3x3"]
  assert 0 < results["bound"] < np.inf
  assert results["freeze_and_bound_median_s"] > 0 and results["freeze_and_bound_cpu_median_s"] > 0
  for name in ("conv tight", "conv row-sum", "dense tight", "dense row-sum", "dense |W|"):
    assert results["stats"][name]["median"] > 0
