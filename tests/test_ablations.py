"""The ablations (experiments.ablations) in their small size: structure, soundness, the
trends that the full run showed with margin, and that they train through the runner.

One in-process run of ``python -m experiments.ablations --preset small`` (digits only; the
docs state its time) is shared by the tests below.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from aol_jax import certify_dataset
from experiments.ablations import configs, main as ablations_main, trainer
from experiments.ablations.configs import LOSS_SETTINGS, PAPER_SETTING, small
from experiments.ablations.configs import full as full_module
from experiments.common import storage
from support.runs import history, run_ablations

# The small ablation run trains and attacks long enough to repay XLA's default
# optimisation (tests/conftest.py).
pytestmark = pytest.mark.xla_default_optimisation

CHECK_FILES = ("offset_temperature", "orthogonality", "aol_vs_plain")
SMALL = small.get_config()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = dict(zip(configs.CHECKS, CHECK_FILES))  # check -> its files' name


def _results(out_dir):
  return {check: json.load(open(os.path.join(out_dir, f"{name}.json")))
          for check, name in CHECKS.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("ablations"))
  trainer.fit.cache_clear()
  xla_flags = os.environ.get("XLA_FLAGS")
  # "--preset small" with a space: the small preset (it once ran the full one silently).
  assert run_ablations(["--preset", "small", "--accelerator=cpu", f"--workdir={out_dir}"]) == 0
  # In-process the runs use this process's backend, started by conftest: the runs' CPU
  # XLA_FLAGS (accelerator.select) are not added, so later tests here compile as before.
  assert os.environ.get("XLA_FLAGS") == xla_flags
  return out_dir, _results(out_dir)


def test_every_check_writes_its_table_json_and_plot_and_nothing_else(run):
  out_dir, results = run
  assert {r["config"] for r in results.values()} == {"small"}
  expected = {f"{name}.{ext}" for name in CHECK_FILES for ext in ("md", "json", "png")}
  assert set(os.listdir(out_dir)) == expected | {"runs"}  # no temporary leftovers
  for name in CHECK_FILES:
    with open(os.path.join(out_dir, f"{name}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(os.path.join(out_dir, f"{name}.md")).read()
    assert text.startswith("### ") and "|---|" in text


def test_every_network_is_a_run_of_the_runner_with_its_own_workdir(run):
  out_dir, _ = run
  runs = sorted(os.listdir(os.path.join(out_dir, "runs")))
  # offset: 3 settings x 2 seeds; the paper's setting at seed 0 is shared with the other
  # checks; plain: one more.
  assert len(runs) == 3 * len(SMALL.seeds) + 1
  for name in runs:
    work = os.path.join(out_dir, "runs", name)
    records = history(work)
    assert [r["epoch"] for r in records] == list(range(1, SMALL.recipes[0].epochs + 1))
    assert "test_accuracy" in records[-1] and os.listdir(os.path.join(work, "checkpoints"))
    assert any(f.startswith("events.out.tfevents.") for f in os.listdir(work))


def test_a_rerun_resumes_every_finished_run_without_training(run, tmp_path):
  out_dir, results = run
  runs = os.path.join(out_dir, "runs")
  before = {n: open(os.path.join(runs, n, "metrics.jsonl")).read() for n in os.listdir(runs)}
  trainer.fit.cache_clear()  # a new process would remember nothing
  assert run_ablations(["--preset=small", "--accelerator=cpu", "--check=orthogonal",
                        f"--workdir={out_dir}"]) == 0
  after = {n: open(os.path.join(runs, n, "metrics.jsonl")).read() for n in os.listdir(runs)}
  assert after == before  # restored, not retrained
  assert _results(out_dir)["orthogonal"] == results["orthogonal"]


def test_offset_temperature_runs_every_setting_and_seed_with_sane_accuracies(run):
  digits = run[1]["offset"]["datasets"]["digits"]
  assert digits["columns"] == ["clean", "36/255", "72/255", "108/255", "1"]
  assert set(digits["settings"]) == {s.name for s in LOSS_SETTINGS}
  for setting in digits["settings"].values():
    assert [r["seed"] for r in setting["runs"]] == list(SMALL.seeds)
    for r in setting["runs"]:
      acc = np.asarray(r["accuracy"])
      assert np.all(np.isfinite(acc)) and np.all((0 <= acc) & (acc <= 1))
      assert np.all(np.diff(acc) <= 0), "certified accuracy must not grow with the radius"
      assert acc[0] > 0.5, f"clean accuracy {acc[0]} on digits: training failed"
    runs = np.asarray([r["accuracy"] for r in setting["runs"]])
    np.testing.assert_allclose(setting["mean"], runs.mean(0), rtol=1e-12)
    np.testing.assert_allclose(setting["spread"], runs.std(0, ddof=1), rtol=1e-12)
  assert [o["column"] for o in digits["ordering"]] == digits["columns"]


def test_offset_temperature_trends_that_the_full_run_showed_with_margin(run):
  digits = run[1]["offset"]["datasets"]["digits"]
  mean = {s.name: digits["settings"][s.name]["mean"] for s in LOSS_SETTINGS}
  small_u, paper_u, large_u = (mean[s.name] for s in LOSS_SETTINGS)
  # Clean accuracy falls as the offset grows (full run: S > M > L, separated, both datasets:
  # digits 98.1 / 94.8 / 90.8, mnist5k 96.7 / 95.4 / 87.0).
  assert small_u[0] > paper_u[0] > large_u[0]
  # At radius 1 the smallest offset certifies the fewest (full run: digits 0.0 against 12.7 /
  # 10.2, mnist5k 9.7 against 73.7 / 64.3). M against L is not asserted: the paper has
  # L > M there, the full run M > L.
  assert small_u[-1] < min(paper_u[-1], large_u[-1])


def test_aol_layers_stay_within_their_bound_and_start_orthogonal(run):
  digits = run[1]["orthogonal"]["datasets"]["digits"]
  assert len(digits["init"]) == len(digits["trained"]) == 8  # 4 convs + 4 denses
  for kind in ("init", "trained"):
    for row in digits[kind]:
      assert row["power_iteration"] <= 1 + 1e-4, row
      assert math.isfinite(row["distance"]) and row["gram_size"] == min(row["matrix"])
  for row in digits["trained"]:
    assert 0 <= row["smallest"] <= row["exact"] <= 1 + 1e-4, row
    # Power iteration gives a lower bound on the exact spectral norm.
    assert row["power_iteration"] <= row["exact"] + 1e-4, row
  # Identity / orthogonal initialisation: every rescaled layer is exactly orthogonal.
  for row in digits["init"]:
    assert row["distance"] < 1e-4 and abs(row["power_iteration"] - 1) < 1e-4, row


def test_training_moves_the_layers_away_from_orthogonal(run):
  digits = run[1]["orthogonal"]["datasets"]["digits"]
  # Full run: every 3x3 conv and dense layer ends at distance >= 0.36 (init: 0).
  for row in digits["trained"]:
    if "conv3x3" in row["layer"] or row["layer"].startswith("dense"):
      assert row["distance"] > 0.05, row


def test_aol_against_plain(run):
  digits = run[1]["plain"]["datasets"]["digits"]
  aol, plain = digits["aol"], digits["plain"]
  for values in (aol["pgd"], aol["certified"], plain["pgd"]):
    assert len(values) == len(digits["radii"]) and all(0 <= v <= 1 for v in values)
  # Soundness: no attack gets below a certificate.
  for pgd, cert in zip(aol["pgd"], aol["certified"]):
    assert pgd >= cert
  assert aol["certified_clean"] == pytest.approx(aol["clean"])
  assert aol["local_lipschitz"] <= 1 + 1e-4
  # Full run (digits / mnist5k): the plain net's local Lipschitz constant is 14.8 / 16.6, and
  # at radius 1 PGD leaves it 1.1% / 64.2% against AOL's 21.7% / 81.2%.
  assert plain["local_lipschitz"] > 1
  assert aol["pgd"][-1] > plain["pgd"][-1]


def test_plain_network_cannot_be_certified():
  recipe = SMALL.recipe("digits")
  data = trainer.load("digits")
  model = trainer.build_plain(trainer.config_for(recipe, PAPER_SETTING, seed=0, plain=True),
                              data.num_classes, data.test_images.shape[1:])
  with pytest.raises(TypeError, match="lipschitz_bound"):
    certify_dataset(model, data.test_inputs()[:8], data.test_labels[:8], batch_size=8)


def test_every_check_is_run_by_its_function():
  assert tuple(ablations_main.RUNS) == configs.CHECKS


def test_the_presets_derive_small_from_full():
  full = full_module.get_config()
  assert set(dataclasses.asdict(full)) == {f.name for f in dataclasses.fields(SMALL)}
  assert SMALL.recipes[0].model_kwargs == full.recipe("digits").model_kwargs
  assert SMALL.recipes[0].epochs < full.recipe("digits").epochs
  # The small run trains each network on one device; the full one on every device.
  assert SMALL.recipes[0].num_devices == 1
  assert {r.num_devices for r in full.recipes} == {None}
  assert trainer.config_for(SMALL.recipes[0], PAPER_SETTING, seed=0).num_devices == 1


@pytest.mark.parametrize("num_devices", [0, 3])
def test_a_recipe_whose_batch_does_not_split_over_its_devices_is_refused(num_devices):
  recipe = dataclasses.replace(SMALL.recipes[0], num_devices=num_devices)
  errors = configs.field_errors(dataclasses.replace(SMALL, recipes=(recipe,)))
  assert errors == {"recipes": f"the digits recipe's num_devices={num_devices} must be None "
                               f"or a divisor >= 1 of its batch_size 64"}


@pytest.mark.parametrize("flags,expected", [
    (["--datasets=cifar10"],
     "error: --datasets=cifar10: no recipe for cifar10 in the small config; choose from digits."),
    (["--config.datasets=mnist5k"], "error: --config.datasets=mnist5k: no recipe for mnist5k "
                                    "in the small config; choose from digits."),
    (["--config.check=fast"], "error: --config.check=fast: must be one of offset, "
                              "orthogonal, plain, all."),
    (["--check", "fast"], "error: --check=fast: must be one of offset, orthogonal, plain, all."),
    (["--config.seeds=(-1,)"], "error: --config.seeds=(-1,): must be one or more integers >= 0."),
    (["--config.recipes=(1,)"], "error: --config.recipes=(1,): must be Recipe objects: set "
                                "recipes in a preset file (configs/), not on the command line."),
    (["--config.seed=x"], "error: --config.seed=x: expected an integer."),
    (["--config.epochs=3"], "error: --config.epochs=3: not a field of the config; the fields "
                            "are name, check, datasets, recipes, seeds, seed."),
    (["--small"], "error: --small: unknown flag"),
    (["all"], "error: unexpected argument 'all': every setting is a --flag"),
    (["--preset=medium"], "error: --preset=medium: must be one of full, small."),
    (["--config=/missing.py"], "error: --config=/missing.py: no such file; pass a config file"),
    (["--check=offset", "--config.check=plain"],
     "error: --check and --config.check both set check; give one of them."),
])
def test_bad_inputs_stop_with_a_one_line_message_naming_the_flag(tmp_path, flags, expected):
  argv = ["--preset=small", "--accelerator=cpu", f"--workdir={tmp_path / 'w'}", *flags]
  if any(f.startswith("--config=") for f in flags):
    argv.remove("--preset=small")
  with pytest.raises(SystemExit) as err:
    run_ablations(argv)
  message = str(err.value)
  assert message.startswith(expected) and "\n" not in message
  assert not (tmp_path / "w").exists()  # refused before the workdir is made


def test_the_short_flags_and_config_fields_set_the_same_config():
  parse = ablations_main.PROGRAM.parse
  short = parse(["--accelerator=cpu", "--workdir=/w", "--preset=full", "--check=plain",
                 "--datasets=mnist5k,digits"])
  long = parse(["--accelerator=cpu", "--workdir=/w", "--preset", "full", "--config.check",
                "plain", "--config.datasets=mnist5k", "--config.datasets=digits"])
  assert short.config == long.config and short.config.name == "full"
  assert (short.config.check, short.config.datasets) == ("plain", ("mnist5k", "digits"))
  assert short.typed == {"check": "--check=plain", "datasets": "--datasets=mnist5k,digits"}
  assert [r.dataset for r in short.config.selected().recipes] == ["mnist5k", "digits"]


def test_the_documented_commands_parse_and_name_existing_checks():
  page = open(os.path.join(ROOT, "docs", "paper_claims.md")).read()
  commands = [line.split("#")[0].split()[3:] for line in page.splitlines()
              if line.startswith("python -m experiments.ablations ")]
  assert len(commands) == 5
  checks = set()
  for argv in commands:
    parsed = ablations_main.PROGRAM.parse(argv)
    assert not configs.field_errors(parsed.config), argv
    checks.add(parsed.config.check)
  assert checks == {*configs.CHECKS, "all"}


def test_the_accelerator_is_checked_first_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.ablations", "--accelerator=tpu",
                         "--preset=small", "--config.check=fast",
                         f"--workdir={tmp_path / 'file' / 'w'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith("error: --accelerator=tpu was requested but JAX "
                                        "cannot use a tpu")
  assert len(proc.stderr.strip().splitlines()) == 1


def test_an_unwritable_workdir_is_refused_before_anything_runs(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(SystemExit) as err:
    run_ablations(["--check=offset", "--preset=small", "--accelerator=cpu",
                   f"--workdir={tmp_path / 'file' / 'wd'}"])
  assert str(err.value) == (f"error: --workdir={tmp_path / 'file' / 'wd'}: lies under the "
                            f"file {tmp_path / 'file'}, not a directory; pass a directory this "
                            f"process can write.")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = str(tmp_path / "table.md")
  storage.write_atomic(path, "old\n")

  def fail(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", fail)  # the temporary is written, the swap fails
  with pytest.raises(OSError, match="disk full"):
    storage.write_atomic(path, "new, never seen\n")
  assert os.listdir(tmp_path) == ["table.md"] and open(path).read() == "old\n"
