"""cai_jax.cpu_backend: the glibc malloc re-exec, and that it stops per-step page faults."""
import os
import subprocess
import sys
import textwrap

import pytest

from cai_jax import cpu_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates and frees a 256 MB buffer 4 times (as XLA:CPU does with its
# per-execution temporary buffer) and prints the minor page faults of the last 3.
_PROBE = textwrap.dedent("""
    import os, resource, sys
    sys.path.insert(0, {root!r})
    from cai_jax import cpu_backend
    cpu_backend.reexec_with_malloc_tunables()
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def touch():
        n = 256 << 20
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
    touch()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        touch()
    print(cpu_backend.malloc_tunables_active(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
""")


def _probe(tmp_path, **env_overrides):
  script = tmp_path / "probe.py"
  script.write_text(_PROBE.format(root=ROOT))
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CAI_JAX_MALLOC_TUNABLES")}
  env.update(env_overrides)
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split()
  return out[0] == "True", int(out[1])


def test_reexec_is_a_no_op_off_linux(monkeypatch):
  """glibc tunables exist only on Linux: elsewhere neither re-exec may run."""
  def no_exec(*a):
    raise AssertionError("re-exec attempted off Linux")
  monkeypatch.setattr(cpu_backend.os, "execve", no_exec)
  monkeypatch.setattr(cpu_backend.sys, "platform", "darwin")
  monkeypatch.setenv("CAI_JAX_MALLOC_TUNABLES", "1")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  assert cpu_backend.reexec_with_malloc_tunables() is None
  monkeypatch.setenv("GLIBC_TUNABLES", cpu_backend.MALLOC_TUNABLES)
  assert cpu_backend.reexec_for_sampling() is None
  assert os.environ["GLIBC_TUNABLES"] == cpu_backend.MALLOC_TUNABLES


def test_reexec_sets_tunables_and_stops_refaulting(tmp_path):
  # The probe calls glibc directly: the project's hosts (TPU VMs, Colab, CI)
  # are Linux, and test_reexec_is_a_no_op_off_linux covers the other branch.
  assert sys.platform.startswith("linux"), "this test needs glibc (Linux)"
  active, faults = _probe(tmp_path, CAI_JAX_MALLOC_TUNABLES="1")
  assert active
  off_active, off_faults = _probe(tmp_path, CAI_JAX_MALLOC_TUNABLES="0")
  assert not off_active
  # Accelerator hosts keep the default allocator unless forced.
  assert _probe(tmp_path, JAX_PLATFORMS="tpu")[0] is False
  # 3 x 256 MB freshly mapped = ~196k faults of 4 KiB pages (384 of 2 MiB ones
  # where transparent huge pages are always on); with the tunables the freed
  # heap is reused and nothing faults again.
  assert off_faults >= 384
  assert faults < off_faults / 20


def test_tunables_env_appends_to_existing_settings():
  env = cpu_backend.tunables_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "X": "1"})
  assert env["GLIBC_TUNABLES"].startswith("glibc.malloc.tcache_count=0:")
  assert cpu_backend.malloc_tunables_active(env)
  assert cpu_backend.tunables_env(env)["GLIBC_TUNABLES"] == env["GLIBC_TUNABLES"]  # idempotent
  assert env["X"] == "1"


def test_has_accelerator_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert cpu_backend.has_accelerator()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not cpu_backend.has_accelerator()


def test_sampling_env_swaps_the_train_tunables_for_huge_pages():
  other = "glibc.malloc.tcache_count=0"
  env = cpu_backend.sampling_env(cpu_backend.tunables_env({"GLIBC_TUNABLES": other, "X": "1"}))
  assert env["GLIBC_TUNABLES"] == f"{other}:{cpu_backend.SAMPLING_MALLOC_TUNABLES}"
  assert not cpu_backend.malloc_tunables_active(env) and env["X"] == "1"
  assert cpu_backend.sampling_env(env) == env  # idempotent
  assert cpu_backend.sampling_env({})["GLIBC_TUNABLES"] == cpu_backend.SAMPLING_MALLOC_TUNABLES


def test_reexec_for_sampling(tmp_path):
  assert sys.platform.startswith("linux"), "this test needs glibc (Linux)"
  script = tmp_path / "sample.py"
  script.write_text(textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {ROOT!r})
      from cai_jax import cpu_backend
      cpu_backend.reexec_for_sampling()
      print(cpu_backend.malloc_tunables_active(), os.environ.get("GLIBC_TUNABLES", "-"))
  """))
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CAI_JAX_MALLOC_TUNABLES")}
  def run(**extra):
    return subprocess.run([sys.executable, str(script)], env={**env, **extra}, text=True,
                          capture_output=True, timeout=120, check=True).stdout.split()
  huge = cpu_backend.SAMPLING_MALLOC_TUNABLES
  other = "glibc.malloc.tcache_count=0"
  with_other = cpu_backend.tunables_env({"GLIBC_TUNABLES": other})["GLIBC_TUNABLES"]
  # The train tunables are swapped for huge pages; other settings are kept.
  assert run(GLIBC_TUNABLES=with_other) == ["False", f"{other}:{huge}"]
  assert run(GLIBC_TUNABLES=cpu_backend.MALLOC_TUNABLES) == ["False", huge]
  assert run() == ["False", huge]
  # Opted out, or on an accelerator host: the train tunables are only taken out.
  assert run(GLIBC_TUNABLES=with_other, CAI_JAX_MALLOC_TUNABLES="0") == ["False", other]
  assert run(CAI_JAX_MALLOC_TUNABLES="0") == ["False", "-"]
  assert run(JAX_PLATFORMS="tpu") == ["False", "-"]
  assert run(JAX_PLATFORMS="tpu", CAI_JAX_MALLOC_TUNABLES="1") == ["False", huge]


def test_sampling_tunables_map_large_buffers_on_huge_pages(tmp_path):
  """A freed and re-allocated 256 MB buffer (a sampler's per-call KV cache)
  faults 2 MiB pages, not 4 KiB ones, where the kernel offers huge pages."""
  assert sys.platform.startswith("linux"), "this test needs glibc (Linux)"
  script = tmp_path / "probe.py"
  script.write_text(_PROBE.format(root=ROOT).replace("reexec_with_malloc_tunables",
                                                     "reexec_for_sampling"))
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CAI_JAX_MALLOC_TUNABLES")}
  def faults(**extra):
    out = subprocess.run([sys.executable, str(script)], env={**env, **extra}, text=True,
                         capture_output=True, timeout=120, check=True).stdout.split()
    return int(out[1])
  thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
  off, on = faults(CAI_JAX_MALLOC_TUNABLES="0"), faults()
  if "[madvise]" in thp:  # huge pages where malloc asks for them
    assert on < off / 20, (on, off, thp)
  else:  # huge pages always, or never: the setting changes nothing
    assert off / 2 <= on <= 2 * off + 64, (on, off, thp)
