"""A certified model to ship: one ``jax.export`` artifact that returns predictions and radii.

:func:`export_certified` writes the frozen network with its certificate (the Lipschitz bound,
the mode's constants, the decision of :func:`aol_jax.certified_radii`) as a serialized
:class:`jax.export.Exported`, batch-polymorphic, lowered for CPU and CUDA GPUs. It takes
either float32 images on the model's ``[0, 1]`` scale, or (``pixel_scale=k``) uint8 pixels
``0..k`` that it scales itself. Loading it needs jax and flatbuffers only::

  exported = jax.export.deserialize(open(path, "rb").read())
  predictions, radii = exported.call(images)  # (n,) int32, (n,) float32

A JSON file beside it (``path + '.json'``) states what the inputs and radii mean, what holds
on each platform, and the facts about the model the caller recorded (:data:`METADATA_KEYS`).
"""

from __future__ import annotations

import fractions
import importlib.util
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aol_jax._src.certification import certifier as certifier_lib
from aol_jax._src.certification.modes import DEFAULT_ROUNDING, ROUNDING_MODES, get_mode
from aol_jax._src.spectral_bounds import FLOAT32_TINY, FLOAT32_UNIT_ROUNDOFF
from aol_jax._src.version import __version__

EXPORT_PLATFORMS = ("cpu", "cuda")
"""The platforms an artifact is lowered for by default."""

_GUARANTEE = {
    "cpu": "IEEE {fmt} products and {fmt} sums in any order (XLA:CPU with its default "
           "numerics: --xla_cpu_enable_fast_math off)",
    "cuda": "IEEE {fmt} products and {fmt} sums in any order: every dot product at precision "
            "HIGHEST (no TF32), no convolution operation (the certified convolutions are "
            "lowered as slices and one dot product: no Winograd or FFT algorithm)",
}

_NOT_COVERED = {
    "tpu": "refused: a TPU's float32 'highest' is a multi-pass bfloat16 product whose rounding "
           "this library does not bound",
}

METADATA_KEYS: dict[str, str] = {
    "dataset": "str: the dataset the model was trained and evaluated on, e.g. 'digits'",
    "input_scaling": "number > 0: the model's inputs are the stored values / input_scaling "
                     "(digits: 16, mnist5k and CIFAR: 255; 1 for data already in [0, 1])",
    "class_names": "list of str, one per class in class-id order, distinct",
    "model": "str: the architecture's name, e.g. 'aol_small'",
    "model_kwargs": "a JSON object: the architecture's keyword arguments",
    "checkpoint_step": "int >= 0: the training step of the exported weights",
    "epoch": "int >= 0 or null: the epoch of that step",
    "test_examples": "int >= 1: how many test examples clean_accuracy and cra count",
    "clean_accuracy": "number in [0, 1]: the test accuracy",
    "cra": "{radius: number in [0, 1]}: the certified robust accuracy per l2 radius on the "
           "[0, 1] scale, the radius a number or a label such as '36/255' "
           "(aol_jax.certification.radius_label); non-increasing in the radius, none above "
           "clean_accuracy",
    "cra_rounding": "str: the rounding mode cra was computed under, if not the artifact's (a "
                    "key of aol_jax.ROUNDING_MODES)",
    "extra": "a JSON object: any other facts, recorded as given",
}
"""The keys :func:`export_certified` accepts in ``metadata``, each with what it holds; each is
optional and validated when given."""


class CertifiedExport(NamedTuple):
  """What :func:`export_certified` wrote.

  Attributes:
    artifact: the path of the ``jax.export`` file.
    description_file: the path of its JSON description (``artifact + '.json'``).
    description: the JSON's content.
  """
  artifact: str
  description_file: str
  description: dict

  @property
  def files(self) -> tuple[str, str]:
    """Both paths written, the artifact first."""
    return self.artifact, self.description_file


