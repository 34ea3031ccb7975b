"""``train_and_evaluate(config, workdir)``: train, checkpoint, resume, certify, export.

What a run leaves in ``workdir``, a local path or ``gs://...`` (only process 0 writes files
other than checkpoints; each file is written all at once, :func:`storage.write_atomic`, so
none is ever seen half-written; checkpoints are orbax's, committed only when complete):

* ``checkpoints/``: orbax checkpoints every ``checkpoint_every`` epochs, at the end and when
  a signal stops the run, each with the config and the per-epoch history; a rerun with the
  same ``workdir`` resumes from the newest one that verifies, exactly as if it had never
  stopped;
* ``events.out.tfevents.*``: TensorBoard's event files (:mod:`experiments.common.summaries`):
  training loss, accuracy, learning rate and epoch time per epoch, test accuracy and
  certified robust accuracy (CRA) at 36/255 per evaluation;
* ``metrics.jsonl``: the same, one JSON line per epoch (``test_accuracy`` and
  ``test_cra_36`` every ``eval_every`` epochs, from :func:`aol_jax.certify_dataset` with the
  run's ``rounding``: the same certificate as ``results.md``);
* ``results.md``: the certification table on the whole test set, ``results.json`` the same
  as data keyed by radius label (``36/255``), and the plots ``training_curves.png`` and
  ``certified_accuracy.png``;
* ``export/``: with ``mode='export'``, the portable certified model
  (:func:`aol_jax.export_certified`) and its description.

The steps, in order: :func:`validate` (once, by the entry point), :func:`setup`,
:func:`restore`, :func:`train` (epochs of :func:`train_epoch`, with :func:`evaluate`), then
:func:`results.report` or :func:`export`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

import aol_jax
from aol_jax import MODELS, offset_cross_entropy, training
from experiments.cifar import configs, console, results
from experiments.cifar.configs import EPOCH_FIELDS, RUN_FIELDS, STATE_FIELDS, Config, ConfigError
from experiments.common import input_pipeline, labels, signals, storage, summaries

# Called after every training step with the run and the step number (a profiler, a progress
# reporter; the tests stop a process at a chosen step with one).
Hook = Callable[["Run", int], None]
# What a run builds to train: (config, num_classes, image shape (H, W, C)) -> model.
BuildModel = Callable[[Config, int, tuple[int, ...]], nnx.Module]


def validate(config: Config, workdir: str, *, typed: dict[str, str] | None = None) -> None:
  """Check the whole config and the paths before anything runs (no data is read).

  Args:
    config: the config to run.
    workdir: the run's directory (local or ``gs://``). To train, it is created and a probe
      file written and removed, so that an unwritable place is named now; to certify or
      export, it must already hold a checkpoint, and nothing is created.
    typed: ``{field: flag as typed}`` (``--epochs=0``), so that the error names what the
      user typed (default ``--config.<field>=<value>``).

  Raises:
    ConfigError: one line naming the flag, its value, what is wrong and what to do.
  """
  typed = typed or {}

  def flag(field: str) -> str:
    value = getattr(config, field, None)
    text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    return typed.get(field, f"--config.{field}={text}")

  errors = configs.field_errors(config)
  if "dataset" not in errors:
    try:
      input_pipeline.spec(config.dataset)
    except ValueError as e:
      errors["dataset"] = str(e)
  if "model" not in errors and config.model not in MODELS:
    errors["model"] = f"unknown model {config.model!r}; choose one of {', '.join(MODELS)}"
  available = jax.device_count()
  if "num_devices" not in errors and (config.num_devices or 0) > available:
    errors["num_devices"] = f"asks for {config.num_devices} devices but {available} exist"
  if not errors:
    devices = config.num_devices or available
    if config.batch_size % devices:
      lower = config.batch_size // devices * devices
      errors["batch_size"] = (
          f"batch_size {config.batch_size} is not divisible by the {devices} devices (every "
          f"device needs the same number of examples): pass {flag('batch_size').split('=')[0]}"
          f" = a multiple of {devices}, e.g. {f'{lower} or ' if lower else ''}"
          f"{lower + devices}")
  if not errors:
    data = input_pipeline.spec(config.dataset)
    try:
      nnx.eval_shape(lambda: build_model(config, data.num_classes, data.image_shape))
    except ConfigError as e:
      errors["model_kwargs"] = str(e).rstrip(".")
  for field, why in errors.items():
    raise ConfigError(f"{flag(field)}: {why}.")
  for name, path in (("data_dir", config.data_dir), ("manual_dir", config.manual_dir)):
    why = configs.path_error(path)
    if why:
      raise ConfigError(f"{flag(name)}: {why}; pass a directory (it is created if missing).")
  if config.mode != "train" and not storage.has_checkpoint(workdir):
    raise ConfigError(f"--mode={config.mode}: {workdir} holds no checkpoint; train first "
                      f"(--mode=train).")
  why = storage.workdir_error(workdir)
  if why:
    raise ConfigError(f"--workdir={workdir}: {why}; pass a directory this process can write.")


def build_model(config: Config, num_classes: int, image_shape: tuple[int, ...]) -> nnx.Module:
  """``MODELS[config.model]`` for images of ``image_shape`` (H, W, C), seeded by the config
  (the Gram precision is set where the train state is created)."""
  height, width, channels = image_shape
  if height != width:
    raise ConfigError(f"The models need square images, got {height}x{width}.")
  try:
    model = MODELS[config.model](num_classes, image_size=height, in_channels=channels,
                                 rngs=nnx.Rngs(config.seed), **config.model_kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"cannot build {config.model} with {config.model_kwargs} for "
                      f"{height}x{width}x{channels} images: {e}") from e
  return model


@dataclasses.dataclass
class Run:
  """Everything a run builds before its first step."""
  config: Config
  workdir: str
  mesh: jax.sharding.Mesh
  data: input_pipeline.Dataset
  batches: input_pipeline.TrainBatches | None
  graphdef: nnx.GraphDef
  state: training.TrainState
  optimizer: Any
  schedule: Callable[[int], Any]
  checkpointer: training.Checkpointer
  history: list[dict] = dataclasses.field(default_factory=list)
  last_saved: int | None = None

  @property
  def steps_per_epoch(self) -> int:
    return self.batches.steps_per_epoch

  @property
  def total_steps(self) -> int:
    return self.config.epochs * self.steps_per_epoch

  def model(self) -> nnx.Module:
    return training.merge_model(self.graphdef, self.state)


def _load_data(config: Config, *, train: bool
               ) -> tuple[input_pipeline.Dataset, input_pipeline.DataOrder]:
  source = dict(data_dir=config.data_dir, manual_dir=config.manual_dir, download=config.download)
  n_train = input_pipeline.num_train_examples(config.dataset, **source)
  try:
    order = input_pipeline.DataOrder(n_train, config.batch_size, config.seed)
  except ValueError as e:
    raise ConfigError(f"{e} Lower the batch size (--batch_size).") from None
  indices = (lambda n: order.share(jax.process_index(), jax.process_count())) if train else (
      lambda n: np.zeros(0, np.int64))
  return input_pipeline.load(config.dataset, **source, train_indices=indices), order


def setup(config: Config, workdir: str, *, train: bool = True,
          build: BuildModel = build_model) -> Run:
  """Data, model, optimiser, state and checkpointer of ``config`` (nothing restored yet).

  ``train=False`` reads only the test split (to certify or export); ``build`` makes the
  model (default :func:`build_model`; the ablations build unconstrained twins with it).
  """
  mesh = training.make_data_mesh(config.num_devices)
  data, order = _load_data(config, train=train)
  model = build(config, data.num_classes, data.test_images.shape[1:])
  batches = (input_pipeline.TrainBatches(mesh, data.train_images, data.train_labels,
                                         max_value=data.max_value, order=order)
             if train else None)
  schedule = training.paper_schedule(config.learning_rate, order.steps_per_epoch, config.epochs)
  optimizer = training.make_optimizer(schedule, momentum=config.momentum,
                                      nesterov=config.nesterov, weight_decay=config.weight_decay)
  graphdef, state = training.create_train_state(model, optimizer,
                                                key=jax.random.key(config.seed), mesh=mesh,
                                                gram_precision=config.gram_precision)
  checkpointer = training.Checkpointer(storage.join(workdir, "checkpoints"),
                                       max_to_keep=config.max_to_keep)
  return Run(config, workdir, mesh, data, batches, graphdef, state, optimizer, schedule,
             checkpointer)


def check_resumable(saved: dict, config: Config, directory: str) -> None:
  """Refuse a checkpoint made under another model, dataset or batch size (one line: what
  changed and what to do); print a note for any other changed field."""
  current = dataclasses.asdict(config)
  changed = sorted(k for k in current if k in saved and saved[k] != current[k])
  fatal = [k for k in changed if k in STATE_FIELDS]
  if fatal:
    raise ConfigError(
        f"The checkpoints in {directory} were made with a different "
        f"{', '.join(fatal)} ({', '.join(f'{k}={saved[k]!r}' for k in fatal)}); use a new "
        f"--workdir or the same settings.")
  steps = [k for k in changed if k in EPOCH_FIELDS]
  if steps:
    raise ConfigError(
        f"--{steps[0]}={current[steps[0]]!r}: the checkpoints in {directory} count steps of "
        f"{steps[0]} {saved[steps[0]]!r} (an epoch has another number of steps now); resume "
        f"with --{steps[0]}={saved[steps[0]]!r}, or start a new --workdir.")
  changed = [k for k in changed if k not in RUN_FIELDS]
  if changed and config.mode == "train":
    print(f"Note: resuming with changed {', '.join(changed)}; the run is no longer identical "
          f"to an uninterrupted one.", flush=True)


def restore(run: Run) -> int | None:
  """Restore the newest verified checkpoint into ``run``; its step, or None if none."""
  found = run.checkpointer.latest_metadata()
  if found is not None:  # the saved config first: a changed model is named before any diff
    check_resumable(found[1].get("config", {}), run.config, run.checkpointer.directory)
  try:
    restored = run.checkpointer.restore_latest(run.state)
  except training.CheckpointMismatchError as e:
    detail = " ".join(str(e).split())
    raise ConfigError(f"The checkpoints in {run.checkpointer.directory} hold another model "
                      f"({detail}); use a new --workdir or the same settings.") from None
  if restored is None:
    return None
  run.state, step, meta = restored
  if found[0] != step:  # the newest step was damaged and set aside: check the one restored
    check_resumable(meta.get("config", {}), run.config, run.checkpointer.directory)
  run.history = list(meta["history"])
  if run.history and run.history[-1]["step"] != step:
    raise ConfigError(f"Checkpoint step {step} in {run.checkpointer.directory} does not end "
                      f"its history (last record: step {run.history[-1]['step']}); the "
                      f"workdir was changed by hand: start a new --workdir.")
  run.last_saved = step
  return step


class _StopRequest:
  """While training, SIGINT / SIGTERM ask the run to stop after the current epoch, with a
  checkpoint; the same signal again stops at once (the entry point's handlers are back)."""

  def __init__(self):
    self.requested = False
    self.signal: int | None = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    print(f"{signal.Signals(signum).name}: stopping after this epoch with a checkpoint "
          f"(send it again to stop at once).", flush=True)
    self.requested, self.signal = True, signum
    self.restore()

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def agreed(self) -> bool:
    """Whether any process was asked to stop (all processes must stop at the same epoch)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def _check_finite(metrics: dict, step: int, last_saved: int | None, directory: str) -> None:
  """:func:`aol_jax.training.check_finite`, saying which checkpoint is kept."""
  try:
    training.check_finite(metrics, step=step)
  except training.NonFiniteLossError as e:
    kept = (f"The last good checkpoint, step {last_saved} in {directory}, is kept"
            if last_saved is not None else "No checkpoint had been written yet")
    raise training.NonFiniteLossError(f"{e} {kept}; nothing after it is saved.") from None


def evaluate(run: Run) -> dict[str, float]:
  """Test accuracy and certified robust accuracy at 36/255 (:func:`results.certify`: the
  certificate of ``results.md``), and the seconds they took."""
  start = time.perf_counter()
  result = results.certify(run.model(), run.data.test_inputs(), run.data.test_labels,
                           run.config, run.mesh, [results.MONITOR_RADIUS])
  return {"test_accuracy": float(result.clean_accuracy), "test_cra_36": float(result.cra[0]),
          "eval_seconds": round(time.perf_counter() - start, 3)}


def train_epoch(run: Run, epoch: int, train_step, progress: console.Progress,
                hooks: Sequence[Hook]) -> dict:
  """One pass over the training set; its record for ``metrics.jsonl`` (without evaluation)."""
  config, step = run.config, int(run.state.step)
  start = time.perf_counter()
  metrics = []
  for i, indices in enumerate(run.batches.epoch_order(epoch)):
    run.state, m = train_step(run.state, *run.batches.batch(indices))
    metrics.append(m)
    if i == 0 and progress.start is None:
      jax.block_until_ready(m)  # the first step compiles: the ETA starts after it
    progress.step(step + i + 1, f"epoch {epoch + 1}/{config.epochs}")
    for hook in hooks:
      hook(run, step + i + 1)
    if (i + 1) % config.log_every == 0:
      last = jax.device_get(m)
      _check_finite(last, step + i + 1, run.last_saved, run.checkpointer.directory)
      progress.postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.3f}")
  metrics = jax.device_get(metrics)
  for i, m in enumerate(metrics):
    _check_finite(m, step + i + 1, run.last_saved, run.checkpointer.directory)
  step += len(metrics)
  return {"epoch": epoch + 1, "step": step, "learning_rate": float(run.schedule(step - 1)),
          **{f"train_{k}": float(np.mean([m[k] for m in metrics]))
             for k in ("loss", "accuracy", "grad_norm")},
          "train_seconds": round(time.perf_counter() - start, 3)}


def _scalars(record: dict) -> dict[str, float]:
  """An epoch's record as TensorBoard tags."""
  names = {"train_loss": "train/loss", "train_accuracy": "train/accuracy",
           "train_grad_norm": "train/grad_norm", "learning_rate": "train/learning_rate",
           "train_seconds": "train/epoch_seconds", "test_accuracy": "eval/accuracy",
           "test_cra_36": "eval/cra_36_255", "eval_seconds": "eval/seconds"}
  return {tag: record[key] for key, tag in names.items() if key in record}


def train(run: Run, *, hooks: Sequence[Hook] = (),
          evaluate: Callable[[Run], dict[str, float]] = evaluate) -> int | None:
  """Train from ``run.state`` to ``config.epochs``; the stop signal's number, if stopped.

  Every epoch appends its record to ``run.history`` and ``metrics.jsonl`` and writes it to
  TensorBoard; every ``eval_every`` epochs and at the last, ``evaluate(run)`` adds the test
  metrics and the console gets one line.
  """
  config = run.config
  loss_fn = functools.partial(offset_cross_entropy, offset=config.loss_offset,
                              temperature=config.loss_temperature)
  train_step = training.make_train_step(run.graphdef, run.optimizer, run.mesh, loss_fn=loss_fn,
                                        augment=config.augment)
  writer = jax.process_index() == 0
  first = int(run.state.step)
  if first >= run.total_steps:
    return None
  stop = _StopRequest()
  progress = console.Progress(run.total_steps, first)
  metrics = summaries.Summaries(run.workdir, enabled=writer, purge_step=first + 1)
  try:
    for epoch in range(first // run.steps_per_epoch, config.epochs):
      record = train_epoch(run, epoch, train_step, progress, hooks)
      last_epoch = epoch + 1 == config.epochs
      if (epoch + 1) % config.eval_every == 0 or last_epoch:
        record.update(evaluate(run))
        progress.line(console.summary(record, config.epochs, progress.eta(record["step"])))
      run.history.append(record)
      if writer:
        storage.write_atomic(storage.join(run.workdir, "metrics.jsonl"),
                             "".join(json.dumps(r) + "\n" for r in run.history))
      metrics.scalars(record["step"], _scalars(record))
      stopping = stop.agreed()
      if (epoch + 1) % config.checkpoint_every == 0 or last_epoch or stopping:
        meta = {"config": dataclasses.asdict(config), "history": run.history}
        run.checkpointer.save(record["step"], run.state, metadata=meta)
        run.last_saved = record["step"]
      if stopping:
        progress.line(f"Stopped at epoch {epoch + 1} with a checkpoint (step "
                      f"{record['step']}); rerun the same command to resume.")
        return stop.signal or signal.SIGTERM
  finally:
    progress.close()
    stop.restore()
    metrics.close()
    run.checkpointer.wait()  # even when stopping on an error, finish writing the last good save
  return None


EXPORT_FILE = "model.jaxexport"


def export(run: Run) -> str:
  """Write the portable certified model of ``run`` (:func:`aol_jax.export_certified`) into
  ``<workdir>/export/``: ``model.jaxexport`` and its description ``model.jaxexport.json``,
  which records under ``"model"`` what a user of the file needs: the dataset, the input
  scaling, the class names, the model, the checkpoint's step, and the clean accuracy and CRA
  on the test set under the export's rounding mode.

  Both are made in a local temporary directory, then each is written with
  :func:`storage.write_atomic`; if anything stops the writing, neither is left. Returns the
  artifact's path.
  """
  config, data = run.config, run.data
  directory = storage.join(run.workdir, "export")
  radii = labels.radii(config.dataset)
  table = results.certify(run.model(), data.test_inputs(), data.test_labels, config, run.mesh,
                          radii)
  last = run.history[-1] if run.history else {}
  metadata = {"dataset": config.dataset, "input_scaling": data.max_value,
              "class_names": list(data.class_names),
              "model": config.model, "model_kwargs": config.model_kwargs,
              "checkpoint_step": int(run.state.step), "epoch": last.get("epoch"),
              "test_examples": table.num_examples, "clean_accuracy": table.clean_accuracy,
              "cra": {labels.radius_label(r): a for r, a in zip(radii, table.cra)}}
  shape = data.test_images.shape[1:]
  paths = [storage.join(directory, name) for name in (EXPORT_FILE, EXPORT_FILE + ".json")]
  with tempfile.TemporaryDirectory() as tmp:
    try:
      aol_jax.export_certified(run.model(), os.path.join(tmp, EXPORT_FILE), input_shape=shape,
                               rounding=config.rounding, metadata=metadata,
                               pixel_scale=int(data.max_value))
    except ValueError as e:
      raise ConfigError(f"--mode=export: {e}") from None
    if jax.process_index() == 0:
      storage.makedirs(directory)

      def remove_both() -> str:
        for path in paths:
          storage.remove(path)
        return f"Nothing exported to {directory}."

      with signals.cleanup(remove_both):  # no artifact without its description
        try:
          for path in paths:
            with open(os.path.join(tmp, os.path.basename(path)), "rb") as f:
              storage.write_atomic(path, f.read())
        except Exception:
          remove_both()
          raise
  print(f"Wrote {paths[0]} and {os.path.basename(paths[1])} beside it: the certified "
        f"{config.model} of step {int(run.state.step)}, {config.rounding} rounding, input "
        f"float32 (n, {', '.join(map(str, shape))}) = {metadata['input_scaling']}; clean "
        f"accuracy {table.clean_accuracy:.3f} on the {table.num_examples} test images.",
        flush=True)
  return paths[0]


def train_and_evaluate(config: Config, workdir: str, *,
                       hooks: Sequence[Hook] = ()) -> dict[str, Any]:
  """Run ``config.mode`` in ``workdir`` (validated by :func:`validate`): train (resuming
  from a checkpoint) then certify; certify the newest checkpoint; or export it.

  Args:
    config: the run's config.
    workdir: local path or ``gs://...``.
    hooks: called after every training step with ``(run, step)``.

  Returns:
    ``{'history': [per-epoch records], 'clean_accuracy': float, 'cra': {label: float}}``;
    ``{'history', 'stopped': signal number}`` after a SIGINT / SIGTERM;
    ``{'export': path}`` in export mode.

  Raises:
    ConfigError: a workdir holding checkpoints of another model, dataset or batch size, or
      (certify, export) no checkpoint that verifies.
    input_pipeline.DataMissingError: the dataset is neither prepared nor preparable.
    aol_jax.training.NonFiniteLossError: the loss became NaN or infinite; nothing after the
      last good checkpoint is saved.
  """
  run = setup(config, workdir, train=config.mode == "train")
  try:
    step = restore(run)
    if config.mode != "train":
      if step is None:
        raise ConfigError(f"--mode={config.mode}: {run.checkpointer.directory} holds no "
                          f"checkpoint that verifies; train first (--mode=train).")
      if config.mode == "export":
        return {"export": export(run)}
      return results.report(run)
    if step is not None and step >= run.total_steps:
      print(f"{workdir} holds a finished run (epoch {config.epochs}/{config.epochs}, step "
            f"{step}): certifying its last checkpoint.", flush=True)
    else:
      if step is not None:
        print(f"Resumed from {run.checkpointer.directory} at step {step} "
              f"(epoch {step // run.steps_per_epoch}).", flush=True)
      console.describe(run)
    stopped = train(run, hooks=hooks)
    if stopped is not None:
      return {"history": run.history, "stopped": stopped}
  finally:
    run.checkpointer.close()
  return results.report(run)


def load(workdir: str) -> tuple[nnx.Module, Config]:
  """The model of the newest verified checkpoint in ``workdir``, and the config it ran with.

  For notebooks: ``model, config = experiments.load('runs/digits')``, then e.g.
  ``aol_jax.certify_dataset(model, images, labels, batch_size=500)``. Only the test split of
  the config's dataset is read (for its image shape and classes).

  Raises:
    ConfigError: ``workdir`` holds no checkpoint.
  """
  if not storage.has_checkpoint(workdir):
    raise ConfigError(f"{workdir} holds no checkpoint.")
  with training.Checkpointer(storage.join(workdir, "checkpoints")) as checkpointer:
    found = checkpointer.latest_metadata()
  if found is None:
    raise ConfigError(f"{workdir} holds no checkpoint that verifies.")
  config = dataclasses.replace(Config(**found[1]["config"]), mode="certify")
  run = setup(config, workdir, train=False)
  try:
    if restore(run) is None:
      raise ConfigError(f"{workdir} holds no checkpoint that verifies.")
  finally:
    run.checkpointer.close()
  return run.model(), config
