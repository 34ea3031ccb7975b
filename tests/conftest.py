"""Simulate 8 devices on the CPU before JAX initialises; one BLAS thread per test process.

No global matmul precision: certify_dataset must force 'highest' itself (test_certify checks
that it does), and a test that needs exact float32 products asks for them in its own scope.

``--file-durations`` prints, after the run, the time spent in each test file (setup, call
and teardown of its tests, summed; with pytest-xdist, per worker process as it ran them).
"""

import collections
import os
import shutil
import tempfile

# pytest-xdist workers each load libtpu for the TPU compile tests; without this the second
# process to load it stops on libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# CPU only, and said before JAX starts: the CUDA plugin (the gpu-compile extra) then compiles
# for H100 targets (test_compile_targets) instead of failing to find a GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite runs one process per core (make test: -n 2 on 2 cores). OpenBLAS's own threads
# on top of that spin-wait for each other: on the loaded 2-core machine a batch of 384 x 384
# Cholesky factorisations took 20 s with two BLAS threads per process and 0.5 s with one.
# Said before numpy loads OpenBLAS (and inherited by the subprocesses tests start); a BLAS
# already loaded is limited through threadpoolctl.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

# The suite's programs run once or a few times, on small inputs: compiled without LLVM's
# optimisation passes (jax_disable_most_optimizations) and with XLA's elemental fusion
# emitters they compile 2-3x faster (tests/test_layers.py + test_architectures.py: 287 s ->
# 115 s on 2 cores). Both act below the HLO, so no compiler count changes, and results
# differ at most in summation order, which every bound and certificate covers. Modules whose
# programs run long (attacks, trainings) are marked `xla_default_optimisation` and compile
# at XLA's default level. `make test-isa` runs the numeric core again at the default level,
# on this ISA and older ones. Explicit XLA_FLAGS (even empty) keep XLA's defaults throughout.
# The environment variable is inherited by the subprocesses tests start.
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_cpu_use_fusion_emitters=false"
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# A program compiled again in another process of the session (the same train step in each
# run of the ablations and of the runner's subprocesses, the same steps in both workers) is
# read from jax's persistent compilation cache: one folder per session, made here by the
# first process (pytest-xdist's workers and the subprocesses tests start inherit it) and
# removed by it at the end (pytest_unconfigure). The cache's key holds the program, the
# compile options, XLA_FLAGS and the jax version, so a hit is the same executable.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="aol_jax_tests_jax_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402
import threadpoolctl  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# The backend starts here, with the flags above. Started later, an experiment run in-process
# (experiments.common.accelerator.select, as the ablations' tests do) would add the runs' CPU
# XLA_FLAGS first, and XLA would compile every later test of that worker with them: which
# tests then, test order would decide.
jax.devices()
# The session's level (pytest-xdist's workers inherit the environment set above).
FAST_COMPILE = jax.config.values["jax_disable_most_optimizations"]
_BLAS_LIMIT = threadpoolctl.threadpool_limits(int(os.environ["OPENBLAS_NUM_THREADS"]),
                                              user_api="blas")

_FILE_SECONDS: collections.Counter = collections.Counter()


@pytest.fixture(scope="session")
def fast_compile() -> bool:
  """Whether this session compiles at the fast level (no XLA_FLAGS were given)."""
  return FAST_COMPILE


@pytest.fixture(scope="module", autouse=True)
def _xla_optimisation(request):
  """XLA's default optimisation for the modules marked ``xla_default_optimisation``; module
  scoped and autouse, so it also covers their module fixtures."""
  marked = request.node.get_closest_marker("xla_default_optimisation") is not None
  before = jax.config.values["jax_disable_most_optimizations"]
  if marked:
    jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


# The slowest test files (`make test-times`, 2026-12-07), slowest first; the rest follow in
# collection order. The Makefile's runs pass --no-loadscope-reorder, so pytest-xdist hands out
# files in this order: without it, it sorts them by their number of tests, and a long file
# with few tests (the TPU compiles) could start last and run alone at the end.
SLOWEST_FIRST = (
    "tests/test_compile_targets.py", "tests/test_ablations.py", "tests/test_layers.py",
    "tests/test_cifar_resume.py", "tests/test_cifar_main.py", "tests/test_experiments_signals.py",
    "tests/test_attacks.py", "tests/test_certification_dataset.py",
    "tests/test_architectures.py", "tests/test_experiment_digits.py",
    "tests/test_sharded_rescaling.py", "tests/test_benchmarks.py",
    "tests/test_false_certificates.py", "tests/test_cifar_multiprocess.py",
    "tests/test_benchmarks_gram_precision.py",
    # make test-isa's files
    "tests/test_certification_rigorous.py", "tests/test_rescaling.py",
    "tests/test_certification_statistical.py", "tests/test_freeze.py")


def pytest_collection_modifyitems(items):
  rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable


def pytest_addoption(parser):
  parser.addoption("--file-durations", action="store_true", default=False,
                   help="print the seconds spent in each test file, slowest first")


def pytest_runtest_logreport(report):
  _FILE_SECONDS[report.nodeid.split("::")[0]] += report.duration


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  if not config.getoption("--file-durations") or not _FILE_SECONDS:
    return
  terminalreporter.section("seconds per test file")
  for path, seconds in _FILE_SECONDS.most_common():
    terminalreporter.write_line(f"{seconds:8.1f}  {path}")
  terminalreporter.write_line(f"{sum(_FILE_SECONDS.values()):8.1f}  total (summed over workers)")