_NARROW = re.compile(r"\b(bf16|f16|f8\w*|tf32)\b")
_TENSOR_TYPE = re.compile(r"tensor<(?:[?\d]+x)*(\w+)>")
_PRODUCT = re.compile(r"stablehlo\.(dot_general|dot|convolution)\b")
_PRECISION = re.compile(r"precision(?:_config)? = \[([^\]]*)\]")
_ALGORITHM = re.compile(r"algorithm = <([^>]*)>")


def reduced_precision_ops(module_text: str) -> list[str]:
  """The lines of a lowered StableHLO module whose arithmetic may be narrower than float32:
  every dot product or convolution on operands other than float32 or float64, or neither at
  precision ``HIGHEST`` (DEFAULT and HIGH allow TF32 or bfloat16 passes) nor with a dot
  algorithm of float32 (or float64) products and sums; and every operation on a narrower
  float type (bfloat16, float16, float8, TF32)."""
  bad = []
  for line in module_text.splitlines():
    if _NARROW.search(" ".join(_TENSOR_TYPE.findall(line))):
      bad.append(line.strip())
      continue
    if not _PRODUCT.search(line):
      continue
    operands = set(_TENSOR_TYPE.findall(line.rsplit(" : ", 1)[-1]))
    precision = re.findall(r"\b(DEFAULT|HIGHEST|HIGH)\b", " ".join(_PRECISION.findall(line)))
    highest = len(precision) == 2 and set(precision) == {"HIGHEST"}
    algorithm = _ALGORITHM.search(line)
    if algorithm:
      fields = dict(re.findall(r"(\w+) = (\w+)", algorithm.group(1)))
      types = {fields.get(k) for k in ("lhs_precision_type", "rhs_precision_type",
                                       "accumulation_type")}
      exact = types <= {"f32", "f64"} and fields.get("allow_imprecise_accumulation") == "false"
      highest = exact and (highest or not precision or set(precision) == {"DEFAULT"})
    if not highest or operands - {"f32", "f64"}:
      bad.append(line.strip())
  return bad


