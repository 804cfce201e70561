"""Fitting a train step to device memory: micro-batches, rematerialisation, logits chunk.

A stage keeps its config's global batch; what changes with the devices is how a
step holds it. `choose` measures candidate splits with the compiled step's own
memory analysis (lowered for abstract, sharded inputs: nothing is allocated)
and returns the largest micro-batch that fits, rematerialising blocks (and, for
SFT, chunking the LM head's logits) only when that lets a larger micro-batch
fit than without. Stages call it at start-up with the runtime's device memory;
the planner (`tools.plan --slice`) calls it with a named slice's HBM.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

from cai_jax.training.accumulate import valid_counts
from cai_jax.utils import InputError

GiB = float(1 << 30)
# Share of device memory a step may plan to use: the analysis does not see the
# runtime's own buffers, host transfers or fragmentation.
HEADROOM = 0.9
# LM-head block used when fitting turns chunking on and the config had none.
FIT_LOGITS_CHUNK = 256


class FitError(InputError):
  """No split of the batch fits the device memory, or the configured count does not
  divide it; a one-line message (the run exits 2)."""


@dataclasses.dataclass(frozen=True)
class Split:
  micro_batches: int = 1
  remat: bool = False
  logits_chunk: int = 0

  def describe(self, batch_size: int) -> str:
    return (f"micro-batch {batch_size // self.micro_batches} x {self.micro_batches} "
            f"accumulation step(s), remat={'on' if self.remat else 'off'}"
            + (f", logits_chunk={self.logits_chunk}" if self.logits_chunk else ""))


@dataclasses.dataclass
class Fit:
  split: Split
  batch_size: int
  bytes: Optional[int]      # compiled per-device total of the chosen split; None: not measured
  budget: Optional[int]     # bytes the step may use (device memory x HEADROOM); None: unknown
  tried: list               # [(Split, bytes)] in the order measured

  def line(self, name: str) -> str:
    what = self.split.describe(self.batch_size)
    if self.budget is None:
      return f"{name}: {what} (device memory unknown; set --config.hbm_gib to fit)"
    return (f"{name}: {what}: {self.bytes / GiB:.2f} GiB per device of "
            f"{self.budget / GiB:.2f} GiB usable ({len(self.tried)} compiles)")

  def record(self) -> dict:
    return {"micro_batches": self.split.micro_batches, "remat": self.split.remat,
            "logits_chunk": self.split.logits_chunk, "batch_size": self.batch_size,
            "gib_per_device": None if self.bytes is None else round(self.bytes / GiB, 3),
            "usable_gib": None if self.budget is None else round(self.budget / GiB, 3)}


def device_budget(hbm_gib: float = 0.0, devices=None) -> Optional[int]:
  """Bytes a step may use per device: `hbm_gib` when given, else the runtime's
  limit for the first local device (TPU, GPU); None where the runtime reports
  none (CPU)."""
  if hbm_gib and float(hbm_gib) > 0:
    return int(float(hbm_gib) * GiB * HEADROOM)
  import jax
  dev = (devices or jax.local_devices())[0]
  try:
    stats = dev.memory_stats()
  except Exception:  # backends without memory statistics
    stats = None
  if not stats or not stats.get("bytes_limit"):
    return None
  return int(int(stats["bytes_limit"]) * HEADROOM)


def compiled_bytes(compiled, extra: int = 0) -> int:
  """Per-device bytes of a compiled step: arguments, outputs not aliased to donated
  arguments, temporaries, plus `extra` (models resident beside the step)."""
  m = compiled.memory_analysis()
  if m is None:
    raise FitError("this backend reports no memory analysis; set the micro-batches by hand")
  out = max(m.output_size_in_bytes - m.alias_size_in_bytes, 0)
  return int(m.argument_size_in_bytes + out + m.temp_size_in_bytes + extra)


def choose(measure: Callable[[Split], int], batch_size: int, divisor: int,
           budget: Optional[int], base: Split = Split(), chunked: bool = False,
           fixed_micro_batches: int = 0, name: str = "step") -> Fit:
  """The split a step runs with.

  measure(split) -> per-device bytes of the step compiled that way. The pick is
  the largest micro-batch at which the base or the lean setting (remat on, and
  the LM-head chunk when `chunked`) fits; the base when both do.
  divisor: devices of the batch axes (a micro-batch must spread over them).
  base: the config's remat and logits chunk. chunked: the step has an LM-head
  chunk to turn on. fixed_micro_batches > 0: the count is the config's; only
  checked against the budget. budget None: nothing is measured; the base split
  runs with one micro-batch (or the fixed count).
  """
  counts = valid_counts(batch_size, divisor)
  if fixed_micro_batches:
    if fixed_micro_batches not in counts:
      raise FitError(f"{name}: batch {batch_size} over {divisor} device(s) does not split into "
                     f"{fixed_micro_batches} micro-batches; set micro_batches to one of "
                     f"{', '.join(map(str, counts))} (or 0 to fit it to memory)")
    counts = [fixed_micro_batches]
  if not counts:
    raise FitError(f"{name}: batch {batch_size} does not divide over the {divisor} devices of "
                   "the batch axes; change the batch size or the mesh")
  if budget is None:
    return Fit(dataclasses.replace(base, micro_batches=counts[0]), batch_size, None, None, [])
  lean = Split(remat=True, logits_chunk=(base.logits_chunk or FIT_LOGITS_CHUNK) if chunked
               else base.logits_chunk)
  tried, memo = [], {}

  def size(split: Split) -> int:
    if split not in memo:
      memo[split] = measure(split)
      tried.append((split, memo[split]))
      logging.info("%s: %s -> %.2f GiB", name, split.describe(batch_size), memo[split] / GiB)
    return memo[split]

  def at(k: int) -> Optional[Split]:
    """The split run at count k: without remat (the base) when it fits, else the
    lean one when that fits, else None. Remat usually shrinks a step; for small
    models its recomputation buffers can make it larger, so both are tried."""
    plain = dataclasses.replace(base, micro_batches=k)
    leaner = dataclasses.replace(lean, micro_batches=k)
    fitting = [split for split in dict.fromkeys((plain, leaner)) if size(split) <= budget]
    return fitting[0] if fitting else None

  # One micro-batch first: accumulating holds float32 gradient sums, which can cost
  # more than the activations a split saves. From two up, memory falls as the count
  # rises: the largest count, then a binary search for the smallest that fits.
  pick = at(counts[0])
  if pick is None:
    if at(counts[-1]) is None:
      need = min(v for _, v in tried)
      raise FitError(f"{name}: no split fits: {counts[-1]} micro-batches need "
                     f"{need / GiB:.1f} GiB per device, {budget / GiB:.1f} GiB usable; use "
                     "more devices or a smaller batch or sequence length")
    lo, hi = 1, len(counts) - 1
    while lo < hi:
      mid = (lo + hi) // 2
      if at(counts[mid]) is not None:
        hi = mid
      else:
        lo = mid + 1
    pick = at(counts[lo])
  return Fit(pick, batch_size, size(pick), budget, tried)
