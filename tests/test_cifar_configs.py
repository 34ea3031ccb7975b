"""experiments.cifar.configs: the full presets set every field, each with a comment; the
derived ones change only what differs, each with a comment."""

import dataclasses
import inspect
import re

import pytest

import aol_jax
from experiments.cifar import configs
from support.configs import get_config


def _set_with_comment(preset):
  module = __import__(f"experiments.cifar.configs.{preset}", fromlist=["get_config"])
  source = inspect.getsource(module.get_config)
  return module, set(re.findall(r"^\s+(\w+)=.*#\s*(?:\S.*)$", source, re.M))


@pytest.mark.parametrize("preset", ["paper", "digits"])
def test_full_preset_sets_every_field_with_one_comment(preset):
  module, set_here = _set_with_comment(preset)
  assert set_here == {f.name for f in dataclasses.fields(configs.Config)}
  assert isinstance(module.get_config(), configs.Config)


@pytest.mark.parametrize("preset,base", [("tiny", "paper"), ("mnist5k", "digits")])
def test_derived_preset_sets_exactly_what_differs_from_its_base(preset, base):
  module, set_here = _set_with_comment(preset)
  derived, parent = get_config(preset), get_config(base)
  differs = {f.name for f in dataclasses.fields(configs.Config)
             if getattr(derived, f.name) != getattr(parent, f.name)}
  assert set_here == differs and differs
  # Derived, not copied: a change to the base shows in the derived preset.
  base_module = __import__(f"experiments.cifar.configs.{base}", fromlist=["get_config"])
  original = base_module.get_config
  try:
    base_module.get_config = lambda: dataclasses.replace(original(), weight_decay=0.125)
    assert module.get_config().weight_decay == 0.125
  finally:
    base_module.get_config = original


def test_the_modes_and_precisions_are_the_librarys_tables():
  assert configs.ROUNDINGS == tuple(aol_jax.ROUNDING_MODES)
  assert configs.GRAM_PRECISIONS == tuple(aol_jax.GRAM_PRECISIONS)
  for preset in configs.PRESETS:
    assert get_config(preset).rounding == aol_jax.certification.DEFAULT_ROUNDING


def test_paper_preset_is_the_papers_recipe():
  c = get_config("paper")
  assert (c.dataset, c.model, c.model_kwargs, c.epochs, c.batch_size) == (
      "cifar10", "aol_small", {}, 1000, 250)
  assert (c.learning_rate, c.momentum, c.nesterov, c.weight_decay) == (1e-3, 0.9, True, 5e-4)
  assert (round(c.loss_offset ** 2, 12), c.loss_temperature, c.augment) == (2.0, 0.25, True)


@pytest.mark.parametrize("field,value,match", [
    ("epochs", 0, "must be >= 1, got 0"),
    ("epochs", -3, "must be >= 1, got -3"),
    ("batch_size", 0, "must be >= 1, got 0"),
    ("learning_rate", float("nan"), "finite number > 0"),
    ("momentum", 1.0, r"in \[0, 1\)"),
    ("epochs", 2.5, "has type float"),
    ("augment", 1, "has type int"),
    ("mode", "fit", "must be one of train, certify, export, got 'fit'"),
    ("rounding", "exact", "must be one of " + ", ".join(aol_jax.ROUNDING_MODES)
     + ", got 'exact'"),
    ("gram_precision", "float16", "must be one of default, high, highest, bfloat16"),
])
def test_field_errors_name_the_field(field, value, match):
  config = dataclasses.replace(get_config("tiny"), **{field: value})
  errors = configs.field_errors(config)
  assert list(errors) == [field] and re.search(match, errors[field])


def test_the_presets_have_no_field_errors():
  for preset in configs.PRESETS:
    assert configs.field_errors(get_config(preset)) == {}
