"""Reusable training machinery: mesh, augmentation, optimiser, sharded steps, checkpoints.

On a mesh of more than one device :func:`create_train_state` has the AOL layers split their
rescaling over ``'data'`` (``nnx.view``, the layers' static ``rescaling_axis``): each device
computes ``1/n`` of every Gram product and of its gradient; the results are those of the
unsplit step.

Typical use (one process or many; see :mod:`aol_jax.training.distributed`)::

  maybe_initialize()                      # before any other JAX call
  mesh = make_data_mesh()
  optimizer = make_optimizer(paper_schedule(1e-3, steps_per_epoch, epochs))
  graphdef, state = create_train_state(model, optimizer, key=jax.random.key(0), mesh=mesh,
                                       gram_precision="default")
  train_step = make_train_step(graphdef, optimizer, mesh)
  ckpt = Checkpointer(workdir + "/checkpoints")
  if (restored := ckpt.restore_latest(state)) is not None:
    state, step, meta = restored
  for images, labels in batches:          # this process's share of each global batch
    state, metrics = train_step(state, *global_batch(mesh, images, labels))
    check_finite(metrics)
  ckpt.save(int(state.step), state, metadata={"epoch": epoch}); ckpt.close()
"""

from aol_jax._src.training.augment import AugmentConfig, augment
from aol_jax._src.training.checkpoint import (CheckpointMismatchError, Checkpointer,
                                              is_local_path, tree_checksum)
from aol_jax._src.training.distributed import distributed_env, maybe_initialize
from aol_jax._src.training.mesh import (DATA_AXIS, check_batch_size, data_sharding, global_batch,
                                        make_data_mesh, replicated_sharding)
from aol_jax._src.training.optim import make_optimizer, paper_schedule, weight_decay_mask
from aol_jax._src.training.step import (NonFiniteLossError, TrainState, check_finite,
                                        create_train_state, make_eval_step, make_train_step,
                                        merge_model, to_inputs)

__all__ = [
    "AugmentConfig", "CheckpointMismatchError", "Checkpointer", "DATA_AXIS",
    "NonFiniteLossError", "TrainState",
    "augment", "check_batch_size", "check_finite", "create_train_state", "data_sharding",
    "distributed_env", "global_batch", "is_local_path", "make_data_mesh", "make_eval_step",
    "make_optimizer",
    "make_train_step", "maybe_initialize", "merge_model", "paper_schedule",
    "replicated_sharding", "to_inputs", "tree_checksum", "weight_decay_mask",
]
