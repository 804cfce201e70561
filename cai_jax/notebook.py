"""What the colabs/ notebooks need from the runtime they run in.

`runtime_summary()` says which accelerator the kernel has and picks the config
that fits it; `workdir()` puts runs on Google Drive when the notebook runs on
Colab and Drive is wanted, so a disconnected runtime loses nothing; configs are
found by name through the installed package (`tools.config_file`).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys

# The config a notebook runs when it is told "auto": SmolLM2 where an accelerator
# makes it quick, the tiny random model on a CPU runtime.
AUTO_CONFIG = {"cpu": "tiny", "gpu": "demo", "tpu": "demo"}


@dataclasses.dataclass
class RuntimeSummary:
  platform: str          # "cpu", "gpu" or "tpu"
  devices: int
  kind: str              # the first device's kind, e.g. "TPU v5 lite", "NVIDIA A100-SXM4-40GB"
  memory_gib: float      # per device, as the runtime reports it (0: not reported, CPU)
  on_colab: bool

  @property
  def config(self) -> str:
    return AUTO_CONFIG.get(self.platform, "tiny")

  def line(self) -> str:
    mem = f", {self.memory_gib:.0f} GiB each" if self.memory_gib else ""
    where = "Colab" if self.on_colab else "this machine"
    return (f"{where}: {self.devices} {self.platform.upper()} device(s) ({self.kind}{mem}); "
            f"'auto' runs configs/{self.config}.py")


def on_colab() -> bool:
  return "google.colab" in sys.modules


def runtime_summary() -> RuntimeSummary:
  import jax
  devs = jax.devices()
  stats = None
  try:
    stats = devs[0].memory_stats()
  except Exception:  # backends without memory statistics
    pass
  mem = float(stats.get("bytes_limit", 0)) / 2**30 if stats else 0.0
  return RuntimeSummary(devs[0].platform, len(devs), str(devs[0].device_kind), mem, on_colab())


def resolve_config(config: str, summary: RuntimeSummary | None = None) -> str:
  """"auto" -> the config for this runtime's accelerator; other values unchanged
  (a config name such as "demo", or a path, with an optional ":arg")."""
  if config == "auto":
    return (summary or runtime_summary()).config
  return config


def workdir(path: str, use_drive: bool = False) -> str:
  """`path` itself, or on Colab with `use_drive` MyDrive/cai_jax/<its last part> on
  the mounted Google Drive, so runs survive a disconnected runtime."""
  if not (use_drive and on_colab()):
    return path
  mount = "/content/drive"
  if not os.path.isdir(os.path.join(mount, "MyDrive")):
    importlib.import_module("google.colab.drive").mount(mount)
  return os.path.join(mount, "MyDrive", "cai_jax", os.path.basename(path.rstrip("/")))
