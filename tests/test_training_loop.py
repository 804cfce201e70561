"""The generic loop: exact resume, sharding invariance, NaN guard, bad checkpoints."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import models, sharding as shd
from cai_jax.training import checkpoint, data, loop, objectives, optim, state as state_lib
from cai_jax.utils import InputError

CFG = models.tiny(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True)


def _examples(n=24, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    k = int(rng.integers(6, 17))
    out.append(data.SFTExample(rng.integers(3, 128, size=k).astype(np.int32),
                               np.arange(k) >= k // 3))
  return out


class Recording(data.BatchIterator):
  """Remembers the index batches it served (to compare data order)."""

  def __init__(self, *a, **kw):
    super().__init__(*a, **kw)
    self.seen = []

  def __next__(self):
    idx = next(self.index)
    self.seen.append(idx.tolist())
    return self.make_batch(idx)


def _setup(mesh_shape=(1, 1, 1), devices=None, ckpt_dir=None, lr=1e-2, loss_fn=None,
           max_to_keep=3, interval=2, seed=0):
  devices = devices if devices is not None else jax.devices()[:int(np.prod(mesh_shape))]
  mesh = shd.make_mesh(mesh_shape, devices=devices)
  ex = _examples()
  it = Recording(data.ShuffledIndex(len(ex), 8, seed=seed),
                 lambda idx: data.sft_batch(ex, [[i] for i in idx], 16, pad_id=0))
  oc = optim.default_optim_config()
  oc.learning_rate = lr
  tx = optim.make_optimizer(oc)
  params = models.init_params(CFG, jax.random.PRNGKey(seed))
  st = state_lib.create_train_state(params, tx, CFG, mesh)
  example = data.sft_batch(ex, [[i] for i in range(8)], 16, pad_id=0)
  step_fn = loop.make_train_step(loss_fn or objectives.sft_loss_fn(CFG), tx, st, mesh, example)
  mngr = (checkpoint.Manager(ckpt_dir, max_to_keep=max_to_keep, save_interval_steps=interval)
          if ckpt_dir else None)
  return mesh, it, st, step_fn, mngr


def _run(ckpt_dir, num_steps, stop_after=None, **kw):
  mesh, it, st, step_fn, mngr = _setup(ckpt_dir=ckpt_dir, **kw)
  try:
    res = loop.train(step_fn=step_fn, state=st, batches=it, mesh=mesh, num_steps=num_steps,
                     rng=jax.random.PRNGKey(42), manager=mngr, stop_after=stop_after,
                     progress=False)
  finally:
    if mngr is not None:
      mngr.close()
  return res, it


def test_exact_resume_in_process(tmp_path):
  straight, it0 = _run(str(tmp_path / "a"), 6)
  first, it1 = _run(str(tmp_path / "b"), 6, stop_after=3)
  assert first.stopped_early and first.step == 3
  # "Kill" after step 3: the interval policy saved step 2 only, so resume redoes step 3.
  second, it2 = _run(str(tmp_path / "b"), 6)
  assert second.resumed_from == 2
  pa = jax.device_get(straight.state.params)
  pb = jax.device_get(second.state.params)
  for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
    assert np.array_equal(np.asarray(x), np.asarray(y))  # bitwise
  assert it1.seen[:2] + it2.seen == it0.seen
  assert [h["loss"] for h in straight.history[2:]] == [h["loss"] for h in second.history]
  assert int(straight.state.step) == int(second.state.step) == 6


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_shapes_match_single_device(mesh_shape):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated devices"
  ref, _ = _run(None, 5, mesh_shape=(1, 1, 1))
  got, _ = _run(None, 5, mesh_shape=mesh_shape)
  np.testing.assert_allclose([h["loss"] for h in got.history], [h["loss"] for h in ref.history],
                             rtol=0, atol=1e-5)
  # The state really is distributed: the embedding lives on all 8 devices.
  emb = got.state.params["embedding"]
  assert len(emb.sharding.device_set) == 8


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
  base = objectives.sft_loss_fn(CFG)

  def loss_fn(params, batch, rng):
    loss, aux = base(params, batch, rng)
    # Poison from the 4th batch on (the batches are fixed; use a marker token count).
    bad = jnp.sum(batch["tokens_BxL"]) % 5 == 999  # never; replaced below
    del bad
    return loss, aux

  # Poison by a learning rate that overflows: params blow up to inf/nan quickly.
  d = str(tmp_path / "nan")
  with pytest.raises(loop.TrainingDivergedError, match="non-finite .* at step"):
    _run(d, 50, lr=1e30, interval=1, loss_fn=loss_fn)
  mngr = checkpoint.Manager(d)
  last = mngr.latest_step()
  if last is not None:
    st, _ = mngr.restore(last)
    leaves = jax.tree_util.tree_leaves(st["train"]["params"])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  mngr.close()


def test_checkpoint_of_other_model_shape_is_a_clear_error(tmp_path):
  d = str(tmp_path / "c")
  _run(d, 2)
  other = CFG.replace(hidden_size=48, num_heads=4, head_dim=12, intermediate_size=96)
  tx = optim.make_optimizer(optim.default_optim_config())
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  st = state_lib.create_train_state(models.init_params(other, jax.random.PRNGKey(0)), tx, other, mesh)
  mngr = checkpoint.Manager(d)
  with pytest.raises(InputError, match=r"shape .* another model shape") as e:
    mngr.restore(target={"train": state_lib.abstract_state(st)})
  assert "\n" not in str(e.value)
  mngr.close()


def test_missing_checkpoint_dir_is_input_error(tmp_path):
  with pytest.raises(InputError, match="not found"):
    checkpoint.Manager(str(tmp_path / "nope"), read_only=True)
  with pytest.raises(InputError, match="not a stage checkpoint"):
    checkpoint.load_params_from_stage(str(tmp_path))


_WORKER = r"""
import os, sys, time
sys.path.insert(0, {tests!r})
import test_training_loop as T
from cai_jax.training import data
orig = T.Recording.__next__
def slow_next(self):
  time.sleep(0.3)  # give the parent time to kill between checkpoints
  return orig(self)
