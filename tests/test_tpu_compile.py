"""AOL-Small's train and certification steps compiled for TPU slices by libtpu, on this host.

Compiler counts, not timings (``benchmarks.tpu_compile``): each step must compile for the
8-chip v5e 2x4 and the 4-host, 16-chip v5e 4x4, fit the chip's HBM, and the train step's
per-device FLOPs must stay within 1.30x those of the same network with plain layers.
About a minute of compiling per topology on two cores; the certification step is compiled
for AOL only (its frozen kernels cost what plain kernels cost).
"""

import os

# libtpu guards itself with a lockfile against a second process on one TPU host; here no
# TPU is used, and pytest-xdist's workers each load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402

from benchmarks import tpu_compile  # noqa: E402

BATCH, CERTIFY_BATCH = 256, 1024


@pytest.fixture(scope="module", params=["v5e:2x4", "v5e:4x4"])
def topology(request):
  mesh = tpu_compile.topology_mesh(request.param)
  return request.param, mesh


@pytest.mark.slow
def test_aol_small_train_step_compiles_fits_and_meets_the_flops_target(topology):
  name, mesh = topology
  hbm = tpu_compile.HBM_GIB[mesh.devices.flat[0].device_kind] * 2**30
  aol = tpu_compile.counts(tpu_compile.compile_train_step(mesh, "aol_small", "aol", BATCH))
  plain = tpu_compile.counts(tpu_compile.compile_train_step(mesh, "aol_small", "plain", BATCH))
  assert aol["peak_bytes"] < hbm, (name, aol["peak_bytes"])
  ratio = aol["flops"] / plain["flops"]
  assert ratio <= tpu_compile.FLOPS_TARGET, (name, ratio)
  # The split rescaling adds no kernel-sized collective: the factors' gathers and sums are
  # a few KiB next to the gradients' all-reduce, which both networks do.
  moved = lambda c: sum(v["bytes"] for v in c.values())
  assert moved(aol["collectives"]) <= 1.01 * moved(plain["collectives"]), (
      aol["collectives"], plain["collectives"])


@pytest.mark.slow
def test_aol_small_certification_step_compiles_and_fits(topology):
  name, mesh = topology
  hbm = tpu_compile.HBM_GIB[mesh.devices.flat[0].device_kind] * 2**30
  compiled = tpu_compile.compile_certify_step(mesh, "aol_small", "aol", CERTIFY_BATCH)
  counts = tpu_compile.counts(compiled)
  assert 0 < counts["peak_bytes"] < hbm, (name, counts["peak_bytes"])
  assert counts["flops"] > 0
