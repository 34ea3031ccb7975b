"""How `make test` compiles. tests/support/cpu_target.py, by which `make test-isa` skips an
ISA cap that compiles the code of a pass before it, must read the target and tell a capped
ISA from the host's; a module's compile level (tests/conftest.py) must not leak; the
slowest files are collected first."""

import os
import subprocess
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _target(xla_flags: str) -> str:
  proc = subprocess.run([sys.executable, "-m", "tests.support.cpu_target"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=True,
                        env={**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"})
  return proc.stdout.strip().splitlines()[-1]


def test_the_target_is_read_and_a_lower_cap_changes_it():
  host, sse = _target(""), _target("--xla_cpu_max_isa=SSE4_2")
  assert host != "unknown" and sse.startswith("nehalem:"), (host, sse)
  assert host != sse
  # The main run's flags leave the CPU target alone.
  assert _target("--xla_cpu_use_fusion_emitters=false") == host


def test_unmarked_modules_compile_at_the_sessions_level(fast_compile):
  """Fast unless XLA_FLAGS are given; a marked module before this one must not leak."""
  assert jax.config.values["jax_disable_most_optimizations"] is fast_compile
  assert fast_compile is (os.environ["XLA_FLAGS"] == "--xla_cpu_use_fusion_emitters=false")


def test_the_slowest_files_are_collected_first_and_exist():
  import conftest
  assert all(os.path.isfile(os.path.join(ROOT, path)) for path in conftest.SLOWEST_FIRST)
  # Collected alphabetically, test_gram.py would come first.
  proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                         "no:cacheprovider", "tests/test_gram.py", "tests/test_rescaling.py",
                         "tests/test_freeze.py"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=True)
  files = [line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line]
  order = list(dict.fromkeys(files))
  assert order == ["tests/test_rescaling.py", "tests/test_freeze.py", "tests/test_gram.py"], order
