"""``--accelerator``: the one backend a run uses, chosen before JAX starts a backend and
checked before anything runs, with one line when it is missing (never a fallback); on a CPU,
XLA's convolutions without YNNPACK (:data:`CPU_XLA_FLAG`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

import jax
import jaxlib.version
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent

# JAX's platform name for each --accelerator value.
PLATFORMS = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}
_HINTS = {"gpu": "install jax with CUDA support (pip install -U 'jax[cuda12]') on a machine "
                 "with an NVIDIA GPU",
          "tpu": "run on a Cloud TPU VM with pip install -U 'jax[tpu]'",
          "cpu": "check that jaxlib is installed"}


# XLA:CPU of jaxlib 0.10 runs convolutions as YNNPACK dot fusions by default. The kernel
# gradient of a 3x3 convolution (192 channels on 8x8, batch 256, one thread) took 1.98x
# torch's time with them and 0.59x without, and AOL-Small's CPU train step (2 threads) 4812 ms
# against 2569 ms (benchmarks/README.md, "XLA:CPU's convolutions"). XLA stops the process on
# a flag it does not know, so it is set only for the jaxlib versions it was measured on.
YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type"  # XLA's flag: which fusions use YNNPACK
CPU_XLA_FLAG = f"{YNN_FUSIONS}="  # none of them
CPU_XLA_FLAG_JAXLIB = ("0.10.",)


def cpu_xla_flags(flags: str, jaxlib_version: str) -> str:
  """``XLA_FLAGS`` for a CPU run: ``flags`` and :data:`CPU_XLA_FLAG`, unless ``flags`` set
  the YNNPACK fusions themselves or ``jaxlib_version`` is not one it was measured on.

  Example:
    >>> cpu_xla_flags("--xla_cpu_max_isa=AVX2", "0.10.2")
    '--xla_cpu_max_isa=AVX2 --xla_cpu_experimental_ynn_fusion_type='
    >>> cpu_xla_flags("--xla_cpu_experimental_ynn_fusion_type=dot", "0.10.2")
    '--xla_cpu_experimental_ynn_fusion_type=dot'
  """
  if YNN_FUSIONS in flags or not jaxlib_version.startswith(CPU_XLA_FLAG_JAXLIB):
    return flags
  return f"{flags} {CPU_XLA_FLAG}".strip()


class AcceleratorError(RuntimeError):
  """JAX cannot use the requested accelerator; the message says what to do."""


def select(name: str) -> None:
  """Let JAX start only the backend of ``--accelerator=name`` (``jax_platforms``): no other
  plugin is probed, so none prints its start-up errors (with the CUDA plugin installed, a
  CPU run would otherwise print a CUDA initialisation traceback). For ``cpu``, also add
  :func:`cpu_xla_flags` to ``XLA_FLAGS``, which XLA reads when the backend starts (not once
  one has: then nothing changes). Call it before anything starts a backend
  (``jax.devices()``, a computation, ``jax.distributed``)."""
  if name == "cpu" and not xla_bridge.backends_are_initialized():
    os.environ["XLA_FLAGS"] = cpu_xla_flags(os.environ.get("XLA_FLAGS", ""),
                                            jaxlib.version.__version__)
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
