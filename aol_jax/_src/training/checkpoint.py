"""Orbax checkpoints of a :class:`TrainState` that are verified before they are trusted.

Each checkpoint is a step directory holding two orbax items: ``state`` (the arrays) and
``meta`` (JSON: the caller's metadata plus a SHA-256 over every array's bytes, dtype, shape
and tree path, computed at save time). Orbax writes a step into a temporary directory and
renames it only once complete, so a crash mid-save leaves no half-written step under a
step's name; such leftovers are named and removed when a :class:`Checkpointer` opens the
directory. On restore, the newest step is loaded and re-hashed; a step that fails to
load, lacks its metadata, or whose hash disagrees (a truncated or garbled file, a
half-copied directory) is reported, moved aside to ``<directory>/corrupt/``, and the next
older step is tried. A partially restored state is never returned.

The directory may be local or on an object store (``gs://...``, any ``etils.epath`` path;
orbax writes the arrays through tensorstore). There, orbax cannot rename a directory
atomically; it writes the step in place and marks it complete with a final
``commit_success.txt`` object, and lists only marked steps. An unmarked step (a save cut
short) is named when the directory is opened and is never loaded; a corrupt step is moved
aside by copying its objects and deleting the originals.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

_CHECKSUM = "_sha256"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_COMMIT_MARKER = "commit_success.txt"  # orbax's completion marker on object stores


def is_local_path(path: str | os.PathLike) -> bool:
  """Whether ``path`` is on the local file system (no ``scheme://`` prefix, as ``gs://``)."""
  return "://" not in os.fspath(path)


def _move_tree(source: epath.Path, target: epath.Path) -> None:
  """Move a directory: one rename locally; on an object store, copy every object, then
  delete the originals (there is no atomic rename there)."""
  if is_local_path(os.fspath(source)):
    os.rename(source, target)
    return
  for item in source.iterdir():
    if item.is_dir():
      _move_tree(item, target / item.name)
    else:
      target.mkdir(parents=True, exist_ok=True)
      item.copy(target / item.name, overwrite=True)
  source.rmtree(missing_ok=True)


def tree_checksum(tree: Any) -> str:
  """SHA-256 over the tree's leaves in order: each leaf's path, dtype, shape and bytes.

  Leaves may be jax arrays replicated across processes: each process hashes its first
  addressable copy, so every process computes the same value.
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(leaf, jax.Array):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
      if not leaf.is_fully_replicated:
        raise ValueError(f"tree_checksum needs replicated arrays; {jax.tree_util.keystr(path)} "
                         f"has sharding {leaf.sharding}.")
      leaf = leaf.addressable_data(0)
    value = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype.str}|{value.shape}|".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


class CheckpointMismatchError(ValueError):
  """A readable checkpoint that holds a different state (another model or optimiser)."""


def _leaf_name(path: tuple) -> str:
  """Orbax's name for a leaf: its path keys joined by dots (``params.layers.1.kernel.value``)."""
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _describe(tree: Any, name_of=None) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{leaf name: (shape, dtype)}`` of an array tree or of orbax's metadata tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = leaf.name if name_of == "orbax" else _leaf_name(path)
    out[name] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
  return out


def _abstract(tree: Any) -> Any:
  """Shape/dtype/sharding stand-ins for the arrays of ``tree`` (abstract leaves kept)."""
  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(leaf, tree)


class Checkpointer:
  """Keep the newest ``max_to_keep`` verified checkpoints of a train state in ``directory``.

  Saves run in the background (orbax async checkpointing); :meth:`wait` blocks until the
  last one is on disk, and :meth:`close` waits and releases the manager. In a multi-process
  job every process must make the same calls.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               async_save: bool = True):
    directory = os.fspath(directory)
    self.directory = os.path.abspath(directory) if is_local_path(directory) else directory
    self._report_leftovers()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    """The saved steps (including one still being written in the background), oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, *, metadata: dict | None = None,
           force: bool = False) -> bool:
    """Start saving ``state`` as ``step`` with JSON-able ``metadata``; returns whether it did.

    The arrays are hashed now (a device-to-host copy) so a later restore can verify them.
    A step that is already on disk is not overwritten unless ``force``.
    """
    meta = dict(metadata or {})
    if _CHECKSUM in meta:
      raise ValueError(f"metadata key {_CHECKSUM!r} is reserved.")
    try:  # fail here, not in orbax's background thread
      json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(f"Checkpoint metadata must be plain JSON (no NaN): {e}") from None
    if step in self.all_steps():
      if not force:
        return False
      self._manager.delete(step)
    meta[_CHECKSUM] = tree_checksum(state)
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    """Block until every started save is finalised on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _path(self, *parts: str) -> epath.Path:
    return epath.Path(self.directory).joinpath(*parts)

  def _report_leftovers(self) -> None:
    """Name the steps of saves that never completed (never loaded; orbax removes them)."""
    root = self._path()
    if jax.process_index() != 0 or not root.is_dir():
      return
    local = is_local_path(self.directory)
    for path in sorted(root.iterdir(), key=lambda p: p.name):
      unfinished = (_TMP_MARKER in path.name if local else
                    path.name.isdigit() and not (path / _COMMIT_MARKER).exists())
      if unfinished:
        print(f"Checkpointer: unfinished checkpoint {path} (a save interrupted before it "
              f"completed; never loaded).", flush=True)

  def _quarantine(self, step: int, reason: str) -> None:
    path = self._path(str(step))
    print(f"Checkpointer: checkpoint {path} is corrupt or incomplete ({reason}); skipping it "
          f"and trying an older one.", flush=True)
    if jax.process_index() == 0 and path.is_dir():
      target = self._path("corrupt", str(step))
      if target.exists():
        target.rmtree()
      target.parent.mkdir(parents=True, exist_ok=True)
      _move_tree(path, target)
      print(f"Checkpointer: moved it to {target}.", flush=True)
    if jax.process_count() > 1:  # every process must see the move before it lists steps again
      multihost_utils.sync_global_devices(f"aol_jax_checkpoint_quarantine_{step}")
    self._manager.reload()

  def check_matches(self, step: int, abstract_state: Any) -> None:
    """Raise :class:`CheckpointMismatchError` if ``step`` holds other arrays (names, shapes,
    dtypes) than ``abstract_state``; any other error means the step is unreadable."""
    metadata = self._manager.item_metadata(step)["state"]
    saved = {} if metadata is None else _describe(getattr(metadata, "tree", metadata), "orbax")
    if not saved:
      raise ValueError("no array metadata")  # unreadable, not a mismatch
    wanted = _describe(abstract_state)
    if saved != wanted:
      diff = sorted(set(saved.items()) ^ set(wanted.items()))[:4]
      raise CheckpointMismatchError(
          f"Checkpoint {self._path(str(step))} holds a different state than "
          f"the one to restore ({len(saved)} vs {len(wanted)} arrays; first differences "
          f"(name, (shape, dtype)): {diff}). It was written by another model or optimiser "
          f"configuration: use a new directory, or restore with the original configuration.")

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Load and verify ``step``.

    Raises:
      CheckpointMismatchError: the step holds a differently shaped state.
      ValueError (or orbax's error): the step is unreadable or does not verify.
    """
    self.check_matches(step, abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(abstract_state)), meta=ocp.args.JsonRestore()))
    meta = dict(restored["meta"] or {})
    expected = meta.pop(_CHECKSUM, None)
    if expected is None:
      raise ValueError("its metadata has no checksum")
    state = restored["state"]
    actual = tree_checksum(state)
    if actual != expected:
      raise ValueError(f"checksum mismatch: saved {expected[:12]}..., loaded {actual[:12]}...")
    return state, meta

  def latest_metadata(self) -> tuple[int, dict] | None:
    """``(step, metadata)`` of the newest step, without loading its arrays (unverified: the
    arrays' checksum is checked by :meth:`restore`); None if there is no step."""
    self.wait()
    self._manager.reload()
    for step in reversed(self.all_steps()):
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      except Exception:  # noqa: BLE001  (damaged: restore_latest reports and skips it)
        continue
      meta = dict(meta["meta"] or {})
      meta.pop(_CHECKSUM, None)
      return step, meta
    return None

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int, dict] | None:
    """The newest checkpoint that verifies, as ``(state, step, metadata)``; None if none does.

    ``abstract_state`` gives the tree structure, shapes, dtypes and shardings to restore into:
    a state like the one saved, or its ``jax.ShapeDtypeStruct`` stand-ins. Corrupt steps
    are reported, moved to ``<directory>/corrupt/`` and skipped.

    Raises:
      CheckpointMismatchError: the newest readable step was saved from a differently shaped
        state; nothing is moved or skipped, since that is a configuration error, not damage.
    """
    self.wait()
    self._manager.reload()  # pick up what other runs left on disk
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # orbax / tensorstore raise many types for damaged files
        first_line = str(e).splitlines()[0] if str(e) else ""
        self._quarantine(step, f"{type(e).__name__}: {first_line}"[:300])
        continue
      return state, step, meta
    return None
