"""Test helpers for servers on localhost: a free port, and a GCS-protocol server.

:func:`gcs_emulator` starts ``gcp-storage-emulator`` (a Google Cloud Storage JSON-API server,
in memory; ``tests/gcs_server.py`` adds the generation header tensorstore needs) in its own
process and returns the environment that points every client of this
project at it:

* tensorstore's ``gcs`` driver (orbax's arrays): ``TENSORSTORE_GCS_HTTP_URL`` and a fixed
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (no credential lookup);
* gcsfs, behind ``etils.epath`` (orbax's metadata, the run's small files):
  ``STORAGE_EMULATOR_HOST``; ``EPATH_USE_TF=false`` makes epath use gcsfs rather than
  TensorFlow's GCS file system, which cannot be pointed at an emulator;
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` skips gcsfs' bucket-type probe, which needs
  real Google credentials.

On a real TPU VM none of this is set: epath uses TensorFlow's or gcsfs' GCS client and
tensorstore its own, both with the VM's service account.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

BUCKET = "aol-test"


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def gcs_environment(url: str) -> dict[str, str]:
  """Environment variables that point tensorstore, gcsfs and epath at the server ``url``."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "EPATH_USE_TF": "false",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def gcs_emulator(bucket: str = BUCKET):
  """Run a GCS-protocol server with ``bucket``; yields the environment for its clients."""
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_server.py")
  server = subprocess.Popen([sys.executable, script, str(port), bucket],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2).close()
        break
      except OSError:
        if server.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"gcp-storage-emulator did not start on {url}") from None
        time.sleep(0.2)
    yield gcs_environment(url)
  finally:
    server.terminate()
    server.wait(timeout=30)


def _clear_client_caches() -> None:
  """gcsfs and epath keep one client per protocol, and epath remembers its choice of
  backend (``EPATH_USE_TF``); a new server needs new clients."""
  import gcsfs
  from etils.epath import backend, gpath
  gcsfs.GCSFileSystem.clear_instance_cache()
  type(backend.fsspec_backend)._get_filesystem.cache_clear()
  gpath._is_tf_installed.cache_clear()


@contextlib.contextmanager
def gcs_clients_in_this_process(env: dict[str, str]):
  """Point this process's clients (epath, gcsfs, tensorstore) at the server of ``env``."""
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  _clear_client_caches()
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _clear_client_caches()
