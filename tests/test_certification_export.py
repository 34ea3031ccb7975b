"""export_certified: the artifact exports from the install `make run` creates, loads in a venv
holding only jax and flatbuffers (and their dependencies) and reproduces certified_radii at
three batch sizes; its JSON and metadata; its dtypes (float32 images, or uint8 pixels scaled
inside); the lowered module's precision on every platform; all-or-nothing writes; bad input.
"""

import fractions
import json
import math
import os
import subprocess
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aol_jax
from aol_jax._src.certification import certifier as certifier_lib
from aol_jax._src.certification import export
from aol_jax._src.certification.certifier import float_radii
from support import venv
from support.certification import digits_like, tiny_std_model, trained_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 8, 1)
BATCH_SIZES = (1, 13, 64)
# What the README tells a user to install to load an artifact.
SERVE_REQUIREMENTS = ["jax", "flatbuffers"]
# Every key of export.METADATA_KEYS, as the runner fills them for digits.
DIGITS = {
    "dataset": "digits", "input_scaling": 16.0, "class_names": [str(d) for d in range(10)],
    "model": "aol_std", "model_kwargs": {"channels": 8}, "checkpoint_step": 120, "epoch": 3,
    "test_examples": 360, "clean_accuracy": 0.9,
    "cra": {"36/255": 0.8, "72/255": 0.7, "108/255": 0.6, "1": 0.1},
    "cra_rounding": "float32", "extra": {"seed": 0},
}


def _model():
  return trained_like(tiny_std_model(), 0.3, seed=11)


def _pixels(n, scale, seed):
  return np.random.default_rng(seed).integers(0, scale + 1, (n, *SHAPE), dtype=np.uint8)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
  """One float32 artifact (with the digits metadata) and one of uint8 pixels / 255."""
  tmp = tmp_path_factory.mktemp("artifacts")
  model = _model()
  images = aol_jax.export_certified(model, tmp / "images.jaxexport", input_shape=SHAPE,
                                    metadata=DIGITS)
  pixels = aol_jax.export_certified(model, tmp / "pixels.jaxexport", input_shape=SHAPE,
                                    pixel_scale=255)
  return model, images, pixels


@pytest.fixture(scope="session")
def serve_python(tmp_path_factory):
  """A venv with exactly jax, flatbuffers and what they require (built once per session)."""
  start = time.perf_counter()
  python, names = venv.build(tmp_path_factory.mktemp("venv") / "serve", SERVE_REQUIREMENTS)
  print(f"\nserve venv: {len(names)} distributions linked in "
        f"{time.perf_counter() - start:.2f} s: {', '.join(names)}")
  return python, names


_SERVE = textwrap.dedent("""
    import importlib.metadata, importlib.util, json, sys
    import jax
    import numpy as np
    out, sizes = {}, [int(s) for s in sys.argv[2].split(",")]
    for name in sys.argv[3:]:
      exported = jax.export.deserialize(open(name + ".jaxexport", "rb").read())
      x = np.load(name + ".npy")
      for n in sizes:
        calls = [exported.call(x[i:i + n]) for i in range(0, len(x), n)]
        out[f"{name}-{n}-predictions"] = np.concatenate([np.asarray(p) for p, _ in calls])
        out[f"{name}-{n}-radii"] = np.concatenate([np.asarray(r) for _, r in calls])
      out[name + "-platforms"] = np.array(exported.platforms)
    np.savez(sys.argv[1], **out)
    print(json.dumps({
        "distributions": sorted(d.metadata["Name"] for d in importlib.metadata.distributions()),
        "importable": [m for m in ("flax", "aol_jax", "tensorflow", "jax_cuda12_plugin")
                       if importlib.util.find_spec(m) is not None],
        "backend": jax.default_backend()}))
""")


