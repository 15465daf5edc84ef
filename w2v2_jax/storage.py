"""One path layer for local disks and object storage (gs://, s3://): etils.epath over fsspec.

Every file the library reads or writes outside a checkpoint goes through here: manifests, label
files, audio, vocabularies, run directories (metrics, best.json, valid.jsonl), exported models and
hypotheses. Orbax writes the checkpoints themselves through the same epath layer plus tensorstore.
Local paths keep plain `open()` speed; a URL goes to gcsfs (the `gcs` extra) or s3fs.

epath goes through fsspec even where TensorFlow is installed (`configure()`, at import).
A local GCS API server (e.g. `gcp-storage-emulator`) is reached by setting `STORAGE_EMULATOR_HOST`
(http://HOST:PORT) before the first storage call; `configure_emulator()` then sets what each client
needs to use it: gcsfs without its gRPC bucket-type probe and anonymous, tensorstore (Orbax) and
google-cloud-cpp (ArrayRecord) at the same server, and no GCE metadata lookups.
"""
from __future__ import annotations

import atexit
import io
import logging
import os
import posixpath
import shutil
import tempfile
from typing import IO, Iterator, Union

from etils import epath

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
SCHEMES = ("gs://", "s3://")
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_LOOPBACK_METADATA = "127.0.0.1:9"        # a closed loopback port: metadata lookups fail at once


def configure() -> str | None:
  """Library-wide storage defaults; `w2v2_jax/__init__.py` calls it before anything imports gcsfs.

  epath (ours, Orbax's, tfds', the whole process's and its children's: it is an environment variable)
  goes through fsspec (gcsfs, s3fs) even where TensorFlow is installed, when gcsfs is installed:
  TensorFlow's file systems return objects our text layer cannot wrap and have no s3:// (it moved to
  tensorflow-io), and fsspec is the path the tests run. EPATH_USE_TF=true in the environment wins.
  Then `configure_emulator()`. Returns the emulator's URL or None."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("gcsfs") is not None:      # else TensorFlow's gs:// stays epath's way there
    os.environ.setdefault("EPATH_USE_TF", "false")
  return configure_emulator()


def configure_emulator() -> str | None:
  """When STORAGE_EMULATOR_HOST names a GCS API server, point every client at it; returns its URL.

  Only defaults are set (a value already in the environment wins). Must run before gcsfs is
  imported (`configure()` calls it)."""
  host = os.environ.get(EMULATOR_ENV, "")
  if not host or host == "default":
    return None
  url = host if host.startswith(("http://", "https://")) else f"http://{host}"
  defaults = {
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",   # its bucket-type probe is gRPC, 60 s timeouts
      "TENSORSTORE_GCS_HTTP_URL": url,                # Orbax's array writes
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,         # google-cloud-cpp (ArrayRecord's gs:// reader)
      "FSSPEC_GCS_TOKEN": "anon",                     # no credentials lookup
      "NO_GCE_CHECK": "True",
      "GCE_METADATA_HOST": _LOOPBACK_METADATA,
      "GCE_METADATA_ROOT": _LOOPBACK_METADATA,
      "GCE_METADATA_IP": _LOOPBACK_METADATA,
  }
  for key, value in defaults.items():
    os.environ.setdefault(key, value)
  try:
    import fsspec  # pylint: disable=import-outside-toplevel
    fsspec.config.conf.setdefault("gcs", {}).setdefault("token", "anon")
  except ImportError:
    pass
  return url


def is_remote(path: PathLike) -> bool:
  """True for an object-store URL (gs://, s3://)."""
  return os.fspath(path).startswith(SCHEMES)


def as_path(path: PathLike) -> epath.Path:
  """An epath.Path: local paths as given, URLs through fsspec."""
  return epath.Path(os.fspath(path))


def join(root: PathLike, *parts: str) -> str:
  """`root/part/...` as a string; URLs are joined with '/', local paths with os.path.join."""
  root = os.fspath(root)
  if is_remote(root):
    return posixpath.join(root, *parts)
  return os.path.join(root, *parts)


def splitext(path: PathLike) -> tuple[str, str]:
  return posixpath.splitext(os.fspath(path)) if is_remote(path) else os.path.splitext(os.fspath(path))


def dirname(path: PathLike) -> str:
  path = os.fspath(path)
  return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def open_file(path: PathLike, mode: str = "r", encoding: str | None = "utf-8") -> IO:
  """Open a local file or an object (text modes decode `encoding`)."""
  if not is_remote(path):
    if "b" in mode:
      return open(os.fspath(path), mode)  # pylint: disable=unspecified-encoding
    return open(os.fspath(path), mode, encoding=encoding)
  if "a" in mode:
    raise ValueError(f"{path}: object stores cannot append; rewrite the whole object")
  import fsspec  # pylint: disable=import-outside-toplevel
  binary = fsspec.open(os.fspath(path), mode if "b" in mode else mode + "b").open()   # a file, whatever
  if "b" in mode:                                                                     # epath's backend
    return binary
  return io.TextIOWrapper(binary, encoding=encoding or "utf-8")


def read_text(path: PathLike) -> str:
  with open_file(path, "r") as f:
    return f.read()


def read_bytes(path: PathLike) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def write_text(path: PathLike, text: str) -> None:
  """Write (replace) a text file or object; a local file's directory is created."""
  if not is_remote(path):
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
  with open_file(path, "w") as f:
    f.write(text)


def write_bytes(path: PathLike, data: bytes) -> None:
  if not is_remote(path):
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
  with open_file(path, "wb") as f:
    f.write(data)


def append_text(path: PathLike, text: str) -> None:
  """Append to a local file; an object is read and rewritten (fine for small logs like valid.jsonl)."""
  if not is_remote(path):
    with open_file(path, "a") as f:
      f.write(text)
    return
  old = read_text(path) if exists(path) else ""
  write_text(path, old + text)


def exists(path: PathLike) -> bool:
  return os.path.exists(os.fspath(path)) if not is_remote(path) else as_path(path).exists()


def isfile(path: PathLike) -> bool:
  if not is_remote(path):
    return os.path.isfile(os.fspath(path))
  p = as_path(path)
  return p.exists() and not p.is_dir()


def isdir(path: PathLike) -> bool:
  return os.path.isdir(os.fspath(path)) if not is_remote(path) else as_path(path).is_dir()


def getsize(path: PathLike) -> int:
  if not is_remote(path):
    return os.path.getsize(os.fspath(path))
  return int(as_path(path).stat().length)


def makedirs(path: PathLike) -> None:
  """Create a local directory (and parents); a no-op on object stores, which have no directories."""
  if not is_remote(path):
    os.makedirs(os.fspath(path), exist_ok=True)


def walk_files(root: PathLike) -> Iterator[str]:
  """Every file under `root`, as paths relative to it, in sorted order (symlinked dirs followed)."""
  root = os.fspath(root)
  if not is_remote(root):
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
      dirnames.sort()
      for name in sorted(filenames):
        yield os.path.relpath(os.path.join(dirpath, name), root)
    return
  import fsspec  # pylint: disable=import-outside-toplevel
  fs, base = fsspec.core.url_to_fs(root)
  base = base.rstrip("/")
  yield from sorted(posixpath.relpath(found, base) for found in fs.find(base))


def local_copy(path: PathLike, into: str | None = None) -> str:
  """A local path with `path`'s content: `path` itself when local, else a download (a file, or every
  object under a prefix) into `into` or a fresh temporary directory that lives as long as the process."""
  path = os.fspath(path)
  if not is_remote(path):
    return path
  target = into
  if target is None:
    target = tempfile.mkdtemp(prefix="w2v2_remote_")
    atexit.register(shutil.rmtree, target, True)
  source = as_path(path)
  if not source.is_dir():
    local = os.path.join(target, posixpath.basename(path.rstrip("/")))
    with open_file(path, "rb") as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst)
    log.info("downloaded %s to %s", path, local)
    return local
  for rel in walk_files(path):
    local = os.path.join(target, rel)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open_file(join(path, rel), "rb") as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst)
  log.info("downloaded %s to %s", path, target)
  return target


