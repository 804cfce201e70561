"""Small shared helpers: one-line input errors, atomic writes, DONE markers, jsonl."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterable, Iterator


class InputError(ValueError):
  """Bad user input (file, config, data line). Its message is one line naming
  the file, the place and the fix; the command line prints it and exits 2."""


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def is_url(path: str) -> bool:
  """gs://, s3:// and other object-store paths (handled through etils.epath)."""
  return "://" in str(path)


def resolve_dir(path: str) -> str:
  """An absolute local path, or an object-store URL unchanged."""
  return str(path) if is_url(path) else os.path.abspath(path)


def epath(path: str):
  """etils.epath.Path (the path layer Orbax uses): gs:// and local paths alike."""
  from etils import epath as _epath
  return _epath.Path(path)


# Name prefix of an atomic write's temporary file (renamed into place when complete).
TMP_PREFIX = ".tmp-"


def atomic_write_bytes(path: str, data: bytes) -> None:
  if is_url(path):
    # An object store publishes an object whole when its upload completes.
    p = epath(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX + os.path.basename(path) + "-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def make_chunk_dir(path: str) -> None:
  """Creates a stage's chunk directory and deletes the temporary files a killed
  earlier run left mid-write (atomic writes rename theirs; these never will).

  Call it before the run's first collective: only then is this process the
  directory's sole writer.
  """
  os.makedirs(path, exist_ok=True)
  for name in os.listdir(path):
    if name.startswith(TMP_PREFIX):
      with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(path, name))


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  """Writes records to `path` atomically (temporary name, then rename)."""
  atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str) -> Iterator[dict]:
  """Yields records; a bad line raises InputError naming the file and line."""
  if not os.path.exists(path):
    raise InputError(f"{path}: file not found")
  opener = open
  if path.endswith(".gz"):
    import gzip
    opener = gzip.open
  with opener(path, "rb") as f:
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


def done_path(stage_dir: str) -> str:
  return os.path.join(stage_dir, "DONE")


def is_done(stage_dir: str) -> bool:
  return os.path.exists(done_path(stage_dir))


def done_info(stage_dir: str) -> dict | None:
  """The summary a finished stage wrote into its DONE marker; None if not done."""
  if not is_done(stage_dir):
    return None
  with open(done_path(stage_dir), encoding="utf-8") as f:
    return json.load(f)


def mark_done(stage_dir: str, info: dict | None = None) -> None:
  """Written last by a stage; a stage that finds it is skipped."""
  atomic_write_text(done_path(stage_dir), json.dumps(info or {}, indent=2) + "\n")


def shared_data_dir() -> str:
  """../shared/data beside the project root (overridable by CAI_JAX_SHARED_DATA)."""
  env = os.environ.get("CAI_JAX_SHARED_DATA")
  if env:
    return env
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(os.path.dirname(root), "shared", "data")
