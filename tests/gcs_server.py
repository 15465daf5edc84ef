"""A real GCS JSON API server on loopback (`gcp-storage-emulator`, in memory) and a minimal client:
`GcsServer` runs it in this process, `GcsServerProcess` in a child process.

The client speaks the JSON API over urllib, independently of the library's storage layer (gcsfs,
epath, tensorstore), so tests can put inputs into the bucket and check what the library wrote.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from http import HTTPStatus

BUCKET = "w2v2-test"
REQUESTS: list[tuple[str, str, str | None]] = []     # media downloads: (bucket, object, Range header or None)


def _behave_like_gcs() -> None:
  """Make the emulator's media downloads carry `x-goog-generation` / `x-goog-metageneration`, as GCS's
  do. gcp-storage-emulator omits them, and tensorstore (Orbax's array I/O) reads an object's generation
  from that header: without it, its second write to an OCDBT manifest fails with "Malformed
  StorageGeneration". It also answers a suffix range ("bytes=-N", the last N bytes: how ArrayRecord's
  GCS reader finds a shard's index) with those bytes, as GCS does, where the emulator would send the
  whole object, and records each media download's Range header in REQUESTS (how a test tells ranged
  reads from whole-object downloads). Patched in this process's copy of the emulator only."""
  from gcp_storage_emulator import server as emulator_server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  original = objects.download
  if getattr(original, "sends_generation", False):
    return

  def download(request, response, storage, *args, **kwargs):
    headers = request._request_handler.headers  # pylint: disable=protected-access
    asked = headers.get("range")
    suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", asked or "")
    try:
      size = len(storage.get_file(request.params["bucket_name"], request.params["object_id"])) if suffix else 0
    except Exception:  # pylint: disable=broad-except  # a missing object: the emulator's own 404 below
      size = 0
    if suffix and size:   # "the last N bytes": GCS honours it, the emulator would send the whole object
      del headers["range"]
      headers["range"] = f"bytes={max(0, size - int(suffix.group(1)))}-{size - 1}"
    original(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
      REQUESTS.append((request.params["bucket_name"], request.params["object_id"], asked))

  download.sends_generation = True
  objects.download = download                       # objects.get(alt=media) calls it by name
  for _, handlers in emulator_server.HANDLERS:      # the routes hold the function itself
    for method, handler in list(handlers.items()):
      if handler is original:
        handlers[method] = download


class _Client:
  """What both server flavours offer a test: the address, gs:// names and the JSON API by hand."""
  bucket: str
  url: str

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


class GcsServer(_Client):
  """The emulator on 127.0.0.1 at a free port, in this process (a thread)."""

  def __init__(self, bucket: str = BUCKET):
    from gcp_storage_emulator import server as emulator  # pylint: disable=import-outside-toplevel
    _behave_like_gcs()
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


class GcsServerProcess(_Client):
  """The same server in a child process: it shares neither the GIL nor the interpreter with the client
  (what a benchmark of reads from a remote store needs). It stops when `stop()` is called or when
  this process exits (it watches its stdin). REQUESTS is not filled for it."""

  def __init__(self, bucket: str = BUCKET):
    self.bucket = bucket
    self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), bucket], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
    line = self._proc.stdout.readline()
    if not line.strip().isdigit():
      self._proc.kill()
      raise RuntimeError(f"the GCS emulator process did not start (it said {line!r})")
    self.port = int(line)
    self.url = f"http://127.0.0.1:{self.port}"

  def stop(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()


@contextlib.contextmanager
def running(bucket: str = BUCKET):
  server = GcsServer(bucket)
  try:
    yield server
  finally:
    server.stop()


if __name__ == "__main__":      # GcsServerProcess's child: serve until stdin closes
  _server = GcsServer(sys.argv[1] if len(sys.argv) > 1 else BUCKET)
  print(_server.port, flush=True)
  sys.stdin.read()
  _server.stop()
