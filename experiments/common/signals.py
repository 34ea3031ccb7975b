"""SIGINT and SIGTERM at any stage of an entry point: one line, exit ``128 + signal``, and
nothing partial left.

:func:`install` is the first thing an entry point's ``__main__`` does, before it imports
anything heavy. From then on either signal runs the cleanups registered with
:func:`cleanup` (newest first: a half-written file, a workdir the run created and made
nothing of), prints one line and ends the process at once. Raising an exception from the
handler instead would reach code that cannot take one: a C extension being imported prints
it with its own traceback (and was seen to crash), a garbage-collection callback reports it
as "ignored".

The training loop replaces the handler while it runs, so that a signal stops it after the
current epoch with a checkpoint (``experiments.cifar.train``); a second signal comes here.
This module imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_cleanups: list[Callable[[], str | None]] = []


def status(signum: int) -> int:
  """The exit status of a process stopped by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
  return 128 + signum


def ignore() -> None:
  """Ignore both signals (while a stopping process cleans up)."""
  for sig in SIGNALS:
    signal.signal(sig, signal.SIG_IGN)


def stop(signum: int, frame=None) -> None:
  """The handler: run the cleanups, print one line, exit ``128 + signum``."""
  ignore()
  notes = []
  for fn in reversed(_cleanups):
    try:
      notes.append(fn())
    except Exception as e:  # noqa: BLE001  (the process is ending; say what was left)
      notes.append(f"(cleanup failed: {e})")
  sys.stdout.flush()
  text = " ".join(n for n in notes if n)
  print(f"Stopped by {signal.Signals(signum).name}.{' ' + text if text else ''}",
        file=sys.stderr, flush=True)
  os._exit(status(signum))


def install() -> None:
  """Make SIGINT and SIGTERM call :func:`stop`."""
  for sig in SIGNALS:
    signal.signal(sig, stop)


@contextlib.contextmanager
def cleanup(fn: Callable[[], str | None]):
  """Run ``fn`` if a signal stops the process inside this block; it may return a note for
  the line the process prints."""
  _cleanups.append(fn)
  try:
    yield
  finally:
    _cleanups.remove(fn)
