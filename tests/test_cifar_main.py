"""The entry point ``python -m experiments.cifar`` end to end on a generated CIFAR-10 archive,
through the real tfds builder, and its error messages."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading

import matplotlib.image
import numpy as np
import pytest

from aol_jax import training
from support.cifar_archive import accept_archive, write_cifar10_archive
from experiments.cifar import configs, train
from experiments.cifar.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(tmp_path, *extra):
  return ["--accelerator=cpu", "--preset=tiny", f"--data_dir={tmp_path / 'data'}",
          f"--manual_dir={tmp_path / 'manual'}", f"--workdir={tmp_path / 'work'}", *extra]


def _checkpoint_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


@pytest.fixture
def archive(tmp_path, monkeypatch):
  path, _ = write_cifar10_archive(str(tmp_path / "manual"), per_file=8)
  accept_archive(monkeypatch, path)
  return path


def test_end_to_end_writes_metrics_results_plots_and_checkpoints(tmp_path, archive, capsys):
  out = main(_flags(tmp_path))
  work = tmp_path / "work"
  # 40 training images, batch 8: 5 steps per epoch, 3 epochs.
  history = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in history] == [1, 2, 3] and [r["step"] for r in history] == [5, 10, 15]
  for r in history:
    assert np.isfinite([r["train_loss"], r["train_accuracy"], r["test_accuracy"]]).all()
    assert 0 <= r["test_cra_36"] <= r["test_accuracy"] <= 1
  assert history == out["history"]
  assert _checkpoint_steps(work) == [10, 15]  # max_to_keep=2
  # One plain line per evaluation on the console; no progress bar off a terminal.
  console = capsys.readouterr()
  lines = [l for l in console.out.splitlines() if l.startswith("epoch ")]
  assert [l.split()[1] for l in lines] == ["1/3", "2/3", "3/3"]
  assert all("CRA(36/255)" in l and "ETA" in l for l in lines)
  assert "/3:" not in console.err and "step/s" not in console.err  # (tfds' own bars may show)

  table = (work / "results.md").read_text()
  assert "| model | n | clean | 36/255 | 72/255 | 108/255 | 1 |" in table
  row = next(line for line in table.splitlines() if line.startswith("| aol_small"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[1] == "8"  # the whole test set
  results = json.loads((work / "results.json").read_text())
  assert results["rounding"] == "float32_statistical"  # the mode is named in both files
  assert "probabilistic rounding allowance included" in table
  assert list(results["cra"]) == ["36/255", "72/255", "108/255", "1"]
  assert results["mode"] == "train" and results["step"] == 15
  # The certificate of metrics.jsonl is the one of results.json (the same certify path).
  assert history[-1]["test_cra_36"] == results["cra"]["36/255"]
  assert history[-1]["test_accuracy"] == results["clean_accuracy"]
  want = [results["clean_accuracy"]] + list(results["cra"].values())
  assert [float(c) for c in cells[2:]] == pytest.approx([100 * v for v in want], abs=0.051)
  assert all(a >= b for a, b in zip(want, want[1:]))  # CRA cannot grow with the radius

  for name in ("training_curves.png", "certified_accuracy.png"):
    image = matplotlib.image.imread(str(work / name))
    assert image.ndim == 3 and min(image.shape[:2]) > 100
  assert not [n for n in os.listdir(work) if n.endswith(".tmp")]


def test_stop_request_checkpoints_and_a_non_finite_loss_keeps_that_checkpoint(
    tmp_path, archive, monkeypatch):
  config = configs.get_config("tiny", data_dir=str(tmp_path / "data"),
                              manual_dir=str(tmp_path / "manual"), epochs=4,
                              checkpoint_every=100)
  work = str(tmp_path / "work")
  # A SIGTERM / Ctrl-C (as the handler records it) stops after the epoch, with a checkpoint.
  monkeypatch.setattr(train._StopRequest, "agreed", lambda self: True)
  assert train.train_and_evaluate(config, work)["stopped"]
  assert _checkpoint_steps(work) == [5]
  assert not os.path.exists(os.path.join(work, "results.md"))
  lines = open(os.path.join(work, "metrics.jsonl")).read()
  monkeypatch.undo()
  # Resume with an absurd learning rate: step 6's update overflows the parameters, so the
  # loss of step 7 is NaN.
  with pytest.raises(training.NonFiniteLossError) as err:
    train.train_and_evaluate(dataclasses.replace(config, learning_rate=1e30), work)
  assert "Non-finite training loss at step 7" in str(err.value)
  assert "last good checkpoint, step 5" in str(err.value)
  assert _checkpoint_steps(work) == [5]
  assert open(os.path.join(work, "metrics.jsonl")).read() == lines
  # The same workdir refuses a checkpoint of differently shaped parameters.
  wider = {"width": 8, "channels": 16, "conv_depth": 1, "dense_depth": 2}
  with pytest.raises(configs.ConfigError) as err:
    train.train_and_evaluate(dataclasses.replace(config, model_kwargs=wider), work)
  assert str(err.value) == (
      f"The checkpoints in {work}/checkpoints were made with a different model_kwargs "
      f"(model_kwargs={config.model_kwargs!r}); use a new --workdir or the same settings.")
  assert _checkpoint_steps(work) == [5]


def test_resuming_refuses_another_dataset_even_when_the_shapes_agree(capsys):
  saved = dataclasses.asdict(configs.get_config("tiny"))
  # CIFAR-100 changes only FirstChannels(num_classes): the parameters would load silently.
  with pytest.raises(configs.ConfigError, match="different dataset"):
    train.check_resumable(saved, configs.get_config("tiny", dataset="cifar100"), "/w")
  train.check_resumable(saved, configs.get_config("tiny", epochs=5, data_dir="/elsewhere",
                                                  rounding="float64"), "/w")
  assert capsys.readouterr().out.splitlines() == [
      "Note: resuming with changed epochs; the run is no longer identical to an "
      "uninterrupted one."]


def test_signal_handler_records_the_request_and_restores_the_previous_handler():
  previous = signal.getsignal(signal.SIGTERM)
  stop = train._StopRequest()
  if threading.current_thread() is threading.main_thread():
    assert signal.getsignal(signal.SIGTERM) == stop._handle
  assert not stop.agreed()
  stop._handle(signal.SIGTERM, None)
  assert stop.requested and stop.agreed()
  assert signal.getsignal(signal.SIGTERM) == previous


@pytest.mark.parametrize("flags,expected", [
    (["--batch_size=12"], "--batch_size=12: batch_size 12 is not divisible by the 8 devices"),
    (["--config.batch_size=12"], "pass --config.batch_size = a multiple of 8, e.g. 8 or 16"),
    (["--model=aol_tiny"], "--model='aol_tiny': Unknown model 'aol_tiny'"),
    (["--dataset=mnist"], "--dataset='mnist': Unknown dataset 'mnist'"),
    (["--dataset=cifar100", "--download=false"], "cifar-100-binary.tar.gz"),
    (["--epochs=0"], "--epochs=0: must be >= 1, got 0"),
    (["--epochs=-3"], "--epochs=-3: must be >= 1, got -3"),
    (["--batch_size=0"], "--batch_size=0: must be >= 1, got 0"),
    (["--config.eval_batch_size=0"], "--config.eval_batch_size=0: must be >= 1"),
    (["--config.learning_rate=-1"], "--config.learning_rate=-1.0: must be a finite number > 0"),
    (["--config.num_devices=16"], "--config.num_devices=16: asks for 16 devices but 8 exist"),
    (["--config.model_kwargs.width=0"], "--config.model_kwargs={"),
    (["--config.model_kwargs.depth=3"], "Cannot build aol_small with {'width': 4, 'channels': 16, "
                                        "'conv_depth': 1, 'dense_depth': 2, 'depth': 3}"),
    (["--config.epochs=x"], "flag --config.epochs=x: invalid literal for int()"),
    (["--config.epochs=2.5"], "flag --config.epochs=2.5"),
    (["--config.augment=maybe"], "flag --config.augment=maybe: ('Non-boolean argument"),
    (["--config.epoch=3"], "unknown config field (Field epoch not found"),
    (["--epoch=3"], "Unknown command line flag 'epoch'"),
    (["--config=/missing/config.py"], "--config=/missing/config.py: no such file; pass a "),
    (["--mode=fit"], "flag --mode=fit: value should be one of <train|certify|export>"),
    (["--mode=export", "--rounding=float64"],
     "--rounding='float64': an exported model certifies its own float32 forward pass"),
    (["--config.gram_precision=fp8"], "--config.gram_precision='fp8': must be one of default,"),
    (["--preset=fast"], "--preset=fast: unknown preset; choose one of paper, digits"),
    (["--config=experiments/cifar/configs/paper.py"], "--preset and --config both"),
    (["--epochs=3", "--config.epochs=4"], "--epochs and --config.epochs both set epochs"),
])
def test_bad_inputs_stop_with_a_one_line_message_naming_the_flag(tmp_path, flags, expected):
  with pytest.raises(SystemExit) as err:
    main(_flags(tmp_path, *flags))
  message = str(err.value)
  assert message.startswith("error: ") and "\n" not in message
  assert expected in message


def _unwritable(tmp_path) -> str:
  """A directory this process cannot write into (as root, chmod does not stop it: /sys)."""
  if os.geteuid() == 0:
    return "/sys/aol_jax_workdir"
  (tmp_path / "ro").mkdir(mode=0o500)
  return str(tmp_path / "ro" / "wd")


@pytest.mark.parametrize("where,expected", [
    ("file", "names the file {tmp}/file, not a directory"),
    ("under_file", "lies under the file {tmp}/file, not a directory"),
    ("proc", "cannot be created (the file system has no such place)"),
    ("unwritable", "no permission to write there"),
])
def test_a_workdir_that_cannot_be_written_is_refused_before_anything_runs(
    tmp_path, where, expected):
  (tmp_path / "file").write_text("x")
  workdir = {"file": str(tmp_path / "file"), "under_file": str(tmp_path / "file" / "wd"),
             "proc": "/proc/aol_jax_workdir", "unwritable": _unwritable(tmp_path)}[where]
  with pytest.raises(SystemExit) as err:
    main([*_flags(tmp_path)[:-1], f"--workdir={workdir}"])
  assert str(err.value) == (f"error: --workdir={workdir}: {expected.format(tmp=tmp_path)}; "
                            f"pass a directory this process can write.")
  assert not (tmp_path / "data").exists()  # nothing was read or prepared


def test_a_bad_flag_prints_one_line_and_no_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.cifar", "--accelerator=cpu",
                         "--preset=tiny", "--epochs=0", f"--workdir={tmp_path / 'w'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip() == "error: --epochs=0: must be >= 1, got 0."
  assert not (tmp_path / "w").exists()


def test_every_config_field_can_be_set_on_the_command_line():
  from experiments.cifar.flags import parse_flags
  base = configs.get_config("paper")
  new = {"dataset": "cifar100", "data_dir": "gs://b/data", "manual_dir": "/m",
         "download": False, "model": "aol_large", "epochs": 7, "batch_size": 64,
         "learning_rate": 0.5, "momentum": 0.5, "nesterov": False, "weight_decay": 0.0,
         "loss_offset": 1.0, "loss_temperature": 0.5, "augment": False, "seed": 9,
         "num_devices": 2, "checkpoint_every": 3, "max_to_keep": 5, "eval_every": 4,
         "eval_batch_size": 333, "log_every": 2, "mode": "certify", "rounding": "float64",
         "gram_precision": "bfloat16"}
  fields = {f.name for f in dataclasses.fields(configs.Config)}
  assert set(new) | {"model_kwargs"} == fields
  assert all(new[k] != getattr(base, k) for k in new)
  argv = ["--accelerator=cpu", "--workdir=/w", "--config=experiments/cifar/configs/tiny.py",
          *[f"--config.{k}={v}" for k, v in new.items()], "--config.model_kwargs.width=6"]
  _, config, set_by = parse_flags(argv)
  assert {k: getattr(config, k) for k in new} == new
  assert config.model_kwargs == {**configs.get_config("tiny").model_kwargs, "width": 6}
  _, paper, _ = parse_flags(["--accelerator=tpu", "--workdir=/w", "--preset=paper",
                             "--config.model_kwargs.width=32", "--config.model_kwargs.pool=4"])
  assert paper.model_kwargs == {"width": 32, "pool": 4}  # keys the preset does not list
  assert set_by["eval_batch_size"] == "--config.eval_batch_size"
  # The short flags of earlier versions set the same fields.
  _, short, set_by = parse_flags(["--accelerator=cpu", "--workdir=/w", "--preset=digits",
                                  "--epochs=3", "--nodownload", "--learning_rate=0.25",
                                  "--mode=export", "--rounding=float64"])
  assert (short.epochs, short.download, short.learning_rate) == (3, False, 0.25)
  assert (short.mode, short.rounding) == ("export", "float64")
  assert short.dataset == "digits" and set_by["epochs"] == "--epochs"


def test_tiny_run_on_1_2_4_8_devices_with_an_eval_batch_they_do_not_divide(tmp_path, archive):
  records = {}
  for n in (1, 2, 4, 8):
    # eval batch 3 is padded to 4 or 8 rows on 4 or 8 devices; the 8 test images fill it.
    out = main([*_flags(tmp_path)[:-1], f"--workdir={tmp_path / str(n)}", "--epochs=1",
                f"--config.num_devices={n}", "--config.eval_batch_size=3",
                "--config.augment=false"])  # (cheaper to compile)
    (records[n],) = out["history"]
    results = json.loads((tmp_path / str(n) / "results.json").read_text())
    assert results["num_examples"] == 8 and records[n]["step"] == 5
  # The same global batches on any device count: the same loss, accuracies and CRA.
  for n in (2, 4, 8):
    for key in ("train_loss", "train_accuracy", "test_accuracy", "test_cra_36"):
      assert records[n][key] == pytest.approx(records[1][key], rel=1e-4, abs=1e-6), (n, key)


@pytest.mark.parametrize("preset,flags", [
    ("paper", {"batch_size": 256}), ("digits", {}), ("tiny", {}), ("mnist5k", {})])
def test_every_preset_validates_on_8_devices(tmp_path, preset, flags):
  # paper needs --batch_size=256 on 8 devices (250 does not divide), as the README says.
  config = configs.get_config(preset, **flags)
  train.validate(config, str(tmp_path / "work"))
  if preset == "paper":
    with pytest.raises(configs.ConfigError, match="batch_size 250 is not divisible by the 8"):
      train.validate(configs.get_config(preset), str(tmp_path / "work"))


def test_help_lists_every_config_field(capsys):
  with pytest.raises(SystemExit) as err:
    main(["--help"])
  assert err.value.code == 0
  printed = capsys.readouterr().out
  for field in dataclasses.fields(configs.Config):
    assert f"--config.{field.name}: " in printed


def test_gram_precision_is_set_on_every_aol_layer():
  import aol_jax
  from flax import nnx
  config = configs.get_config("tiny", gram_precision="bfloat16")
  model = train.build_model(config, 10, (32, 32, 3))
  layers = [m for _, m in nnx.iter_modules(model)
            if isinstance(m, (aol_jax.AOLDense, aol_jax.AOLConv))]
  assert len(layers) >= 4 and {m.gram_precision for m in layers} == {"bfloat16"}
