"""Train and certify an AOL network on CIFAR-10, CIFAR-100 or scikit-learn's digits.

Run ``python -m experiments.cifar --accelerator=cpu --preset=digits --workdir=runs/digits``
(see ``python -m experiments.cifar --help``). The logic lives in importable modules:
:mod:`.configs` (one file per preset), :mod:`.flags`, :mod:`.train` (with :mod:`.console`
and :mod:`.results`) and :mod:`experiments.common`; :mod:`.main` only parses flags.
"""
