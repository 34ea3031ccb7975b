#!/usr/bin/env bash
# The accelerator check (issue 25, item 5): one table, printed, of
#   AOL-Small and AOL-Medium train steps over plain (gram_precision 'default' and 'highest'),
#   certify_dataset over a bare forward pass, and the exported artifact's radii here vs cpu.
# It runs with the machine's own jax and flax (the device image: jax 0.11, CUDA 13) and this
# checkout's aol_jax and benchmarks on PYTHONPATH; nothing is installed.
#   benchmarks/on_device.sh                                 # one GPU, paper sizes, ~5 min on H100
#   benchmarks/on_device.sh --platform=cpu --size=tiny      # the same on a CPU, tiny sizes
#   PYTHON=python3.12 benchmarks/on_device.sh --json out.json
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"${PYTHON:-python3}" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)'
exec "${PYTHON:-python3}" -m benchmarks.on_device "$@"
