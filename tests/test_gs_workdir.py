"""The whole tiny pipeline on a gs:// workdir, with epath's gs:// calls (and Orbax's
TensorStore GCS driver) redirected to a temporary directory: every stage's records,
chunks, checkpoints, exports, settings, DONE markers, the report and its plots land
in the bucket, and no local `gs:` folder is ever created."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `cai_jax.main` with gs:// redirected to BUCKET_ROOT (argv[1]); argv[2:] are its flags.
DRIVER = r'''
import os, sys
bucket_root = sys.argv[1]
seen = []

def local(p):
  p = str(p)
  if "://" not in p:
    return p
  seen.append(p)
  return os.path.join(bucket_root, p.split("://", 1)[1])

def back(p, was_url):
  return ("gs://" + os.path.relpath(p, bucket_root)) if was_url else p

def one(fn, path, *a, **kw):
  return fn(local(path), *a, **kw)

def two(fn, path, dst, *a, **kw):
  return fn(local(path), local(dst), *a, **kw)

def glob(fn, path):
  return [back(g, "://" in str(path)) for g in fn(local(path))]

def walk(fn, top, **kw):
  for d, dirs, files in fn(local(top), **kw):
    yield back(d, "://" in str(top)), dirs, files

from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils
gcs_utils.get_kvstore_for_gcs = lambda path: {"driver": "file", "path": local(path)}
gcs_utils.is_hierarchical_namespace_enabled = lambda path: False  # a bucket metadata call
with epath_testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one,
                              mkdir=one, remove=one, rmtree=one, stat=one, rename=two,
                              replace=two, copy=two, glob=glob, walk=walk):
  from cai_jax import main
  sys.argv = ["cai-jax"] + sys.argv[2:]
  try:
    main.run()
  except SystemExit as e:
    print("gs calls:", len(seen), flush=True)
    raise
'''


def test_tiny_pipeline_on_a_gs_workdir(tmp_path):
  bucket = tmp_path / "buckets"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu", CAI_JAX_MALLOC_TUNABLES="0",
             CAI_JAX_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-c", DRIVER, str(bucket),
                      f"--config={ROOT}/configs/tiny.py", "--workdir=gs://my-bucket/runs/tiny",
                      "--config.compilation_cache="], cwd=str(cwd), env=env,
                     capture_output=True, text=True, timeout=1500)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  run = bucket / "my-bucket" / "runs" / "tiny"
  for stage in ("revise", "sft", "label", "pm", "ppo", "evaluate"):
    assert (run / stage / "DONE").is_file(), stage
    assert (run / stage / "settings.json").is_file(), stage
  for export in ("sft/final", "pm/final", "ppo/final", "ppo/value_final"):
    assert (run / export / "config.json").is_file() and \
        (run / export / "model.safetensors").is_file(), export
  # Finished stages keep their exports and drop their optimizer checkpoints.
  assert not (run / "sft" / "checkpoints").exists() and not (run / "ppo" / "checkpoints").exists()
  assert (run / "report.md").is_file() and (run / "config.json").is_file()
  assert (run / "ppo" / "samples.jsonl").stat().st_size > 0
  assert any(p.suffix == ".png" for p in (run / "report_files").iterdir())
  # Nothing was written as a local path named after the URL.
  for d in (cwd, tmp_path, ROOT):
    assert not any(n.startswith("gs:") for n in os.listdir(d)), d
  assert not list(cwd.iterdir())
