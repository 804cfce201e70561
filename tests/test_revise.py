"""Revise stage: orchestration, ablations, resume, never-overwrite, real SmolLM2 run."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from cai_jax import constitution as C
from cai_jax import sampling
from cai_jax.data import prompts as prompts_lib
from cai_jax.stages import revise
from cai_jax.utils import InputError, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(model="tiny", fmt="chat", num_red_team=5, num_helpful=3, **revise_kw):
  c = ml_collections.ConfigDict()
  c.seed = 3
  c.model = model
  c.feedback_model = ""
  c.dtype = "float32"
  c.prompt_format = fmt
  c.constitution = "harmlessness"
  c.mesh = ml_collections.ConfigDict({"ici": (-1, 1, 1), "dcn": None})
  c.data = prompts_lib.default_config()
  c.data.num_red_team = num_red_team
  c.data.num_helpful = num_helpful
  c.revise = revise.default_config()
  c.revise.update(dict(num_revisions=2, max_new_tokens=8, critique_max_new_tokens=8,
                       revision_max_new_tokens=8, chunk_size=2, batch_size=2, num_fewshot=1,
                       progress=False, write_tfds=False))
  c.revise.update(revise_kw)
  return c


class FakeSampler:
  """Stands in for the model: answers are a hash of (prompt, seed), so they
  depend on exactly what the stage asks and with which randomness."""
  calls = []
  fail_after = None

  def __init__(self, cfg, params, tok, rc, fmt, stops, mesh):
    pass

  def __call__(self, prompts, key, max_new_tokens, step):
    FakeSampler.calls.append(list(prompts))
    if FakeSampler.fail_after is not None and len(FakeSampler.calls) > FakeSampler.fail_after:
      raise KeyboardInterrupt("simulated crash")
    seed = sampling.key_seed(key)
    return [f"ans-{hashlib.sha1(f'{i}|{p}|{seed}'.encode()).hexdigest()[:10]}"
            for i, p in enumerate(prompts)]


@pytest.fixture
def fake(monkeypatch):
  FakeSampler.calls = []
  FakeSampler.fail_after = None
  monkeypatch.setattr(revise, "_Sampler", FakeSampler)
  # The fake never reads weights: skip initialising them (tokenizer is real).
  from cai_jax import roles
  monkeypatch.setattr(roles, "load", lambda spec, **kw: (
      roles.tiny_config(), None, roles.load_tokenizer("tiny")))
  return FakeSampler


def _read(workdir, name="records.jsonl"):
  return list(read_jsonl(os.path.join(workdir, "revise", name)))


def test_records_rounds_and_prompts(fake, tmp_path):
  cfg = make_config(fmt="raw")
  s = revise.run(cfg, str(tmp_path))
  recs, helpful = _read(tmp_path), _read(tmp_path, "helpful.jsonl")
  const = C.load("harmlessness")
  want = prompts_lib.load_prompts(cfg.data, "red_team", "train")
  assert [r["id"] for r in recs] == [p["id"] for p in want] and len(recs) == 5
  for r, p in zip(recs, want):
    assert r["prompt"] == p["messages"] and r["initial_response"].startswith("ans-")
    assert len(r["rounds"]) == 2
    for x in r["rounds"]:
      assert x["principle_id"] in const.principle_ids
      assert x["critique"].startswith("ans-") and x["revision"].startswith("ans-")
  assert [len(h["responses"]) for h in helpful] == [2, 2, 2]
  assert len(set(h["responses"][0] for h in helpful) | set(h["responses"][1] for h in helpful)) == 6
  assert s["num_red_team"] == 5 and s["num_helpful"] == 3
  assert os.path.exists(tmp_path / "revise" / "DONE")
  # Each critique prompt names the principle recorded for its round, in the
  # paper's layout after the previous revision, with one few-shot dialogue first.
  crit_prompts = [p for call in fake.calls for p in call if p.endswith("\n\nCritique:")]
  assert len(crit_prompts) == 10
  ex = const.critique_examples[0]
  for r in recs:
    q = r["prompt"][-1]["content"]
    mine = [p for p in crit_prompts if f"\n\nHuman: {q}\n\nAssistant:" in p]
    assert len(mine) == 2
    for k, p in enumerate(mine):  # in call order: round 1, then round 2
      principle = const.principle(r["rounds"][k]["principle_id"])
      prev = r["rounds"][k - 1]["revision"] if k else r["initial_response"]
      assert p.endswith(f" {prev}\n\nCritiqueRequest: {principle.critique_request}\n\nCritique:")
      assert p.startswith("\n\nHuman: " + ex.conversation[0]["content"])
  # A second call finds DONE and returns the same summary without sampling.
  n = len(fake.calls)
  assert revise.run(cfg, str(tmp_path)) == s and len(fake.calls) == n


def test_principles_drawn_per_round_and_seeded(fake, tmp_path):
  cfg = make_config(num_red_team=40, num_helpful=0, helpful_samples=0, num_revisions=4,
                    chunk_size=40, batch_size=8)
  revise.run(cfg, str(tmp_path / "a"))
  recs = _read(tmp_path / "a")
  ids = [[x["principle_id"] for x in r["rounds"]] for r in recs]
  flat = [i for row in ids for i in row]
  assert len(set(flat)) >= 12  # 160 draws over 16 principles
  assert sum(len(set(row)) > 1 for row in ids) >= 30  # drawn independently per round
  cfg.seed = 4
  revise.run(cfg, str(tmp_path / "b"))
  other = [[x["principle_id"] for x in r["rounds"]] for r in _read(tmp_path / "b")]
  assert other != ids


def test_ablations_direct_revision_and_num_principles(fake, tmp_path):
  cfg = make_config(fmt="raw", direct_revision=True, num_principles=2, num_fewshot=0,
                    helpful_samples=0)
  revise.run(cfg, str(tmp_path))
  const = C.load("harmlessness")
  pool = const.principles[:2]
  recs = _read(tmp_path)
  for r in recs:
    for x in r["rounds"]:
      assert x["critique"] is None and x["principle_id"] in [p.id for p in pool]
  prompts = [p for call in fake.calls for p in call]
  assert len(prompts) == 5 * 3  # initial + 2 direct revisions, no critiques
  assert not any("Critique" in p for p in prompts)
  revs = [p for p in prompts if p.endswith("\n\nRevision:")]
  assert len(revs) == 10
  for p in revs:
    assert any(p.endswith(f"\n\nRevisionRequest: {q.revision_request}\n\nRevision:")
               for q in pool)
    assert p.startswith("\n\nHuman:")  # no few-shot dialogue in front


def test_resume_after_crash_matches_uninterrupted(fake, tmp_path):
  cfg = make_config()
  revise.run(cfg, str(tmp_path / "full"))
  full_calls = len(fake.calls)
  fake.calls = []
  fake.fail_after = 7  # dies inside the second chunk
  with pytest.raises(KeyboardInterrupt):
    revise.run(cfg, str(tmp_path / "part"))
  chunk0 = tmp_path / "part" / "revise" / "chunks" / "red_team-00000.jsonl"
  assert chunk0.exists() and not (tmp_path / "part" / "revise" / "DONE").exists()
  before = chunk0.read_bytes()
  fake.fail_after = None
  fake.calls = []
  s = revise.run(cfg, str(tmp_path / "part"))
  assert s["resumed_prompts"] == 2
  assert len(fake.calls) == full_calls - 5  # chunk 0 (initial + 2 rounds) was not redone
  for name in ("records.jsonl", "helpful.jsonl"):
    assert (tmp_path / "part" / "revise" / name).read_bytes() == \
        (tmp_path / "full" / "revise" / name).read_bytes()
  assert chunk0.read_bytes() == before


def test_completed_records_never_overwritten(fake, tmp_path):
  cfg = make_config(helpful_samples=0)
  chunks = tmp_path / "revise" / "chunks"
  chunks.mkdir(parents=True)
  ids = [p["id"] for p in prompts_lib.load_prompts(cfg.data, "red_team", "train")]
  mine = [{"id": i, "prompt": [{"role": "user", "content": "kept"}], "initial_response": "x",
           "rounds": [{"principle_id": "bias", "critique": "c", "revision": "r"}] * 2}
          for i in ids[:2]]
  text = "".join(json.dumps(r) + "\n" for r in mine)
  (chunks / "red_team-00000.jsonl").write_text(text)
  revise.run(cfg, str(tmp_path))
  assert (chunks / "red_team-00000.jsonl").read_text() == text
  recs = _read(tmp_path)
  assert recs[:2] == mine and len(recs) == 5
  # A different final file is an error, never replaced.
  os.remove(tmp_path / "revise" / "DONE")
  (tmp_path / "revise" / "records.jsonl").write_text("{}\n")
  with pytest.raises(InputError, match="never overwritten"):
    revise.run(cfg, str(tmp_path))
  assert (tmp_path / "revise" / "records.jsonl").read_text() == "{}\n"
  # A chunk holding other prompts (prompt set changed) is refused too.
  (tmp_path / "revise" / "records.jsonl").unlink()
  (chunks / "red_team-00001.jsonl").write_text(text)
  with pytest.raises(InputError, match="other prompts"):
    revise.run(cfg, str(tmp_path))


def test_config_change_refused_on_resume(fake, tmp_path):
  cfg = make_config(helpful_samples=0, num_red_team=2)
  revise.run(cfg, str(tmp_path))
  os.remove(tmp_path / "revise" / "DONE")
  cfg.revise.num_revisions = 3
  with pytest.raises(InputError, match=r"other settings \(revise.num_revisions: 2 -> 3\)"):
    revise.run(cfg, str(tmp_path))
  cfg.revise.num_revisions = 2
  cfg.revise.batch_size = 4  # changes the sampler's batches, so the results
  with pytest.raises(InputError, match="revise.batch_size: 2 -> 4"):
    revise.run(cfg, str(tmp_path))
  cfg.revise.batch_size = 2
  cfg.revise.progress = True  # does not change what a chunk holds
  revise.run(cfg, str(tmp_path))


def test_bad_inputs(fake, tmp_path):
  p = tmp_path / "rt.jsonl"
  p.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": ""}\n')
  cfg = make_config()
  cfg.data.red_team = str(p)
  cfg.data.eval_fraction = 0.0
  with pytest.raises(InputError) as e:
    revise.run(cfg, str(tmp_path / "w"))
  assert f"{p}:2" in str(e.value) and "empty prompt" in str(e.value)
  bad = tmp_path / "c.json"
  bad.write_text(json.dumps({"name": "x", "description": "", "principles": []}))
  cfg = make_config()
  cfg.constitution = str(bad)
  with pytest.raises(C.ConstitutionError, match="principles"):
    revise.run(cfg, str(tmp_path / "w2"))
  cfg = make_config()
  cfg.revise.num_revisions = 0
  with pytest.raises(InputError, match="num_revisions"):
    revise.run(cfg, str(tmp_path / "w3"))


_CHILD = """
import os, sys, json
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import ml_collections
from cai_jax.stages import revise
cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
revise.run(cfg, sys.argv[2])
"""


@pytest.mark.slow
def test_resume_after_sigkill_tiny_model(tmp_path):
  """A real run (tiny random model) killed with SIGKILL mid-way and restarted
  equals an uninterrupted run with the same seed, one record per prompt."""
  cfg = make_config(num_red_team=4, num_helpful=2, num_revisions=1, chunk_size=1,
                    batch_size=1, max_new_tokens=6, critique_max_new_tokens=6,
                    revision_max_new_tokens=6, write_tfds=True, shard=False)
  part = tmp_path / "part"
  chunks = part / "revise" / "chunks"
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, "-c", _CHILD, cfg.to_json(), str(part)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 600
    while not (chunks.exists() and any(f.startswith("red_team-") for f in os.listdir(chunks))):
      assert proc.poll() is None, "child exited before writing a chunk"
      assert time.time() < deadline
      time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (part / "revise" / "DONE").exists()
  written = {f: (chunks / f).read_bytes() for f in os.listdir(chunks) if f.endswith(".jsonl")}
  assert 1 <= len(written) < 6
  # What a kill during a chunk write leaves behind (a temporary never renamed).
  (chunks / ".tmp-red_team-00003.jsonl-killed").write_text('{"id": "half')
  s = revise.run(cfg, str(part))
  assert s["resumed_prompts"] == len(written)
  for f, b in written.items():
    assert (chunks / f).read_bytes() == b
  revise.run(cfg, str(tmp_path / "full"))
  for name in ("records.jsonl", "helpful.jsonl"):
    a = (part / "revise" / name).read_bytes()
    assert a == (tmp_path / "full" / "revise" / name).read_bytes()
  recs = _read(part)
  assert sorted(r["id"] for r in recs) == sorted(set(r["id"] for r in recs))
  assert len(recs) == 4 and len(_read(part, "helpful.jsonl")) == 2
  assert not [f for f in os.listdir(chunks) if f.startswith(".tmp")]
  from cai_jax.data import slcai
  assert len(list(slcai.sl_cai_examples(str(part / "revise"), use_tfds=True))) == \
      len(list(slcai.sl_cai_examples(str(part / "revise"))))


@pytest.mark.slow
def test_real_run_smollm2(tmp_path, smollm2_path):
  """SmolLM2 on 8 prompts with 2 rounds: complete records, valid principle
  ids, non-empty revisions, most of them different from the first answer."""
  cfg = make_config(model=smollm2_path, num_red_team=8, num_helpful=0, helpful_samples=0,
                    shard=False,
                    num_revisions=2, num_fewshot=1, chunk_size=8, batch_size=8,
                    max_new_tokens=32, critique_max_new_tokens=32, revision_max_new_tokens=32,
                    temperature=0.7, top_p=0.9)
  s = revise.run(cfg, str(tmp_path))
  recs = _read(tmp_path)
  const = C.load("harmlessness")
  assert len(recs) == 8
  changed = 0
  for r in recs:
    assert r["initial_response"].strip() and len(r["rounds"]) == 2
    for x in r["rounds"]:
      assert x["principle_id"] in const.principle_ids
      assert x["critique"].strip() and x["revision"].strip()
    changed += r["rounds"][-1]["revision"].strip() != r["initial_response"].strip()
  assert changed >= 6, changed
  assert s["frac_revision_changed"] >= 0.75
