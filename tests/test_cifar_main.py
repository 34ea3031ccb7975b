"""The entry point ``python -m experiments.cifar`` end to end on a generated CIFAR-10 archive,
through the real tfds builder: what it writes (TensorBoard events read back with
TensorBoard's reader), its console, and its error messages."""

import dataclasses
import importlib.util
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
from support.configs import get_config
from support.runs import history, listing, results, run_cifar, tensorboard_scalars
from experiments.cifar import configs, train
from experiments.cifar.main import PROGRAM
from experiments.common.command_line import UsageError

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


def test_end_to_end_writes_metrics_events_results_plots_and_checkpoints(tmp_path, archive,
                                                                         capsys):
  assert run_cifar(_flags(tmp_path)) == 0
  work = tmp_path / "work"
  # 40 training images, batch 8: 5 steps per epoch, 3 epochs.
  records = history(str(work))
  assert [r["epoch"] for r in records] == [1, 2, 3] and [r["step"] for r in records] == [5, 10, 15]
  for r in records:
    assert np.isfinite([r["train_loss"], r["train_accuracy"], r["test_accuracy"]]).all()
    assert 0 <= r["test_cra_36"] <= r["test_accuracy"] <= 1
    assert r["train_seconds"] > 0 and r["eval_seconds"] > 0
  assert _checkpoint_steps(work) == [10, 15]  # max_to_keep=2
  # One plain line per evaluation, training and evaluation seconds apart; no progress bar off
  # a terminal.
  console = capsys.readouterr()
  lines = [l for l in console.out.splitlines() if l.startswith("epoch ")]
  assert [l.split()[1] for l in lines] == ["1/3", "2/3", "3/3"]
  for line, r in zip(lines, records):
    assert f"  train {r['train_seconds']:.1f} s  eval {r['eval_seconds']:.1f} s  ETA" in line
    assert f"CRA(36/255) {r['test_cra_36']:.3f}" in line
  assert "/3:" not in console.err and "step/s" not in console.err  # (tfds' own bars may show)

  # TensorBoard's own reader finds every metric of metrics.jsonl at its step.
  scalars = tensorboard_scalars(str(work))
  tags = {"train/loss": "train_loss", "train/accuracy": "train_accuracy",
          "train/learning_rate": "learning_rate", "train/epoch_seconds": "train_seconds",
          "eval/accuracy": "test_accuracy", "eval/cra_36_255": "test_cra_36",
          "eval/seconds": "eval_seconds", "train/grad_norm": "train_grad_norm"}
  assert set(scalars) == set(tags)
  for tag, key in tags.items():
    assert [s for s, _ in scalars[tag]] == [5, 10, 15], tag
    np.testing.assert_allclose([v for _, v in scalars[tag]], [r[key] for r in records],
                               rtol=1e-6, err_msg=tag)  # stored as float32

  table = (work / "results.md").read_text()
  assert "| model | n | clean | 36/255 | 72/255 | 108/255 | 1 |" in table
  row = next(line for line in table.splitlines() if line.startswith("| aol_small"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[1] == "8"  # the whole test set
  out = results(str(work))
  assert out["rounding"] == configs.Config().rounding  # the library's default, named in both
  assert f"{out['rounding']} rounding allowance included" in table
  assert list(out["cra"]) == ["36/255", "72/255", "108/255", "1"]
  assert out["mode"] == "train" and out["step"] == 15
  # The certificate of metrics.jsonl is the one of results.json (the same certify path).
  assert records[-1]["test_cra_36"] == out["cra"]["36/255"]
  assert records[-1]["test_accuracy"] == out["clean_accuracy"]
  want = [out["clean_accuracy"]] + list(out["cra"].values())
  assert [float(c) for c in cells[2:]] == pytest.approx([100 * v for v in want], abs=0.051)
  assert all(a >= b for a, b in zip(want, want[1:]))  # CRA cannot grow with the radius

  for name in ("training_curves.png", "certified_accuracy.png"):
    image = matplotlib.image.imread(str(work / name))
    assert image.ndim == 3 and min(image.shape[:2]) > 100
  assert listing(str(work)) == {"checkpoints", "metrics.jsonl", "results.md", "results.json",
                                "training_curves.png", "certified_accuracy.png",
                                "events.out.tfevents.*"}  # nothing half-written beside them

  # A rerun of the finished workdir says so, trains nothing and certifies again.
  assert run_cifar(_flags(tmp_path)) == 0
  printed = capsys.readouterr().out
  assert printed.splitlines()[0] == (f"{work} holds a finished run (epoch 3/3, step 15): "
                                     f"certifying its last checkpoint.")
  assert "Resumed" not in printed and "epoch 3/3  step" not in printed
  assert history(str(work)) == records


def test_stop_request_checkpoints_and_a_non_finite_loss_keeps_that_checkpoint(
    tmp_path, archive, monkeypatch):
  config = get_config("tiny", data_dir=str(tmp_path / "data"),
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
  saved = dataclasses.asdict(get_config("tiny"))
  # CIFAR-100 changes only FirstChannels(num_classes): the parameters would load silently.
  with pytest.raises(configs.ConfigError, match="different dataset"):
    train.check_resumable(saved, get_config("tiny", dataset="cifar100"), "/w")
  other = next(r for r in configs.ROUNDINGS if r != saved["rounding"])
  train.check_resumable(saved, get_config("tiny", epochs=5, data_dir="/elsewhere",
                                          rounding=other), "/w")
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
    (["--batch_size", "12"], "--batch_size=12: batch_size 12 is not divisible by the 8 devices"),
    (["--config.batch_size=12"], "pass --config.batch_size = a multiple of 8, e.g. 8 or 16"),
    (["--model=aol_tiny"], "--model=aol_tiny: unknown model 'aol_tiny'"),
    (["--dataset=mnist"], "--dataset=mnist: Unknown dataset 'mnist'"),
    (["--dataset=cifar100", "--download=false"], "cifar-100-binary.tar.gz"),
    (["--epochs=0"], "--epochs=0: must be >= 1, got 0."),
    (["--epochs", "-3"], "--epochs=-3: must be >= 1, got -3."),
    (["--batch_size=0"], "--batch_size=0: must be >= 1, got 0."),
    (["--config.eval_batch_size=0"], "--config.eval_batch_size=0: must be >= 1"),
    (["--config.learning_rate=-1"], "--config.learning_rate=-1: must be a finite number > 0"),
    (["--config.num_devices=16"], "--config.num_devices=16: asks for 16 devices but 8 exist"),
    (["--config.model_kwargs.width=0"], "--config.model_kwargs.width=0: cannot build aol_small"),
    (["--config.model_kwargs.depth", "3"],
     "--config.model_kwargs.depth=3: cannot build aol_small with {'width': 4, 'channels': 16, "
     "'conv_depth': 1, 'dense_depth': 2, 'depth': 3}"),
    (["--config.epochs=x"], "error: --config.epochs=x: expected an integer."),
    (["--config.epochs=2.5"], "error: --config.epochs=2.5: expected an integer."),
    (["--epochs=2.5"], "error: --epochs=2.5: expected an integer."),
    (["--config.augment=maybe"], "error: --config.augment=maybe: expected true or false."),
    (["--config.foo=1"], "error: --config.foo=1: not a field of the config; the fields are "
                         "dataset, data_dir,"),
    (["--config.epoch=3"], "error: --config.epoch=3: not a field of the config"),
    (["--epoch=3"], "error: --epoch: unknown flag"),
    (["--config=/missing/config.py"], "error: --config=/missing/config.py: no such file; pass "
                                      "a config file that defines get_config(), or "
                                      "--preset=NAME (paper, digits, tiny, mnist5k)."),
    (["--mode=fit"], "error: --mode=fit: must be one of train, certify, export."),
    (["--mode", "fit"], "error: --mode=fit: must be one of train, certify, export."),
    (["--config.gram_precision=fp8"], "--config.gram_precision=fp8: must be one of default,"),
    (["--preset=fast"], "error: --preset=fast: must be one of paper, digits, tiny, mnist5k."),
    (["--preset", "fast"], "error: --preset=fast: must be one of paper, digits, tiny, mnist5k."),
    (["--config=experiments/cifar/configs/paper.py"], "--preset and --config both"),
    (["--epochs=3", "--config.epochs=4"], "--epochs and --config.epochs both set epochs"),
    (["extra"], "error: unexpected argument 'extra'"),
])
def test_bad_inputs_stop_with_a_one_line_message_naming_the_flag(tmp_path, flags, expected):
  with pytest.raises(SystemExit) as err:
    run_cifar(_flags(tmp_path, *flags))
  message = str(err.value)
  assert message.startswith("error: ") and "\n" not in message
  assert expected in message
  assert not (tmp_path / "work").exists()  # a failed run leaves no workdir behind


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
    run_cifar([*_flags(tmp_path)[:-1], f"--workdir={workdir}"])
  assert str(err.value) == (f"error: --workdir={workdir}: {expected.format(tmp=tmp_path)}; "
                            f"pass a directory this process can write.")
  assert not (tmp_path / "data").exists()  # nothing was read or prepared


def test_a_missing_accelerator_is_one_line_without_the_plugins_start_up_noise(tmp_path):
  # The CUDA plugin is installed (the test extra) and this machine has no GPU.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, "-m", "experiments.cifar", "--accelerator", "gpu",
                         "--preset", "digits", "--workdir", str(tmp_path / "w")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and proc.stdout == ""
  assert len(proc.stderr.splitlines()) == 1, proc.stderr
  assert proc.stderr.startswith("error: --accelerator=gpu was requested but JAX cannot use a "
                                "gpu: ")
  assert proc.stderr.rstrip().endswith("or choose another --accelerator. Not falling back.")
  assert not (tmp_path / "w").exists()


def test_a_bad_flag_prints_one_line_and_no_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.cifar", "--accelerator=cpu",
                         "--preset=tiny", "--epochs=0", f"--workdir={tmp_path / 'w'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip() == "error: --epochs=0: must be >= 1, got 0."
  assert not (tmp_path / "w").exists()


def test_the_runner_imports_no_torch_and_leaves_it_importable(tmp_path):
  # tensorboardX's writer imports torch, when installed (the test extra installs it), only
  # to accept torch tensors: 1.4 s of every run's start-up. The runner imports it without.
  assert importlib.util.find_spec("torch") is not None
  code = ("import sys, experiments.cifar.main; from experiments.common import summaries; "
          "s = summaries.Summaries(sys.argv[1]); "
          "assert 'torch' not in sys.modules, 'torch imported'; import torch; "
          "s.scalars(3, {'x': torch.tensor(2.0).item()}); s.close()")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert tensorboard_scalars(str(tmp_path)) == {"x": [(3, 2.0)]}


def test_the_runner_starts_without_its_plotting_and_summary_libraries():
  """matplotlib and tensorboardX (with google-cloud-storage) are imported when the run plots
  and writes, not before: a bad flag or an early signal is answered 1.2 s sooner."""
  code = ("import sys, experiments.cifar.main; "
          "print(sorted(m for m in ('matplotlib', 'tensorboardX') if m in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "[]"


def test_every_config_field_can_be_set_on_the_command_line_either_way():
  base = get_config("paper")
  other_rounding = next(r for r in configs.ROUNDINGS if r != base.rounding)
  new = {"dataset": "cifar100", "data_dir": "gs://b/data", "manual_dir": "/m",
         "download": False, "model": "aol_large", "epochs": 7, "batch_size": 64,
         "learning_rate": 0.5, "momentum": 0.5, "nesterov": False, "weight_decay": 0.0,
         "loss_offset": 1.0, "loss_temperature": 0.5, "augment": False, "seed": 9,
         "num_devices": 2, "checkpoint_every": 3, "max_to_keep": 5, "eval_every": 4,
         "eval_batch_size": 333, "log_every": 2, "mode": "certify", "rounding": other_rounding,
         "gram_precision": "bfloat16"}
  fields = {f.name for f in dataclasses.fields(configs.Config)}
  assert set(new) | {"model_kwargs"} == fields
  assert all(new[k] != getattr(base, k) for k in new)
  equals = ["--accelerator=cpu", "--workdir=/w", "--config=experiments/cifar/configs/tiny.py",
            *[f"--config.{k}={v}" for k, v in new.items()], "--config.model_kwargs.width=6"]
  spaces = ["--accelerator", "cpu", "--workdir", "/w", "--config",
            "experiments/cifar/configs/tiny.py", "--config.model_kwargs.width", "6"]
  for k, v in new.items():  # absl's booleans take no separate value: --noflag
    spaces += [f"--noconfig.{k}"] if v is False else [f"--config.{k}", str(v)]
  for argv in (equals, spaces):
    parsed = PROGRAM.parse(argv)
    assert {k: getattr(parsed.config, k) for k in new} == new
    assert parsed.config.model_kwargs == {**get_config("tiny").model_kwargs, "width": 6}
    assert (parsed.accelerator, parsed.workdir) == ("cpu", "/w")
  paper = PROGRAM.parse(["--accelerator=tpu", "--workdir=/w", "--preset=paper",
                         "--config.model_kwargs.width=32", "--config.model_kwargs.pool=4"])
  assert paper.config.model_kwargs == {"width": 32, "pool": 4}  # keys the preset does not list
  # The short flags set the same fields, with = or a space; --preset with a space too.
  for argv in (["--preset=digits", "--epochs=3", "--nodownload", "--learning_rate=0.25",
                "--mode=export", f"--rounding={other_rounding}"],
               ["--preset", "digits", "--epochs", "3", "--nodownload", "--learning_rate",
                "0.25", "--mode", "export", "--rounding", other_rounding]):
    short = PROGRAM.parse(["--accelerator=cpu", "--workdir=/w", *argv])
    assert (short.config.epochs, short.config.download, short.config.learning_rate) == (
        3, False, 0.25)
    assert (short.config.mode, short.config.rounding) == ("export", other_rounding)
    assert short.config.dataset == "digits" and short.typed["epochs"] == "--epochs=3"
  # The preset is a value: parsing never changes what get_config() returns.
  assert get_config("digits") == __import__("experiments.cifar.configs.digits",
                                            fromlist=["x"]).get_config()


def test_a_missing_preset_is_an_error_not_the_paper_recipe():
  with pytest.raises(UsageError) as err:
    PROGRAM.parse(["--accelerator=cpu", "--workdir=/w", "--epochs=3"])
  assert str(err.value) == "give --preset=NAME (paper, digits, tiny, mnist5k) or --config=PATH."


def test_tiny_run_on_1_2_4_8_devices_with_an_eval_batch_they_do_not_divide(tmp_path, archive):
  records = {}
  for n in (1, 2, 4, 8):
    # eval batch 3 is padded to 4 or 8 rows on 4 or 8 devices; the 8 test images fill it.
    assert run_cifar([*_flags(tmp_path)[:-1], f"--workdir={tmp_path / str(n)}", "--epochs=1",
                      f"--config.num_devices={n}", "--config.eval_batch_size=3",
                      "--config.augment=false"]) == 0  # (cheaper to compile)
    (records[n],) = history(str(tmp_path / str(n)))
    assert results(str(tmp_path / str(n)))["num_examples"] == 8 and records[n]["step"] == 5
  # The same global batches on any device count: the same loss, accuracies and CRA.
  for n in (2, 4, 8):
    for key in ("train_loss", "train_accuracy", "test_accuracy", "test_cra_36"):
      assert records[n][key] == pytest.approx(records[1][key], rel=1e-4, abs=1e-6), (n, key)


@pytest.mark.parametrize("preset,flags", [
    ("paper", {"batch_size": 256}), ("digits", {}), ("tiny", {}), ("mnist5k", {})])
def test_every_preset_validates_on_8_devices(tmp_path, preset, flags):
  # paper needs --batch_size=256 on 8 devices (250 does not divide), as the README says.
  config = get_config(preset, **flags)
  train.validate(config, str(tmp_path / "work"))
  if preset == "paper":
    with pytest.raises(configs.ConfigError, match="batch_size 250 is not divisible by the 8"):
      train.validate(get_config(preset), str(tmp_path / "work"))


def test_help_lists_every_config_field(capsys):
  with pytest.raises(SystemExit) as err:
    run_cifar(["--help"])
  assert err.value.code == 0
  printed = capsys.readouterr().out
  for field in dataclasses.fields(configs.Config):
    assert f"--config.{field.name}: " in printed


def test_gram_precision_is_set_on_every_aol_layer_of_the_run(tmp_path):
  """The runner decides the Gram precision once, where it creates the train state."""
  import aol_jax
  from flax import nnx
  config = get_config("digits", gram_precision="bfloat16")
  run = train.setup(config, str(tmp_path), train=False)
  model = nnx.merge(run.graphdef, run.state.params, run.state.rest)
  layers = [m for _, m in nnx.iter_modules(model)
            if isinstance(m, (aol_jax.AOLDense, aol_jax.AOLConv))]
  assert len(layers) >= 4 and {m.gram_precision for m in layers} == {"bfloat16"}
  plain = train.build_model(config, 10, (8, 8, 1))  # as built: the layers' own default
  assert {m.gram_precision for _, m in nnx.iter_modules(plain)
          if isinstance(m, (aol_jax.AOLDense, aol_jax.AOLConv))} == {"default"}
