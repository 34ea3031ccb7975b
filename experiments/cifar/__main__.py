"""``python -m experiments.cifar``: see :mod:`experiments.cifar.main`."""

from experiments.common import signals

signals.install()  # first: a signal during the imports below ends in one line too
with signals.exit_on_interrupt():
  from absl import app

  from experiments.cifar.main import PROGRAM, main

  app.run(main, flags_parser=PROGRAM.parse_or_exit)
