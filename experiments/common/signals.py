"""SIGINT and SIGTERM at any stage of an entry point: one line, exit ``128 + signal``.

:func:`install` is the first thing an entry point's ``__main__`` does, before it imports
anything heavy: from then on either signal raises :class:`Interrupted` in the main thread,
wherever it is (imports, setup, certification, export), and :func:`exit_on_interrupt` turns
it into one line on stderr and the exit status. The training loop replaces the handlers
while it runs so that a signal stops it after the current epoch, with a checkpoint
(``experiments.cifar.train``). This module imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
  """SIGINT or SIGTERM arrived. A ``BaseException``, like ``KeyboardInterrupt``, so that no
  ``except Exception`` on the way swallows it."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _raise(signum, frame) -> None:
  raise Interrupted(signum)


def install() -> None:
  """Make SIGINT and SIGTERM raise :class:`Interrupted` (SIGTERM's default would kill the
  process without a word, SIGINT's raise ``KeyboardInterrupt`` with a traceback)."""
  for sig in SIGNALS:
    signal.signal(sig, _raise)


def ignore() -> None:
  """Ignore both signals: while a stopping process cleans up and says why."""
  for sig in SIGNALS:
    signal.signal(sig, signal.SIG_IGN)


def status(signum: int) -> int:
  """The exit status of a process stopped by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
  return 128 + signum


@contextlib.contextmanager
def exit_on_interrupt():
  """Turn :class:`Interrupted` into one line on stderr and ``sys.exit(128 + signal)``."""
  try:
    yield
  except Interrupted as e:
    ignore()
    print(f"Stopped by {signal.Signals(e.signum).name}.", file=sys.stderr, flush=True)
    sys.exit(status(e.signum))
