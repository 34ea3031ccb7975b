"""Train and certify an AOL network on CIFAR-10, CIFAR-100 or scikit-learn's digits.

Run ``python -m experiments.cifar --accelerator=cpu --preset=digits --workdir=runs/digits``
(see ``python -m experiments.cifar --help``). The logic lives in importable modules:
:mod:`.configs` (one file per preset), :mod:`.input_pipeline`, :mod:`.train` and
:mod:`.plotting`; ``__main__`` only parses flags.
"""
