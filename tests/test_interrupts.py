"""SIGTERM / SIGINT as flags: the handler only records, the loops save and stop at a
safe point, the command line exits 143 / 130 with one line, a rerun finishes as an
uninterrupted run would."""
import os
import signal
import sys

import jax
import numpy as np
import pytest

from cai_jax import interrupts
from cai_jax.runtime import runners

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import test_training_loop as tl  # noqa: E402


@pytest.fixture(autouse=True)
def clean_flag():
  interrupts.reset()
  yield
  interrupts.reset()


def test_handler_records_and_never_raises():
  interrupts._handle(signal.SIGTERM, None)  # what the interpreter calls on the signal
  assert interrupts.received() == signal.SIGTERM
  assert interrupts.requested() == signal.SIGTERM
  with pytest.raises(interrupts.Interrupted) as e:
    interrupts.check("the test")
  assert e.value.exit_status == 143 and "SIGTERM" in str(e.value) and "the test" in str(e.value)
  assert isinstance(e.value, Exception) and not isinstance(e.value, KeyboardInterrupt)


class _SignalAt(tl.Recording):
  """Batches that deliver a signal (as the handler would) while step `at` is fetched."""

  def __init__(self, *a, at, **kw):
    super().__init__(*a, **kw)
    self.at = at

  def __next__(self):
    if len(self.seen) + 1 == self.at:
      interrupts._handle(signal.SIGINT, None)
    return super().__next__()


def test_train_loop_saves_the_step_reached_and_resumes_exactly(tmp_path, monkeypatch):
  straight, it0 = tl._run(str(tmp_path / "a"), 6)
  mesh, _, st, step_fn, mngr = tl._setup(ckpt_dir=str(tmp_path / "b"))
  ex = tl._examples()
  it = _SignalAt(tl.data.ShuffledIndex(len(ex), 8, seed=0),
                 lambda idx: tl.data.sft_batch(ex, [[i] for i in idx], 16, pad_id=0), at=3)
  with pytest.raises(interrupts.Interrupted) as e:
    tl.loop.train(step_fn=step_fn, state=st, batches=it, mesh=mesh, num_steps=6,
                  rng=jax.random.PRNGKey(42), manager=mngr, progress=False)
  mngr.close()
  assert e.value.exit_status == 130 and "step 3" in str(e.value)
  # Step 3 is off the save interval (2): it was saved because of the signal.
  assert checkpoint_steps(tmp_path / "b")[-2:] == [2, 3]
  interrupts.reset()
  second, it2 = tl._run(str(tmp_path / "b"), 6)
  assert second.resumed_from == 3
  assert it.seen + it2.seen == it0.seen
  for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(straight.state.params)),
                  jax.tree_util.tree_leaves(jax.device_get(second.state.params))):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def checkpoint_steps(d):
  return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def test_chunk_runner_stops_between_chunks(tmp_path):
  class Ctx:
    def path(self, *parts):
      return os.path.join(str(tmp_path), *parts)
  os.makedirs(tmp_path / "chunks")
  chunks = runners.chunk_list("c", [{"id": i} for i in range(6)], 2)
  made = []

  def make(chunk):
    made.append(chunk.index)
    if chunk.index == 1:
      interrupts._handle(signal.SIGTERM, None)
    return [{"id": it["id"]} for it in chunk.items]
  with pytest.raises(interrupts.Interrupted):
    runners.run_chunks(Ctx(), chunks, make, desc="test", progress=False)
  assert made == [0, 1]  # chunk 1 finished and was written; chunk 2 never started
  assert sorted(os.listdir(tmp_path / "chunks")) == ["c-00000.jsonl", "c-00001.jsonl"]
  interrupts.reset()
  out = runners.run_chunks(Ctx(), chunks, make, desc="test", progress=False)
  assert made == [0, 1, 2] and [r.resumed for r in out] == [True, True, False]


@pytest.mark.slow
def test_sigterm_and_sigint_over_the_tiny_pipeline(tmp_path):
  """One SIGTERM and one SIGINT trial of benchmarks/signal_trials.py (which runs 10 of
  each at random times): status 143 / 130 within 30 s, one line, a rerun identical to
  the reference. The signals go at fixed points of the run (SFT training, the PPO
  stage), not at a fraction of the reference's time: a run on a warm compilation
  cache, or on a machine less busy than the reference's, may finish before it."""
  import signal_trials as st
  xla = str(tmp_path / "xla")
  ref = str(tmp_path / "reference")
  st.run_to_end(ref, xla)
  for i, (signum, after) in enumerate(((signal.SIGTERM, "sft/settings.json"),
                                       (signal.SIGINT, "ppo/settings.json"))):
    r = st.trial(ref, str(tmp_path / f"t{i}"), xla, signum, 0.5, after=after)
    assert not r["finished_before_signal"], r
    assert r["status"] == 128 + signum and r["stop_s"] <= st.STOP_LIMIT_S, r
    assert r["message"].startswith("cai-jax: stopped by " + r["signal"]), r
    assert r["differences"] == [], r
