"""All-or-nothing writes of a run's small files, on a local disk or an object store.

Paths are anything ``etils.epath`` understands: local paths, ``gs://``, ``s3://`` ...

* Local: write a temporary file next to the target, then ``os.replace`` it over the target
  (an atomic rename on POSIX), so a reader sees the old file or the new one.
* Object store (``gs://`` ...): one object upload. GCS and S3 make an object visible only
  when its upload has completed, so a reader again sees the old object or the new one,
  never a part. (A rename there would be a copy plus a delete: not atomic.)
"""

from __future__ import annotations

import os

from etils import epath

from aol_jax.training import is_local_path as is_local


def join(path: str | os.PathLike, *parts: str) -> str:
  """``path / part / ...`` as a string, for local and object-store paths alike."""
  return os.fspath(epath.Path(path).joinpath(*parts))


def makedirs(path: str | os.PathLike) -> None:
  """Create the directory ``path`` and its parents (a no-op prefix on an object store)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def workdir_error(path: str | os.PathLike) -> str | None:
  """Why a run cannot write into the directory ``path``, in a few words; None if it can.

  Tried, not guessed: the directory is created (locally) and a small probe object written
  and removed, so a missing bucket, missing permission, a read-only or virtual file system
  (``/proc``) or a parent that is a file all show here, before anything runs.
  """
  path = os.fspath(path)
  if is_local(path):
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
      ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
      where = "names" if ancestor == os.path.abspath(path) else "lies under"
      return f"{where} the file {ancestor}, not a directory"
  probe = epath.Path(path) / f".write_test.{os.getpid()}"
  try:
    if is_local(path):
      makedirs(path)
    probe.write_bytes(b"")
    probe.unlink()
  except FileNotFoundError:
    if is_local(path):
      return "cannot be created (the file system has no such place)"
    bucket = path.split("://", 1)[1].split("/", 1)[0]
    return f"the bucket {bucket} does not exist; create it or fix the name"
  except OSError as e:
    text = (str(e).strip().splitlines() or [""])[0]
    # gcsfs reports HTTP 401 / 403 as an OSError whose message starts "Forbidden".
    if isinstance(e, PermissionError) or text.startswith(("Forbidden", "Unauthorized")):
      return "no permission to write there"
    return f"cannot be written ({e.strerror or text or type(e).__name__})"
  except Exception as e:  # noqa: BLE001  (object-store clients raise their own types)
    text = str(e).strip().splitlines()
    return f"cannot be written ({type(e).__name__}: {text[0] if text else ''})"
  return None


# The temporaries of the local writes under way: what a process stopped by a signal removes.
_writing: set[str] = set()


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """Write ``data`` (text as UTF-8) to ``path`` all at once: never seen half-written."""
  data = data.encode() if isinstance(data, str) else data
  if is_local(path):
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    _writing.add(tmp)
    try:
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, path)
    finally:  # on an error the target is left as it was, and no temporary stays behind
      if os.path.exists(tmp):
        os.remove(tmp)
      _writing.discard(tmp)
  else:
    epath.Path(path).write_bytes(data)


def remove_partial() -> None:
  """Remove the temporary of a local write cut short (a process stopped by a signal: no
  ``finally`` runs). An object-store upload cut short is never visible."""
  for tmp in list(_writing):
    if os.path.exists(tmp):
      os.remove(tmp)
    _writing.discard(tmp)


def exists(path: str | os.PathLike) -> bool:
  """Whether ``path`` exists (an object store has a directory once anything lies under it)."""
  return epath.Path(path).exists()


def remove(path: str | os.PathLike) -> None:
  """Delete the file ``path`` if it exists."""
  epath.Path(path).unlink(missing_ok=True)


def remove_tree(path: str | os.PathLike) -> None:
  """Delete ``path`` and everything under it, if it exists."""
  p = epath.Path(path)
  if p.exists():
    p.rmtree()


def has_checkpoint(workdir: str | os.PathLike) -> bool:
  """Whether ``<workdir>/checkpoints`` holds a step directory (committed or not), without
  creating anything; whether one verifies is the checkpointer's to say."""
  directory = epath.Path(workdir) / "checkpoints"
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())
