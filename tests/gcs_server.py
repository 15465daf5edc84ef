"""A real GCS JSON API server on loopback (`gcp-storage-emulator`, in memory) and a minimal client.

The client speaks the JSON API over urllib, independently of the library's storage layer (gcsfs,
epath, tensorstore), so tests can put inputs into the bucket and check what the library wrote.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import urllib.parse
import urllib.request
from http import HTTPStatus

BUCKET = "w2v2-test"


def _send_generation_headers() -> None:
  """Make the emulator's media downloads carry `x-goog-generation` / `x-goog-metageneration`, as GCS's
  do. gcp-storage-emulator omits them, and tensorstore (Orbax's array I/O) reads an object's generation
  from that header: without it, its second write to an OCDBT manifest fails with "Malformed
  StorageGeneration". Patched in this process's copy of the emulator only."""
  from gcp_storage_emulator import server as emulator_server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  original = objects.download
  if getattr(original, "sends_generation", False):
    return

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])

  download.sends_generation = True
  objects.download = download                       # objects.get(alt=media) calls it by name
  for _, handlers in emulator_server.HANDLERS:      # the routes hold the function itself
    for method, handler in list(handlers.items()):
      if handler is original:
        handlers[method] = download


class GcsServer:
  """The emulator on 127.0.0.1 at a free port; `env()` is what a client process needs to use it."""

  def __init__(self, bucket: str = BUCKET):
    from gcp_storage_emulator import server as emulator  # pylint: disable=import-outside-toplevel
    _send_generation_headers()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    self.bucket = bucket
    self._server = emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    self._server.start()
    httpd = self._server._api._httpd  # pylint: disable=protected-access
    self.port = httpd.server_address[1]
    default_error = httpd.handle_error

    def handle_error(request, client_address):   # a client that hung up early (BrokenPipe) is not news
      if not isinstance(sys.exc_info()[1], ConnectionError):
        default_error(request, client_address)

    httpd.handle_error = handle_error
    self.url = f"http://127.0.0.1:{self.port}"

  def stop(self) -> None:
    self._server.stop()

  def env(self, base: dict | None = None) -> dict:
    """Environment for a `w2v2` process: the emulator's address (the library sets the rest)."""
    env = dict(os.environ if base is None else base)
    env["STORAGE_EMULATOR_HOST"] = self.url
    return env

  def gs(self, name: str) -> str:
    return f"gs://{self.bucket}/{name}"

  # -- the JSON API, by hand -----------------------------------------------------------------------

  def put(self, name: str, data: bytes | str) -> None:
    body = data.encode() if isinstance(data, str) else data
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    req = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{self.bucket}/o?{query}", data=body,
                                 method="POST", headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=30) as resp:
      assert resp.status == 200, resp.status

  def get(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o/{quoted}?alt=media", timeout=30) as resp:
      return resp.read()

  def list(self, prefix: str = "") -> list[str]:
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o?{query}", timeout=30) as resp:
      return sorted(item["name"] for item in json.load(resp).get("items", []))


@contextlib.contextmanager
def running(bucket: str = BUCKET):
  server = GcsServer(bucket)
  try:
    yield server
  finally:
    server.stop()
