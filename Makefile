# The two commands of the README. Both start from a fresh machine with Python >= 3.10.
PYTHON ?= python3

.PHONY: run test test-isa test-times docs install-experiments install-test

# uv installs the wheels pip would install, from the same constraints, in a quarter of the
# time (the test extra: 19 s against pip's 83 s; it unpacks in parallel and byte-compiles
# nothing, which Python does for the modules a process imports). uv does not read pip's
# configuration: the wheel folders pip is configured to find links in are passed on (asked
# of pip only by the install targets).
FIND_LINKS = $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_INSTALL = $(PYTHON) -m pip install -q -c constraints.txt uv && $(PYTHON) -m uv pip install \
	-q --python $(PYTHON) $(addprefix --find-links ,$(FIND_LINKS)) -c constraints.txt

install-experiments:
	$(UV_INSTALL) -e '.[experiments]'

install-test:
	$(UV_INSTALL) -e '.[test]'

# The main job: train on scikit-learn's digits (offline, about 30 s on a 2-core CPU), then certify.
run: install-experiments
	$(PYTHON) -m experiments.cifar --accelerator=cpu --preset=digits --workdir=runs/digits

# Two workers, a test file each at a time, handed out slowest first (tests/conftest.py).
XDIST = -n 2 --dist loadfile --no-loadscope-reorder

# The test suite but the numeric core, compiled for speed (tests/conftest.py; it ends with
# the seconds spent per test file); then the numeric core and the doctests at XLA's default
# optimisation, on this ISA and under capped ones (XLA's CPU code differs per ISA; no
# doctest or test may depend on the last float digit).
test: install-test
	$(PYTHON) -m pytest $(XDIST) -q --file-durations tests $(addprefix --ignore=,$(ISA_TESTS))
	$(MAKE) test-isa
	$(MAKE) docs

# The docs site from docs/ and the docstrings; any warning fails the build.
docs:
	$(PYTHON) -m sphinx -W --keep-going -q -b html docs docs/_build/html

# The doctests and the numeric core tests at XLA's default optimisation, on this machine's
# ISA and under SSE4.2 and AVX2: the Gram and rescaling, freeze, the exact norms and the
# certificate's rule and rounding models. XLA_FLAGS changes only XLA's CPU code: the
# kernel-norm bounds (tests/test_spectral_bounds.py) run in numpy and LAPACK, which it does
# not touch, so they run once, above. test_layers (its bounds are checked against SVDs) runs
# once, above, to keep CI short. A cap that leaves XLA's target CPU and features as a pass
# before it had them (AVX2 on a CPU without AVX-512) compiles the same code: that pass is
# skipped, with a line saying so (tests/support/cpu_target.py).
ISA_TESTS ?= aol_jax tests/test_gram.py tests/test_rescaling.py tests/test_freeze.py \
	tests/test_lipschitz.py tests/test_certification_rule.py \
	tests/test_certification_statistical.py tests/test_certification_rigorous.py
test-isa:
	seen=" "; for isa in native SSE4_2 AVX2; do \
	  flags=$$([ $$isa = native ] || echo --xla_cpu_max_isa=$$isa); \
	  target=$$(XLA_FLAGS="$$flags" JAX_PLATFORMS=cpu $(PYTHON) -m tests.support.cpu_target \
	            2>/dev/null | tail -n 1); \
	  case "$$target" in unknown|"") ;; *) case "$$seen" in *" $$target "*) \
	    echo "== XLA_FLAGS=$$flags: target $$target, compiled by a pass above; skipped"; \
	    continue;; esac;; esac; \
	  seen="$$seen$$target "; \
	  echo "== XLA_FLAGS=$$flags (XLA's default optimisation; target $$target)"; \
	  XLA_FLAGS="$$flags" $(PYTHON) -m pytest $(XDIST) -q \
	    -p no:cacheprovider $(ISA_TESTS) || exit 1; \
	done

# Seconds per test file (summed setup + call + teardown, slowest first), for finding what to
# cut; the same workers as `make test`.
test-times:
	$(PYTHON) -m pytest $(XDIST) -q -p no:cacheprovider --file-durations $(TEST_ARGS)
