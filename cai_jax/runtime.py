"""Process set-up that has to happen before the first allocation: glibc malloc.

XLA:CPU allocates each executable's temporary buffer (1.8 GB for a SmolLM2
train step) with `posix_memalign` from a worker thread. glibc serves requests
that large with a fresh `mmap` and unmaps them on free, so every step
page-faults the whole buffer again: 1.4 M minor faults and 3-4 s of kernel
time per step, about 10% of a CPU train step. PyTorch's CPU allocator pays the
same. The settings below keep freed memory in one brk heap (no per-request
mmap, no trimming) on transparent huge pages, so steady-state steps fault
nothing. The cost: the process keeps its peak heap until it exits.

glibc reads GLIBC_TUNABLES only at start-up, so `reexec_with_malloc_tunables()`
re-executes the current command with them set (once; a no-op when they are
already set, off Linux, or with CAI_JAX_MALLOC_TUNABLES=0). `make demo`,
`make test` and `make bench` export them directly.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1")
_OPT_OUT = "CAI_JAX_MALLOC_TUNABLES"


def malloc_tunables_active(env=None) -> bool:
  env = os.environ if env is None else env
  return "glibc.malloc.mmap_max=0" in env.get("GLIBC_TUNABLES", "")


def tunables_env(env=None) -> dict:
  """`env` (default: this process's) with MALLOC_TUNABLES added to GLIBC_TUNABLES."""
  env = dict(os.environ if env is None else env)
  current = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.mmap_max=0" not in current:
    env["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLES}" if current else MALLOC_TUNABLES
  return env


def reexec_with_malloc_tunables(module: Optional[str] = None,
                                argv: Optional[Sequence[str]] = None) -> None:
  """Re-executes this process with MALLOC_TUNABLES unless they are active.

  `module`: re-run as `python -m module` (for `python -m` entry points);
  otherwise the script in sys.argv[0] is re-run. Returns only when nothing is
  to be done.
  """
  if (not sys.platform.startswith("linux") or malloc_tunables_active()
      or os.environ.get(_OPT_OUT, "1") == "0"):
    return
  args = list(sys.argv[1:] if argv is None else argv)
  if module:
    cmd = [sys.executable, "-m", module, *args]
  else:
    cmd = [sys.executable, os.path.abspath(sys.argv[0]), *args]
  env = tunables_env()
  env[_OPT_OUT] = "0"  # never loop, even if glibc ignores the variable
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, cmd, env)
