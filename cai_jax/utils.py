"""Small shared helpers: one-line input errors and the one file layer.

Every file the pipeline reads or writes goes through the functions here, which
take local paths and object-store URLs (gs://…) alike: local paths through the
os module (atomic writes: temporary name, fsync, rename), URLs through
etils.epath, the path layer Orbax uses. A `gs://` workdir therefore never
turns into a local `gs:` folder.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
from typing import Iterable, Iterator


class InputError(ValueError):
  """Bad user input (file, config, data line). Its message is one line naming
  the file, the place and the fix; the command line prints it and exits 2."""


# ---------------------------------------------------------------- paths
def is_url(path) -> bool:
  """gs://, s3:// and other object-store paths (handled through etils.epath)."""
  return "://" in str(path)


def resolve_dir(path) -> str:
  """An absolute local path, or an object-store URL unchanged."""
  return str(path) if is_url(path) else os.path.abspath(os.path.expanduser(str(path)))


def epath(path):
  """etils.epath.Path (the path layer Orbax uses): gs:// and local paths alike."""
  from etils import epath as _epath
  return _epath.Path(str(path))


def join(path, *parts) -> str:
  """os.path.join that keeps a URL's scheme (`gs://b` + `x` -> `gs://b/x`)."""
  return os.path.join(str(path), *[str(p) for p in parts])


def exists(path) -> bool:
  return epath(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
  return epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
  return epath(path).is_file() if is_url(path) else os.path.isfile(path)


def makedirs(path) -> None:
  if is_url(path):
    epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
  if not isdir(path):
    return []
  if is_url(path):
    return sorted(p.name for p in epath(path).iterdir())
  return sorted(os.listdir(path))


def remove(path) -> None:
  """Deletes a file, a directory tree or a symlink (not its target); absent is fine."""
  if is_url(path):
    p = epath(path)
    if p.is_dir():
      p.rmtree()
    elif p.exists():
      p.unlink()
    return
  if os.path.islink(path) or os.path.isfile(path):
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)
  elif os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)


def read_bytes(path) -> bytes:
  if is_url(path):
    return epath(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_text(path) -> str:
  return read_bytes(path).decode("utf-8")


def read_json(path, default=None):
  """A JSON file's content; `default` when the file is absent."""
  if not exists(path):
    return default
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); delete or "
                     "restore the file") from None


# ---------------------------------------------------------------- writing
# Name prefix of an atomic write's temporary file (renamed into place when complete).
TMP_PREFIX = ".tmp-"


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write_bytes(path, data) -> None:
  """The one writer: the file appears whole or not at all, with the user's umask.
  `data`: bytes, or a sequence of byte strings written one after another (large
  files without one joined copy in memory)."""
  parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
  if is_url(path):
    # An object store publishes an object whole when its upload completes.
    p = epath(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("wb") as f:
      for part in parts:
        f.write(part)
    return
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX + os.path.basename(path) + "-")
  try:
    with os.fdopen(fd, "wb") as f:
      for part in parts:
        f.write(part)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def atomic_write_text(path, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_once(path: str, text: str) -> None:
  """Atomic write; an existing file is kept, and must hold the same content."""
  if exists(path):
    if read_text(path) == text:
      return
    raise InputError(f"{path}: exists with different content; finished output is never "
                     "overwritten (use a fresh --workdir or --rerun)")
  atomic_write_text(path, text)


def jsonl_text(records: Iterable[dict]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path, records: Iterable[dict]) -> None:
  """Writes records to `path` atomically (temporary name, then rename)."""
  atomic_write_text(path, jsonl_text(records))


def copy_dir_to(src_local: str, dst) -> None:
  """Copies a local directory tree to `dst` (local or URL); dst is replaced whole
  on local disks (written beside, then renamed) and file by file on object stores."""
  if not is_url(dst):
    tmp = str(dst) + ".tmp"
    remove(tmp)
    shutil.copytree(src_local, tmp)
    remove(dst)
    os.replace(tmp, dst)
    return
  remove(dst)
  for root, _, names in os.walk(src_local):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), src_local)
      with open(os.path.join(root, name), "rb") as f:
        atomic_write_bytes(join(dst, rel), f.read())


