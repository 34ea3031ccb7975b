"""``--mode=certify`` re-certifies a trained workdir without training, ``--mode=export`` writes
its portable certified model, and ``experiments.load`` gives the trained model back."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import aol_jax

import experiments
from experiments.cifar import configs
from experiments.common import input_pipeline
from support.cifar_archive import prepare_cifar10
from support.runs import history, results, run_cifar


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("modes")
  prepare_cifar10(tmp)
  flags = ["--accelerator=cpu", "--preset=tiny", "--epochs=1", "--config.augment=false",
           f"--data_dir={tmp / 'data'}", f"--workdir={tmp / 'work'}"]
  assert run_cifar(flags) == 0
  return tmp, flags, results(str(tmp / "work"))


def _files(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_certify_mode_recertifies_the_checkpoint_without_training(trained):
  tmp, flags, out = trained
  work = tmp / "work"
  before = _files(work)
  records = history(str(work))
  other = next(r for r in configs.ROUNDINGS if r != out["rounding"])
  assert run_cifar([*flags, "--mode", "certify", "--rounding", other]) == 0
  again = results(str(work))
  assert (again["mode"], again["rounding"], again["step"]) == ("certify", other, 5)
  assert list(again["cra"]) == ["36/255", "72/255", "108/255", "1"]
  assert again["clean_accuracy"] == out["clean_accuracy"]  # the same trained model
  assert history(str(work)) == records
  table = (work / "results.md").read_text()
  assert "re-certified from its checkpoint (--mode=certify)" in table
  assert f"{other} rounding allowance included" in table
  after = _files(work)
  unchanged = [k for k in before if k.startswith("checkpoints/") or k == "metrics.jsonl"]
  assert unchanged and all(after[k] == before[k] for k in unchanged)  # nothing trained


@pytest.mark.parametrize("mode", ["certify", "export"])
@pytest.mark.parametrize("where", ["missing", "empty"])
def test_certify_and_export_on_a_workdir_without_checkpoints_say_so_and_create_nothing(
    trained, tmp_path, mode, where):
  _, flags, _ = trained
  workdir = tmp_path / "w"
  if where == "empty":
    workdir.mkdir()
  with pytest.raises(SystemExit) as err:
    run_cifar([*flags[:-1], f"--workdir={workdir}", f"--mode={mode}"])
  assert str(err.value) == (f"error: --mode={mode}: {workdir} holds no checkpoint; train "
                            f"first (--mode=train).")
  assert sorted(os.listdir(tmp_path)) == (["w"] if where == "empty" else [])
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_export_mode_writes_the_certified_model_that_certified_radii_describes(trained,
                                                                              capsys):
  tmp, flags, certified = trained
  assert run_cifar([*flags, "--mode=export"]) == 0
  export_dir = tmp / "work" / "export"
  printed = capsys.readouterr().out
  assert f"Wrote {export_dir / 'model.jaxexport'} and model.jaxexport.json beside it" in printed
  assert sorted(p.name for p in export_dir.iterdir()) == ["model.jaxexport",
                                                           "model.jaxexport.json"]
  description = json.loads((export_dir / "model.jaxexport.json").read_text())
  assert (description["rounding"], description["num_classes"]) == (configs.Config().rounding, 10)
  assert description["inputs"]["shape"] == ["n", 32, 32, 3]
  # What the runner records about the model (issue 22): scaling, data, classes, accuracy.
  model_facts = description["model"]
  assert model_facts["input_scaling"] == 255
  assert description["inputs"]["dtype"] == "uint8"  # the stored pixels, scaled inside
  assert model_facts["dataset"] == "cifar10" and model_facts["model"] == "aol_small"
  assert model_facts["checkpoint_step"] == 5 and model_facts["epoch"] == 1
  assert model_facts["class_names"][:2] == ["airplane", "automobile"]
  assert len(model_facts["class_names"]) == 10
  assert model_facts["clean_accuracy"] == certified["clean_accuracy"]
  assert model_facts["cra"] == certified["cra"]
  model, _ = experiments.load(str(tmp / "work"))
  data = input_pipeline.load("cifar10", data_dir=str(tmp / "data"), download=False)
  pixels = data.test_images[:5]  # uint8, not the export's batch
  call = jax.export.deserialize((export_dir / "model.jaxexport").read_bytes()).call
  predictions, radii = call(pixels)
  # The artifact certifies the exact image pixels / 255 (certified_radii the float64 one).
  want_pred, want_radii = aol_jax.certified_radii(model, pixels.astype(np.float64) / 255,
                                                  batch_size=8)
  np.testing.assert_array_equal(predictions, want_pred)
  np.testing.assert_allclose(radii, want_radii, rtol=1e-3, atol=1e-6)
  assert description["lipschitz_bound"] > 0


def test_export_mode_refuses_a_mode_that_does_not_certify_float32_and_writes_nothing(
    trained, tmp_path):
  tmp, flags, _ = trained
  workdir = tmp_path / "copy"
  shutil.copytree(tmp / "work", workdir, ignore=shutil.ignore_patterns("export"))
  with pytest.raises(SystemExit) as err:
    run_cifar([*flags[:-1], f"--workdir={workdir}", "--mode=export", "--rounding=float64"])
  assert str(err.value).startswith("error: --rounding=float64: 'float64' cannot be exported")
  assert str(err.value).endswith("use one of float32, float32_statistical.")
  assert "\n" not in str(err.value)
  assert not (workdir / "export").exists()


def test_load_gives_the_trained_model_and_its_config(trained):
  tmp, _, out = trained
  model, config = experiments.load(str(tmp / "work"))
  assert (config.model, config.epochs, config.augment) == ("aol_small", 1, False)
  data = input_pipeline.load("cifar10", data_dir=str(tmp / "data"), download=False)
  predicted = np.asarray(model(data.test_inputs())).argmax(-1)
  assert np.mean(predicted == data.test_labels) == pytest.approx(out["clean_accuracy"])
