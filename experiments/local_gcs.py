"""A Google Cloud Storage server on localhost, for trying the ``gs://`` path without a bucket.

  python -m experiments.local_gcs --port=4443 --bucket=aol-local --log=/tmp/local_gcs.log &

prints the environment variables to export in the shell that runs the experiment, then
serves until SIGTERM (``kill %1`` for the line above) or SIGINT (Ctrl-C in the foreground),
in memory: everything is lost when it stops. The server's own messages (one per request,
and the tracebacks of clients that hang up mid-answer) go to ``--log``, not the terminal.
It is
``gcp-storage-emulator`` (``pip install -e '.[test]'``) with one addition: a media download
also returns the object's generation in the ``x-goog-generation`` header, as Google Cloud
Storage does. tensorstore's ``gcs`` driver (orbax's arrays) reads the generation from that
header for its conditional writes; without it the driver sees generation 0 and refuses
("Malformed StorageGeneration").

The variables (:func:`environment`) point each client of this project at the server:

* tensorstore (orbax's arrays): ``TENSORSTORE_GCS_HTTP_URL`` and a fixed
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (no credential lookup);
* gcsfs behind ``etils.epath`` (orbax's metadata, the run's small files):
  ``STORAGE_EMULATOR_HOST``; ``EPATH_USE_TF=false`` makes epath use gcsfs rather than
  TensorFlow's GCS client, which cannot be pointed at a local server;
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` skips gcsfs' bucket-type probe, which needs
  real Google credentials.

On a real cloud machine set none of them: the clients use the machine's credentials.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence


def environment(url: str) -> dict[str, str]:
  """The environment variables that point tensorstore, gcsfs and epath at ``url``."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "EPATH_USE_TF": "false",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _patch_downloads() -> None:
  """Add the generation headers to the emulator's media downloads (before it builds routes)."""
  from gcp_storage_emulator.handlers import objects
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001  (the original handler answers 404)
      obj = None
    if obj:
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return download(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation


def _log_to(path: str) -> None:
  """Send the server's messages to ``path``: its logging, and stderr, where the standard
  library's HTTP server prints a traceback for every client that hangs up mid-answer."""
  stream = open(path, "a", buffering=1)
  logging.basicConfig(stream=stream, level=logging.INFO, force=True)
  sys.stderr = stream


def serve(port: int, bucket: str, log: str) -> None:
  """Serve ``bucket`` on ``127.0.0.1:port`` until SIGTERM or SIGINT."""
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: stop.set())
  _log_to(log)
  _patch_downloads()
  from gcp_storage_emulator.server import create_server
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  try:
    for name, value in environment(f"http://127.0.0.1:{port}").items():
      print(f"export {name}={value}")
    print(f"# serving gs://{bucket} on 127.0.0.1:{port} (log: {log}); SIGTERM or Ctrl-C stops "
          f"it", flush=True)
    stop.wait()
  finally:
    server.stop()


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m experiments.local_gcs",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--port", type=int, default=4443, help="TCP port on 127.0.0.1")
  parser.add_argument("--bucket", default="aol-local", help="the bucket to create")
  parser.add_argument("--log", default="local_gcs.log", help="the file that receives the "
                      "server's messages")
  args = parser.parse_args(argv)
  serve(args.port, args.bucket, args.log)


if __name__ == "__main__":
  main()