def copy_dir_from(src, dst_local: str) -> None:
  """Copies a directory tree (local or URL) into a local directory."""
  if not is_url(src):
    shutil.copytree(src, dst_local, dirs_exist_ok=True)
    return
  def files(d):  # object stores refuse recursive globs: walk level by level
    for p in d.iterdir():
      if p.is_dir():
        yield from files(p)
      else:
        yield p

  root = str(src).rstrip("/")
  for p in files(epath(root)):
    out = os.path.join(dst_local, str(p)[len(root) + 1:])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "wb") as f:
      f.write(p.read_bytes())


class JsonlLog:
  """An append-only jsonl log that survives a resume: `truncate(upto)` keeps the
  records whose `key` is <= upto (a killed run may have written later ones), and
  `append` adds records. Local files are appended to and flushed; on an object
  store (no appends) the whole file is rewritten at each `flush`."""

  def __init__(self, path, key: str = "step"):
    self.path, self.key = str(path), key
    self._lines: list[str] = []
    self._f = None

  def truncate(self, upto: int) -> None:
    keep = []
    if exists(self.path):
      for line in read_text(self.path).splitlines():
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by the interruption
        if rec.get(self.key, 0) <= upto:
          keep.append(line + "\n")
    atomic_write_text(self.path, "".join(keep))
    self._lines = keep

  def append(self, records: Iterable[dict]) -> None:
    text = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    if is_url(self.path):
      self._lines.extend(text)
      return
    if self._f is None:
      self._f = open(self.path, "a", encoding="utf-8")
    self._f.writelines(text)

  def flush(self) -> None:
    if is_url(self.path):
      atomic_write_text(self.path, "".join(self._lines))
    elif self._f is not None:
      self._f.flush()

  def close(self) -> None:
    self.flush()
    if self._f is not None:
      self._f.close()
      self._f = None


# ---------------------------------------------------------------- reading
def open_read(path):
  data = read_bytes(path) if is_url(path) else None
  raw = io.BytesIO(data) if data is not None else open(path, "rb")
  return gzip.GzipFile(fileobj=raw) if str(path).endswith(".gz") else raw


def read_jsonl(path) -> Iterator[dict]:
  """Yields records; a bad line raises InputError naming the file and line."""
  if not exists(path):
    raise InputError(f"{path}: file not found")
  with open_read(path) as f:
    for i, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise InputError(f"{path}:{i}: line is not valid UTF-8 (byte {e.start}); "
                         "re-encode the file as UTF-8") from None
      if not line.strip():
        continue
      try:
        yield json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno}); "
                         "fix or remove the line") from None


# ---------------------------------------------------------------- stage markers
def make_chunk_dir(path) -> None:
  """Creates a stage's chunk directory and deletes the temporary files a killed
  earlier run left mid-write (atomic writes rename theirs; these never will).

  Call it before the run's first collective: only then is this process the
  directory's sole writer.
  """
  makedirs(path)
  for name in listdir(path):
    if name.startswith(TMP_PREFIX):
      remove(join(path, name))


def done_path(stage_dir) -> str:
  return join(stage_dir, "DONE")


def is_done(stage_dir) -> bool:
  return exists(done_path(stage_dir))


def done_info(stage_dir) -> dict | None:
  """The summary a finished stage wrote into its DONE marker; None if not done."""
  if not is_done(stage_dir):
    return None
  return json.loads(read_text(done_path(stage_dir)) or "{}")


def mark_done(stage_dir, info: dict | None = None) -> None:
  """Written last by a stage; a stage that finds it is skipped."""
  atomic_write_text(done_path(stage_dir), json.dumps(info or {}, indent=2) + "\n")


def shared_data_dir() -> str:
  """../shared/data beside the project root (overridable by CAI_JAX_SHARED_DATA)."""
  env = os.environ.get("CAI_JAX_SHARED_DATA")
  if env:
    return env
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(os.path.dirname(root), "shared", "data")
