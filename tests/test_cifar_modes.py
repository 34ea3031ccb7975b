"""``--mode=certify`` re-certifies a trained workdir without training, ``--mode=export`` says
that it is not available yet, and ``experiments.load`` gives the trained model back."""

import json
import os

import numpy as np
import pytest

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
  again = main([*flags, "--mode=certify", "--rounding=worst_case"])
  results = json.loads((work / "results.json").read_text())
  assert (results["mode"], results["rounding"], results["step"]) == ("certify", "worst_case", 5)
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


def test_export_mode_is_not_available_yet_and_writes_nothing(trained):
  tmp, flags, _ = trained
  with pytest.raises(SystemExit) as err:
    main([*flags, "--mode=export"])
  assert str(err.value) == (
      "error: --mode='export': exporting the certified model is not available yet (it needs "
      "aol_jax.export_certified); use --mode=certify for the certificate.")
  assert not os.path.exists(tmp / "work" / "export")


def test_load_gives_the_trained_model_and_its_config(trained):
  tmp, _, out = trained
  model, config = experiments.load(str(tmp / "work"))
  assert (config.model, config.epochs, config.augment) == ("aol_small", 1, False)
  data = input_pipeline.load("cifar10", data_dir=str(tmp / "data"), download=False)
  predicted = np.asarray(model(data.test_inputs())).argmax(-1)
  assert np.mean(predicted == data.test_labels) == pytest.approx(out["clean_accuracy"])
