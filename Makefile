# The two commands of the README. Both start from a fresh machine with Python >= 3.10.
PYTHON ?= python3

.PHONY: run test install-experiments install-test

install-experiments:
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[experiments]'

install-test:
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[test]'

# The main job: train on scikit-learn's digits (offline, about a minute on a CPU), then certify.
run: install-experiments
	$(PYTHON) -m experiments.cifar --accelerator=cpu --preset=digits --workdir=runs/digits

# The whole test suite.
test: install-test
	$(PYTHON) -m pytest -n 2 --dist loadfile -q
