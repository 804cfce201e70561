"""Everything CPU-specific: the process set-up (glibc malloc, done before the
first allocation) and the sampler's XLA:CPU choices (`decode_program`).

One switch, CAI_JAX_CPU_BACKEND=0, turns all of it off; none of it runs on
TPU or GPU (the malloc re-execution checks for accelerator device files, the
sampler's choices for CPU devices).

Malloc.

XLA:CPU allocates each executable's temporary buffer (gigabytes for a SmolLM2
train step) with `posix_memalign` from a worker thread. glibc serves requests
that large with a fresh `mmap` and unmaps them on free, so every step
page-faults the whole buffer again (the cost is measured in
benchmarks/README.md). PyTorch's CPU allocator pays the same. The settings below keep freed memory in one brk heap (no per-request
mmap, no trimming) on transparent huge pages, so steady-state steps fault
nothing. The cost: the process keeps its peak heap until it exits.

The single arena costs compile-bound work (lock contention among XLA's compile
threads slows the test suite), and accelerator hosts gain nothing, as device
buffers do not come from malloc.

glibc reads GLIBC_TUNABLES only at start-up, so `reexec_with_malloc_tunables()`
re-executes the current command with them set: once, and only on a Linux host
without TPU/GPU device files. CAI_JAX_MALLOC_TUNABLES=0 turns it off, =1 forces
it. `make demo` and `make bench` export the tunables; `make test` turns them off.
Sampling-only processes take huge pages alone instead (`reexec_for_sampling`).
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Optional

MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1")
# Sampling-only processes: transparent huge pages for malloc's memory, and
# nothing else (see `reexec_for_sampling`).
SAMPLING_MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"
_OPT_OUT = "CAI_JAX_MALLOC_TUNABLES"


def malloc_tunables_active(env=None) -> bool:
  env = os.environ if env is None else env
  return "glibc.malloc.mmap_max=0" in env.get("GLIBC_TUNABLES", "")


def has_accelerator() -> bool:
  """TPU (/dev/accel*, /dev/vfio) or NVIDIA device files, or JAX_PLATFORMS naming one."""
  platforms = os.environ.get("JAX_PLATFORMS", "").lower()
  if platforms:
    return any(p in platforms for p in ("tpu", "cuda", "gpu", "rocm"))
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/nvidia[0-9]*")
              or os.path.exists("/dev/vfio/0"))


def tunables_env(env=None) -> dict:
  """`env` (default: this process's) with MALLOC_TUNABLES added to GLIBC_TUNABLES."""
  env = dict(os.environ if env is None else env)
  if not malloc_tunables_active(env):
    current = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLES}" if current else MALLOC_TUNABLES
  return env


def reexec_with_malloc_tunables(module: Optional[str] = None) -> None:
  """Re-executes this process with MALLOC_TUNABLES unless they are active.

  `module`: re-run as `python -m module` (for `python -m` entry points);
  otherwise the script in sys.argv[0] is re-run. Returns only when nothing is
  to be done.
  """
  choice = os.environ.get(_OPT_OUT, "")
  if (not sys.platform.startswith("linux") or malloc_tunables_active() or choice == "0"
      or not enabled()
      or (choice != "1" and has_accelerator())):
    return
  args = sys.argv[1:]
  if module:
    cmd = [sys.executable, "-m", module, *args]
  else:
    cmd = [sys.executable, os.path.abspath(sys.argv[0]), *args]
  _reexec(cmd, tunables_env())


def _reexec(cmd, env) -> None:
  env[_OPT_OUT] = "0"  # never loop, even if glibc ignores the variable
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, cmd, env)


def _without(env, tunables: str) -> dict:
  """A copy of `env` with the settings in `tunables` taken out of GLIBC_TUNABLES."""
  drop = set(tunables.split(":"))
  rest = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t not in drop]
  env = dict(env)
  env.pop("GLIBC_TUNABLES", None)
  if rest:
    env["GLIBC_TUNABLES"] = ":".join(rest)
  return env


def sampling_env(env=None) -> dict:
  """`env` (default: this process's) with MALLOC_TUNABLES taken out of
  GLIBC_TUNABLES and SAMPLING_MALLOC_TUNABLES added (other settings kept)."""
  env = _without(os.environ if env is None else env,
                 f"{MALLOC_TUNABLES}:{SAMPLING_MALLOC_TUNABLES}")
  current = env.get("GLIBC_TUNABLES")
  env["GLIBC_TUNABLES"] = f"{current}:{SAMPLING_MALLOC_TUNABLES}" if current \
      else SAMPLING_MALLOC_TUNABLES
  return env


def reexec_for_sampling() -> None:
  """Re-executes this script under SAMPLING_MALLOC_TUNABLES instead of
  MALLOC_TUNABLES unless it runs so already (Linux only). On accelerator hosts
  or with CAI_JAX_MALLOC_TUNABLES=0, MALLOC_TUNABLES are only taken out.

  For sampling-only processes such as `benchmarks/sampling.py`: every `sample()`
  call allocates its KV cache and temporaries afresh, and glibc maps requests
  that large anew each time; on 4 KiB pages SmolLM2's sampler at batch 64
  took ~70k minor faults per call, on huge pages ~1k. The single arena of
  MALLOC_TUNABLES is left out.
  """
  if not sys.platform.startswith("linux"):
    return
  choice = os.environ.get(_OPT_OUT, "")
  if choice == "0" or (choice != "1" and has_accelerator()):
    if not malloc_tunables_active():
      return
    env = _without(os.environ, MALLOC_TUNABLES)
  else:
    env = sampling_env()
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
      return
  _reexec([sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]], env)


# ---------------------------------------------------------------- the sampler's programs
# The CPU decode step computed feature-major (`models.decode.decode_step`,
# weights transposed once per params), which skips XLA:CPU's per-call weight
# repacking (measured in benchmarks/README.md). Used without a mesh.
FEATURE_MAJOR_DECODE = True
# Otherwise a CPU batch of at most FEW_ROWS rows per device is sampled by a
# program compiled with FEW_ROWS_COMPILER_OPTIONS: XLA:CPU's Eigen dots run a
# decode step's skinny matmuls faster at few rows and evenly at 32 and more
# (benchmarks/README.md). Eigen allocates its packing buffers on every dot, so
# the gain needs a malloc without a single-arena lock (not MALLOC_TUNABLES).
FEW_ROWS = 16
FEW_ROWS_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_SWITCH = "CAI_JAX_CPU_BACKEND"


def enabled() -> bool:
  """The switch: CAI_JAX_CPU_BACKEND=0 runs the CPU like any other backend."""
  return os.environ.get(_SWITCH, "1") != "0"


def _on_cpu(mesh) -> bool:
  import jax
  devices = mesh.devices.flat if mesh is not None else jax.devices()
  return next(iter(devices)).platform == "cpu"


def decode_program(mesh, rows_per_device: int, scan_layers: bool = False) -> tuple:
  """(feature_major, compiler_options) for a sampler's decode on these devices:
  (False, None) off the CPU or with the switch off."""
  if not enabled() or not _on_cpu(mesh):
    return False, None
  if FEATURE_MAJOR_DECODE and mesh is None and not scan_layers:
    return True, None
  if rows_per_device <= FEW_ROWS:
    return False, FEW_ROWS_COMPILER_OPTIONS
  return False, None
