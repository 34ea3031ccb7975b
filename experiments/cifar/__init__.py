"""Train and certify an AOL network on CIFAR-10, CIFAR-100, scikit-learn's digits or mnist5k.

Run ``python -m experiments.cifar --accelerator=cpu --preset=digits --workdir=runs/digits``
(see ``python -m experiments.cifar --help``). :mod:`.main` parses the flags and calls
:func:`.train.train_and_evaluate`; the logic lives in importable modules: :mod:`.configs`
(one file per preset), :mod:`.train` (with :mod:`.console` and :mod:`.results`) and
:mod:`experiments.common`.
"""
