"""Label stage: exact soft-label maths, position debiasing, ensembling, CoT clamping,
hard labels, resume, TFDS output and bad input."""
import dataclasses
import hashlib
import json
import os
import types

import jax
import ml_collections
import numpy as np
import pytest

from cai_jax import constitution as C
from cai_jax import models, sampling
from cai_jax.data import preferences_tfds
from cai_jax.data import prompts as prompts_lib
from cai_jax.evaluation import option_scores
from cai_jax import feedback, roles
from cai_jax.stages import label
from cai_jax.utils import InputError, read_jsonl


def make_config(num_red_team=3, fmt="raw", **kw):
  c = ml_collections.ConfigDict()
  c.seed = 5
  c.model = "tiny"
  c.feedback_model = ""
  c.dtype = "float32"
  c.prompt_format = fmt
  c.constitution = "harmlessness"
  c.mesh = ml_collections.ConfigDict({"ici": (-1, 1, 1), "dcn": None})
  c.data = prompts_lib.default_config()
  c.data.num_red_team = num_red_team
  c.label = label.default_config()
  c.label.update(dict(max_new_tokens=6, chunk_size=2, batch_size=2, num_fewshot=1,
                      num_cot_fewshot=1, cot_max_new_tokens=6, progress=False,
                      write_tfds=False))
  c.label.update(kw)
  return c


def _h(s: str) -> float:
  return int(hashlib.sha1(s.encode()).hexdigest()[:8], 16) / 16**8


def fake_generate(cfg, params, tok, prompts, *, seed=0, **kw):
  """Deterministic stand-in for the sampler: text = hash of (prompt, seed, row)."""
  out = []
  for i, p in enumerate(prompts):
    h = hashlib.sha1(f"{p}|{seed}|{i}".encode()).hexdigest()[:8]
    txt = f"reply {h}." if "step by step" not in str(p)[-40:] else \
        f"reason {h} about it. So the answer is (A)"
    out.append(types.SimpleNamespace(text=txt))
  return out


class FakeScores:
  """Option log-probs we control: content of the response shown at each letter
  (a hash of its text and of the principle) plus a pure per-position bias."""

  def __init__(self, tok, bias=(0.0, 0.0), scale=1.0):
    self.tok, self.bias, self.scale, self.prompts = tok, bias, scale, []

  def content(self, principle: str, response: str) -> float:
    return self.scale * 4.0 * _h(principle + "|" + response)

  def parse(self, text: str):
    a = text.rfind("\n (A) ")
    b = text.rfind("\n (B) ")
    end = text.find("\n", b + 1)
    head = text[:a]
    if head.endswith("\nOptions:"):  # the paper's header line before the options
      head = head[:-len("\nOptions:")]
    principle = head[head.rfind("\n") + 1:]
    # In chat rendering the last option ends the user turn.
    return principle, text[a + 6:b], text[b + 6:end].split("<|im_end|>")[0]

  def __call__(self, cfg, params, prompt_ids, option_ids, **kw):
    out = []
    for ids in prompt_ids:
      text = self.tok.decode(ids)
      self.prompts.append(text)
      principle, ra, rb = self.parse(text)
      out.append(np.array([self.content(principle, ra) + self.bias[0] - 3.0,
                           self.content(principle, rb) + self.bias[1] - 3.0]))
    return out


@pytest.fixture
def tok():
  return roles.load_tokenizer("tiny")


@pytest.fixture
def fakes(monkeypatch, tok):
  monkeypatch.setattr(sampling, "generate", fake_generate)
  scores = FakeScores(tok)
  monkeypatch.setattr(option_scores, "option_logprobs", scores)
  return scores


def _records(workdir):
  return list(read_jsonl(os.path.join(workdir, "label", "preferences.jsonl")))


