"""The CPU that XLA compiles for under this process's XLA_FLAGS: ``python -m
tests.support.cpu_target`` prints its LLVM CPU name and a digest of its feature list, as a
compiled executable records them, or ``unknown`` where they cannot be read.

``make test-isa`` runs the numeric core once per distinct target. ``--xla_cpu_max_isa``
only removes the features above its cap (AVX2 removes AVX-512 and nothing else), and where
it removes none XLA keeps the host CPU: the cap then compiles exactly the code of the pass
without it (the object files compared byte for byte on a CPU without AVX-512).
"""

import hashlib
import re

import jax
import jax.numpy as jnp

# The target's LLVM CPU name, a byte or two of protobuf framing, then its features.
_TARGET = re.compile(rb"([0-9a-z\-]{3,})[\x00-\x20\x80-\xff]{1,4}"
                     rb"([+-][0-9a-z.\-]+(?:,[+-][0-9a-z.\-]+){8,})")


def target() -> str:
  compiled = jax.jit(lambda x: jnp.sum(jnp.exp(x) * x, axis=0)).lower(
      jnp.ones((8, 8))).compile()
  blob = jax.devices("cpu")[0].client.serialize_executable(compiled.runtime_executable())
  found = _TARGET.findall(blob)
  if len(found) != 1:
    return "unknown"
  cpu, features = found[0]
  return f"{cpu.decode()}:{hashlib.sha256(features).hexdigest()[:12]}"


if __name__ == "__main__":
  print(target())
