"""The one metrics writer: WORKDIR/<stage>/metrics*.jsonl and TensorBoard scalars.

Every training stage writes one JSON line per step (loss, accuracy where
defined, learning rate, tokens/s, ...) and the same scalars to TensorBoard, on
the main host only. A resumed run first drops the lines after the step it
resumes from, so the file always describes the one run that produced the
checkpoint.
"""
from __future__ import annotations

import math
from typing import Optional

import jax

from cai_jax import utils


class MetricsWriter:

  def __init__(self, path: str, tb_dir: Optional[str] = None, resume_step: int = 0,
               key: str = "step"):
    self.main = jax.process_index() == 0
    self.key = key
    self.log = utils.JsonlLog(path, key=key) if self.main else None
    if self.log is not None:
      self.log.truncate(int(resume_step))
    self.tb = None
    if tb_dir and self.main:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(tb_dir)

  def write(self, step: int, scalars: dict, prefix: str = "") -> None:
    """One JSON line {key: step, prefix+name: value, ...} and the same TB scalars."""
    if not self.main:
      return
    rec = {self.key: int(step)}
    for k, v in scalars.items():
      if k == self.key:
        continue
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        rec[prefix + k] = float(v) if math.isfinite(float(v)) else None
    self.log.append([rec])
    if self.tb is not None:
      for k, v in rec.items():
        if k != self.key and v is not None:
          self.tb.add_scalar(k, v, int(step))

  def text(self, tag: str, text: str, step: int) -> None:
    if self.tb is not None:
      self.tb.add_text(tag, text, int(step))

  def flush(self) -> None:
    if self.log is not None:
      self.log.flush()
    if self.tb is not None:
      self.tb.flush()

  def close(self) -> None:
    if self.log is not None:
      self.log.close()
    if self.tb is not None:
      self.tb.close()