def test_soft_label_is_softmax_of_option_logprobs_real_tiny_model(tmp_path, tok):
  """Real tiny model, no fakes: p_a = softmax(lp_a, lp_b) within 1e-6, and the
  log-probs equal the sampler's `score_tokens` on the same question."""
  c = make_config(num_red_team=2, debias=False)
  out = label.run(c, str(tmp_path))
  assert out["num_comparisons"] == 2
  recs = _records(str(tmp_path))
  const = C.load("harmlessness")
  cfg = roles.tiny_config()
  params = models.init_params(cfg, jax.random.PRNGKey(5), ("lm",))
  for r in recs:
    assert set(r) >= {"id", "prompt", "response_a", "response_b", "principle_ids", "p_a",
                      "logp_a", "logp_b"}
    want = np.exp(r["logp_a"]) / (np.exp(r["logp_a"]) + np.exp(r["logp_b"]))
    assert abs(r["p_a"] - want) < 1e-6
  # Rebuild the first question exactly and score " (A)" / " (B)" with the sampler.
  r = recs[0]
  ex = const.label_examples[0]
  lab = feedback.Labeller(cfg, params, tok, feedback.Prompter("raw", tok), const, c.label)
  captured = []
  orig = feedback.Prompter.label

  def spy(self, shots, conv, principle, resp):
    s = orig(self, shots, conv, principle, resp)
    captured.append(s)
    return s

  feedback.Prompter.label = spy
  try:
    key = jax.random.fold_in(jax.random.PRNGKey(5), 0)
    _, k_label, k_rng = jax.random.split(key, 3)
    got = lab([{"prompt": r["prompt"], "response_a": r["response_a"],
                "response_b": r["response_b"]}], np.random.default_rng(sampling.key_seed(k_rng)), 0)
  finally:
    feedback.Prompter.label = orig
  assert got[0]["principle_ids"] == r["principle_ids"]
  assert got[0]["p_a"] == pytest.approx(r["p_a"], abs=1e-9)
  ids = sampling.encode_prompt(tok, captured[0])
  opt = [tok(" (A)", add_special_tokens=False)["input_ids"],
         tok(" (B)", add_special_tokens=False)["input_ids"]]
  ref = sampling.score_tokens(cfg, params, [ids, ids], opt, pad_id=cfg.pad_token_id)
  assert float(np.sum(ref[0])) == pytest.approx(r["logp_a"], abs=1e-4)
  assert float(np.sum(ref[1])) == pytest.approx(r["logp_b"], abs=1e-4)
  assert ex.conversation[0]["content"] in captured[0]


@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_soft_label_exact_with_controlled_logprobs(tmp_path, fakes, fmt):
  label.run(make_config(num_red_team=4, debias=False, fmt=fmt), str(tmp_path))
  const = C.load("harmlessness")
  for r in _records(str(tmp_path)):
    p = const.choice_principle(r["principle_ids"][0]).text
    la, lb = fakes.content(p, r["response_a"]) - 3.0, fakes.content(p, r["response_b"]) - 3.0
    assert r["logp_a"] == pytest.approx(la, abs=1e-9)
    assert r["logp_b"] == pytest.approx(lb, abs=1e-9)
    assert abs(r["p_a"] - np.exp(la) / (np.exp(la) + np.exp(lb))) < 1e-6


@pytest.mark.parametrize("mean", ["logprob", "probability"])
def test_both_orders_against_pure_position_bias(tmp_path, fakes, mean):
  """logprob: the bias cancels exactly, p_a = sigmoid(d). probability: the two
  orders' probabilities are averaged, sigmoid(d + bias) and sigmoid(d - bias)."""
  fakes.bias = (2.5, -1.0)  # a strong preference for whatever is shown as (A)
  label.run(make_config(num_red_team=4, debias=True, debias_mean=mean), str(tmp_path / "d"))
  label.run(make_config(num_red_team=4, debias=False), str(tmp_path / "n"))
  const = C.load("harmlessness")
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  worst_plain = 0.0
  for r, n in zip(_records(str(tmp_path / "d")), _records(str(tmp_path / "n"))):
    p = const.choice_principle(r["principle_ids"][0]).text
    d = fakes.content(p, r["response_a"]) - fakes.content(p, r["response_b"])
    bias = fakes.bias[0] - fakes.bias[1]
    want = sig(d) if mean == "logprob" else (sig(d + bias) + sig(d - bias)) / 2
    assert r["p_a"] == pytest.approx(want, abs=1e-12)
    assert n["response_a"] == r["response_a"]
    p2 = const.choice_principle(n["principle_ids"][0]).text
    d2 = fakes.content(p2, n["response_a"]) - fakes.content(p2, n["response_b"])
    worst_plain = max(worst_plain, abs(n["p_a"] - 1 / (1 + np.exp(-d2))))
  assert worst_plain > 0.1  # without debiasing the bias shows