def _tolerance(model, images, radii):
  """How far two float32 evaluations of the certificate may put a radius apart: the same
  sums in other orders (another batch size, another compilation) move the margin by a few
  ulps of the logits, 16 u max|logit| here, and the radius r = (m - A(0)) / (sqrt(2) (L +
  beta)) by that over sqrt(2) L; plus 2 ulps of the float32 radius itself."""
  logits = np.asarray(aol_jax.freeze(model)(images))
  lipschitz = aol_jax.freeze(model).lipschitz_bound()
  margin_ulps = 16 * 2.0 ** -24 * np.max(np.abs(logits), axis=1)
  return margin_ulps / (math.sqrt(2) * lipschitz) + 2 * np.spacing(radii.astype(np.float32))


def test_artifact_loads_with_jax_and_flatbuffers_alone_and_reproduces_certified_radii(
    artifacts, serve_python, tmp_path):
  """Loaded where only jax and flatbuffers are installed, called at 1, 13 and 64 images per
  call: the predictions are certified_radii's, the radii too within _tolerance."""
  model, images_export, pixels_export = artifacts
  python, names = serve_python
  assert names == ["flatbuffers", "jax", "jaxlib", "ml-dtypes", "numpy", "opt-einsum", "scipy"]
  images, _ = digits_like(64, seed=6)
  pixels = _pixels(64, 255, seed=3)
  inputs = {"images": (images_export, images, images),
            "pixels": (pixels_export, pixels, pixels / 255.0)}  # float64: certified as given
  for name, (written, x, _) in inputs.items():
    os.symlink(written.artifact, tmp_path / f"{name}.jaxexport")
    np.save(tmp_path / f"{name}.npy", x)
  result = subprocess.run(
      [str(python), "-I", "-c", _SERVE, "out.npz", ",".join(map(str, BATCH_SIZES)), *inputs],
      env=venv.clean_environment(JAX_PLATFORMS="cpu"), cwd=tmp_path, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  served = json.loads(result.stdout.splitlines()[-1])
  assert served == {"distributions": ["flatbuffers", "jax", "jaxlib", "ml_dtypes", "numpy",
                                      "opt_einsum", "scipy"],
                    "importable": [], "backend": "cpu"}
  out = np.load(tmp_path / "out.npz")
  for name, (_, x, reference) in inputs.items():
    # Lowered for CPU and CUDA GPUs, run here on the CPU.
    assert tuple(out[name + "-platforms"]) == ("cpu", "cuda")
    want_pred, want = aol_jax.certified_radii(model, reference, batch_size=16)
    want = float_radii(want, np.float32)
    assert np.sum(want > 0) >= 40
    tol = _tolerance(model, reference.astype(np.float32), want)
    for n in BATCH_SIZES:
      pred, radii = out[f"{name}-{n}-predictions"], out[f"{name}-{n}-radii"]
      assert pred.dtype == np.int32 and radii.dtype == np.float32
      np.testing.assert_array_equal(pred, want_pred)
      gap = np.abs(radii.astype(np.float64) - want)
      print(f"{name}, {n} per call: {np.sum(gap == 0)}/64 radii identical, largest gap "
            f"{gap.max():.3g} ({np.max(gap / np.maximum(want, 1e-30)):.3g} relative, "
            f"{np.max(gap / tol):.3f} of the tolerance)")
      assert np.all(gap <= tol), (name, n, np.max(gap / tol))


def test_export_works_in_the_install_make_run_creates(tmp_path):
  """`make run` installs '.[experiments]': export_certified must work there, without the
  test extra (whose tensorflow is what brought flatbuffers in)."""
  python, names = venv.build(tmp_path / "run", venv.project_requirements("experiments"))
  assert "tensorflow-cpu" not in names and "tensorflow" not in names
  script = textwrap.dedent("""
      import sys
      sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
      import aol_jax
      from support.certification import tiny_std_model
      written = aol_jax.export_certified(tiny_std_model(), sys.argv[2], input_shape=(8, 8, 1))
      print(written.description["rounding"])
  """)
  result = subprocess.run([str(python), "-I", "-c", script, ROOT, str(tmp_path / "m.bin")],
                          env=venv.clean_environment(JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == [aol_jax.certification.DEFAULT_ROUNDING]
  assert sorted(os.listdir(tmp_path)) == ["m.bin", "m.bin.json", "run"]


def test_export_without_flatbuffers_says_so_before_any_work(tmp_path, monkeypatch):
  real = export.importlib.util.find_spec
  monkeypatch.setattr(export.importlib.util, "find_spec",
                      lambda name, *a: None if name == "flatbuffers" else real(name, *a))
  with pytest.raises(ImportError, match="needs the 'flatbuffers' package.*pip install "
                                        "flatbuffers"):
    aol_jax.export_certified(tiny_std_model(), tmp_path / "m.bin", input_shape=SHAPE)
  assert os.listdir(tmp_path) == []


def test_json_records_the_model_the_input_and_what_holds_per_platform(artifacts):
  model, images_export, pixels_export = artifacts
  for written in (images_export, pixels_export):
    assert written.files == (written.artifact, written.artifact + ".json")
    assert written.description_file.endswith("jaxexport.json")
    on_disk = json.loads(open(written.description_file).read())
    assert on_disk == written.description
    assert on_disk["rounding"] == aol_jax.certification.DEFAULT_ROUNDING == "float32"
    assert on_disk["statistical"] is False
    assert on_disk["lipschitz_bound"] == pytest.approx(aol_jax.freeze(model).lipschitz_bound(),
                                                       rel=1e-6)
    assert on_disk["num_classes"] == 10 and on_disk["inputs"]["shape"] == ["n", *SHAPE]
    assert sorted(on_disk["platforms"]) == ["cpu", "cuda"]
    assert all(text.startswith("rigorous for IEEE float32 products and float32 sums in any "
                               "order") for text in on_disk["platforms"].values())
    assert "HIGHEST (no TF32)" in on_disk["platforms"]["cuda"]
    assert "bfloat16" in on_disk["platforms_not_covered"]["tpu"]
    assert (on_disk["library"], on_disk["library_version"], on_disk["jax_version"]) == (
        "aol_jax", aol_jax.__version__, jax.__version__)
  images_json = images_export.description
  assert set(DIGITS) == set(export.METADATA_KEYS) and images_json["model"] == DIGITS
  assert images_json["inputs"]["dtype"] == "float32"
  # Digits are 0..16: the inputs' text names that scaling and never 255.
  assert "stored values / 16 (model.input_scaling)" in images_json["inputs"]["values"]
  assert "255" not in json.dumps([images_json["inputs"], images_json["outputs"]])
  assert "float64 array to float32" in images_json["inputs"]["dtype_rule"]
  pixels_json = pixels_export.description
  assert "model" not in pixels_json
  assert (pixels_json["inputs"]["dtype"], pixels_json["inputs"]["pixel_scale"]) == ("uint8", 255)
  assert "nothing is rounded silently" in pixels_json["inputs"]["dtype_rule"]
  assert "the exact image pixels / 255" in pixels_json["outputs"]["radii"]


def test_float32_artifact_refuses_other_dtypes_except_what_jax_converts_first(artifacts):
  """Every dtype but float32 is refused by exported.call; a float64 array is refused with
  jax_enable_x64 on, and converted to float32 by JAX before the call with it off (the
  artifact cannot see it: the radius is that of the rounded image, as the JSON says)."""
  _, images_export, _ = artifacts
  call = jax.export.deserialize(open(images_export.artifact, "rb").read()).call
  x = digits_like(4, seed=2)[0].astype(np.float64) + 1e-12  # not float32-representable
  for dtype in (np.float16, jnp.bfloat16, np.int32, np.uint8):
    with pytest.raises(ValueError, match="Dtype mismatch.*expected float32"):
      call(x.astype(dtype))
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match="Dtype mismatch.*expected float32 and called with "
                                         "float64"):
      call(x)
  rounded = call(x.astype(np.float32))
  for got, want in zip(call(x), rounded):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_pixel_artifact_takes_uint8_only_and_certifies_the_exact_scaled_image(artifacts):
  """uint8 pixels: every other dtype refused, x64 on or off (float64 too: JAX makes it
  float32, also refused). The radius is the float32 image's less ||p / 255 - fl(p / 255)||:
  the rounding inside the artifact is paid for, to 2 ulps of the radius."""
  _, images_export, pixels_export = artifacts
  on_pixels = jax.export.deserialize(open(pixels_export.artifact, "rb").read()).call
  on_images = jax.export.deserialize(open(images_export.artifact, "rb").read()).call
  pixels = _pixels(13, 255, seed=3)
  for x in (pixels / 255.0, (pixels / 255.0).astype(np.float32), pixels.astype(np.int32),
            pixels.astype(np.int64), pixels.astype(np.int8)):
    with pytest.raises(ValueError, match="Dtype mismatch.*expected uint8"):
      on_pixels(x)
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match="Dtype mismatch.*expected uint8 and called with "
                                         "float64"):
      on_pixels(pixels / 255.0)
  rounded = (pixels / np.float32(255)).astype(np.float32)  # what x / 255 computes in float32
  pred_p, radii_p = map(np.asarray, on_pixels(pixels))
  pred_f, radii_f = map(np.asarray, on_images(rounded))
  np.testing.assert_array_equal(pred_p, pred_f)
  shift = np.array([math.sqrt(sum((fractions.Fraction(int(v), 255) - fractions.Fraction(
      float(q))) ** 2 for v, q in zip(p.ravel(), r.ravel()))) for p, r in zip(pixels, rounded)])
  assert np.all(radii_f > 0) and np.all(shift > 5e-8)
  paid = radii_f.astype(np.float64) - radii_p
  np.testing.assert_array_less(np.abs(paid - shift), 2 * np.spacing(radii_f) + 1e-4 * shift)
  # A pixel above the scale puts the image outside [0, 1]: radius 0.
  pixels16 = _pixels(2, 16, seed=1)
  pixels16[1, 0, 0, 0] = 17
  scaled = aol_jax.export_certified(_model(), os.path.join(
      os.path.dirname(pixels_export.artifact), "p16.bin"), input_shape=SHAPE, pixel_scale=16)
  _, radii16 = jax.export.deserialize(open(scaled.artifact, "rb").read()).call(pixels16)
  assert radii16[0] > 0 and radii16[1] == 0


@pytest.mark.parametrize("scale", [1, 3, 7, 16, 100, 255])
def test_pixel_tables_are_what_division_computes_and_bound_the_rounding(scale):
  """The float32 inputs are the nearest to v / k, as NumPy's float32 division gives them (XLA
  may multiply by fl(1 / k) instead, an ulp away; either way the residual is bounded)."""
  quotient, squares, c = export._pixel_tables(scale, 3072)
  values = np.arange(256)
  np.testing.assert_array_equal(quotient, values.astype(np.float32) / np.float32(scale))
  for v, q, s in zip(values, quotient, squares):
    exact = (fractions.Fraction(int(v), scale) - fractions.Fraction(float(q))) ** 2
    assert exact <= fractions.Fraction(float(s)) <= max(exact * (1 + 2 ** -22), 2.0 ** -126)
  u, gamma = 2.0 ** -24, 3072 * 2.0 ** -24 / (1 - 3072 * 2.0 ** -24)
  need = 1 / (math.sqrt(1 - gamma) * (1 - 8 * u) * (1 - u))
  assert need <= float(c) <= need * (1 + 2 ** -20)


def test_exported_model_gives_radius_zero_outside_what_it_certifies(artifacts):
  """An image certified_radii would refuse (outside [0, 1], NaN, inf) is never certified by
  the artifact, which cannot raise: its radius is 0."""
  _, images_export, _ = artifacts
  images, _ = digits_like(40, seed=6)
  call = jax.export.deserialize(open(images_export.artifact, "rb").read()).call
  _, radii = call(images)
  i = int(np.argmax(np.asarray(radii)))
  assert radii[i] > 0
  bad = np.repeat(images[i:i + 1], 4, axis=0)
  for row, value in enumerate((1.5, -0.1, np.nan, np.inf)):
    bad[row, 0, 0, 0] = value
  _, bad_radii = call(bad)
  np.testing.assert_array_equal(np.asarray(bad_radii), 0.0)


def test_lowered_module_runs_every_product_in_float32_on_every_platform(artifacts):
  _, images_export, pixels_export = artifacts
  for written in (images_export, pixels_export):
    exported = jax.export.deserialize(open(written.artifact, "rb").read())
    assert exported.platforms == ("cpu", "cuda")
    module = exported.mlir_module()  # one module: a branch per platform
    assert module.count("stablehlo.dot_general") >= 10
    assert "stablehlo.convolution" not in module
    assert export.reduced_precision_ops(module) == []


def _lowered(fn, *shapes, platforms=("cpu", "cuda")):
  specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  return jax.export.export(jax.jit(fn), platforms=platforms)(*specs).mlir_module()


@pytest.mark.parametrize("fn,flagged", [
    (lambda a, b: jnp.dot(a, b, precision="highest"), False),
    (lambda a, b: jax.lax.dot(a, b, precision=jax.lax.DotAlgorithmPreset.F32_F32_F32), False),
    (lambda a, b: jnp.dot(a, b), True),
    (lambda a, b: jnp.dot(a, b, precision="high"), True),
    (lambda a, b: jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                          precision="highest").astype(jnp.float32), True),
    (lambda a, b: jax.lax.dot(a, b, precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3),
     True),
    (lambda a, b: jnp.dot((a.astype(jnp.bfloat16) + 1).astype(jnp.float32), b,
                          precision="highest"), True),
])
def test_reduced_precision_ops_flags_what_is_narrower_than_float32(fn, flagged):
  module = _lowered(fn, (4, 8), (8, 3))
  assert bool(export.reduced_precision_ops(module)) == flagged


