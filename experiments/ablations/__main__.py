"""``python -m experiments.ablations``: see :mod:`experiments.ablations.main`."""

from experiments.common import signals

signals.install()  # first: a signal during the imports below ends in one line too

from absl import app  # noqa: E402

from experiments.ablations.main import PROGRAM, main  # noqa: E402

app.run(main, flags_parser=PROGRAM.parse_or_exit)