def local_model_copy(url: str, subdirs: tuple, marker: str, weights: tuple, companion: str) -> str:
  """A local copy of a model at `url`: the first of url/<subdir> (for each of `subdirs`, "" for url
  itself) that holds `marker` and one of `weights` (a directory model), else the file `url` with the
  `companion` file next to it when there is one (e.g. a fairseq .pt and its dict.ltr.txt).
  FileNotFoundError if neither."""
  for sub in subdirs:
    candidate = join(url, sub) if sub else url
    if isfile(join(candidate, marker)) and any(isfile(join(candidate, w)) for w in weights):
      return local_copy(candidate)
  if not isfile(url):
    raise FileNotFoundError(f"{url}: no such checkpoint (no {marker} in it or in "
                            f"{', '.join(s for s in subdirs if s)}, and not a file)")
  local = local_copy(url)
  if isfile(join(dirname(url), companion)):
    local_copy(join(dirname(url), companion), into=os.path.dirname(local))
  return local


def upload_dir(local_dir: str, dest: PathLike) -> None:
  """Copy every file of a local directory to `dest` (an object prefix or a local directory)."""
  for rel in walk_files(local_dir):
    with open(os.path.join(local_dir, rel), "rb") as f:
      write_bytes(join(dest, *rel.split(os.sep)), f.read())


def bytes_io(path: PathLike) -> io.BytesIO:
  """The whole object (or file) in memory, for decoders that need to seek."""
  return io.BytesIO(read_bytes(path))
