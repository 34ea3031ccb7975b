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


def is_local(path: str | os.PathLike) -> bool:
  """Whether ``path`` is on the local file system (no ``scheme://`` prefix)."""
  return "://" not in os.fspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
  """``path / part / ...`` as a string, for local and object-store paths alike."""
  return os.fspath(epath.Path(path).joinpath(*parts))


def makedirs(path: str | os.PathLike) -> None:
  """Create the directory ``path`` and its parents (a no-op prefix on an object store)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """Write ``data`` (text as UTF-8) to ``path`` all at once: never seen half-written."""
  data = data.encode() if isinstance(data, str) else data
  if is_local(path):
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    try:
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, path)
    finally:  # on an error the target is left as it was, and no temporary stays behind
      if os.path.exists(tmp):
        os.remove(tmp)
  else:
    epath.Path(path).write_bytes(data)
