"""A console a person can read: the stages, their progress bars and summaries.

The terminal shows this project's own log lines and everyone's warnings;
INFO lines of libraries (Orbax saves, TFDS builders, matplotlib) go only to the
run's log file, WORKDIR/log.txt, together with everything else.
"""
from __future__ import annotations

import logging
import os

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FILE_HANDLER = None


# Library warnings that say nothing to act on (a local TFDS build names its config).
_QUIET = ("Using custom data configuration",)


class _OwnLinesOrWarnings(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if getattr(record, "file_only", False):
      return False
    own = os.path.abspath(record.pathname).startswith(_PACKAGE)
    if own:
      return record.levelno >= logging.INFO
    return record.levelno >= logging.WARNING and not str(record.msg).startswith(_QUIET)


class _Short(logging.Formatter):
  """Terminal lines without absl's timestamp/thread prefix: the message, and for
  warnings the level and where they come from."""

  def format(self, record: logging.LogRecord) -> str:
    msg = record.getMessage()
    if record.levelno >= logging.WARNING:
      return f"{record.levelname.lower()}: {os.path.basename(record.pathname)}:{record.lineno}: {msg}"
    return msg


def setup() -> None:
  """Filters and shortens the terminal's handlers."""
  root = logging.getLogger()
  for h in root.handlers:
    if h is _FILE_HANDLER:
      continue
    if not any(isinstance(f, _OwnLinesOrWarnings) for f in h.filters):
      h.addFilter(_OwnLinesOrWarnings())
    h.setFormatter(_Short())
  if root.level > logging.INFO or root.level == logging.NOTSET:
    root.setLevel(logging.INFO)


def log_to(log_path: str | None) -> None:
  """Every log line from now on also goes to `log_path` (local paths; None stops it).
  The pipeline attaches it once the run's input has been checked, so a refused
  run leaves no file behind."""
  global _FILE_HANDLER
  root = logging.getLogger()
  if _FILE_HANDLER is not None:
    if log_path and _FILE_HANDLER.baseFilename == os.path.abspath(log_path):
      return
    root.removeHandler(_FILE_HANDLER)
    _FILE_HANDLER.close()
    _FILE_HANDLER = None
  if log_path and "://" not in log_path:
    _FILE_HANDLER = logging.FileHandler(log_path, encoding="utf-8")
    _FILE_HANDLER.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname).1s %(filename)s:%(lineno)d] %(message)s"))
    root.addHandler(_FILE_HANDLER)
