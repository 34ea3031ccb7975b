"""How `make test` compiles. tests/support/cpu_target.py, by which `make test-isa` skips an
ISA cap that compiles the code of a pass before it, must read the target and tell a capped
ISA from the host's; and a module's compile level (tests/conftest.py) must not leak."""

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
