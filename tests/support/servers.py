"""Servers on localhost for the tests: a free port, and the GCS server of
:mod:`experiments.local_gcs` in its own process (:func:`gcs_emulator`)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import urllib.request

from experiments import local_gcs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BUCKET = "aol-test"


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def gcs_emulator(bucket: str = BUCKET):
  """Run ``python -m experiments.local_gcs`` with ``bucket``; yields the environment that it
  printed (its ``export NAME=VALUE`` lines), so the tests use what a user would export."""
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  log = tempfile.NamedTemporaryFile(prefix="local_gcs.", suffix=".log", delete=False).name
  server = subprocess.Popen([sys.executable, "-m", "experiments.local_gcs", f"--port={port}",
                             f"--bucket={bucket}", f"--log={log}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    env = {}
    for line in server.stdout:  # the exports, then one comment line once it serves
      if line.startswith("export "):
        name, _, value = line[len("export "):].strip().partition("=")
        env[name] = value
      elif line.startswith("#"):
        break
    if not env or server.poll() is not None:
      raise RuntimeError(f"python -m experiments.local_gcs did not start on {url}")
    urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=10).close()
    yield env
  finally:
    server.terminate()
    server.wait(timeout=30)
    os.remove(log)


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


@contextlib.contextmanager
def forbidding_gcs_server():
  """A GCS-protocol server that answers every request 403 (a bucket without permission);
  yields the environment for its clients."""
  import http.server
  import threading

  class Deny(http.server.BaseHTTPRequestHandler):
    def _deny(self):
      body = b'{"error": {"code": 403, "message": "no storage.objects.create access"}}'
      self.send_response(403)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _deny

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Deny)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield local_gcs.environment(f"http://127.0.0.1:{server.server_address[1]}")
  finally:
    server.shutdown()
    server.server_close()
