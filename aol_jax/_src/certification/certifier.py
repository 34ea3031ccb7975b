"""A model prepared for certification: the one seam the drivers share.

:func:`prepare` freezes the model into float32 (the evaluation's format for a float64 mode,
by exact widening), checks every step it applies, refuses what no bound covers, and computes
the mode's constants once. The :class:`Certifier` it returns evaluates batches: the
predictions, the per-example decision at a radius, and the largest certified radius by an
exact bisection of that decision. :func:`aol_jax.certify_dataset`,
:func:`aol_jax.certified_radii` and :func:`aol_jax.export_certified` all go through it, so
they decide alike.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from aol_jax._src import checks
from aol_jax._src.certification import protocol
from aol_jax._src.certification.margins import margins
from aol_jax._src.certification.modes import DEFAULT_ROUNDING, Bounds, Mode, get_mode
from aol_jax._src.certification.rule import certify
from aol_jax._src.freeze import freeze


def platform_of(device: jax.Device) -> str:
  """``'cpu'``, ``'tpu'``, ``'cuda'`` or ``'rocm'`` (a GPU by its runtime), else the
  device's platform name."""
  if device.platform == "gpu":
    version = str(getattr(device.client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version or "hip" in version else "cuda"
  return device.platform


def check_platform(mode: Mode, platform: str) -> None:
  """``ValueError`` unless ``mode``'s arithmetic assumptions hold on ``platform``."""
  if platform not in mode.platforms:
    raise ValueError(
        f"rounding={mode.name!r} certifies {mode.evaluation} on {', '.join(mode.platforms)} "
        f"(IEEE {mode.fmt.name} products and sums), not on {platform!r}: on a TPU, float32 "
        "'highest' is a multi-pass bfloat16 product whose rounding this library does not "
        "bound. Certify on the host instead: pass platform='cpu'.")


def _inspect(closed: Any) -> tuple[set, str]:
  """Every floating dtype that an operation of the closed jaxpr ``closed`` produces, nested
  ones too, and a digest of the program: its text and the values of its constants."""
  found = set()
  digest = hashlib.sha256(str(closed.jaxpr).encode())

  def constants(closed):
    for value in getattr(closed, "consts", ()):
      array = np.asarray(value)
      digest.update(f"{array.dtype}{array.shape}".encode())
      digest.update(array.tobytes())

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        dtype = getattr(v.aval, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
          found.add(jnp.dtype(dtype))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          constants(sub)
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  constants(closed)
  walk(closed.jaxpr)
  return found, digest.hexdigest()


def _frozen_copy(model: nnx.Module, mode: Mode) -> nnx.Module:
  """``model`` frozen into float32, widened exactly to the mode's format, its per-layer
  matmul precision cleared (every product of the evaluation runs at 'highest'), refused
  where a parameter is wider than the format, not finite, or subnormal, or where an
  operation still computes narrower."""
  target = jnp.dtype(mode.fmt.name)
  for path, module in nnx.iter_modules(model):
    dtype = getattr(module, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.inexact) and (
        not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 32):
      raise TypeError(f"{type(module).__name__} at path {tuple(path)} computes in "
                      f"{jnp.dtype(dtype)}, and a certificate covers a float32 or wider "
                      "evaluation only; set its dtype to None (or float32) to certify the "
                      "model you will run.")
  frozen = freeze(model, dtype=jnp.float32)
  for path, module in nnx.iter_modules(frozen):
    if getattr(module, "precision", None) is not None:
      module.precision = None
  for key_path, value in jax.tree_util.tree_flatten_with_path(nnx.state(frozen))[0]:
    array = np.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
      continue
    where = jax.tree_util.keystr(key_path)
    if jnp.finfo(array.dtype).bits > jnp.finfo(target).bits:
      raise ValueError(f"The model holds {array.dtype} values at {where}, wider than "
                       f"rounding={mode.name!r} evaluates in ({target}); certify with a "
                       "float64 mode, or cast the model to float32 first.")
    wide = array.astype(np.float64)
    if not np.all(np.isfinite(wide)):
      raise ValueError(f"The model holds non-finite values at {where}; no bound exists.")
    if np.any((wide != 0) & (np.abs(wide) < jnp.finfo(target).tiny)):
      raise ValueError(f"The model holds subnormal values at {where} (nonzero, below "
                       f"{jnp.finfo(target).tiny}), which platforms flush to zero or not; the "
                       "certificate does not model that. Set them to zero first.")
  state = jax.tree.map(lambda a: a.astype(target) if jnp.issubdtype(a.dtype, jnp.floating)
                       else a, nnx.state(frozen))
  nnx.update(frozen, state)
  return frozen


def _traced_evaluation(mode: Mode, static: Any, scalars: Any, graphdef: Any, state: Any,
                       image_shape: tuple[int, ...]) -> tuple[jax.ShapeDtypeStruct, str]:
  """The mode's evaluation of one image traced anew, as the code runs now: the logits'
  shape and the program's digest; ``TypeError`` if it computes anything narrower than the
  mode's format."""
  target = jnp.dtype(mode.fmt.name)
  x = jax.ShapeDtypeStruct((1, *image_shape), target)
  evaluate = lambda s, c, v: mode.model.evaluate(static, c, nnx.merge(graphdef, s), v)
  closed, out = jax.make_jaxpr(evaluate, return_shape=True)(state, scalars, x)
  dtypes, program = _inspect(closed)
  narrow = {d for d in dtypes if jnp.finfo(d).bits < jnp.finfo(target).bits}
  if narrow:
    raise TypeError(f"The model still computes in {sorted(str(d) for d in narrow)} after "
                    f"freezing into {target} (a layer casts internally), and certificates "
                    f"assume {target}. Make the layer compute in its input's dtype.")
  return out[0], program


class Scalars(NamedTuple):
  """A certifier's traced constants: ``L`` and the mode's (read-only host arrays)."""
  lipschitz: np.ndarray
  model: Any


def _read_only(value: Any) -> np.ndarray:
  array = np.array(value)
  array.setflags(write=False)
  return array


@dataclasses.dataclass(frozen=True)
class Certifier:
  """A model prepared by :func:`prepare`: frozen, checked, its constants computed once.

  A certifier is a static argument of the jitted functions below; what varies between
  networks of one architecture (the parameters, ``L`` and the rounding model's constants) is
  not part of its hash but passed traced (``state`` and ``scalars``), so those networks share
  one compiled program. The traced methods read the constants only as ``static`` (hashed)
  and ``scalars``; ``lipschitz`` and ``constants`` are the host values, for reports.

  Attributes:
    mode: the row of :data:`aol_jax.ROUNDING_MODES` it certifies under.
    graphdef, state: the frozen network (``state`` on the host, in the mode's format).
    image_shape: one input's shape.
    num_classes: the logits' size.
    lipschitz: ``L``, the network's Lipschitz bound the certificates use.
    constants: the mode's per-model constants, on the host.
    static: the part of ``constants`` a compiled evaluation holds as constants (hashed).
    program: a digest of the evaluation as ``prepare`` traced it (hashed): its jaxpr's text
      and constants. Networks share a compiled program only where their code traces to the
      same one; a method, class attribute or global changed between two ``prepare`` calls
      that changes what the network computes changes the digest, and a new program is
      compiled.
    scalars: ``L`` and the rest of the constants as host arrays of the mode's format,
      rounded as the evaluation uses them: traced arguments of the jitted functions.
    platform: where its evaluations run (a platform of ``mode.platforms``).
  """
  mode: Mode
  graphdef: Any
  state: Any = dataclasses.field(compare=False, hash=False)  # traced, never a static key
  image_shape: tuple[int, ...]
  num_classes: int
  lipschitz: float = dataclasses.field(compare=False, hash=False)  # in scalars
  constants: Any = dataclasses.field(compare=False, hash=False)  # in static and scalars
  static: Any
  program: str
  scalars: Any = dataclasses.field(compare=False, hash=False)  # traced, never a static key
  platform: str

  def evaluate(self, state: Any, x: jax.Array, scalars: Any = None
               ) -> tuple[jax.Array, jax.Array, Bounds]:
    """Traced: logits, predictions and the per-example bounds for a batch ``x``
    (``scalars``: traced ones, else this certifier's as constants)."""
    scalars = self.scalars if scalars is None else scalars
    logits, bounds = self.mode.model.evaluate(self.static, scalars.model,
                                              nnx.merge(self.graphdef, state), x)
    return logits, jnp.argmax(logits, axis=-1).astype(jnp.int32), bounds

  def allowance(self, bounds: Bounds, eps: jax.Array, scalars: Any = None) -> jax.Array:
    """Traced: the rounding allowance at radius ``eps`` (scalar or per example)."""
    scalars = self.scalars if scalars is None else scalars
    return self.mode.model.allowance(self.static, scalars.model, bounds, eps)

  def decide(self, logits: jax.Array, labels: jax.Array, bounds: Bounds,
             eps: jax.Array, scalars: Any = None) -> jax.Array:
    """Traced: per example, whether ``labels`` is certified at radius ``eps``: the margin
    beats ``sqrt(2) L eps`` plus the allowance, every value computed was finite, no value can
    overflow inside the ball (``eps <= bounds.limit``), and ``eps`` is a finite radius >= 0
    (a traced radius cannot be refused, so an invalid one certifies nothing)."""
    scalars = self.scalars if scalars is None else scalars
    eps = jnp.broadcast_to(jnp.asarray(eps, logits.dtype), labels.shape)
    valid = jnp.isfinite(eps) & (eps >= 0) & bounds.finite & (eps <= bounds.limit)
    safe = jnp.where(valid, eps, 0)
    allow = self.allowance(bounds, safe, scalars)
    ok = certify(logits, labels, safe, lipschitz_constant=scalars.lipschitz,
                 allowance=jnp.where(jnp.isfinite(allow) & (allow >= 0), allow, 0))
    return ok & valid & jnp.isfinite(allow) & (allow >= 0)

  def radii(self, state: Any, x: jax.Array, shift: jax.Array, scalars: Any = None
            ) -> tuple[jax.Array, jax.Array, jax.Array, Bounds, jax.Array]:
    """Traced: predictions, the largest radius ``r`` (a float of the mode's format) with
    the prediction certified at ``r + shift``, whether radius 0 is, the bounds and logits."""
    scalars = self.scalars if scalars is None else scalars
    logits, pred, bounds = self.evaluate(state, x, scalars)
    shift = jnp.asarray(shift, logits.dtype)
    # The ball of radius e around x lies in that of e + shift around the image evaluated;
    # the sum is rounded up, and a shift that is negative or not finite certifies nothing.
    bad_shift = ~(jnp.isfinite(shift) & (shift >= 0))
    decide = lambda e: self.decide(logits, pred, bounds, jnp.where(
        bad_shift, jnp.nan, jnp.where(shift > 0, jnp.nextafter(e + shift, jnp.inf), e)),
        scalars)
    largest, at_zero = largest_certified(decide, jnp.dtype(self.mode.fmt.name), pred)
    return pred, largest, at_zero, bounds, logits


def largest_certified(decide, dtype, like: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per example, the largest non-negative float ``r`` of ``dtype`` with ``decide(r)``, and
  whether ``decide(0)`` holds; ``decide`` maps radii shaped (and sharded) ``like`` to bools,
  non-increasing.

  Bisection on the bit patterns: the non-negative floats of a dtype are ordered as their
  bits read as integers, so ``bits(dtype)`` halvings of ``[0, +inf)`` find the last certified
  one exactly (no tolerance), the decision itself being evaluated at every step.
  """
  itype = jnp.int32 if jnp.dtype(dtype).itemsize == 4 else jnp.int64
  inf_bits = jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, dtype), itype)
  as_float = lambda bits: jax.lax.bitcast_convert_type(bits, dtype)
  at_zero = decide(jnp.zeros_like(like, dtype))
  low = jnp.zeros_like(at_zero, itype)
  high = jnp.full_like(at_zero, inf_bits, itype)

  def step(_, bounds):
    low, high = bounds
    mid = low + (high - low) // 2
    ok = decide(as_float(mid))
    return jnp.where(ok, mid, low), jnp.where(ok, high, mid)

  low, _ = jax.lax.fori_loop(0, 8 * jnp.dtype(dtype).itemsize, step, (low, high))
  return as_float(low), at_zero


def prepare(model: nnx.Module, image_shape: Sequence[int], *,
            rounding: str = DEFAULT_ROUNDING, platform: str = "cpu") -> Certifier:
  """Prepares ``model`` to certify images of ``image_shape`` under ``rounding``.

  Every step the network applies must state its bound (else
  :class:`~aol_jax.certification.UndeclaredBoundError` names its path), the mode must cover
  ``platform``'s arithmetic, and no parameter may be wider than the mode's format, not
  finite, or subnormal. Call the returned certifier's functions inside ``mode.arithmetic()``.
  """
  mode = get_mode(rounding)
  check_platform(mode, platform)
  checks.nnx_module(model, "model")
  shape = tuple(image_shape)
  if not shape or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                          and d >= 1 for d in shape):
    raise ValueError(f"image_shape must be one image's shape, positive ints such as "
                     f"(32, 32, 3), got {image_shape!r}.")
  shape = tuple(int(d) for d in shape)
  with mode.arithmetic():
    # An undeclared step is refused by its path before anything is computed; the constants
    # each step states are checked where they are used: those of the frozen copy, certified.
    protocol.flatten(model)
    frozen = _frozen_copy(model, mode)
    constants = mode.model.constants(frozen, shape)
    static, lipschitz = mode.model.static(constants), float(mode.model.lipschitz(constants))
    # L as the rule reads it: rounded to the logits' format (rule.certify covers that).
    scalars = jax.tree.map(_read_only, Scalars(np.asarray(lipschitz, mode.fmt.name),
                                               mode.model.scalars(constants)))
    graphdef, state = nnx.split(frozen)
    logits, program = _traced_evaluation(mode, static, scalars.model, graphdef, state, shape)
    if logits.ndim != 2 or logits.shape[-1] < 2:
      raise ValueError(f"The model maps one image to {logits.shape[1:]}; a classifier "
                       "returns one logit per class, at least 2.")
    state = jax.device_get(state)
  return Certifier(mode=mode, graphdef=graphdef, state=state, image_shape=shape,
                   num_classes=int(logits.shape[-1]), lipschitz=lipschitz,
                   constants=constants, static=static, program=program, scalars=scalars,
                   platform=platform)


@functools.partial(jax.jit, static_argnums=0)
def _radii(certifier: Certifier, state: Any, scalars: Any, x: jax.Array, shift: jax.Array):
  return certifier.radii(state, x, shift, scalars)[:3]


def radii(certifier: Certifier, state: Any, x: jax.Array, shift: jax.Array):
  """Jitted :meth:`Certifier.radii` without the bounds and logits."""
  return _radii(certifier, state, certifier.scalars, x, shift)


@functools.partial(jax.jit, static_argnums=0)
def _counts(certifier: Certifier, state: Any, scalars: Any, x: jax.Array, shift: jax.Array,
            y: jax.Array, valid: jax.Array, eps: jax.Array):
  pred, largest, at_zero, bounds, logits = certifier.radii(state, x, shift, scalars)
  correct = jnp.sum((margins(logits, y) > 0) & bounds.finite & valid)
  cert = (pred == y)[None] & at_zero[None] & (largest[None, :] >= eps[:, None]) & valid[None]
  allow = jax.vmap(lambda e: certifier.allowance(bounds, e + shift, scalars))(eps)
  allow = jnp.max(jnp.where(valid[None] & bounds.finite[None], allow, 0), axis=1)
  return correct, jnp.sum(cert, axis=1), allow


def counts(certifier: Certifier, state: Any, x: jax.Array, shift: jax.Array, y: jax.Array,
           valid: jax.Array, eps: jax.Array):
  """Jitted, for one padded batch: correct count, certified count per radius of ``eps``,
  and the largest allowance applied per radius. Certified at ``e`` means predicted ``y``
  and ``e`` at most the largest certified radius: the one decision :func:`radii` reports."""
  return _counts(certifier, state, certifier.scalars, x, shift, y, valid, eps)


def float_radii(eps: ArrayLike, dtype) -> np.ndarray:
  """The radii as floats of ``dtype``, each >= its float64 value (rounded up, never down)."""
  eps = np.asarray(eps, np.float64)
  low = eps.astype(dtype)
  return np.where(low.astype(np.float64) < eps, np.nextafter(low, np.asarray(np.inf, dtype)),
                  low)


def checked_images(images: ArrayLike) -> np.ndarray:
  """``images`` as a float32 or float64 array, finite and in ``[0, 1]``, else ValueError
  (integers and floats narrower than float32 are refused, never converted)."""
  array = np.asarray(images)
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise ValueError(f"images must be floating-point values in [0, 1], got dtype "
                     f"{array.dtype}; divide integer images by their full-scale value "
                     "(255 for uint8) first.")
  if jnp.finfo(array.dtype).bits < 32:
    raise ValueError(f"images are {array.dtype}, and the model would compute on them in "
                     f"{array.dtype} (its normalisation, say) before anything widens them: "
                     "pass float32 (or float64) images, the evaluation a certificate covers.")
  if array.ndim < 2 or array.shape[0] == 0:
    raise ValueError(f"images must be (n, ...) with n >= 1, got shape {array.shape}.")
  if array.dtype != np.float64:
    array = array.astype(np.float32)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"images contain {int(np.sum(~np.isfinite(array)))} non-finite values "
                     "(NaN or inf); clean them before certifying.")
  low, high = float(array.min()), float(array.max())
  if low < 0 or high > 1:
    raise ValueError(f"images must lie in [0, 1] (the scale the radii are measured on), got "
                     f"values in [{low}, {high}]; rescale them (a 0..255 image: / 255).")
  return array


def checked_batch_size(batch_size: Any) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
      batch_size < 1):
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
  return int(batch_size)


def placement(platform: str | None, mesh: jax.sharding.Mesh | None) -> tuple[str, Any, Any]:
  """``(platform, state placement, batch placement)`` for a run on ``mesh`` (batches split
  over its ``'data'`` axis, the state replicated) or on one device of ``platform`` (default:
  JAX's default backend)."""
  if mesh is not None:
    if "data" not in mesh.axis_names:
      raise ValueError(f"mesh needs a 'data' axis, has {mesh.axis_names}.")
    on = platform_of(mesh.devices.flat[0])
    if platform is not None and platform != on:
      raise ValueError(f"platform={platform!r} but the mesh's devices are {on!r}; pass one.")
    return (on, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  try:
    device = jax.devices(platform)[0] if platform is not None else jax.devices()[0]
  except RuntimeError as e:
    raise ValueError(f"platform={platform!r}: JAX has no such backend here ({e}).") from None
  return platform_of(device), device, device


def batches(certifier: Certifier, images: np.ndarray, labels: np.ndarray, *,
            batch_size: int, mesh: jax.sharding.Mesh | None, state_at: Any, batch_at: Any):
  """``(state, x, shift, y, valid)`` per padded batch of ``batch_size`` rows (a multiple of
  the mesh's data axis), placed. float64 images in a float32 mode are rounded to float32 and
  ``shift`` is ``||x - x32||`` rounded up: the ball of radius ``e`` around ``x`` lies in that
  of ``e + shift`` around ``x32``. In a float64 mode they are taken as given."""
  n = images.shape[0]
  dtype = np.dtype(certifier.mode.fmt.name)
  shift = np.zeros(n, dtype)
  if images.dtype == np.float64 and dtype != np.float64:
    rounded = images.astype(dtype)
    gap = np.linalg.norm((images - rounded.astype(np.float64)).reshape(n, -1), axis=1)
    shift = float_radii(gap * (1 + 1e-9), dtype)
    images = rounded
  images = images.astype(dtype)  # float32 -> float64 is exact
  rows = batch_size
  if mesh is not None:
    rows = -(-batch_size // mesh.shape["data"]) * mesh.shape["data"]
  state = jax.device_put(certifier.state, state_at)
  for start in range(0, n, rows):
    x, s, y = images[start:start + rows], shift[start:start + rows], labels[start:start + rows]
    valid = np.arange(rows) < x.shape[0]
    if x.shape[0] < rows:
      pad = rows - x.shape[0]
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      s = np.concatenate([s, np.zeros(pad, s.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
    yield (state, *jax.device_put((x, s, y, valid), batch_at))