def test_ensembling_over_k_principles(tmp_path, fakes):
  label.run(make_config(num_red_team=3, num_principles=3, debias=False), str(tmp_path))
  const = C.load("harmlessness")
  for r in _records(str(tmp_path)):
    assert len(r["principle_ids"]) == 3
    ps = []
    for pid in r["principle_ids"]:
      t = const.choice_principle(pid).text
      d = fakes.content(t, r["response_a"]) - fakes.content(t, r["response_b"])
      ps.append(1 / (1 + np.exp(-d)))
    assert r["p_a"] == pytest.approx(np.mean(ps), abs=1e-12)


def test_few_shot_examples_get_independent_principles(tmp_path, fakes):
  label.run(make_config(num_red_team=4, num_fewshot=-1, num_principles=2, debias=False),
            str(tmp_path))
  const = C.load("harmlessness")
  texts = [p.text for p in const.choice_principles]
  n_ex = len(const.label_examples)
  seen = set()
  for prompt in fakes.prompts:
    used = tuple(t for line in prompt.split("\n") for t in texts if line == t)
    assert len(used) == n_ex + 1  # one principle line per example and one for the question
    seen.add(used)
  assert len({u[:-1] for u in seen}) > 1  # example principles vary between questions


@pytest.mark.parametrize("clamp,lo,hi", [((0.4, 0.6), 0.4, 0.6), ((0.2, 0.8), 0.2, 0.8),
                                         ((), 0.0, 1.0)])
def test_cot_clamps_and_stores_reasoning(tmp_path, fakes, clamp, lo, hi):
  fakes.scale = 10.0  # confident answers: unclamped p far outside [0.2, 0.8]
  label.run(make_config(num_red_team=4, cot=True, cot_samples=2, cot_clamp=clamp),
            str(tmp_path))
  recs = _records(str(tmp_path))
  ps = np.array([r["p_a"] for r in recs])
  assert np.all((ps >= lo) & (ps <= hi))
  if not clamp:
    assert np.any((ps < 0.2) | (ps > 0.8))
  else:
    assert np.any(np.isclose(ps, lo) | np.isclose(ps, hi))
  for r in recs:
    assert len(r["cot"]) == 2 * 2  # 2 chains x 2 orders
    for chain in r["cot"]:
      assert chain.startswith("reason ") and "answer" not in chain
      assert any(f"{feedback.STEP} {chain}\n{feedback.SO}" in p for p in fakes.prompts)


def test_hard_labels(tmp_path, fakes):
  label.run(make_config(num_red_team=4, hard_labels=True), str(tmp_path))
  for r in _records(str(tmp_path)):
    assert r["p_a"] in (0.0, 0.5, 1.0)
    assert r["p_a"] == (1.0 if r["p_a_soft"] > 0.5 else 0.0 if r["p_a_soft"] < 0.5 else 0.5)


def test_resume_after_crash_matches_uninterrupted(tmp_path, fakes, monkeypatch):
  c = make_config(num_red_team=5, chunk_size=2)
  label.run(c, str(tmp_path / "full"))
  calls = {"n": 0}
  real = feedback.Labeller.__call__

  def crashing(self, *a, **k):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt("simulated crash")
    return real(self, *a, **k)

  monkeypatch.setattr(feedback.Labeller, "__call__", crashing)
  with pytest.raises(KeyboardInterrupt):
    label.run(c, str(tmp_path / "crash"))
  stage = tmp_path / "crash" / "label"
  assert not (stage / "DONE").exists() and not (stage / "preferences.jsonl").exists()
  assert sorted(os.listdir(stage / "chunks")) == ["preferences-00000.jsonl"]
  monkeypatch.setattr(feedback.Labeller, "__call__", real)
  out = label.run(c, str(tmp_path / "crash"))
  assert out["resumed_prompts"] == 2
  assert _records(str(tmp_path / "crash")) == _records(str(tmp_path / "full"))
  assert (stage / "DONE").exists()
  # DONE: a second run is skipped and returns the stored summary.
  assert label.run(c, str(tmp_path / "crash")) == json.loads((stage / "DONE").read_text())


