"""The README and the docs pages: their Python examples run as written and their assertions
hold, the public API list of docs/api.md is ``aol_jax.__all__``, the README stays a front page,
and every ``python -m experiments.cifar`` command gets past configuration to data loading."""

import contextlib
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page.name, block) for page in PAGES
          for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


def _api_kinds() -> dict[str, str]:
  """docs/api.md's list of public names: kind (Classes, Functions, ...) -> names (what a
  parenthesis explains is not listed)."""
  section = (ROOT / "docs" / "api.md").read_text().split("## Public names", 1)[1]
  section = section.split("\n## ", 1)[0]
  kinds = {}
  for kind, body in re.findall(r"- \*\*(\w+):\*\* (.*?)(?=\n- \*\*|\Z)", section, flags=re.S):
    for name in re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", body)):
      kinds[name] = kind
  return kinds


def test_every_public_name_is_what_the_api_page_says():
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


def test_the_readme_is_a_front_page():
  text = README.read_text()
  assert len(text.splitlines()) <= 200
  headings = re.findall(r"^## (.+)$", text, flags=re.M)
  assert headings[:3] == ["Install", "The two commands", "Results"]
  commands = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[1].splitlines()
  assert [c.split("#")[0].strip() for c in commands] == ["make run", "make test"]
  first = text.index("CRA")  # spelled out where it first appears
  assert text[first - len("certified robust accuracy ("):first].lower() == (
      "certified robust accuracy (")
  for link in re.findall(r"\]\((docs/[\w.]+)\)", text):
    assert (ROOT / link).exists(), link


def test_make_run_is_the_command_the_readme_names():
  makefile = (ROOT / "Makefile").read_text()
  recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
  command = next(l.strip() for l in recipe.splitlines() if "experiments.cifar" in l)
  command = command.replace("$(PYTHON)", "python")
  assert f"`make run` is\n`{command}`" in README.read_text()


def test_there_are_examples():
  assert len([b for page, b in BLOCKS if page == "README.md"]) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"{page}-{i}" for i, (page, _) in enumerate(BLOCKS)])
def test_example_runs(index):
  page, block = BLOCKS[index]
  exec(compile(block, f"{page}[python block {index}]", "exec"), {})


def _experiment_commands() -> list[list[str]]:
  """The arguments of every ``python -m experiments.cifar`` command in the README's and the
  docs' bash blocks (continuation lines joined; a command inside ``--command="..."``
  included)."""
  commands = []
  for page in PAGES:
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
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


def test_the_docs_have_the_tpu_slice_commands():
  assert any("--accelerator=tpu" in c and any(a.startswith("--workdir=gs://") for a in c)
             for c in COMMANDS)
  assert len(COMMANDS) >= 5


def _accelerator(args: list[str]) -> tuple[str, list[str]]:
  """The command's accelerator, and the command with it replaced by cpu."""
  out, found = [], None
  for i, arg in enumerate(args):
    if arg.startswith("--accelerator="):
      found, arg = arg.split("=", 1)[1], "--accelerator=cpu"
    elif i and args[i - 1] == "--accelerator":
      found, arg = arg, "cpu"
    out.append(arg)
  return found, out


@pytest.mark.parametrize("index", range(len(COMMANDS)))
def test_experiment_command_gets_past_configuration_to_data_loading(
    index, tmp_path, monkeypatch):
  """Each command as written, on this machine's 8 simulated devices (the device count of a
  v5e-8 / v3-8) for a TPU command and on 1 device for a GPU command, on the CPU."""
  from experiments.common import input_pipeline
  from support.runs import run_cifar
  from support.servers import gcs_clients_in_this_process, gcs_emulator

  accelerator, args = _accelerator(COMMANDS[index])
  if accelerator == "gpu":
    args.append("--config.num_devices=1")
  monkeypatch.chdir(tmp_path)  # relative workdirs land here; the config files stay reachable
  (tmp_path / "experiments").symlink_to(ROOT / "experiments")

  def reached(*_, **__):
    raise _ReachedDataLoading
  monkeypatch.setattr(input_pipeline, "num_train_examples", reached)
  with contextlib.ExitStack() as stack:
    if any("gs://" in a for a in args):
      buckets = {a.split("gs://", 1)[1].split("/", 1)[0] for a in args if "gs://" in a}
      (bucket,) = buckets
      stack.enter_context(gcs_clients_in_this_process(stack.enter_context(gcs_emulator(bucket))))
    with pytest.raises(_ReachedDataLoading):
      run_cifar(args)
