"""The entry point with its workdir in a bucket (``gs://``), against a real GCS-protocol
server on localhost (``gcp-storage-emulator``): every file of a run lands there, and a
corrupt newest checkpoint in the bucket is named, moved aside and skipped."""

import io
import json

import matplotlib.image
import numpy as np
import pytest
from etils import epath

from support.cifar_archive import accept_archive, write_cifar10_archive
from support.runs import history, listing, run_cifar, tensorboard_scalars
from support.servers import (BUCKET, forbidding_gcs_server, gcs_clients_in_this_process,
                             gcs_emulator)


@pytest.fixture(scope="module")
def gcs():
  with gcs_emulator() as env, gcs_clients_in_this_process(env):
    yield env


@pytest.fixture
def archive(tmp_path, monkeypatch):
  path, _ = write_cifar10_archive(str(tmp_path / "manual"), per_file=8)
  accept_archive(monkeypatch, path)
  return path


def _steps(root: epath.Path) -> list[int]:
  return sorted(int(p.name) for p in (root / "checkpoints").iterdir() if p.name.isdigit())


def test_a_run_in_a_bucket_writes_everything_there_and_skips_a_corrupt_checkpoint(
    tmp_path, archive, gcs, capsys):
  work = f"gs://{BUCKET}/run"
  flags = ["--accelerator=cpu", "--preset=tiny", f"--data_dir={tmp_path / 'data'}",
           f"--manual_dir={tmp_path / 'manual'}", f"--workdir={work}"]
  assert run_cifar(flags) == 0
  root = epath.Path(work)
  assert listing(work) == {
      "checkpoints", "metrics.jsonl", "results.md", "results.json", "training_curves.png",
      "certified_accuracy.png", "events.out.tfevents.*"}  # and nothing half-written
  records = history(work)
  assert [r["step"] for r in records] == [5, 10, 15]
  results = json.loads((root / "results.json").read_text())
  assert results["num_examples"] == 8 and results["clean_accuracy"] == records[-1][
      "test_accuracy"]
  # The TensorBoard events landed in the bucket, whole: TensorBoard's reader finds them.
  scalars = tensorboard_scalars(work)
  assert [s for s, _ in scalars["eval/cra_36_255"]] == [5, 10, 15]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]],
                             [r["train_loss"] for r in records], rtol=1e-6)
  table = (root / "results.md").read_text()
  assert "| model | n | clean | 36/255 | 72/255 | 108/255 | 1 |" in table
  for name in ("training_curves.png", "certified_accuracy.png"):
    image = matplotlib.image.imread(io.BytesIO((root / name).read_bytes()), format="png")
    assert image.ndim == 3 and min(image.shape[:2]) > 100
  assert _steps(root) == [10, 15]  # max_to_keep=2, each committed with orbax's marker
  assert all((root / "checkpoints" / s / "commit_success.txt").exists() for s in ("10", "15"))

  # Garble every array file of the newest checkpoint, in the bucket.
  garbled = 0
  for path in (root / "checkpoints" / "15" / "state").iterdir():
    if path.is_dir():
      for f in path.iterdir():
        if not f.is_dir():
          f.write_bytes(np.random.default_rng(0).bytes(len(f.read_bytes())))
          garbled += 1
  assert garbled
  capsys.readouterr()
  assert run_cifar([*flags, "--epochs=4"]) == 0
  again = history(work)
  printed = capsys.readouterr().out
  assert f"checkpoint {work}/checkpoints/15 is corrupt" in printed
  assert "at step 10 (epoch 2)" in printed
  assert (root / "checkpoints" / "corrupt" / "15" / "commit_success.txt").exists()
  assert [r["epoch"] for r in again] == [1, 2, 3, 4]
  assert again[:2] == records[:2]
  # The resumed run told TensorBoard to drop what came after step 10: one point per epoch.
  assert [s for s, _ in tensorboard_scalars(work)["train/loss"]] == [5, 10, 15, 20]
  assert _steps(root) == [15, 20]  # epoch 3 retrained and saved again, then epoch 4


def _refusal(tmp_path, workdir) -> str:
  with pytest.raises(SystemExit) as err:
    run_cifar(["--accelerator=cpu", "--preset=tiny", f"--data_dir={tmp_path / 'data'}",
               f"--workdir={workdir}"])
  assert not (tmp_path / "data").exists()  # refused before anything ran
  return str(err.value)


def test_a_missing_bucket_is_refused_before_anything_runs(tmp_path, gcs):
  assert _refusal(tmp_path, "gs://nobucket/run") == (
      "error: --workdir=gs://nobucket/run: the bucket nobucket does not exist; create it or "
      "fix the name; pass a directory this process can write.")


def test_a_bucket_without_permission_is_refused_before_anything_runs(tmp_path):
  with forbidding_gcs_server() as env, gcs_clients_in_this_process(env):
    assert _refusal(tmp_path, f"gs://{BUCKET}/run") == (
        f"error: --workdir=gs://{BUCKET}/run: no permission to write there; pass a directory "
        f"this process can write.")
