"""The run's results: the certificate on the whole test set, ``results.md``, ``results.json``
and the plots, each written all at once by process 0."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

import aol_jax
from flax import nnx

from experiments.cifar.configs import Config
from experiments.common import labels, plotting, storage

# Radii of the certified-accuracy plot (the reported ones are added).
CURVE_RADII = tuple(np.linspace(0.0, 1.5, 61).tolist())
# The radius of the certificate in metrics.jsonl (test_cra_36).
MONITOR_RADIUS = 36 / 255


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is ``>= n``."""
  return -(-n // multiple) * multiple


def certify(model: nnx.Module, images: np.ndarray, test_labels: np.ndarray, config: Config,
            mesh: jax.sharding.Mesh, radii) -> aol_jax.CertificationResult:
  """:func:`aol_jax.certify_dataset` with the run's rounding mode: the only certificate."""
  return aol_jax.certify_dataset(model, images, test_labels, eps_list=list(radii),
                                 batch_size=round_up(config.eval_batch_size, mesh.devices.size),
                                 mesh=mesh, rounding=config.rounding)


def report(run) -> dict[str, Any]:
  """Certify the model of ``run`` on the whole test set; write results, plots; return them."""
  config = run.config
  reported = labels.radii(config.dataset)
  radii = sorted(set(CURVE_RADII) | set(reported))
  full = certify(run.model(), run.data.test_inputs(), run.data.test_labels, config, run.mesh,
                 radii)
  keep = [radii.index(r) for r in reported]
  table = dataclasses.replace(
      full, eps_list=tuple(reported), num_certified=tuple(full.num_certified[i] for i in keep),
      max_allowance=tuple(full.max_allowance[i] for i in keep))
  if jax.process_index() == 0:
    _write_results(run, table)
    if run.history:
      plotting.plot_training_curves(run.history, storage.join(run.workdir,
                                                              "training_curves.png"))
    plotting.plot_certified_accuracy(full.eps_list, full.cra,
                                     storage.join(run.workdir, "certified_accuracy.png"),
                                     title=f"{config.model} on {config.dataset}")
  print(aol_jax.certification_markdown(table, name=config.model), flush=True)
  return {"history": run.history, "clean_accuracy": table.clean_accuracy,
          "cra": {labels.radius_label(r): a for r, a in zip(table.eps_list, table.cra)}}


def _write_results(run, table: aol_jax.CertificationResult) -> None:
  """``results.md`` (the table and how it was produced) and ``results.json`` (the data)."""
  config, last = run.config, (run.history[-1] if run.history else {})
  step = int(run.state.step)
  how = ("trained and certified" if config.mode == "train" else
         f"re-certified from its checkpoint (--mode={config.mode})")
  text = (
      f"# {config.model} on {config.dataset}\n\n"
      f"Certified robust accuracy (%) on the {table.num_examples} test images after epoch "
      f"{last.get('epoch', '?')} (step {step}), {how}, from "
      f"`aol_jax.certify_dataset` (l2, Lipschitz constant {table.lipschitz_constant:g}, "
      f"{table.rounding} rounding allowance included).\n\n"
      f"{aol_jax.certification_markdown(table, name=config.model)}\n\n"
      f"Config:\n\n```json\n{json.dumps(dataclasses.asdict(config), indent=2)}\n```\n")
  storage.write_atomic(storage.join(run.workdir, "results.md"), text)
  data = {"model": config.model, "dataset": config.dataset, "epoch": last.get("epoch"),
          "step": step, "mode": config.mode, "num_examples": table.num_examples,
          "rounding": table.rounding, "clean_accuracy": table.clean_accuracy,
          "cra": {labels.radius_label(r): a for r, a in zip(table.eps_list, table.cra)}}
  storage.write_atomic(storage.join(run.workdir, "results.json"),
                       json.dumps(data, indent=2) + "\n")
