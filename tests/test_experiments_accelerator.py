"""``--accelerator=cpu`` compiles XLA's convolutions without YNNPACK (its XLA_FLAGS), before
the backend starts, and leaves a user's own setting of those fusions alone."""

import ast
import os
import subprocess
import sys

from experiments.common import accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = accelerator.YNN_FUSIONS

# In a fresh process: select() as a run does (or not: argv[1] == "no"), then compile a train
# step's convolution (its kernel gradient, the one YNNPACK ran slowest) and say whether XLA
# made a YNNPACK fusion of it.
_PROBE = """
import sys
from experiments.common import accelerator
if sys.argv[1] == "select":
  accelerator.select("cpu")
import os, jax, jax.numpy as jnp
conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
grad = jax.jit(jax.grad(lambda x, k: jnp.vdot(conv(x, k), x), argnums=1))
text = grad.lower(jnp.ones((32, 8, 8, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
print(repr(os.environ.get("XLA_FLAGS", "")))
print("__ynn_fusion" in text)
"""


def _probe(xla_flags, select=True):
  env = dict(os.environ, XLA_FLAGS=xla_flags)
  proc = subprocess.run([sys.executable, "-c", _PROBE, "select" if select else "no"],
                        cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  flags, ynn = proc.stdout.strip().splitlines()[-2:]
  flags = ast.literal_eval(flags)
  return flags, ynn == "True"


def test_xla_flags_of_a_cpu_run():
  add = accelerator.cpu_xla_flags
  assert add("", "0.10.2") == accelerator.CPU_XLA_FLAG
  assert add("--xla_cpu_max_isa=AVX2", "0.10.0") == (
      "--xla_cpu_max_isa=AVX2 " + accelerator.CPU_XLA_FLAG)
  # The user's own choice of the fusions stays; a jaxlib it was not measured on gets none
  # (XLA stops the process on a flag it does not know).
  assert add(f"{NAME}=dot", "0.10.2") == f"{NAME}=dot"
  assert add("--xla_cpu_max_isa=AVX2", "0.11.0") == "--xla_cpu_max_isa=AVX2"


def test_a_cpu_run_compiles_its_convolutions_without_ynnpack():
  assert _probe("") == (accelerator.CPU_XLA_FLAG, False)
  # Without select(), XLA makes the YNNPACK fusion (what the flag is there to avoid).
  assert _probe("", select=False) == ("", True)
  # A user's own setting of the fusions is left as it is ("+dot": the default list and dot).
  assert _probe(f"{NAME}=+dot") == (f"{NAME}=+dot", True)


def test_select_changes_nothing_once_a_backend_has_started():
  import jax
  jax.devices()  # this test process's backend has started (conftest)
  before = os.environ.get("XLA_FLAGS")
  accelerator.select("cpu")
  assert os.environ.get("XLA_FLAGS") == before
