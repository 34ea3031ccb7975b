"""The training state and the sharded, jitted train and eval steps.

Data parallelism on a one-axis mesh (:mod:`aol_jax.training.mesh`): the state is replicated
(``P()``), each batch is split over ``'data'`` (``P('data')``), and ``jax.jit`` inserts the
all-reduce of the gradients. The AOL rescaling, which does not depend on the batch, is split
over ``'data'`` too when the mesh has more than one device, so every device does ``1/n`` of
it: :func:`create_train_state` decides, once, and sets it on the layers with ``nnx.view``
(their static ``rescaling_axis``), so the graph definition it returns carries it into the
steps. It decides there, by the mesh's platform, what the factors multiply (the layers'
``scaled_operand``): on a TPU the smaller of the input and the kernel, elsewhere the
kernel. The step donates the state it receives, so the caller must use the state it
returns and drop the old one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from aol_jax._src.gram import GramPrecision
from aol_jax._src.losses import offset_cross_entropy
from aol_jax._src.training.augment import AugmentConfig, augment as augment_images
from aol_jax._src.training.mesh import (DATA_AXIS, check_batch_size, data_sharding,
                                   replicated_sharding)


class TrainState(NamedTuple):
  """Everything a resumed run needs, as one pytree of arrays.

  Attributes:
    params: the ``nnx.Param`` state of the model (``nnx.split(model, nnx.Param, ...)``).
    rest: every other variable of the model, passed to the model but not updated by the
      step (the AOL networks have none; a frozen kernel of :func:`aol_jax.freeze` lands here).
    opt_state: the optax state for ``params``.
    step: number of steps taken, int32 scalar.
    key: raw PRNG key data (``jax.random.key_data``); step ``s`` augments with
      ``fold_in(key, s)``, so a resumed run draws exactly what an uninterrupted one would.
  """
  params: nnx.State
  rest: nnx.State
  opt_state: optax.OptState
  step: jax.Array
  key: jax.Array


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient became NaN or infinite."""


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, *,
                       key: jax.Array | int, mesh: Mesh | None = None,
                       split_rescaling: bool | None = None,
                       gram_precision: GramPrecision | None = None
                       ) -> tuple[nnx.GraphDef, TrainState]:
  """Split ``model`` into its graph definition and a fresh :class:`TrainState`.

  The one place the AOL layers' training modes are decided: they are set with
  ``nnx.view`` (the layers' ``set_view``) on the graph definition returned, which the steps
  built from it (:func:`make_train_step`, :func:`make_eval_step`) carry.

  Args:
    model: the network; its parameters become ``state.params``.
    optimizer: e.g. :func:`aol_jax.training.make_optimizer`.
    key: a PRNG key (typed or raw) or an int seed, for the augmentation.
    mesh: if given, the state is placed replicated on it (what the train step expects).
    split_rescaling: split the AOL layers' rescaling over the mesh axis ``'data'`` (each
      device computes ``1/n`` of every Gram product and of its gradient; the results are
      those of the unsplit step). Default: whenever ``mesh`` has more than one device.
      ``False`` computes all of it on every device.
    gram_precision: if given, the precision of every AOL layer's training-time Gram
      products (a key of :data:`aol_jax.GRAM_PRECISIONS`); default: as the layers were built.

  Returns:
    ``(graphdef, state)``; :func:`merge_model` rebuilds the model.

  Raises:
    ValueError: ``split_rescaling`` without a mesh axis ``'data'`` to split over.
  """
  graphdef, params, rest = nnx.split(_training_view(model, mesh, split_rescaling,
                                                    gram_precision), nnx.Param, ...)
  if isinstance(key, int):
    key = jax.random.key(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  state = TrainState(params=params, rest=rest, opt_state=optimizer.init(params),
                     step=jnp.zeros((), jnp.int32), key=jnp.asarray(key, jnp.uint32))
  if mesh is not None:
    state = jax.device_put(state, replicated_sharding(mesh))
  return graphdef, state


def _training_view(model: nnx.Module, mesh: Mesh | None, split: bool | None,
                   gram_precision: str | None) -> nnx.Module:
  """``model`` under ``nnx.view`` with the layers' rescaling axis (and Gram precision)."""
  if split is None:
    split = mesh is not None and mesh.devices.size > 1
  if split and (mesh is None or DATA_AXIS not in mesh.axis_names):
    axes = "no mesh" if mesh is None else f"a mesh with axes {mesh.axis_names}"
    raise ValueError(f"split_rescaling needs a mesh axis {DATA_AXIS!r} to split over, got "
                     f"{axes}; pass mesh=make_data_mesh(), or split_rescaling=False.")
  # raise_if_not_found=False: a network without AOL layers has nothing to split.
  model = nnx.view(model, rescaling_axis=DATA_AXIS if split else None,
                   scaled_operand=_scaled_operand(mesh), raise_if_not_found=False)
  if gram_precision is not None:  # (a network without AOL layers has no Gram to set)
    model = nnx.view(model, gram_precision=gram_precision, raise_if_not_found=False)
  return model


def _scaled_operand(mesh: Mesh | None) -> str:
  """What the AOL layers' factors multiply in training on ``mesh``'s platform (the default
  device's without a mesh), chosen by compiler counts of AOL-Small's train step at global
  batch 256 (``benchmarks/README.md``, ``compile_targets``): on a TPU, whose compiler fuses
  the input's scaling into the layer's product, the smaller operand (per-device peak /
  plain, kernels scaled -> 'smaller': 1.54 -> 1.21 on v5e 2x4, 1.71 -> 1.13 on 4x4, 1.13 ->
  1.09 on v5p 2x2x2); elsewhere the kernel (every input scaled: 8 H100s 1.10 -> 1.14, the
  CPU at batch 256 1.28 -> 1.51)."""
  device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
  return "smaller" if device.platform == "tpu" else "kernel"


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """The model with the parameters of ``state``, for use outside the steps (evaluation,
  certification, freeze): its rescaling is computed whole (``rescaling_axis=None``), so
  it runs with or without a mesh, and applied to the kernels (``scaled_operand='kernel'``),
  the kernels its unfrozen ``lipschitz_bound()`` states a bound for."""
  return nnx.view(nnx.merge(graphdef, state.params, state.rest), rescaling_axis=None,
                  scaled_operand="kernel", raise_if_not_found=False)


def to_inputs(images: jax.Array) -> jax.Array:
  """uint8 images (e.g. CIFAR as stored) become ``x / 255`` in float32, the paper's only
  preprocessing; floating-point images are taken to be in ``[0, 1]`` already.

  Raises:
    ValueError: for integer images of any other dtype, whose scale is unknown (divide
      them by their own maximum value first).
  """
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  if jnp.issubdtype(images.dtype, jnp.integer) or images.dtype == jnp.bool_:
    raise ValueError(f"to_inputs takes uint8 images (scaled by 1/255) or floating-point images "
                     f"in [0, 1]; got dtype {images.dtype}. Convert them to float in [0, 1] "
                     f"(divide by the value that means full intensity) first.")
  return images


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    mesh: Mesh, *,
                    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = offset_cross_entropy,
                    augment: bool | AugmentConfig = True
                    ) -> Callable[[TrainState, jax.Array, jax.Array],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted step ``(state, images, labels) -> (state, metrics)``.

  The returned function checks the batch size, enters ``jax.set_mesh(mesh)`` and calls the
  ``jax.jit`` function (state replicated, batch sharded on ``'data'``, state donated),
  which it also exposes as ``.jitted``.

  ``images`` ``(N, H, W, C)`` (uint8 or float in ``[0, 1]``, see :func:`to_inputs`) and
  ``labels`` ``(N,)`` are global arrays sharded on ``'data'`` (see
  :func:`aol_jax.training.global_batch`); ``N`` must be a multiple of the device count.
  The state is donated. With ``augment`` (True: the paper's :class:`AugmentConfig`) the
  images are augmented on device with ``fold_in(state.key, state.step)``.

  Metrics, all scalars over the global batch: ``loss`` (of the augmented batch, before the
  update), ``accuracy``, ``grad_norm`` (global l2 norm of the loss gradient) and ``finite``
  (loss and gradient are finite). A non-finite step returns the state it was given,
  unchanged, so the state never holds NaNs; the caller should stop on ``finite == False``
  (:func:`check_finite`) with its last checkpoint intact.

  The AOL layers split their rescaling over ``'data'`` if ``graphdef`` says so
  (:func:`create_train_state`'s ``split_rescaling``).
  """
  config = AugmentConfig() if augment is True else augment or None

  def step(state: TrainState, images: jax.Array, labels: jax.Array
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    x = to_inputs(images)
    if config is not None:
      key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
      x = augment_images(key, x, config=config)

    def loss_and_logits(params, x, labels):
      logits = nnx.merge(graphdef, params, state.rest)(x)
      return loss_fn(logits, labels), logits

    (loss, logits), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(
        state.params, x, labels)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state._replace(params=params, opt_state=opt_state, step=state.step + 1)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = dict(loss=loss, accuracy=jnp.mean(jnp.argmax(logits, -1) == labels),
                   grad_norm=grad_norm, finite=finite)
    return new_state, metrics

  replicated, batch = replicated_sharding(mesh), data_sharding(mesh)
  jitted = jax.jit(step, in_shardings=(replicated, batch, batch),
                   out_shardings=(replicated, replicated), donate_argnums=0)

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    check_batch_size(mesh, images.shape[0])
    with jax.set_mesh(mesh):
      return jitted(state, images, labels)

  train_step.jitted = jitted  # the jax.jit object (for .lower(...)); call it under jax.set_mesh
  return train_step


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh
                   ) -> Callable[[TrainState, jax.Array], jax.Array]:
  """The jitted ``(state, images) -> logits``, no augmentation; logits sharded on ``'data'``;
  the rescaling split as ``graphdef`` says (:func:`create_train_state`)."""

  def logits(state: TrainState, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state.params, state.rest)(to_inputs(images))

  jitted = jax.jit(logits, in_shardings=(replicated_sharding(mesh), data_sharding(mesh)),
                   out_shardings=data_sharding(mesh))

  def eval_step(state: TrainState, images: jax.Array) -> jax.Array:
    check_batch_size(mesh, images.shape[0])
    with jax.set_mesh(mesh):
      return jitted(state, images)

  eval_step.jitted = jitted  # the jax.jit object (for .lower(...)); call it under jax.set_mesh
  return eval_step


def check_finite(metrics: dict[str, Any], *, step: int | None = None) -> None:
  """Raise :class:`NonFiniteLossError` naming the step if ``metrics['finite']`` is False."""
  if not bool(metrics["finite"]):
    where = "" if step is None else f" at step {step}"
    raise NonFiniteLossError(
        f"Non-finite training loss{where} (loss={float(metrics['loss'])}, "
        f"grad_norm={float(metrics['grad_norm'])}). Stopping; the last checkpoint written "
        f"before this step is intact. Lower the learning rate or check the inputs.")
