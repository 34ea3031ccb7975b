"""Check 3: what the guarantee costs. AOL against an unconstrained network of the same shape.

Both networks have the same layers (AOLConv / AOLDense replaced by ``nnx.Conv`` /
``nnx.Linear`` with the same initialisation in the plain one) and are trained with the same
recipe and loss (the paper's offset cross-entropy, u = sqrt2, t = 1/4). On the same test
examples: clean accuracy, empirical robust accuracy under ``pgd_l2`` at each radius (an
upper bound on the true robust accuracy), AOL's certified robust accuracy (a lower bound),
and the largest local Lipschitz constant found by power iteration at a few test images.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aol_jax import certify_dataset
from aol_jax import power_iteration
from experiments.ablations import report, trainer
from experiments.ablations.configs import PAPER_SETTING, PLAIN_LR_NOTE, AblationConfig

NAME = "aol_vs_plain"
LIPSCHITZ_POINTS = 8  # test images at which the local Lipschitz constant is estimated


def local_lipschitz(model: nnx.Module, images: np.ndarray, *, iterations: int) -> float:
  """The largest Jacobian spectral norm found by power iteration at the first
  :data:`LIPSCHITZ_POINTS` images: a lower bound on the network's l2 Lipschitz constant."""
  graphdef, state = nnx.split(model)
  f = lambda z: nnx.merge(graphdef, state)(z)
  norm = jax.jit(lambda x: power_iteration(f, x, iterations))
  return max(float(norm(jnp.asarray(x[None]))) for x in images[:LIPSCHITZ_POINTS])


def run(config: AblationConfig, workdir: str) -> dict:
  """Train both networks per dataset, attack both, certify AOL; write the files."""
  results = {"config": config.name, "seed": config.seed, "loss": PAPER_SETTING.name,
             "datasets": {}}
  for recipe in config.recipes:
    images, labels = trainer.attack_subset(recipe)
    entry = {"epochs": recipe.epochs, "radii": list(recipe.radii),
             "learning_rate": {"aol": recipe.learning_rate,
                               "plain": recipe.plain_learning_rate},
             "columns": [report.radius_label(r) for r in recipe.radii],
             "examples": len(labels), "pgd_steps": recipe.pgd_steps}
    for kind, plain in (("aol", False), ("plain", True)):
      trained = trainer.fit(recipe, PAPER_SETTING, seed=config.seed, workdir=workdir,
                            plain=plain)
      model = trainer.fast_copy(trained.model)
      clean = trainer.clean_accuracy(model, images, labels)
      robust, seconds = trainer.timed(trainer.empirical_robust_accuracy, model, images,
                                      labels, recipe.radii, steps=recipe.pgd_steps)
      lip = local_lipschitz(model, images, iterations=recipe.power_iterations)
      entry[kind] = {"clean": clean, "pgd": list(robust), "local_lipschitz": lip,
                     "train_seconds": trained.seconds, "final_loss": trained.final_loss}
      trainer.log(f"[{NAME}] {recipe.dataset} {kind}: trained {recipe.epochs} epochs in "
                  f"{trained.seconds:.1f} s, clean {report.pct(clean)}%, PGD "
                  + " / ".join(report.pct(r) for r in robust)
                  + f"% ({seconds:.1f} s), local Lipschitz {lip:.3f}")
      if not plain:
        cert = certify_dataset(trained.model, images, labels, eps_list=recipe.radii,
                               batch_size=recipe.eval_batch_size)
        entry[kind]["certified"] = list(cert.cra)
        entry[kind]["certified_clean"] = cert.clean_accuracy
    results["datasets"][recipe.dataset] = entry
  return report.publish(workdir, NAME, results, markdown, plot)


def markdown(results: dict) -> str:
  """One table per dataset: clean, PGD and certified accuracy (%), local Lipschitz."""
  out = [f"### AOL against a plain network of the same shape ({results['config']} run, "
         f"seed {results['seed']}, loss {results['loss']})"]
  for dataset, d in results["datasets"].items():
    aol, plain = d["aol"], d["plain"]
    out += ["", f"{dataset} ({d['epochs']} epochs; {d['examples']} test images; pgd_l2 with "
            f"{d['pgd_steps']} steps of 0.1 eps in [0, 1]; %):", ""]
    rows = [
        ["plain, empirical (PGD)", report.pct(plain["clean"])]
        + [report.pct(v) for v in plain["pgd"]] + [f"{plain['local_lipschitz']:.2f}"],
        ["AOL, empirical (PGD)", report.pct(aol["clean"])]
        + [report.pct(v) for v in aol["pgd"]] + [f"{aol['local_lipschitz']:.3f}"],
        ["AOL, certified", report.pct(aol["certified_clean"])]
        + [report.pct(v) for v in aol["certified"]] + ["<= 1 (guaranteed)"],
    ]
    out.append(report.markdown_table(["network", "clean"] + d["columns"]
                                     + ["local Lipschitz (power it.)"], rows))
    out += ["", f"Peak learning rate: AOL {d['learning_rate']['aol']}, plain "
            f"{d['learning_rate']['plain']}."]
  out += ["", PLAIN_LR_NOTE]
  return "\n".join(out) + "\n"


def plot(results: dict, path: str) -> None:
  """Accuracy against radius, one panel per dataset."""
  datasets = results["datasets"]
  fig, axes = report.figure(len(datasets))
  for ax, (dataset, d) in zip(axes, datasets.items()):
    x = [0.0] + d["radii"]
    ax.plot(x, [100 * v for v in [d["plain"]["clean"], *d["plain"]["pgd"]]], "o-",
            label="plain, PGD (upper bound)")
    ax.plot(x, [100 * v for v in [d["aol"]["clean"], *d["aol"]["pgd"]]], "s-",
            label="AOL, PGD (upper bound)")
    ax.plot(x, [100 * v for v in [d["aol"]["certified_clean"], *d["aol"]["certified"]]],
            "^--", label="AOL, certified (lower bound)")
    ax.set(title=dataset, xlabel="l2 radius (0 = clean)", ylabel="accuracy (%)",
           ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  report.save_figure(fig, path)
