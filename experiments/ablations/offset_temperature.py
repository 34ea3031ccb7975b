"""Check 1: the offset / temperature trade-off of the offset cross-entropy.

The paper (AOL-Small, CIFAR-10) finds that a larger offset ``u`` (with a larger temperature
``t``) lowers clean accuracy and raises certified robust accuracy (CRA) at large radii. Here
the three settings are trained on each dataset with several seeds, and the ordering of the
means is compared with the paper's, radius by radius.
"""

from __future__ import annotations

import time

from experiments.ablations import report, trainer
from experiments.ablations.configs import (LOSS_SETTINGS, PAPER_OFFSET_TEMPERATURE, PAPER_RADII,
                                          AblationConfig)

NAME = "offset_temperature"
# Short names for orderings: small, paper's (medium), large offset.
SHORT = dict(zip((s.name for s in LOSS_SETTINGS), ("S", "M", "L")))


def ordering(means: dict[str, float]) -> str:
  """Settings by decreasing value, e.g. ``'M > S > L'``."""
  return " > ".join(SHORT[k] for k in sorted(means, key=lambda k: -means[k]))


def separated(means: dict[str, float], spreads: dict[str, float]) -> bool:
  """Whether each neighbour pair of the ordering differs by more than the sum of their
  spreads (sample standard deviations over seeds): the ordering is not within seed noise."""
  keys = sorted(means, key=lambda k: -means[k])
  return all(means[a] - means[b] > spreads[a] + spreads[b] for a, b in zip(keys, keys[1:]))


def run(config: AblationConfig, workdir: str) -> dict:
  """Train every (dataset, setting, seed), certify, and write the table, JSON and plot."""
  total = len(config.recipes) * len(LOSS_SETTINGS) * len(config.seeds)
  done, start = 0, time.perf_counter()
  results = {"config": config.name, "seeds": list(config.seeds),
             "settings": {s.name: {"short": SHORT[s.name], "offset": s.offset,
                                   "temperature": s.temperature} for s in LOSS_SETTINGS},
             "datasets": {}}
  for recipe in config.recipes:
    columns = ["clean"] + [report.radius_label(r) for r in recipe.radii]
    per_setting = {}
    for setting in LOSS_SETTINGS:
      runs = []
      for seed in config.seeds:
        trained = trainer.fit(recipe, setting, seed=seed, workdir=workdir)
        cert = trainer.certify(trained.model, recipe)
        done += 1
        runs.append({"seed": seed, "accuracy": [cert.clean_accuracy, *cert.cra],
                     "train_seconds": trained.seconds})
        trainer.log(f"[{NAME} {done}/{total}] {recipe.dataset} {setting.name} seed {seed}: "
                    f"{recipe.epochs} epochs in {trained.seconds:.1f} s, clean "
                    f"{report.pct(cert.clean_accuracy)}%, CRA "
                    + " / ".join(report.pct(c) for c in cert.cra) + "%; "
                    + trainer.eta(start, done, total))
      stats = [report.mean_spread([r["accuracy"][i] for r in runs])
               for i in range(len(columns))]
      per_setting[setting.name] = {"runs": runs, "mean": [m for m, _ in stats],
                                   "spread": [s for _, s in stats]}
    orders = []
    for i, column in enumerate(columns):
      means = {k: v["mean"][i] for k, v in per_setting.items()}
      spreads = {k: v["spread"][i] for k, v in per_setting.items()}
      paper = None
      if i < len(PAPER_RADII) + 1 and (i == 0 or recipe.radii[i - 1] == PAPER_RADII[i - 1]):
        paper = ordering({k: v[i] for k, v in PAPER_OFFSET_TEMPERATURE.items()})
      ours = ordering(means)
      orders.append({"column": column, "paper": paper, "ours": ours,
                     "matches_paper": None if paper is None else ours == paper,
                     "separated": separated(means, spreads) if len(config.seeds) > 1 else None})
    results["datasets"][recipe.dataset] = {"columns": columns, "radii": list(recipe.radii),
                                           "epochs": recipe.epochs,
                                           "settings": per_setting, "ordering": orders}
  return report.publish(workdir, NAME, results, markdown, plot)


def markdown(results: dict) -> str:
  """The tables: paper figures, ours per dataset (mean ± sample std over seeds), orderings."""
  seeds = len(results["seeds"])
  out = [f"### Offset / temperature trade-off ({results['config']} run, {seeds} seed(s))", "",
         "Paper, AOL-Small on CIFAR-10 (%):", ""]
  header = ["setting", "clean"] + [report.radius_label(r) for r in PAPER_RADII]
  out.append(report.markdown_table(header, [
      [f"{SHORT[k]}: {k}"] + [f"{v:.1f}" for v in values]
      for k, values in PAPER_OFFSET_TEMPERATURE.items()]))
  for dataset, d in results["datasets"].items():
    out += ["", f"Ours, {dataset} ({d['epochs']} epochs; mean ± std over {seeds} seed(s), %):",
            ""]
    rows = [[f"{SHORT[k]}: {k}"] + [report.pct(m, s) for m, s in zip(v["mean"], v["spread"])]
            for k, v in d["settings"].items()]
    out.append(report.markdown_table(["setting"] + d["columns"], rows))
    out += ["", f"Ordering of the means, {dataset} (S/M/L = small/paper's/large offset; "
            "'separated': every gap exceeds the sum of the two spreads):", ""]
    rows = [[o["column"], o["paper"] or "n/a", o["ours"],
             {None: "n/a", True: "yes", False: "no"}[o["matches_paper"]],
             {None: "n/a", True: "yes", False: "no"}[o["separated"]]] for o in d["ordering"]]
    out.append(report.markdown_table(["column", "paper", "ours", "same as paper", "separated"],
                                     rows))
  return "\n".join(out) + "\n"


def plot(results: dict, path: str) -> None:
  """Accuracy against radius (radius 0: clean) per setting, one panel per dataset and one
  with the paper's CIFAR-10 figures."""
  datasets = results["datasets"]
  fig, axes = report.figure(len(datasets) + 1)
  for ax, (dataset, d) in zip(axes, datasets.items()):
    x = [0.0] + d["radii"]
    for k, v in d["settings"].items():
      ax.errorbar(x, [100 * m for m in v["mean"]], yerr=[100 * s for s in v["spread"]],
                  marker="o", capsize=3, label=f"{SHORT[k]}: {k}")
    ax.set(title=f"{dataset} (ours)", xlabel="l2 radius (0 = clean)", ylabel="accuracy (%)",
           ylim=(0, 100))
  ax = axes[-1]
  for k, values in PAPER_OFFSET_TEMPERATURE.items():
    ax.plot([0.0, *PAPER_RADII], values, "o--", label=f"{SHORT[k]}: {k}")
  ax.set(title="AOL-Small, CIFAR-10 (paper)", xlabel="l2 radius (0 = clean)",
         ylabel="accuracy (%)", ylim=(0, 100))
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  report.save_figure(fig, path)
