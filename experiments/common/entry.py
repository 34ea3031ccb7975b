"""Around an entry point's work: the accelerator first, then one line and an exit status for
every way a run can end, and no workdir left behind by a run that made nothing of it."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import logging

from aol_jax import training
from experiments.common import accelerator, command_line, input_pipeline, signals, storage

# The errors of a run that are the user's to fix: each is one line, exit status 1.
ERRORS = (accelerator.AcceleratorError, input_pipeline.DataMissingError,
          training.NonFiniteLossError)


# Library warnings that say nothing about the run (tfds on every CIFAR read).
_NOTES = ("OpenCV is not installed",)


def _drop_notes(record) -> bool:
  return not str(record.msg).startswith(_NOTES)


def run(parsed: command_line.Parsed, work: Callable[[], int | None], *,
        errors: tuple[type[Exception], ...] = ()) -> int:
  """Select and check ``parsed.accelerator``, then ``work()``; its exit status (0 for None).

  * An error of :data:`ERRORS` or ``errors``: ``sys.exit('error: <one line>')`` (status 1).
  * SIGINT / SIGTERM outside the training loop (:func:`signals.stop`): one line, exit status
    130 / 143 (the training loop itself stops after an epoch, with a checkpoint, and
    ``work`` returns that status).
  * Either way, half-written files are removed, and so is a workdir that did not exist
    before and holds no checkpoint.
  """
  logging.set_verbosity(logging.WARNING)  # absl.app sets INFO: orbax would log every save
  logging.get_absl_handler().addFilter(_drop_notes)
  workdir = parsed.workdir
  try:
    created = not storage.exists(workdir)
  except Exception:  # noqa: BLE001  (a bucket without permission: validate names it)
    created = False

  def clean() -> str | None:
    storage.remove_partial()
    try:
      if storage.has_checkpoint(workdir):
        return "The last checkpoint is kept; rerun the same command to resume."
      if created and storage.exists(workdir):
        storage.remove_tree(workdir)
    except Exception:  # noqa: BLE001  (another process of the job removed it first; no access)
      pass
    return None

  with signals.cleanup(clean):
    try:
      accelerator.select(parsed.accelerator)
      training.maybe_initialize()  # jax.distributed, before the backend starts
      accelerator.require(parsed.accelerator)
      return work() or 0
    except Exception as e:
      clean()
      if isinstance(e, (*ERRORS, *errors)):
        sys.exit("error: " + " ".join(str(e).split()))
      raise  # a bug: its traceback
