"""A certified model to ship: one ``jax.export`` artifact that returns predictions and radii.

:func:`export_certified` writes the frozen network with its certificate (the Lipschitz bound,
the mode's constants, the decision of :func:`aol_jax.certified_radii`) as a serialized
:class:`jax.export.Exported`, batch-polymorphic, float32 in, lowered for CPU and CUDA GPUs.
Loading it needs jax (and flatbuffers, which jax.export's serialisation imports)::

  exported = jax.export.deserialize(open(path, "rb").read())
  predictions, radii = exported.call(images)  # (n,) int32, (n,) float32

A JSON file beside it (``path + '.json'``) states what the radii mean, platform by platform.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aol_jax._src.certification import certifier as certifier_lib
from aol_jax._src.certification.modes import DEFAULT_ROUNDING, ROUNDING_MODES, get_mode
from aol_jax._src.version import __version__

EXPORT_PLATFORMS = ("cpu", "cuda")
"""The platforms an artifact is lowered for by default."""

_GUARANTEE = {
    "cpu": "IEEE {fmt} products and {fmt} sums in any order (XLA:CPU)",
    "cuda": "IEEE {fmt} products and {fmt} sums in any order: every dot product at precision "
            "HIGHEST (no TF32), every convolution lowered as slices and one dot product (no "
            "Winograd or FFT algorithm)",
}


def reduced_precision_ops(module_text: str) -> list[str]:
  """The dot products and convolutions of a lowered StableHLO module that do not run at
  precision HIGHEST on float32 or wider operands (TF32, bfloat16 passes, narrow types)."""
  bad = []
  for line in module_text.splitlines():
    if "stablehlo.dot_general" not in line and "stablehlo.convolution" not in line:
      continue
    types = re.findall(r"tensor<[^>]*x(\w+)>|tensor<(\w+)>", line.split(":")[-1])
    elements = {a or b for a, b in types}
    narrow = elements - {"f32", "f64"}
    if "precision = [HIGHEST, HIGHEST]" not in line or narrow:
      bad.append(line.strip())
  return bad


def export_certified(model: nnx.Module, path: str | os.PathLike, *, input_shape: Sequence[int],
                     rounding: str = DEFAULT_ROUNDING,
                     platforms: Sequence[str] = EXPORT_PLATFORMS,
                     metadata: dict | None = None) -> dict:
  """Writes ``model``'s certified classifier to ``path`` and its description to
  ``path + '.json'``; returns that description.

  The artifact computes, for a float32 batch ``(n, *input_shape)`` of images in ``[0, 1]``
  (any ``n``), the prediction and the float32 radius ``r`` such that the prediction is
  certified (under ``rounding``) at every float32 radius ``eps < r``, 0 where nothing is:
  the decision of :func:`aol_jax.certified_radii`, rounded up to float32. An image that
  :func:`aol_jax.certified_radii` would refuse (a value outside ``[0, 1]`` or not finite)
  gets radius 0. The frozen kernels and the certificate's constants are constants inside
  it; every product runs at precision HIGHEST (checked in the lowered module).

  Inputs are float32: ``exported.call`` refuses any other dtype when ``jax_enable_x64`` is
  on; with it off (JAX's default) JAX itself converts a float64 NumPy array to float32
  before any function sees it, as for every jitted function, so pass float32 images.

  Args:
    model: as for :func:`aol_jax.certify_dataset` (an ``AOLNetwork``, trained or frozen).
    path: the artifact's file; the JSON goes to ``path + '.json'``. Both are written
      atomically: on any failure neither is left.
    input_shape: one image's shape, e.g. ``(32, 32, 3)``.
    rounding: an exportable key of :data:`aol_jax.ROUNDING_MODES` (a float32 mode).
    platforms: the platforms to lower for, among the mode's (``'cpu'``, ``'cuda'``); a TPU
      is refused (its float32 'highest' is a multi-pass bfloat16 product this library does
      not bound).
    metadata: JSON-serialisable facts about the model, recorded under ``"model"`` (the
      runner records the dataset, the input scaling, the model name, the checkpoint step,
      the class names, the clean accuracy and the certified accuracies).

  Returns:
    The JSON description as a dict.
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
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise ValueError(f"path {path!r}: its directory {directory!r} does not exist; create it "
                     "first.")
  if metadata is not None:
    json.dumps(metadata)  # refuses what JSON cannot hold before anything is written
  prepared = certifier_lib.prepare(model, shape, rounding=rounding, platform="cpu")
  # Host copies: the artifact holds plain constants, whatever mesh the model was trained on.
  state = jax.tree.map(np.asarray, prepared.state)

  def predict(images):
    shift = jnp.zeros(images.shape[:1], jnp.float32)
    pred, largest, at_zero = prepared.radii(state, images, shift)[:3]
    # Outside what certified_radii accepts (non-finite, or outside [0, 1]): radius 0.
    flat = images.reshape(images.shape[0], -1)
    accepted = jnp.all(jnp.isfinite(flat) & (flat >= 0) & (flat <= 1), axis=1)
    radius = jnp.where(at_zero & accepted, jnp.nextafter(largest, jnp.float32(jnp.inf)), 0.0)
    return pred, radius.astype(jnp.float32)

  batch, = jax.export.symbolic_shape("n")
  spec = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  with jax.default_matmul_precision("highest"):
    exported = jax.export.export(jax.jit(predict), platforms=platforms)(spec)
  bad = reduced_precision_ops(exported.mlir_module())
  if bad:
    raise TypeError(f"The lowered artifact holds {len(bad)} dot products or convolutions not "
                    f"at float32 precision HIGHEST (first: {bad[0][:200]}); refusing to "
                    "export a certificate for it.")
  blob = exported.serialize()
  fmt = mode.fmt.name
  description = {
      "format": "jax.export (jax.export.deserialize(bytes).call(images)); needs jax and "
                "flatbuffers",
      "inputs": {"shape": ["n", *shape], "dtype": "float32",
                 "scaling": "values in [0, 1], scaled as the model was trained (see "
                            "model.input_scaling where recorded); an image with a value "
                            "outside [0, 1] or not finite gets radius 0",
                 "dtype_rule": "pass float32: with jax_enable_x64 on, any other dtype is "
                               "refused; with it off JAX converts float64 NumPy arrays to "
                               "float32 before the call"},
      "outputs": {"predictions": "(n,) int32 class ids",
                  "radii": "(n,) float32: the prediction is certified at every float32 l2 "
                           "radius eps < radius (on the [0, 1] scale); 0: nothing certified"},
      "num_classes": prepared.num_classes,
      "lipschitz_bound": prepared.lipschitz,
      "rounding": rounding,
      "certifies": mode.describe(),
      "statistical": mode.statistical,
      "platforms": {p: ("statistical model of " if mode.statistical else "rigorous for ")
                    + _GUARANTEE[p].format(fmt=fmt) for p in platforms},
      "library": "aol_jax", "library_version": __version__, "jax_version": jax.__version__,
  }
  if metadata is not None:
    description["model"] = dict(metadata)
  _write_both(path, blob, json.dumps(description, indent=2, sort_keys=True).encode())
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
