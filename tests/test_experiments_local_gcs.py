"""``python -m experiments.local_gcs``: prints the exports, logs to its file and not the
terminal, and stops on SIGTERM and on SIGINT, as the docs say."""

import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from support.servers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_server_logs_to_its_file_and_stops_on_a_signal(tmp_path, sig):
  port, log = free_port(), tmp_path / "gcs.log"
  server = subprocess.Popen([sys.executable, "-m", "experiments.local_gcs", f"--port={port}",
                             "--bucket=b", f"--log={log}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  try:
    lines = []
    for line in server.stdout:
      lines.append(line.rstrip("\n"))
      if line.startswith("#"):
        break
    assert lines[0] == f"export STORAGE_EMULATOR_HOST=http://127.0.0.1:{port}"
    assert lines[-1] == (f"# serving gs://b on 127.0.0.1:{port} (log: {log}); SIGTERM or "
                         f"Ctrl-C stops it")
    for _ in range(3):
      urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b/b", timeout=10).close()
    server.send_signal(sig)
    out, err = server.communicate(timeout=30)
  finally:
    if server.poll() is None:
      server.kill()
  assert server.returncode == 0 and err == "" and out == ""
  assert log.read_text().count('"GET /storage/v1/b/b HTTP/1.1" 200') == 3
