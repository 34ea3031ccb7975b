"""``python -m experiments.cifar``: see :mod:`experiments.cifar.main`."""

import sys

from experiments.common.cpu_only import keep_jax_on_cpu_if_asked

keep_jax_on_cpu_if_asked(sys.argv[1:])

from experiments.cifar.main import main  # noqa: E402  (after the environment above)

main()
