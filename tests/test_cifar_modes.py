"""``--mode=certify`` re-certifies a trained workdir without training, ``--mode=export`` writes
its portable certified model, and ``experiments.load`` gives the trained model back."""

import json
import os

import jax
import numpy as np
import pytest

import aol_jax

import experiments
from experiments.cifar.main import main
from experiments.common import input_pipeline
from support.cifar_archive import accept_archive, write_cifar10_archive


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("modes")
  archive, _ = write_cifar10_archive(str(tmp / "manual"), per_file=8)
  with pytest.MonkeyPatch.context() as mp:
    accept_archive(mp, archive)
    input_pipeline.prepare_tfds("cifar10", data_dir=str(tmp / "data"),
                                manual_dir=str(tmp / "manual"), download=False)
  flags = ["--accelerator=cpu", "--preset=tiny", "--epochs=1", "--config.augment=false",
           f"--data_dir={tmp / 'data'}", f"--workdir={tmp / 'work'}"]
  out = main(flags)
  return tmp, flags, out


def _files(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_certify_mode_recertifies_the_checkpoint_without_training(trained):
  tmp, flags, out = trained
  work = tmp / "work"
  before = _files(work)
  again = main([*flags, "--mode=certify", "--rounding=float64"])
  results = json.loads((work / "results.json").read_text())
  assert (results["mode"], results["rounding"], results["step"]) == ("certify", "float64", 5)
  assert list(results["cra"]) == ["36/255", "72/255", "108/255", "1"]
  assert results["clean_accuracy"] == out["clean_accuracy"]  # the same trained model
  assert again["history"] == out["history"]
  table = (work / "results.md").read_text()
  assert "re-certified from its checkpoint (--mode=certify)" in table
  assert "worst_case rounding allowance included" in table
  after = _files(work)
  unchanged = [k for k in before if k.startswith("checkpoints/") or k == "metrics.jsonl"]
  assert unchanged and all(after[k] == before[k] for k in unchanged)  # nothing trained


def test_certify_mode_on_a_workdir_without_checkpoints_says_so(trained, tmp_path):
  _, flags, _ = trained
  with pytest.raises(SystemExit) as err:
    main([*flags[:-1], f"--workdir={tmp_path / 'empty'}", "--mode=certify"])
  assert str(err.value) == (f"error: --mode=certify: {tmp_path / 'empty' / 'checkpoints'} "
                            f"holds no checkpoint; train first (--mode=train).")


def test_export_mode_writes_the_certified_model_that_certified_radii_describes(trained):
  tmp, flags, _ = trained
  out = main([*flags, "--mode=export"])
  export_dir = tmp / "work" / "export"
  assert out == {"export": str(export_dir / "model.jaxexport")}
  assert sorted(p.name for p in export_dir.iterdir()) == ["model.jaxexport",
                                                           "model.jaxexport.json"]
  description = json.loads((export_dir / "model.jaxexport.json").read_text())
  assert (description["rounding"], description["num_classes"]) == ("float32_statistical", 10)
  assert description["inputs"]["shape"] == ["n", 32, 32, 3]
  model, _ = experiments.load(str(tmp / "work"))
  images = input_pipeline.load("cifar10", data_dir=str(tmp / "data"),
                               download=False).test_inputs()[:5]  # not the export's batch
  call = jax.export.deserialize((export_dir / "model.jaxexport").read_bytes()).call
  predictions, radii = call(images)
  want_pred, want_radii = aol_jax.certified_radii(model, images, batch_size=8)
  np.testing.assert_array_equal(predictions, want_pred)
  # float64 radii rounded up to float32 by the artifact.
  np.testing.assert_allclose(radii, want_radii, rtol=1e-4)
  assert description["lipschitz_bound"] > 0


def test_export_mode_refuses_the_worst_case_rounding_and_writes_nothing(trained, tmp_path):
  _, flags, _ = trained
  with pytest.raises(SystemExit) as err:
    main([*flags[:-1], f"--workdir={tmp_path / 'w'}", "--mode=export", "--rounding=float64"])
  assert str(err.value).startswith("error: --rounding='float64': an exported model "
                                   "certifies its own float32 forward pass")
  assert not os.path.exists(tmp_path / "w" / "export")


def test_load_gives_the_trained_model_and_its_config(trained):
  tmp, _, out = trained
  model, config = experiments.load(str(tmp / "work"))
  assert (config.model, config.epochs, config.augment) == ("aol_small", 1, False)
  data = input_pipeline.load("cifar10", data_dir=str(tmp / "data"), download=False)
  predicted = np.asarray(model(data.test_inputs())).argmax(-1)
  assert np.mean(predicted == data.test_labels) == pytest.approx(out["clean_accuracy"])
