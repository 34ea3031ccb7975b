"""export_certified: the artifact, loaded in a process with jax only, reproduces
certified_radii; its JSON; all-or-nothing writes; bad input."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import aol_jax
from aol_jax._src.certification import export
from aol_jax._src.certification.certifier import float_radii
from support.certification import digits_like, tiny_std_model, trained_like

_LOAD = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    images = np.load(sys.argv[2])
    exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
    predictions, radii = exported.call(images)
    assert "flax" not in sys.modules and "aol_jax" not in sys.modules, sorted(sys.modules)
    np.savez(sys.argv[3], predictions=np.asarray(predictions), radii=np.asarray(radii))
""")


def test_exported_model_reproduces_certified_radii_with_jax_alone(tmp_path):
  model = trained_like(tiny_std_model(), 0.3, seed=11)
  images, _ = digits_like(40, seed=6)
  path = tmp_path / "model.jaxexport"
  description = aol_jax.export_certified(model, path, input_shape=(8, 8, 1))
  # Exported from a 1-example trace; called on 13 examples in a process without flax.
  np.save(tmp_path / "x.npy", images[:13])
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # aol_jax not importable
  subprocess.run([sys.executable, "-c", _LOAD, str(path), str(tmp_path / "x.npy"),
                  str(tmp_path / "out.npz")], check=True, env=env, cwd=tmp_path, timeout=300)
  out = np.load(tmp_path / "out.npz")
  preds, radii = aol_jax.certified_radii(model, images[:13], batch_size=8)
  assert out["predictions"].dtype == np.int32 and out["radii"].dtype == np.float32
  np.testing.assert_array_equal(out["predictions"], preds)
  assert np.sum(radii > 0) >= 5
  # The float32 radii are certified_radii's rounded up to float32. A separate compilation
  # may sum in another order: the float32 logits then differ by far less than the rounding
  # allowance (u S_f M, ~1e-6 relative here), and so may the radii.
  logits = np.asarray(aol_jax.freeze(model)(images[:13]))
  ulps = 16 * 2.0 ** -24 * float(np.max(np.abs(logits)))
  np.testing.assert_allclose(out["radii"], float_radii(radii, np.float32), rtol=1e-5,
                             atol=ulps / np.sqrt(2))
  on_disk = json.loads((tmp_path / "model.jaxexport.json").read_text())
  assert on_disk == description
  lip = aol_jax.freeze(model).lipschitz_bound()
  assert on_disk["lipschitz_bound"] == pytest.approx(lip, rel=1e-12)
  assert on_disk["num_classes"] == 10 and on_disk["inputs"]["dtype"] == "float32"
  assert on_disk["inputs"]["shape"] == ["n", 8, 8, 1] and on_disk["rounding"] == (
      aol_jax.certification.DEFAULT_ROUNDING)
  assert on_disk["library_version"] == aol_jax.__version__


def test_exported_model_gives_radius_zero_outside_what_it_certifies(tmp_path):
  """An image certified_radii would refuse (outside [0, 1], NaN, inf) is never certified by
  the artifact, which cannot raise: its radius is 0."""
  import jax  # noqa: PLC0415
  model = trained_like(tiny_std_model(), 0.3, seed=11)
  images, _ = digits_like(40, seed=6)
  path = tmp_path / "model.jaxexport"
  aol_jax.export_certified(model, path, input_shape=(8, 8, 1))
  call = jax.export.deserialize(path.read_bytes()).call
  _, radii = call(images)
  i = int(np.argmax(np.asarray(radii)))
  assert radii[i] > 0
  bad = np.repeat(images[i:i + 1], 4, axis=0)
  for row, value in enumerate((1.5, -0.1, np.nan, np.inf)):
    bad[row, 0, 0, 0] = value
  _, bad_radii = call(bad)
  np.testing.assert_array_equal(np.asarray(bad_radii), 0.0)


def test_export_writes_nothing_on_failure(tmp_path, monkeypatch):
  model = tiny_std_model()
  path = tmp_path / "model.bin"
  calls = []

  def failing_replace(src, dst):
    calls.append(dst)
    if len(calls) == 2:
      raise OSError("disk full")
    os.rename(src, dst)

  monkeypatch.setattr(export.os, "replace", failing_replace)
  with pytest.raises(OSError, match="disk full"):
    aol_jax.export_certified(model, path, input_shape=(8, 8, 1))
  assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_shape=(8, 8, 1), rounding="float64"), "rounding"),
    (dict(input_shape=(8, 0, 1)), "input_shape"),
    (dict(input_shape=(8, 8, 3)), "channels"),
])
def test_export_rejects_bad_input(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    aol_jax.export_certified(tiny_std_model(), tmp_path / "m.bin", **kwargs)
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="directory"):
    aol_jax.export_certified(tiny_std_model(), tmp_path / "no" / "m.bin", input_shape=(8, 8, 1))