@pytest.mark.parametrize("precision,flagged", [("highest", False), (None, True)])
def test_reduced_precision_ops_reads_a_convolution_s_precision(precision, flagged):
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
  module = _lowered(conv, (1, 8, 8, 2), (3, 3, 2, 4))
  assert bool(export.reduced_precision_ops(module)) == flagged


@pytest.mark.parametrize("product,match", [
    (lambda x: jnp.dot(x, jnp.eye(x.shape[1]), precision=jax.lax.Precision.DEFAULT),
     "not at precision HIGHEST"),
    (lambda x: jnp.dot(x.astype(jnp.bfloat16), jnp.eye(x.shape[1], dtype=jnp.bfloat16),
                       precision="highest").astype(jnp.float32), "narrower than float32"),
    (lambda x: jax.lax.conv_general_dilated(
        x[:, None, :, None], jnp.ones((1, 1, 1, 1)), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")[:, 0, :, 0],
     "a convolution operation, which a GPU may run with a Winograd"),
])
def test_export_refuses_a_module_it_does_not_bound(tmp_path, monkeypatch, product, match):
  """The guards on the lowered module itself: a product narrower than float32, or (for CUDA)
  any convolution operation, in what the artifact computes is refused; nothing is written."""
  radii = certifier_lib.Certifier.radii

  def radii_after(self, state, x, shift):
    return radii(self, state, product(x.reshape(x.shape[0], -1)).reshape(x.shape), shift)

  monkeypatch.setattr(certifier_lib.Certifier, "radii", radii_after)
  with pytest.raises(TypeError, match=match):
    aol_jax.export_certified(tiny_std_model(), tmp_path / "m.bin", input_shape=SHAPE)
  assert os.listdir(tmp_path) == []


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
    aol_jax.export_certified(model, path, input_shape=SHAPE)
  assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_shape=SHAPE, rounding="float64"), "rounding"),
    (dict(input_shape=(8, 0, 1)), "input_shape"),
    (dict(input_shape=(8, 8, 3)), "channels"),
    (dict(input_shape=SHAPE, platforms=("cpu", "tpu")),
     "rounding='float32' holds on cpu, cuda only; a TPU's float32 'highest' is a multi-pass "
     "bfloat16 product"),
    (dict(input_shape=SHAPE, platforms=()), "name one or more"),
    (dict(input_shape=SHAPE, pixel_scale=256), "pixel_scale must be None"),
    (dict(input_shape=SHAPE, pixel_scale=16.0), "pixel_scale must be None"),
    (dict(input_shape=SHAPE, pixel_scale=0), "pixel_scale must be None"),
    (dict(input_shape=SHAPE, pixel_scale=255, metadata={"input_scaling": 16}),
     "input_scaling.*16 but pixel_scale=255"),
])
def test_export_rejects_bad_input(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match) as error:
    aol_jax.export_certified(tiny_std_model(), tmp_path / "m.bin", **kwargs)
  assert "\n" not in str(error.value)
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="directory"):
    aol_jax.export_certified(tiny_std_model(), tmp_path / "no" / "m.bin", input_shape=SHAPE)