def test_tfds_records_round_trip(tmp_path, fakes):
  label.run(make_config(num_red_team=3, cot=True, write_tfds=True, fmt="chat"), str(tmp_path))
  want = _records(str(tmp_path))
  got = preferences_tfds.load(str(tmp_path / "label"))
  assert [g["id"] for g in got] == [w["id"] for w in want]
  for g, w in zip(got, want):
    assert g["prompt"] == w["prompt"] and g["response_a"] == w["response_a"]
    assert g["principle_ids"] == w["principle_ids"] and g["cot"] == w["cot"]
    assert g["p_a"] == pytest.approx(w["p_a"], abs=1e-6)


def test_bad_input(tmp_path, tok):
  const = C.load("harmlessness")
  bad = dataclasses.replace(const, choice_principles=(C.ChoicePrinciple("blank", "  "),),
                            source="my_constitution.json")
  cfg = roles.tiny_config()
  with pytest.raises(InputError) as e:
    feedback.Labeller(cfg, None, tok, feedback.Prompter("raw", tok), bad, label.default_config())
  assert "my_constitution.json" in str(e.value) and "'blank'" in str(e.value)
  assert "\n" not in str(e.value)
  with pytest.raises(InputError, match="cot_clamp"):
    label.run(make_config(cot_clamp=(0.7, 0.3)), str(tmp_path))
  with pytest.raises(InputError, match="config.label.bogus"):
    c = make_config()
    c.label.bogus = 1
    label.run(c, str(tmp_path))


def test_policy_role_prefers_the_sft_stage(tmp_path):
  """One rule for every stage: the sft stage's directory when sft is part of the run
  or has run in the workdir, else config.model; an explicit field wins."""
  from cai_jax.runtime import StageContext
  c = make_config()
  ctx = lambda: StageContext(c, str(tmp_path), "label", label.default_config())  # noqa: E731
  assert ctx().role_spec("policy") == "tiny"
  c.stages = ("sft", "label")
  assert ctx().role_spec("policy") == str(tmp_path / "sft")
  c.stages = ("label",)
  os.makedirs(tmp_path / "sft" / "final")
  assert ctx().role_spec("policy") == str(tmp_path / "sft")
  assert ctx().role_spec("policy", "smollm2") == "smollm2"


def test_per_axis_labels_draw_within_each_axis(tmp_path, fakes):
  """label.per_axis: one soft label per axis from principles of that axis only; the
  record's p_a is the axes' mean. Without per_axis the axes change nothing: the
  records equal those of the same constitution with its axes removed."""
  const = C.load("harmlessness")
  label.run(make_config(num_red_team=3, per_axis=True, num_principles=2, debias=False),
            str(tmp_path / "axes"))
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  recs = _records(str(tmp_path / "axes"))
  assert recs
  for r in recs:
    assert list(r["axes"]) == const.axis_names
    for name, ids in const.axes:
      a = r["axes"][name]
      assert len(a["principle_ids"]) == 2 and set(a["principle_ids"]) <= set(ids)
      ps = [sig(fakes.content(const.choice_principle(pid).text, r["response_a"])
                - fakes.content(const.choice_principle(pid).text, r["response_b"]))
            for pid in a["principle_ids"]]
      assert a["p_a"] == pytest.approx(np.mean(ps), abs=1e-12)
    assert r["p_a"] == pytest.approx(np.mean([r["axes"][n]["p_a"] for n in const.axis_names]),
                                     abs=1e-12)
    assert r["principle_ids"] == [p for n in const.axis_names
                                  for p in r["axes"][n]["principle_ids"]]

  plain = tmp_path / "plain.json"
  dataclasses.replace(const, axes=()).save(str(plain))
  label.run(make_config(num_red_team=3), str(tmp_path / "with_axes"))
  c = make_config(num_red_team=3)
  c.constitution = str(plain)
  label.run(c, str(tmp_path / "without"))
  assert _records(str(tmp_path / "with_axes")) == _records(str(tmp_path / "without"))
  c.label.per_axis = True
  with pytest.raises(InputError, match="label.per_axis needs a constitution with axes"):
    label.run(c, str(tmp_path / "bad"))
