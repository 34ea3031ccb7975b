"""experiments.cifar.configs: every preset sets every field, each with a comment."""

import dataclasses
import inspect
import re

import pytest

from experiments.cifar import configs


@pytest.mark.parametrize("preset", configs.PRESETS)
def test_preset_sets_every_field_with_one_comment(preset):
  module = __import__(f"experiments.cifar.configs.{preset}", fromlist=["get_config"])
  source = inspect.getsource(module.get_config)
  fields = {f.name for f in dataclasses.fields(configs.Config)}
  set_here = dict(re.findall(r"^\s+(\w+)=.*#\s*(\S.*)$", source, re.M))
  assert set(set_here) == fields
  assert isinstance(module.get_config(), configs.Config)


def test_overrides_apply_and_none_keeps_the_preset_value():
  config = configs.get_config("paper", epochs=3, learning_rate=None, dataset="cifar100")
  assert (config.epochs, config.learning_rate, config.dataset) == (3, 1e-3, "cifar100")


def test_paper_preset_is_the_papers_recipe():
  c = configs.get_config("paper")
  assert (c.dataset, c.model, c.model_kwargs, c.epochs, c.batch_size) == (
      "cifar10", "aol_small", {}, 1000, 250)
  assert (c.learning_rate, c.momentum, c.nesterov, c.weight_decay) == (1e-3, 0.9, True, 5e-4)
  assert (round(c.loss_offset ** 2, 12), c.loss_temperature, c.augment) == (2.0, 0.25, True)


@pytest.mark.parametrize("preset,fields,match", [
    ("fast", {}, "Unknown preset 'fast'"),
    ("tiny", {"epoch": 3}, "Unknown config fields"),
])
def test_bad_presets_and_fields_are_refused(preset, fields, match):
  with pytest.raises(configs.ConfigError, match=match):
    configs.get_config(preset, **fields)
