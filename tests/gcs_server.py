"""A GCS-protocol server for the tests: ``python tests/gcs_server.py PORT BUCKET``.

``gcp-storage-emulator`` (in memory) with one addition: a media download also returns the
object's generation in the ``x-goog-generation`` header, as Google Cloud Storage does.
tensorstore's ``gcs`` driver (orbax's arrays) reads the generation from that header to make
its conditional writes (OCDBT manifests); without it the driver sees generation 0 and
refuses ("Malformed StorageGeneration").
"""

import sys
import time

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001  (the original handler answers 404)
    obj = None
  if obj:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation  # before the server module builds its routes

from gcp_storage_emulator.server import create_server  # noqa: E402


def main(port: int, bucket: str) -> None:
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  try:
    while True:
      time.sleep(3600)
  finally:
    server.stop()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
