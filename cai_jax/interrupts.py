"""SIGTERM and SIGINT as flags: the handler records the signal, the loops stop.

A signal handler that raises can land anywhere, including inside a garbage
collector callback, where Python prints "Exception ignored" and carries on. So
the handler only records the signal. The train loop, the PPO loop, the chunk
runner, the sampler's batch loop and the pipeline call `check()` at their safe
points: there they save what they have, and `check()` raises `Interrupted`, an
ordinary exception from ordinary code. The command line turns it into one line
and the conventional status, 128 + the signal number (143 for SIGTERM, 130 for
SIGINT). A second signal while the first is being handled exits at once
(everything on disk is written whole, so nothing is half-written).

With several processes a host stops only where every host checks together
(`check(collective=True)`: the train loop every COLLECTIVE_EVERY steps, the PPO
loop, between stages), so the hosts agree on where they stop and no save or
collective is left waiting.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

_received: Optional[int] = None
NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class Interrupted(Exception):
  """Raised at a safe point after SIGTERM or SIGINT; progress so far is saved."""

  def __init__(self, signum: int, where: str):
    self.signum, self.where = int(signum), where
    super().__init__(f"stopped by {NAMES.get(signum, f'signal {signum}')} in {where}; "
                     "progress is saved: rerun the same command to resume")

  @property
  def exit_status(self) -> int:
    return 128 + self.signum


def _handle(signum, frame) -> None:
  del frame
  global _received
  if _received is not None:
    sys.stderr.write(f"cai-jax: {NAMES.get(signum, signum)} again: exiting now; rerun the same "
                     "command to resume from the last save\n")
    sys.stderr.flush()
    os._exit(128 + signum)
  _received = signum


def install() -> None:
  """Record SIGTERM and SIGINT from now on (main thread only)."""
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, _handle)


def received() -> Optional[int]:
  """The signal this process has received, or None."""
  return _received


def reset() -> None:
  global _received
  _received = None


def requested(collective: bool = False) -> Optional[int]:
  """The signal to stop for here, or None. With several processes, only
  `collective` points answer (every host must call them together), with the
  first signal any host received."""
  from cai_jax import multihost
  if multihost.process_count() == 1:
    return _received
  if not collective:
    return None
  import numpy as np
  from jax.experimental import multihost_utils
  got = np.asarray(multihost_utils.process_allgather(np.asarray([_received or 0], np.int32)))
  got = [int(x) for x in got.reshape(-1) if int(x)]
  return got[0] if got else None


# Steps between the hosts' agreement in the train loop: the all-gather waits for the
# step in flight, so a per-step one would stop the host preparing the next batch.
COLLECTIVE_EVERY = 10


def requested_at(step: int) -> Optional[int]:
  """`requested(collective=True)` for a loop the hosts run in lockstep, at `step`:
  every step with one process, every COLLECTIVE_EVERY steps with several."""
  from cai_jax import multihost
  if multihost.process_count() > 1 and step % COLLECTIVE_EVERY:
    return None
  return requested(collective=True)


def check(where: str, collective: bool = False) -> None:
  """Raises `Interrupted` if a stop was requested (see `requested`)."""
  signum = requested(collective)
  if signum is not None:
    raise Interrupted(signum, where)