@pytest.mark.parametrize("change,match", [
    ({"dataset_name": "digits"}, r"unknown keys \['dataset_name'\].*under 'extra'"),
    ({"dataset": ""}, r"metadata\['dataset'\] must be str"),
    ({"model": 3}, r"metadata\['model'\] must be str"),
    ({"input_scaling": 0}, r"metadata\['input_scaling'\] must be number > 0"),
    ({"input_scaling": "stored pixel value / 16"}, r"metadata\['input_scaling'\]"),
    ({"checkpoint_step": -1}, r"metadata\['checkpoint_step'\] must be int >= 0"),
    ({"checkpoint_step": True}, r"metadata\['checkpoint_step'\]"),
    ({"epoch": 1.5}, r"metadata\['epoch'\] must be int >= 0 or null"),
    ({"test_examples": 0}, r"metadata\['test_examples'\] must be int >= 1"),
    ({"model_kwargs": "channels=8"}, r"metadata\['model_kwargs'\] must be a JSON object"),
    ({"class_names": ["a"] * 10}, r"metadata\['class_names'\] must be list of str"),
    ({"class_names": [str(d) for d in range(9)]}, "names 9 classes but the model has 10"),
    ({"clean_accuracy": 1.2}, r"metadata\['clean_accuracy'\] must be number in \[0, 1\]"),
    ({"clean_accuracy": float("nan")}, r"metadata\['clean_accuracy'\]"),
    ({"cra": {"36/255": 0.5, "72/255": 0.6}}, "non-increasing in the radius"),
    ({"cra": {"36/255": 0.95}}, r"at most clean_accuracy \(0.9\)"),
    ({"cra": {"big": 0.5}}, r"metadata\['cra'\] must be"),
    ({"cra": {"-1": 0.5}}, r"metadata\['cra'\] must be"),
    ({"cra": {"1": 1.5}}, r"metadata\['cra'\] must be"),
    ({"cra": {}}, r"metadata\['cra'\] must be"),
    ({"cra_rounding": "worst_case"}, r"metadata\['cra_rounding'\]"),
    ({"extra": [1]}, r"metadata\['extra'\] must be a JSON object"),
    ({"extra": {"when": {1, 2}}}, "metadata must be JSON-serialisable"),
])
def test_export_validates_the_metadata(tmp_path, change, match):
  with pytest.raises(ValueError, match=match) as error:
    aol_jax.export_certified(tiny_std_model(), tmp_path / "m.bin", input_shape=SHAPE,
                             metadata={**DIGITS, **change})
  assert "\n" not in str(error.value)
  assert os.listdir(tmp_path) == []

