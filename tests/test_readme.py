"""The README's Python examples run as written and their assertions hold, and its
experiment commands get past configuration to data loading."""

import contextlib
import pathlib
import re
import shlex

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _api_kinds() -> dict[str, str]:
  """The README's Public API list: kind (Classes, Functions, ...) -> names."""
  section = README.read_text().split("### Public API", 1)[1].split("\n#", 1)[0]
  kinds = {}
  for kind, body in re.findall(r"- \*\*(\w+):\*\* (.*?)(?=\n- \*\*|\Z)", section, flags=re.S):
    for name in re.findall(r"`(\w+)`", body):
      kinds[name] = kind
  return kinds


def test_every_public_name_is_what_the_readme_says():
  import inspect
  import types

  import aol_jax
  kinds = _api_kinds()
  assert set(kinds) == set(aol_jax.__all__)
  for name, kind in kinds.items():
    value = getattr(aol_jax, name)
    is_module = isinstance(value, types.ModuleType)
    is_class = inspect.isclass(value)
    is_function = callable(value) and not is_class and not is_module
    assert {"Classes": is_class, "Functions": is_function, "Modules": is_module,
            "Constants": not (is_class or is_function or is_module)}[kind], (name, kind)
  # The README's certify(logits, labels, eps, ...) is the function, not a submodule.
  assert aol_jax.certify([[1.0, 0.0]], [0], 0.1, allowance=0.0)[0]


def test_readme_has_examples():
  assert len(BLOCKS) >= 2, "README lost its Python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
  exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def _experiment_commands() -> list[list[str]]:
  """The arguments of every ``python -m experiments.cifar`` command in the README's bash
  blocks (continuation lines joined; a command inside ``--command="..."`` included)."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
    for line in block.replace("\\\n", " ").splitlines():
      if "python -m experiments.cifar" not in line:
        continue
      tail = line.split("python -m experiments.cifar", 1)[1]
      tail = tail.split('"', 1)[0]  # the end of a quoted --command="..."
      commands.append(shlex.split(tail.split("#", 1)[0]))
  return commands


COMMANDS = _experiment_commands()


class _ReachedDataLoading(Exception):
  pass


def test_readme_has_the_tpu_slice_commands():
  assert any("--accelerator=tpu" in c and any(a.startswith("--workdir=gs://") for a in c)
             for c in COMMANDS)
  assert len(COMMANDS) >= 4


@pytest.mark.parametrize("index", range(len(COMMANDS)))
def test_readme_experiment_command_gets_past_configuration_to_data_loading(
    index, tmp_path, monkeypatch):
  """Each command as written, on this machine's 8 simulated devices (the device count of a
  v5e-8 / v3-8) for a TPU command and on 1 device for a GPU command, on the CPU."""
  from experiments.common import input_pipeline
  from experiments.cifar.main import main
  from support.servers import gcs_clients_in_this_process, gcs_emulator

  args = COMMANDS[index]
  accelerator = next(a.split("=", 1)[1] for a in args if a.startswith("--accelerator="))
  args = [("--accelerator=cpu" if a.startswith("--accelerator=") else a) for a in args]
  if accelerator == "gpu":
    args.append("--config.num_devices=1")
  monkeypatch.chdir(tmp_path)  # relative workdirs land here; the config files stay reachable
  (tmp_path / "experiments").symlink_to(README.parent / "experiments")

  def reached(*_, **__):
    raise _ReachedDataLoading
  monkeypatch.setattr(input_pipeline, "num_train_examples", reached)
  with contextlib.ExitStack() as stack:
    if any("gs://" in a for a in args):
      buckets = {a.split("gs://", 1)[1].split("/", 1)[0] for a in args if "gs://" in a}
      (bucket,) = buckets
      stack.enter_context(gcs_clients_in_this_process(stack.enter_context(gcs_emulator(bucket))))
    with pytest.raises(_ReachedDataLoading):
      main(args)
