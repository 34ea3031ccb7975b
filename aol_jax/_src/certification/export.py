"""A certified model to ship: one ``jax.export`` artifact that returns predictions and radii.

:func:`export_certified` writes the frozen network with its certificate (the Lipschitz bound,
the rounding terms, the decision of :func:`aol_jax.certified_radii`) as a serialized
:class:`jax.export.Exported`, batch-polymorphic, float32 in. Loading it needs jax only::

  exported = jax.export.deserialize(open(path, "rb").read())
  predictions, radii = exported.call(images)  # (n,) int32, (n,) float32

A JSON file beside it (``path + '.json'``) states what the radii mean.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from aol_jax._src.certification import dataset
from aol_jax._src.certification.modes import DEFAULT_ROUNDING, mode_description
from aol_jax._src.version import __version__

EXPORT_ROUNDING = ("float32_statistical",)
"""The modes an artifact can carry: the one certifying the float32 forward pass it runs."""


def export_certified(model: nnx.Module, path: str | os.PathLike, *, input_shape: Sequence[int],
                     rounding: str = DEFAULT_ROUNDING, metadata: dict | None = None) -> dict:
  """Writes ``model``'s certified classifier to ``path`` and its description to
  ``path + '.json'``; returns that description.

  The artifact computes, for a float32 batch ``(n, *input_shape)`` of images in ``[0, 1]``
  (any ``n``), the prediction and the float32 radius ``r`` such that the prediction is
  certified (under ``rounding``) at every float32 radius ``eps < r``, 0 where nothing is:
  the decision of :func:`aol_jax.certified_radii`, whose float64 radii it returns rounded
  up to float32. An image that :func:`aol_jax.certified_radii` would refuse (a value outside
  ``[0, 1]`` or not finite) gets radius 0. The frozen float32 kernels, the Lipschitz bound, the rounding terms and
  ``M(0)`` are constants inside it; its dot products and convolutions are lowered with
  precision 'highest', as the rounding model assumes.

  The radii hold for the float32 evaluation the artifact performs, under the probabilistic
  rounding model (:mod:`aol_jax.certification.probabilistic`). Both files are written atomically: on any failure neither is left.

  Args:
    model: as for :func:`aol_jax.certify_dataset` (an ``AOLNetwork``, trained or frozen).
    path: the artifact's file; the JSON goes to ``path + '.json'``.
    input_shape: one image's shape, e.g. ``(32, 32, 3)``.
    rounding: a key of :data:`EXPORT_ROUNDING`; ``'float64'`` certifies a float64
      evaluation, which a float32 artifact does not perform, and is refused.
    metadata: JSON-serialisable facts about the model recorded under ``"model"`` in the
      description (the runner writes the dataset, input scaling, model name, checkpoint
      step, class names, clean accuracy and certified accuracies).

  Returns:
    The JSON description as a dict.
  """
  if rounding not in EXPORT_ROUNDING:
    raise ValueError(f"rounding must be one of {list(EXPORT_ROUNDING)} for an exported "
                     f"model, got {rounding!r}: the artifact runs the float32 forward pass, "
                     "which only the probabilistic mode certifies.")
  if not isinstance(model, nnx.Module):
    raise ValueError(f"model must be an nnx.Module (an aol_jax.AOLNetwork), got "
                     f"{type(model).__name__}.")
  shape = tuple(input_shape)
  if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                          for d in shape):
    raise ValueError(f"input_shape must be one image's shape, positive ints such as "
                     f"(32, 32, 3), got {input_shape!r}.")
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise ValueError(f"path {path!r}: its directory {directory!r} does not exist; create it "
                     "first.")

  with jax.default_matmul_precision("highest"):
    dataset.protocol.lipschitz_bound(model)  # refuses an undeclared layer by its path
    frozen = dataset._float32_copy(model, shape)  # noqa: SLF001  (one freezing, not two)
    certifier = dataset._probabilistic_certifier(frozen, shape)  # noqa: SLF001
    graphdef, state = nnx.split(frozen)
    # Host copies: the artifact holds plain constants, whatever mesh the model was trained on.
    state = jax.device_get(state)
    certifier.zero_norm = dataset._zero_input_activation_norm(graphdef, state, shape)  # noqa: SLF001
    num_classes = int(jax.eval_shape(frozen, jax.ShapeDtypeStruct((1, *shape),
                                                                  jnp.float32)).shape[-1])

    def predict(images):
      shift = jnp.zeros(images.shape[:1], jnp.float32)
      _, pred, largest, at_zero, _ = dataset._probabilistic_decisions(  # noqa: SLF001
          certifier.graphdef, certifier.terms, certifier.operations, state, images, shift,
          certifier.zero_norm)
      # Outside what certified_radii accepts (non-finite, or outside [0, 1]): radius 0.
      flat = images.reshape(images.shape[0], -1)
      accepted = jnp.all(jnp.isfinite(flat) & (flat >= 0) & (flat <= 1), axis=1)
      radius = jnp.where(at_zero & accepted, jnp.nextafter(largest, jnp.float32(jnp.inf)), 0.0)
      return pred, radius.astype(jnp.float32)

    batch, = jax.export.symbolic_shape("n")
    spec = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    blob = jax.export.export(jax.jit(predict))(spec).serialize()

  description = {
      "format": "jax.export (jax.export.deserialize(bytes).call(images))",
      "inputs": {"shape": ["n", *shape], "dtype": "float32",
                 "scaling": "pixel values in [0, 1] (uint8 images / 255); an image with "
                            "a value outside [0, 1] or not finite gets radius 0"},
      "outputs": {"predictions": "(n,) int32 class ids",
                  "radii": "(n,) float32: the prediction is certified at every float32 l2 "
                           "radius eps < radius (on the [0, 1] scale); 0: nothing certified"},
      "num_classes": num_classes,
      "lipschitz_bound": float(certifier.lipschitz),
      "rounding": rounding,
      "rounding_model": mode_description(rounding),
      "assumptions": [
          "the artifact's own float32 forward pass, matmul precision 'highest' (true float32 "
          "products, no TF32 or bfloat16 passes)",
          "independent zero-mean rounding errors (probabilistic model of Higham & Mary 2019; "
          "not a worst-case bound), plus a deterministic underflow term",
          "IEEE float32 round to nearest",
          "finite images in [0, 1] of the exported shape",
      ],
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
