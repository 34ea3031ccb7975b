"""``train_and_evaluate(config, workdir)``: train, checkpoint, resume, certify, plot.

What a run leaves in ``workdir``, a local path or ``gs://...`` (only process 0 writes files
other than checkpoints; each file is written all at once, :func:`storage.write_atomic`, so
none is ever seen half-written; checkpoints are orbax's, committed only when complete):

* ``checkpoints/``: orbax checkpoints every ``checkpoint_every`` epochs and at the end, each
  with the config and the per-epoch history; a rerun with the same ``workdir`` resumes
  from the newest one that verifies, exactly as if it had never stopped;
* ``metrics.jsonl``: one JSON line per epoch (train loss / accuracy / gradient norm,
  learning rate, and every ``eval_every`` epochs the test accuracy and CRA at 36/255);
* ``results.md``: the certification table of :func:`aol_jax.certify_dataset`
  on the whole test set after the last epoch, and ``results.json``, the same as data;
* ``training_curves.png`` and ``certified_accuracy.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import tqdm
from flax import nnx

from aol_jax import training
from aol_jax import (STANDARD_RADII, CertificationResult, certification_markdown,
                     certified_robust_accuracy, certify_dataset)
from aol_jax.losses import offset_cross_entropy
from aol_jax.models import MODELS
from experiments.cifar import configs, input_pipeline, plotting, storage
from experiments.cifar.configs import STATE_FIELDS, Config, ConfigError

# Radii of the certified-accuracy plot (the standard ones are added).
CURVE_RADII = tuple(np.linspace(0.0, 1.5, 61).tolist())
# For tests of preemption: the process SIGKILLs itself right after this training step
# (once the checkpoints started before it are written), a deterministic kill point.
KILL_AT_STEP_ENV = "AOL_JAX_KILL_AT_STEP"


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is ``>= n``."""
  return -(-n // multiple) * multiple


def validate(config: Config, workdir: str, *, flag_names: dict[str, str] | None = None) -> None:
  """Check the whole config and the paths before anything runs (no data is read).

  Args:
    config: the config to run.
    workdir: the run's directory (local or ``gs://``).
    flag_names: ``{field: flag}`` naming the flag that set a field (default
      ``--config.<field>``), so that the error names what the user typed.

  Raises:
    ConfigError: one line naming the flag, its value, what is wrong and what to do.
  """
  names = flag_names or {}
  flag = lambda field: names.get(field, f"--config.{field}")
  errors = configs.field_errors(config)
  if "dataset" not in errors and config.dataset not in input_pipeline.DATASETS:
    errors["dataset"] = (f"Unknown dataset {config.dataset!r}; choose one of "
                         f"{', '.join(input_pipeline.DATASETS)}")
  if "model" not in errors and config.model not in MODELS:
    errors["model"] = f"Unknown model {config.model!r}; choose one of {', '.join(MODELS)}"
  available = jax.device_count()
  if "num_devices" not in errors and (config.num_devices or 0) > available:
    errors["num_devices"] = f"asks for {config.num_devices} devices but {available} exist"
  if not errors:
    devices = config.num_devices or available
    if config.batch_size % devices:
      lower = config.batch_size // devices * devices
      errors["batch_size"] = (
          f"batch_size {config.batch_size} is not divisible by the {devices} devices (every "
          f"device needs the same number of examples): pass {flag('batch_size')} = a multiple "
          f"of {devices}, e.g. {f'{lower} or ' if lower else ''}{lower + devices}")
  if not errors:
    shape, classes = input_pipeline.SHAPES[config.dataset]
    try:
      nnx.eval_shape(lambda: build_model(config, classes, shape))
    except ConfigError as e:
      errors["model_kwargs"] = str(e).rstrip(".")
  for field, why in errors.items():
    value = getattr(config, field, None)
    raise ConfigError(f"{flag(field)}={value!r}: {why}.")
  for name, path in (("workdir", workdir), ("data_dir", config.data_dir),
                     ("manual_dir", config.manual_dir)):
    why = configs.path_error(path)
    if why:
      shown = "--workdir" if name == "workdir" else flag(name)
      raise ConfigError(f"{shown}={path}: {why}; pass a directory (it is created if missing).")


def build_model(config: Config, num_classes: int, image_shape: tuple[int, ...]) -> nnx.Module:
  """``MODELS[config.model]`` for images of ``image_shape`` (H, W, C), seeded by the config."""
  height, width, channels = image_shape
  if height != width:
    raise ConfigError(f"The models need square images, got {height}x{width}.")
  try:
    return MODELS[config.model](num_classes, image_size=height, in_channels=channels,
                                rngs=nnx.Rngs(config.seed), **config.model_kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"Cannot build {config.model} with {config.model_kwargs} for "
                      f"{height}x{width}x{channels} images: {e}") from e


def evaluate(eval_step, state: training.TrainState, mesh: jax.sharding.Mesh,
             images: np.ndarray, labels: np.ndarray, *, batch_size: int,
             lipschitz_constant: float) -> tuple[float, float]:
  """Test accuracy and CRA at 36/255 (exact-arithmetic certificate, for monitoring only;
  ``results.md`` comes from :func:`certify_dataset`, which adds the rounding allowance).

  Any ``batch_size`` on any device count: it is rounded up to a multiple of the devices,
  and every batch is padded with zeros whose logits are dropped.
  """
  processes, me = jax.process_count(), jax.process_index()
  batch_size = round_up(batch_size, mesh.devices.size)
  local = batch_size // processes
  logits = []
  for start in range(0, len(images), batch_size):
    x = images[start:start + batch_size]
    x = np.concatenate([x, np.zeros((batch_size - len(x),) + x.shape[1:], x.dtype)])
    out = eval_step(state, *training.global_batch(mesh, x[me * local:(me + 1) * local]))
    if processes > 1:
      from jax.experimental import multihost_utils
      out = multihost_utils.process_allgather(out, tiled=True)
    logits.append(np.asarray(out))
  logits = np.concatenate(logits)[:len(images)]
  clean, cra = certified_robust_accuracy(logits, labels, [36 / 255],
                                         lipschitz_constant=lipschitz_constant, allowance=0.0)
  return float(clean), float(cra[0])


def _certify(model: nnx.Module, dataset: input_pipeline.Dataset, mesh, batch_size: int
             ) -> tuple[CertificationResult, CertificationResult]:
  """The standard-radii table and the plot's curve, from one pass of certify_dataset."""
  radii = sorted(set(CURVE_RADII) | set(STANDARD_RADII))
  full = certify_dataset(model, dataset.test_inputs(), dataset.test_labels, eps_list=radii,
                         batch_size=round_up(batch_size, mesh.devices.size), mesh=mesh)
  keep = [radii.index(r) for r in STANDARD_RADII]
  table = dataclasses.replace(
      full, eps_list=tuple(STANDARD_RADII),
      num_certified=tuple(full.num_certified[i] for i in keep),
      max_allowance=tuple(full.max_allowance[i] for i in keep))
  return table, full


class _StopRequest:
  """SIGINT / SIGTERM ask the run to stop after the current epoch, with a checkpoint."""

  def __init__(self):
    self.requested = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    print(f"\nReceived signal {signum}: stopping after this epoch with a checkpoint "
          f"(send it again to stop at once).", flush=True)
    self.requested = True
    self.restore()

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def agreed(self) -> bool:
    """Whether any process was asked to stop (all processes must stop at the same epoch)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def _check_resumable(saved: dict, config: Config) -> None:
  """Refuse a checkpoint whose state shapes differ; note any other changed field."""
  current = dataclasses.asdict(config)
  changed = sorted(k for k in current if k in saved and saved[k] != current[k])
  fatal = [k for k in changed if k in STATE_FIELDS]
  if fatal:
    raise ConfigError(
        f"The checkpoints in this workdir were made with a different "
        f"{', '.join(fatal)} ({', '.join(f'{k}={saved[k]!r}' for k in fatal)}); use a new "
        f"--workdir or the same settings.")
  changed = [k for k in changed if k not in ("data_dir", "manual_dir", "download", "log_every")]
  if changed:
    print(f"Note: resuming with changed {', '.join(changed)}; the run is no longer identical "
          f"to an uninterrupted one.", flush=True)


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint), then certify.

  Returns:
    ``{'history': [per-epoch records], 'clean_accuracy': float, 'cra': {radius: float}}``.

  Raises:
    ConfigError: unknown model or dataset, a batch size the devices do not divide, or a
      workdir holding checkpoints of another model or dataset.
    input_pipeline.DataMissingError: the dataset is neither prepared nor preparable.
    aol_jax.training.NonFiniteLossError: the loss became NaN or infinite; nothing after the
      last good checkpoint is saved.
  """
  validate(config, workdir)
  writer = jax.process_index() == 0
  storage.makedirs(workdir)
  mesh = training.make_data_mesh(config.num_devices)
  source = dict(data_dir=config.data_dir, manual_dir=config.manual_dir,
                download=config.download)
  n_train = input_pipeline.num_train_examples(config.dataset, **source)
  try:
    order = input_pipeline.DataOrder(n_train, config.batch_size, config.seed)
  except ValueError as e:
    raise ConfigError(f"{e} Lower the batch size (--batch_size).") from None
  data = input_pipeline.load(config.dataset, **source, train_indices=lambda n: order.share(
      jax.process_index(), jax.process_count()))
  model = build_model(config, data.num_classes, data.train_images.shape[1:])
  lipschitz = float(model.lipschitz_bound())
  batches = input_pipeline.TrainBatches(mesh, data.train_images, data.train_labels,
                                        max_value=data.max_value, order=order)
  steps_per_epoch = batches.steps_per_epoch
  kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
  schedule = training.paper_schedule(config.learning_rate, steps_per_epoch, config.epochs)
  optimizer = training.make_optimizer(schedule, momentum=config.momentum,
                                      nesterov=config.nesterov, weight_decay=config.weight_decay)
  graphdef, state = training.create_train_state(model, optimizer,
                                                key=jax.random.key(config.seed), mesh=mesh)
  loss_fn = functools.partial(offset_cross_entropy, offset=config.loss_offset,
                              temperature=config.loss_temperature)
  train_step = training.make_train_step(graphdef, optimizer, mesh, loss_fn=loss_fn,
                                        augment=config.augment)
  eval_step = training.make_eval_step(graphdef, mesh)
  test_images = data.test_inputs()

  checkpointer = training.Checkpointer(storage.join(workdir, "checkpoints"),
                                       max_to_keep=config.max_to_keep)
  history: list[dict] = []
  try:
    restored = checkpointer.restore_latest(state)
  except training.CheckpointMismatchError as e:
    raise ConfigError(str(e)) from None
  if restored is not None:
    state, step, meta = restored
    _check_resumable(meta.get("config", {}), config)
    if step % steps_per_epoch:
      raise ConfigError(f"Checkpoint step {step} is not at an epoch boundary of "
                        f"{steps_per_epoch} steps: the batch size or dataset changed.")
    history = [r for r in meta["history"] if r["epoch"] <= step // steps_per_epoch]
    print(f"Resumed from {checkpointer.directory} at step {step} "
          f"(epoch {step // steps_per_epoch}).", flush=True)
  step = int(state.step)
  last_saved = step if restored is not None else None
  print(f"{config.model} on {config.dataset}: {n_train} "
        f"training / {len(data.test_labels)} test images, {mesh.devices.size} "
        f"{mesh.devices.flat[0].platform} device(s), batch {config.batch_size}, "
        f"{steps_per_epoch} steps per epoch, "
        f"data {'on device' if batches.on_device else 'on host'}.",
        flush=True)

  def save() -> None:
    meta = {"config": dataclasses.asdict(config), "history": history}
    checkpointer.save(step, state, metadata=meta)

  stop = _StopRequest()
  bar = tqdm.tqdm(total=config.epochs * steps_per_epoch, initial=step, unit="step",
                  disable=not writer, dynamic_ncols=True, mininterval=0.5)
  try:
    for epoch in range(step // steps_per_epoch, config.epochs):
      bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
      start_time = time.time()
      metrics = []
      for i, indices in enumerate(batches.epoch_order(epoch)):
        state, m = train_step(state, *batches.batch(indices))
        metrics.append(m)
        bar.update(1)
        if step + i + 1 == kill_at:
          checkpointer.wait()
          print(f"{KILL_AT_STEP_ENV}: killing this process after step {kill_at}.", flush=True)
          os.kill(os.getpid(), signal.SIGKILL)
        if (i + 1) % config.log_every == 0:
          last = jax.device_get(m)
          _check_finite(last, step + i + 1, last_saved, checkpointer.directory)
          bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.3f}")
      metrics = jax.device_get(metrics)
      for i, m in enumerate(metrics):
        _check_finite(m, step + i + 1, last_saved, checkpointer.directory)
      step += steps_per_epoch
      record = {"epoch": epoch + 1, "step": step,
                "learning_rate": float(schedule(step - 1)),
                **{f"train_{k}": float(np.mean([m[k] for m in metrics]))
                   for k in ("loss", "accuracy", "grad_norm")}}
      last_epoch = epoch + 1 == config.epochs
      if (epoch + 1) % config.eval_every == 0 or last_epoch:
        record["test_accuracy"], record["test_cra_36"] = evaluate(
            eval_step, state, mesh, test_images, data.test_labels,
            batch_size=config.eval_batch_size, lipschitz_constant=lipschitz)
      record["seconds"] = round(time.time() - start_time, 3)
      history.append(record)
      bar.set_postfix(loss=f"{record['train_loss']:.4f}", acc=f"{record['train_accuracy']:.3f}")
      if writer:
        storage.write_atomic(storage.join(workdir, "metrics.jsonl"),
                     "".join(json.dumps(r) + "\n" for r in history))
      stopping = stop.agreed()
      if (epoch + 1) % config.checkpoint_every == 0 or last_epoch or stopping:
        save()
        last_saved = step
      if stopping:
        checkpointer.close()
        bar.close()
        print(f"Stopped at epoch {epoch + 1}; rerun the same command to resume.", flush=True)
        return {"history": history, "stopped": True}
  finally:
    bar.close()
    stop.restore()
    checkpointer.wait()  # even when stopping on an error, finish writing the last good save
  checkpointer.close()

  table, curve = _certify(training.merge_model(graphdef, state), data, mesh,
                          config.eval_batch_size)
  if writer:
    _write_results(workdir, config, table, history)
    plotting.plot_training_curves(history, storage.join(workdir, "training_curves.png"))
    plotting.plot_certified_accuracy(curve.eps_list, curve.cra,
                                     storage.join(workdir, "certified_accuracy.png"),
                                     title=f"{config.model} on {config.dataset}")
  print(certification_markdown(table, name=config.model), flush=True)
  return {"history": history, "clean_accuracy": table.clean_accuracy,
          "cra": dict(zip(table.eps_list, table.cra))}


def _check_finite(metrics: dict, step: int, last_saved: int | None, directory: str) -> None:
  """:func:`aol_jax.training.check_finite`, saying which checkpoint is kept."""
  try:
    training.check_finite(metrics, step=step)
  except training.NonFiniteLossError as e:
    kept = (f"The last good checkpoint, step {last_saved} in {directory}, is kept"
            if last_saved is not None else "No checkpoint had been written yet")
    raise training.NonFiniteLossError(f"{e} {kept}; nothing after it is saved.") from None


def _write_results(workdir: str, config: Config, table: CertificationResult,
                   history: list[dict]) -> None:
  """``results.md``: the certification table and how it was produced."""
  last = history[-1] if history else {}
  text = (
      f"# {config.model} on {config.dataset}\n\n"
      f"Certified robust accuracy (%) on the {table.num_examples} test images after epoch "
      f"{last.get('epoch', '?')} (step {last.get('step', '?')}), from "
      f"`aol_jax.certify_dataset` (l2, Lipschitz constant {table.lipschitz_constant:g}, "
      f"{table.rounding} rounding allowance included).\n\n"
      f"{certification_markdown(table, name=config.model)}\n\n"
      f"Config:\n\n```json\n{json.dumps(dataclasses.asdict(config), indent=2)}\n```\n")
  storage.write_atomic(storage.join(workdir, "results.md"), text)
  data = {"model": config.model, "dataset": config.dataset, "epoch": last.get("epoch"),
          "num_examples": table.num_examples, "rounding": table.rounding,
          "clean_accuracy": table.clean_accuracy,
          "cra": {f"{r:.6f}": a for r, a in zip(table.eps_list, table.cra)}}
  storage.write_atomic(storage.join(workdir, "results.json"), json.dumps(data, indent=2) + "\n")
