"""``--accelerator``: the one backend a run uses, chosen before JAX starts a backend and
checked before anything runs, with one line when it is missing (never a fallback)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

import jax

# JAX's platform name for each --accelerator value.
PLATFORMS = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}
_HINTS = {"gpu": "install jax with CUDA support (pip install -U 'jax[cuda12]') on a machine "
                 "with an NVIDIA GPU",
          "tpu": "run on a Cloud TPU VM with pip install -U 'jax[tpu]'",
          "cpu": "check that jaxlib is installed"}


class AcceleratorError(RuntimeError):
  """JAX cannot use the requested accelerator; the message says what to do."""


def select(name: str) -> None:
  """Let JAX start only the backend of ``--accelerator=name`` (``jax_platforms``): no other
  plugin is probed, so none prints its start-up errors (with the CUDA plugin installed, a
  CPU run would otherwise print a CUDA initialisation traceback). Call it before anything
  starts a backend (``jax.devices()``, a computation, ``jax.distributed``)."""
  jax.config.update("jax_platforms", PLATFORMS[name])


class _Collect(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    self.messages.append(record.getMessage())
    if record.exc_info and record.exc_info[1] is not None:
      self.messages.append(str(record.exc_info[1]))


@contextlib.contextmanager
def _stderr_to_file():
  """Send file descriptor 2 to a temporary file (libtpu writes its start-up messages there
  from C++, out of reach of Python's logging); yields a function that reads what came."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield lambda: (tmp.seek(0), tmp.read().decode(errors="replace"))[1]
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def require(name: str) -> None:
  """Start the backend selected by :func:`select` and check that it is ``name``.

  What a backend says while it starts is kept off the console: JAX logs a plugin that fails
  to start as a traceback (collected here, its last line becomes the reason of the one-line
  error), and libtpu writes to the process's stderr directly.

  Raises:
    AcceleratorError: JAX cannot use ``name``.
  """
  logger = logging.getLogger("jax._src.xla_bridge")
  collect, propagate = _Collect(), logger.propagate
  logger.addHandler(collect)
  logger.propagate = False
  try:
    with _stderr_to_file() as printed:
      try:
        found, reason = jax.default_backend(), f"JAX's devices are {jax.devices()}"
      except Exception as e:  # noqa: BLE001  (each backend fails in its own way)
        found = None
        text = collect.messages[-1] if collect.messages else str(e) or printed()
        lines = [l for l in text.strip().splitlines() if l.strip()]
        reason = lines[-1] if lines else type(e).__name__
  finally:
    logger.removeHandler(collect)
    logger.propagate = propagate
  if found != name:
    raise AcceleratorError(f"--accelerator={name} was requested but JAX cannot use a {name}: "
                           f"{reason.rstrip('.')}. To fix: {_HINTS[name]}, or choose another "
                           f"--accelerator. Not falling back.")