def _pixel_tables(scale: int, size: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
  """For uint8 pixels scaled by ``1 / scale``: the float32 input ``q[v]`` nearest ``v / scale``
  (NumPy's float32 division; XLA may multiply by ``fl(1 / scale)`` instead, an ulp away),
  ``t[v] >= (v / scale - q[v])^2`` (float32, never subnormal), and ``c`` such that
  ``fl(fl(sqrt(fl(sum_i t[p_i]))) * c) >= ||p / scale - q[p]||_2`` for ``size`` pixels ``p``,
  summed in any order.

  The sum of ``size`` non-negative normal terms is at least ``(1 - gamma_size)`` times the
  exact one (Higham, Lemma 3.4; a partial sum is never below a term, so none underflows),
  ``sqrt`` is within four ulps (relative ``8 u``: a GPU's approximate square root, as in
  :mod:`.rigorous`) and the product within ``u``, so
  ``c = 1 / (sqrt(1 - gamma_size) (1 - 8 u) (1 - u))``, rounded up.
  """
  u = FLOAT32_UNIT_ROUNDOFF
  if size * u >= 0.5:
    raise ValueError(f"pixel_scale: images of {size} pixels are too large for the float32 "
                     f"bound of their rounding (fewer than {2 ** 23}); pass float32 images.")
  quotient, squares = [], []
  for v in range(256):
    exact = fractions.Fraction(v, scale)
    near = np.float32(v / scale)  # within an ulp; the nearest of it and its neighbours is
    q = min((np.nextafter(near, np.float32(-1)), near, np.nextafter(near, np.float32(2))),
            key=lambda f: abs(fractions.Fraction(float(f)) - exact))  # what x / k computes
    quotient.append(q)
    residual = exact - fractions.Fraction(float(q))
    square = np.float32(residual * residual)
    if fractions.Fraction(float(square)) < residual * residual:
      square = np.nextafter(square, np.float32(np.inf))
    squares.append(np.float32(max(square, FLOAT32_TINY)) if square > 0 else square)
  gamma = size * u / (1 - size * u)
  c = 1 / (math.sqrt(1 - gamma) * (1 - 8 * u) * (1 - u)) * (1 + 2.0 ** -30)
  c32 = np.float32(c)
  if float(c32) < c:
    c32 = np.nextafter(c32, np.float32(np.inf))
  return np.array(quotient, np.float32), np.array(squares, np.float32), c32


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(
      value)


def _radius(label: Any) -> float | None:
  """A certified_accuracy key as a radius >= 0: a number, or a label 'p/q' or '0.5'."""
  if _is_number(label):
    value = float(label)
  elif isinstance(label, str):
    try:
      value = float(fractions.Fraction(label.strip()))
    except (ValueError, ZeroDivisionError):
      return None
  else:
    return None
  return value if value >= 0 else None


def _checked_metadata(metadata: Mapping) -> dict:
  """``metadata`` validated against :data:`METADATA_KEYS` (``class_names``' length apart: it
  needs the model), else a one-line ValueError."""
  if not isinstance(metadata, Mapping):
    raise ValueError(f"metadata must be a dict with keys among {', '.join(METADATA_KEYS)}, got "
                     f"{type(metadata).__name__}.")
  unknown = sorted(str(k) for k in metadata if k not in METADATA_KEYS)
  if unknown:
    raise ValueError(f"metadata has unknown keys {unknown}; the keys are "
                     f"{', '.join(METADATA_KEYS)} (put anything else under 'extra').")

  def fail(key: str, value: Any) -> None:
    raise ValueError(f"metadata[{key!r}] must be {METADATA_KEYS[key]}; got {value!r}.")

  for key in ("dataset", "model"):
    if key in metadata and not (isinstance(metadata[key], str) and metadata[key].strip()):
      fail(key, metadata[key])
  scaling = metadata.get("input_scaling", 1)
  if not _is_number(scaling) or scaling <= 0:
    fail("input_scaling", scaling)
  for key, least in (("checkpoint_step", 0), ("epoch", 0), ("test_examples", 1)):
    value = metadata.get(key, least)
    if (key != "epoch" or value is not None) and (
        not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least):
      fail(key, value)
  if "class_names" in metadata:
    names = metadata["class_names"]
    if (not isinstance(names, (list, tuple)) or not names
        or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
      fail("class_names", names)
  clean = metadata.get("clean_accuracy", 1.0)
  if not _is_number(clean) or not 0 <= clean <= 1:
    fail("clean_accuracy", clean)
  if "cra" in metadata:
    table = metadata["cra"]
    if not isinstance(table, Mapping) or not table or not all(
        _radius(r) is not None and _is_number(v) and 0 <= v <= 1 for r, v in table.items()):
      fail("cra", table)
    values = [v for _, v in sorted(table.items(), key=lambda item: _radius(item[0]))]
    if any(b > a for a, b in zip(values, values[1:])) or values[0] > clean:
      raise ValueError(f"metadata['cra'] must be non-increasing in the radius and at most "
                       f"clean_accuracy ({clean}); got {dict(table)!r}.")
  if "cra_rounding" in metadata and metadata["cra_rounding"] not in ROUNDING_MODES:
    fail("cra_rounding", metadata["cra_rounding"])
  for key in ("model_kwargs", "extra"):
    if key in metadata and not isinstance(metadata[key], Mapping):
      fail(key, metadata[key])
  checked = dict(metadata)
  if "class_names" in checked:
    checked["class_names"] = list(checked["class_names"])
  try:
    json.dumps(checked, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"metadata must be JSON-serialisable (str keys; str, numbers, lists, "
                     f"dicts): {e}.") from None
  return checked


def export_certified(model: nnx.Module, path: str | os.PathLike, *, input_shape: Sequence[int],
                     rounding: str = DEFAULT_ROUNDING,
                     platforms: Sequence[str] = EXPORT_PLATFORMS,
                     pixel_scale: int | None = None,
                     metadata: Mapping | None = None) -> CertifiedExport:
  """Writes ``model``'s certified classifier to ``path`` and its description to
  ``path + '.json'``.

  The artifact computes, for a batch of ``n`` images (any ``n``), the prediction and the
  float32 radius ``r`` such that the prediction is certified (under ``rounding``) at every
  float32 l2 radius ``eps < r`` on the ``[0, 1]`` scale, 0 where nothing is: the decision of
  :func:`aol_jax.certified_radii`, rounded up to float32. The frozen kernels and the
  certificate's constants are constants inside it; every product runs at precision HIGHEST
  on float32 (checked in the lowered module, :func:`reduced_precision_ops`).

  Its input, and what happens to any other dtype:

  * ``pixel_scale=None``: float32 images ``(n, *input_shape)``, certified as given; one with
    a value outside ``[0, 1]`` or not finite gets radius 0 (where
    :func:`aol_jax.certified_radii` would refuse it). ``exported.call`` refuses every other
    dtype ("Dtype mismatch"), with one exception no artifact can see: with
    ``jax_enable_x64`` off (JAX's default) JAX converts a float64 array to float32 (round to
    nearest) before the call, so the radius is that of the rounded image (each value moved
    by at most ``2^-24`` of itself, or ``2^-150`` below ``2^-126``). Pass float32, or use
    ``pixel_scale``.
  * ``pixel_scale=k`` (an int in ``1..255``): uint8 pixels ``(n, *input_shape)`` in
    ``0..k``, the model's input being ``pixels / k`` (digits: 16; CIFAR: 255). The artifact
    scales them itself and certifies the exact image ``pixels / k``: its float32 rounding
    ``q`` is certified at ``eps + ||pixels / k - q||`` (bounded above in the artifact), as
    :func:`aol_jax.certified_radii` does for a float64 image. A pixel above ``k`` gets
    radius 0. ``exported.call`` refuses every other dtype with ``jax_enable_x64`` on or off
    (a float64 array becomes float32, which is refused too): nothing is rounded silently.

  Args:
    model: as for :func:`aol_jax.certify_dataset` (an ``AOLNetwork``, trained or frozen).
    path: the artifact's file; the JSON goes to ``path + '.json'``. Both are written
      atomically: on any failure neither is left.
    input_shape: one image's shape, e.g. ``(32, 32, 3)``.
    rounding: an exportable key of :data:`aol_jax.ROUNDING_MODES` (a float32 mode).
    platforms: the platforms to lower for, among the mode's (``'cpu'``, ``'cuda'``); a TPU
      is refused (its float32 'highest' is a multi-pass bfloat16 product this library does
      not bound).
    pixel_scale: ``None`` (float32 input) or the full-scale pixel value ``k`` (uint8 input).
    metadata: facts about the model, recorded under ``"model"`` in the JSON; the keys of
      :data:`METADATA_KEYS`, each optional and validated (``class_names`` against the
      model's class count, ``input_scaling`` against ``pixel_scale``).

  Returns:
    A :class:`CertifiedExport`: both paths and the JSON's content.
  """
  mode = get_mode(rounding)
  if not mode.exportable:
    raise ValueError(f"rounding={rounding!r} cannot be exported: the artifact runs a float32 "
                     "evaluation, which " + rounding + " does not certify. Exportable: "
                     + ", ".join(k for k, m in ROUNDING_MODES.items() if m.exportable) + ".")
  platforms = tuple(platforms)
  refused = [p for p in platforms if p not in mode.platforms]
  if not platforms or refused:
    raise ValueError(f"platforms={platforms!r}: rounding={rounding!r} holds on "
                     f"{', '.join(mode.platforms)} only; "
                     + ("a TPU's float32 'highest' is a multi-pass bfloat16 product whose "
                        "rounding this library does not bound." if "tpu" in refused else
                        "name one or more of them."))
  shape = tuple(input_shape)
  if not shape or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                          and d >= 1 for d in shape):
    raise ValueError(f"input_shape must be one image's shape, positive ints such as "
                     f"(32, 32, 3), got {input_shape!r}.")
  shape = tuple(int(d) for d in shape)
  if pixel_scale is not None and (
      not isinstance(pixel_scale, (int, np.integer)) or isinstance(pixel_scale, bool)
      or not 1 <= pixel_scale <= 255):
    raise ValueError(f"pixel_scale must be None (float32 images) or the full-scale value of "
                     f"uint8 pixels, an int in 1..255 (digits: 16, CIFAR: 255); got "
                     f"{pixel_scale!r}.")
  if metadata is not None:
    metadata = _checked_metadata(metadata)
  if metadata is not None and pixel_scale is not None and "input_scaling" in metadata and (
      metadata["input_scaling"] != pixel_scale):
    raise ValueError(f"metadata['input_scaling']={metadata['input_scaling']!r} but "
                     f"pixel_scale={pixel_scale!r}: the artifact would scale pixels by "
                     f"1/{pixel_scale}; pass the scale the model was trained with to both.")
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise ValueError(f"path {path!r}: its directory {directory!r} does not exist; create it "
                     "first.")
  if importlib.util.find_spec("flatbuffers") is None:
    raise ImportError("export_certified needs the 'flatbuffers' package (jax.export's "
                      "serialisation imports it): pip install flatbuffers.")
  prepared = certifier_lib.prepare(model, shape, rounding=rounding, platform="cpu")
  names = (metadata or {}).get("class_names", [None] * prepared.num_classes)
  if len(names) != prepared.num_classes:
    raise ValueError(f"metadata['class_names'] names {len(names)} classes but the model has "
                     f"{prepared.num_classes}; give one name per class, in class-id order.")
  # Host copies: the artifact holds plain constants, whatever mesh the model was trained on.
  state = jax.tree.map(np.asarray, prepared.state)
  size = math.prod(shape)
  if pixel_scale is not None:
    quotient, squares, c = _pixel_tables(int(pixel_scale), size)

  def certified(images, shift, accepted):
    pred, largest, at_zero = prepared.radii(state, images, shift)[:3]
    radius = jnp.where(at_zero & accepted, jnp.nextafter(largest, jnp.float32(jnp.inf)), 0.0)
    return pred, radius.astype(jnp.float32)

  def predict_images(images):
    flat = images.reshape(images.shape[0], -1)
    # Outside what certified_radii accepts (non-finite, or outside [0, 1]): radius 0.
    accepted = jnp.all(jnp.isfinite(flat) & (flat >= 0) & (flat <= 1), axis=1)
    return certified(images, jnp.zeros(images.shape[:1], jnp.float32), accepted)

  def predict_pixels(pixels):
    flat = pixels.reshape(pixels.shape[0], -1).astype(jnp.int32)
    images = jnp.asarray(quotient)[flat].reshape(pixels.shape)
    shift = jnp.sqrt(jnp.sum(jnp.asarray(squares)[flat], axis=1)) * c
    return certified(images, shift, jnp.all(flat <= pixel_scale, axis=1))

  batch, = jax.export.symbolic_shape("n")
  if pixel_scale is None:
    predict, spec = predict_images, jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  else:
    predict, spec = predict_pixels, jax.ShapeDtypeStruct((batch, *shape), jnp.uint8)
  with mode.arithmetic():
    exported = jax.export.export(jax.jit(predict), platforms=platforms)(spec)
  module = exported.mlir_module()
  bad = reduced_precision_ops(module)
  if bad:
    raise TypeError(f"The lowered artifact holds {len(bad)} operations narrower than float32 "
                    f"or dot products not at precision HIGHEST (first: {bad[0][:200]}); "
                    "refusing to export a certificate for it.")
  if "cuda" in platforms and "stablehlo.convolution" in module:
    raise TypeError("The lowered artifact holds a convolution operation, which a GPU may run "
                    "with a Winograd or FFT algorithm the certificate does not bound; lower "
                    "for platforms=('cpu',) or make the layer a slices-and-dot convolution.")
  blob = exported.serialize()
  description = _description(exported, prepared, mode, shape, pixel_scale, metadata)
  text = json.dumps(description, indent=2, sort_keys=True, allow_nan=False).encode()
  _write_both(path, blob, text)
  return CertifiedExport(artifact=path, description_file=path + ".json",
                         description=description)


def _description(exported: jax.export.Exported, prepared: certifier_lib.Certifier, mode: Any,
                 shape: tuple[int, ...], pixel_scale: int | None,
                 metadata: dict | None) -> dict:
  """The JSON beside the artifact."""
  fmt = mode.fmt.name
  scaling = None if metadata is None else metadata.get("input_scaling")
  if pixel_scale is not None:
    inputs = {
        "dtype": "uint8", "pixel_scale": int(pixel_scale),
        "values": f"pixels 0..{pixel_scale}; the model's input is pixels / {pixel_scale}, "
                  "computed inside the artifact; an image with a pixel above "
                  f"{pixel_scale} gets radius 0",
        "dtype_rule": "uint8 only: exported.call refuses every other dtype, with "
                      "jax_enable_x64 on or off (a float64 array becomes float32 and is "
                      "refused too); nothing is rounded silently",
    }
    radius_of = (f"the exact image pixels / {pixel_scale} (its float32 rounding inside the "
                 "artifact is accounted for)")
  else:
    inputs = {
        "dtype": "float32",
        "values": "the model's inputs, on the [0, 1] scale it was trained on: "
                  + (f"stored values / {scaling:g} (model.input_scaling)" if scaling is not None
                     else "how raw data maps to it is not recorded here")
                  + "; an image with a value outside [0, 1] or not finite gets radius 0",
        "dtype_rule": "float32, certified as given: exported.call refuses every other dtype, "
                      "except that with jax_enable_x64 off (JAX's default) JAX converts a "
                      "float64 array to float32 (round to nearest) before the call, which no "
                      "artifact can see; the radius is then that of the rounded image (each "
                      "value moved by at most 2^-24 of itself, or 2^-150 below 2^-126). Pass "
                      "float32",
    }
    radius_of = "the float32 image given"
  description = {
      "format": "jax.export: exported = jax.export.deserialize(bytes); predictions, radii = "
                "exported.call(images). Needs jax and flatbuffers only",
      "calling_convention_version": exported.calling_convention_version,
      "inputs": {"shape": ["n", *shape], **inputs},
      "outputs": {"predictions": "(n,) int32 class ids",
                  "radii": "(n,) float32: the prediction is certified at every float32 l2 "
                           f"radius eps < radius around {radius_of}, on the [0, 1] scale; "
                           "0: nothing certified"},
      "num_classes": prepared.num_classes,
      "lipschitz_bound": prepared.lipschitz,
      "rounding": mode.name,
      "certifies": mode.describe(),
      "statistical": mode.statistical,
      "platforms": {p: ("statistical model of " if mode.statistical else "rigorous for ")
                    + _GUARANTEE[p].format(fmt=fmt) for p in exported.platforms},
      "platforms_not_covered": {p: why for p, why in _NOT_COVERED.items()
                                if p not in exported.platforms},
      "library": "aol_jax", "library_version": __version__, "jax_version": jax.__version__,
  }
  if metadata is not None:
    description["model"] = metadata
  return description


def _write_both(path: str, blob: bytes, text: bytes) -> None:
  """Writes ``blob`` to ``path`` and ``text`` to ``path + '.json'``, each through a temporary
  file in the same directory renamed into place; on failure the temporaries are removed and
  no partially written file remains."""
  directory = os.path.dirname(os.path.abspath(path))
  temporaries = []
  try:
    for data in (blob, text):
      fd, tmp = tempfile.mkstemp(dir=directory, prefix=".export-", suffix=".tmp")
      temporaries.append(tmp)
      with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporaries[0], path)
    try:
      os.replace(temporaries[1], path + ".json")
    except BaseException:
      os.remove(path)  # an artifact without its description is not left behind
      raise
  finally:
    for tmp in temporaries:
      if os.path.exists(tmp):
        os.remove(tmp)