T.Recording.__next__ = slow_next
T._run({ckpt!r}, 1000, interval=2)
"""


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
  """A separate process is SIGKILLed mid-run; resuming gives the same params."""
  import signal
  import subprocess
  import sys
  import time
  ckpt = str(tmp_path / "killed")
  code = _WORKER.format(tests=os.path.dirname(os.path.abspath(__file__)), ckpt=ckpt)
  env = dict(os.environ)
  proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 600
    while time.time() < deadline:
      steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
      if steps and max(steps) >= 4:
        break
      if proc.poll() is not None:
        pytest.fail("worker exited early: " + proc.stderr.read().decode()[-2000:])
      time.sleep(0.1)
    else:
      pytest.fail("worker made no checkpoint at step >= 4 in time")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  killed_at = max(int(n) for n in os.listdir(ckpt) if n.isdigit())
  assert 4 <= killed_at < 10
  resumed, _ = _run(ckpt, 10)
  assert resumed.resumed_from is not None and resumed.resumed_from >= 4
  straight, _ = _run(str(tmp_path / "straight"), 10)
  for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(straight.state.params)),
                  jax.tree_util.tree_leaves(jax.device_get(resumed.state.params))):
    assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("damage", ["truncate", "delete_metadata"])
def test_damaged_checkpoint_names_the_step_to_delete(tmp_path, damage):
  d = str(tmp_path / "ck")
  _run(d, 4)
  steps = sorted(int(x) for x in os.listdir(d) if x.isdigit())
  last = steps[-1]
  hit = 0
  for root, _, files in os.walk(os.path.join(d, str(last), "state")):
    for f in files:
      p = os.path.join(root, f)
      if damage == "truncate":
        open(p, "wb").close()
        hit += 1
      elif "metadata" in f.lower():
        os.remove(p)
        hit += 1
  assert hit
  with pytest.raises(InputError) as e:
    _run(d, 6)
  msg = str(e.value)
  assert "\n" not in msg
  assert f"checkpoint step {last} under {d} is damaged" in msg, msg
  assert f"delete {d}/{last} to resume from step {steps[-2]}" in msg, msg
