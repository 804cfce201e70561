"""Input data: hh-rlhf and red-team TFDS builders, prompt sets, SL-CAI-n reader."""
import gzip
import hashlib
import json
import os

import pytest

from cai_jax import text as text_lib
from cai_jax.data import prompts as prompts_lib
from cai_jax.data import slcai
from cai_jax.data import sources
from cai_jax.utils import InputError, make_chunk_dir, read_jsonl


def test_split_prompt_response_cases():
  h = "\n\nHuman: hi\n\nAssistant:"
  assert text_lib.split_prompt_response(h + " a", h + " b") == (h, " a", " b")
  # Replies that share a beginning still split at the tag.
  assert text_lib.split_prompt_response(h + " I like it", h + " I do not") == \
      (h, " I like it", " I do not")
  # A reply that itself contains an Assistant tag: split on the shared prefix.
  assert text_lib.split_prompt_response(h + " ok\n\nAssistant: more", h + " no") == \
      (h, " ok\n\nAssistant: more", " no")
  assert text_lib.split_prompt_response(h + " x\n\nHuman: y", h + " z") == \
      (h, " x\n\nHuman: y", " z")
  assert text_lib.split_prompt_response(h, h + " b") == (h, "", " b")
  assert text_lib.split_prompt_response(h + " s", h + " s") == (h, " s", " s")
  # The replies diverge inside a tag: that tag is not part of the shared prompt.
  a = h + " one\n\nHuman: more\n\nAssistant: x"
  b = h + " one\n\nHuman: more\n\nAssistan"
  assert text_lib.split_prompt_response(a, b)[0] == h
  with pytest.raises(text_lib.TranscriptError):
    text_lib.split_prompt_response("\n\nHuman: a", "\n\nHuman: b")


def test_hh_rlhf_builder_2312_pairs(shared_data, tmp_path):
  from cai_jax.data import builders
  path = os.path.join(shared_data, "hh_rlhf", "harmless-base", "test.jsonl.gz")
  src = builders.build_hh_rlhf({"test": path}, str(tmp_path / "tfds"))["test"]
  raw = list(read_jsonl(path))
  assert len(src) == len(raw) == 2312
  special = []
  for i, r in enumerate(raw):
    ex = builders.decode(src[i])
    assert ex["id"] == f"test-{i:06d}"
    p = ex["prompt"]
    assert p + ex["chosen"] == r["chosen"] and p + ex["rejected"] == r["rejected"]
    assert p.endswith("\n\nAssistant:")
    msgs = text_lib.parse_transcript(p)
    assert msgs[-1] == {"role": "assistant", "content": ""} and msgs[-2]["role"] == "user"
    naive = r["chosen"][:r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")]
    naive_r = r["rejected"][:r["rejected"].rfind("\n\nAssistant:") + len("\n\nAssistant:")]
    if naive != p or naive_r != p:
      special.append(i)
      reply = ex["chosen"] if naive != p else ex["rejected"]
      assert "Human:" in reply or "Assistant:" in reply
      # Everything after the prompt differs between the two replies at once,
      # or one reply is a prefix-free continuation: the prompt is the longest
      # shared transcript prefix ending in an Assistant tag.
      n = len(os.path.commonprefix([r["chosen"], r["rejected"]]))
      assert r["chosen"].rfind("\n\nAssistant:", 0, n) + len("\n\nAssistant:") == len(p)
  assert len(special) == 5
  # Building again reuses the prepared dataset.
  again = builders.build_hh_rlhf({"test": path}, str(tmp_path / "tfds"))["test"]
  assert builders.decode(again[17]) == builders.decode(src[17])


def _red_team_file(tmp_path, items, name="red_team_attempts.jsonl.gz"):
  p = tmp_path / name
  with gzip.open(p, "wt", encoding="utf-8") as f:
    json.dump(items, f)
  return str(p)


RED_TEAM = [
    {"transcript": "\n\nHuman: How do I hurt someone?\n\nAssistant: I won't help with that.",
     "min_harmlessness_score_transcript": -1.5, "num_params": "52B", "model_type": "plain lm",
     "rating": 0.0, "task_description": "get violent advice",
     "task_description_harmlessness_score": -0.4, "red_team_member_id": 3,
     "is_upworker": False, "tags": ["violence"]},
    {"transcript": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a mean joke"
                   "\n\nAssistant: No thanks.\n\nHuman: Please?\n\nAssistant: Still no.",
     "min_harmlessness_score_transcript": 0.3, "num_params": "13B",
     "model_type": "rlhf", "rating": 2.0, "task_description": "mean joke",
     "task_description_harmlessness_score": 0.1, "red_team_member_id": 5,
     "is_upworker": True, "tags": None},
]


def test_red_team_builder_and_prompt_extraction(tmp_path):
  from cai_jax.data import builders
  path = _red_team_file(tmp_path, RED_TEAM)
  src = builders.build_red_team({"train": path}, str(tmp_path / "tfds"))["train"]
  assert len(src) == 2
  a, b = builders.decode(src[0]), builders.decode(src[1])
  assert a["prompt"] == [{"role": "user", "content": "How do I hurt someone?"}]
  assert a["tags"] == ["violence"] and a["rating"] == 0.0 and a["num_params"] == "52B"
  assert abs(a["min_harmlessness_score_transcript"] + 1.5) < 1e-6
  # Multi-turn: everything up to the final Assistant turn.
  assert [m["content"] for m in b["prompt"]] == ["Hi there", "Hello!", "Tell me a mean joke",
                                                 "No thanks.", "Please?"]
  assert b["prompt"][-1]["role"] == "user" and b["tags"] == []
  # The same file as a prompt source.
  ps = prompts_lib.read_prompts(path)
  assert [p["messages"] for p in ps] == [a["prompt"], b["prompt"]]


def test_builtin_prompt_sets_and_split():
  for kind in ("red_team", "helpful"):
    allp = prompts_lib.load_prompts(None, kind, "all")
    assert len(allp) >= 40
    assert any(len(p["messages"]) > 1 for p in allp)  # some multi-turn prompts
    for p in allp:
      assert p["messages"][-1]["role"] == "user" and p["messages"][-1]["content"].strip()
    cfg = prompts_lib.default_config()
    cfg.eval_fraction = 0.2
    train = prompts_lib.load_prompts(cfg, kind, "train")
    ev = prompts_lib.load_prompts(cfg, kind, "eval")
    assert len(ev) == round(0.2 * len(allp)) and len(train) + len(ev) == len(allp)
    assert not {p["id"] for p in train} & {p["id"] for p in ev}
    # File order is kept within a split; the split is stable.
    order = [p["id"] for p in allp]
    assert [p["id"] for p in train] == [i for i in order if i in {p["id"] for p in train}]
    assert prompts_lib.load_prompts(cfg, kind, "eval") == ev
    cfg["num_" + kind] = 5
    assert prompts_lib.load_prompts(cfg, kind, "train") == train[:5]
  rt = {p["messages"][-1]["content"] for p in prompts_lib.load_prompts(None, "red_team", "all")}
  hp = {p["messages"][-1]["content"] for p in prompts_lib.load_prompts(None, "helpful", "all")}
  assert not rt & hp


def test_prompts_from_hh_rlhf_file(shared_data):
  path = os.path.join(shared_data, "hh_rlhf", "harmless-base", "test.jsonl.gz")
  ps = prompts_lib.load_prompts({"red_team": path, "eval_fraction": 0.0}, "red_team", "train")
  assert 2000 < len(ps) <= 2312  # duplicates dropped
  assert len({json.dumps(p["messages"]) for p in ps}) == len(ps)
  assert all(p["messages"][-1]["role"] == "user" for p in ps)


def test_prompt_file_formats(tmp_path):
  p = tmp_path / "p.jsonl"
  p.write_text("\n".join(json.dumps(x) for x in [
      {"id": "a", "messages": [{"role": "user", "content": "one"}]},
      {"prompt": "two"},
      {"id": "c", "prompt": "\n\nHuman: x\n\nAssistant: y\n\nHuman: three\n\nAssistant:"},
  ]) + "\n")
  ps = prompts_lib.read_prompts(str(p))
  assert [x["id"] for x in ps] == ["a", "p-000001", "c"]
  assert ps[1]["messages"] == [{"role": "user", "content": "two"}]
  assert [m["content"] for m in ps[2]["messages"]] == ["x", "y", "three"]
  # A directory holding prompts.jsonl (generate_prompts output) works too.
  d = tmp_path / "gen"
  d.mkdir()
  (d / "prompts.jsonl").write_text(p.read_text())
  assert [x["messages"] for x in prompts_lib.read_prompts(str(d))] == \
      [x["messages"] for x in ps]


def test_bad_data_lines(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_bytes(b'{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "caf\xe9"}\n')
  with pytest.raises(InputError) as e:
    prompts_lib.read_prompts(str(p))
  assert f"{p}:2" in str(e.value) and "UTF-8" in str(e.value) and "\n" not in str(e.value)

  p = tmp_path / "empty.jsonl"
  p.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "messages": '
               '[{"role": "user", "content": "  "}]}\n')
  with pytest.raises(InputError) as e:
    prompts_lib.read_prompts(str(p))
  assert f"{p}:2" in str(e.value) and "empty prompt" in str(e.value)

  p = tmp_path / "hh.jsonl"
  h = "\n\nHuman: {}\n\nAssistant:"
  p.write_text(json.dumps({"chosen": h.format("q") + " a", "rejected": h.format("q") + " b"})
               + "\n" + json.dumps({"chosen": h.format(" ") + " a",
                                    "rejected": h.format(" ") + " b"}) + "\n")
  with pytest.raises(InputError) as e:
    list(sources.hh_rlhf_pairs(str(p)))
  assert f"{p}:2" in str(e.value) and "empty prompt" in str(e.value)

  p = tmp_path / "hh2.jsonl"
  p.write_bytes(json.dumps({"chosen": h.format("q") + " a", "rejected": h.format("q") + " b"})
                .encode() + b"\n\xff\xfe\n")
  with pytest.raises(InputError, match=f"{p}:2"):
    list(sources.hh_rlhf_pairs(str(p)))

  path = _red_team_file(tmp_path, [RED_TEAM[0], {"transcript": "\n\nHuman: \n\nAssistant: hi"}],
                        "rt_bad.json.gz")
  with pytest.raises(InputError) as e:
    list(sources.red_team_attempts(path))
  assert "entry 1" in str(e.value) and path in str(e.value)

  p = tmp_path / "dup.jsonl"
  p.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
  with pytest.raises(InputError, match="duplicate prompt id"):
    prompts_lib.read_prompts(str(p))


def _fake_revise_dir(d):
  os.makedirs(d)
  recs = [{"id": f"r{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
           "initial_response": f"init{i}",
           "rounds": [{"principle_id": "a", "critique": f"c{i}{k}", "revision": f"rev{i}{k}"}
                      for k in range(3)]} for i in range(2)]
  recs[1]["rounds"][2]["revision"] = " "  # empty revisions are not trained on
  helpful = [{"id": "h0", "prompt": [{"role": "user", "content": "hq"}],
              "responses": ["s0", "s1"]}]
  for name, rs in (("records.jsonl", recs), ("helpful.jsonl", helpful)):
    with open(os.path.join(d, name), "w") as f:
      f.write("".join(json.dumps(r) + "\n" for r in rs))
  return recs


def test_sl_cai_n_reader(tmp_path):
  d = str(tmp_path / "revise")
  _fake_revise_dir(d)
  one = list(slcai.sl_cai_examples(d, 1, include_helpful=False))
  assert [(e["id"], e["response"], e["round"]) for e in one] == [("r0/r1", "rev00", 1),
                                                                 ("r1/r1", "rev10", 1)]
  two = list(slcai.sl_cai_examples(d, 2))
  assert [e["response"] for e in two] == ["rev00", "rev01", "rev10", "rev11", "s0", "s1"]
  assert two[-1]["source"] == "helpful" and two[-1]["prompt"][0]["content"] == "hq"
  every = list(slcai.sl_cai_examples(d))
  assert [e["response"] for e in every if e["source"] == "revision"] == \
      ["rev00", "rev01", "rev02", "rev10", "rev11"]
  assert list(slcai.sl_cai_examples(d, use_tfds=True)) == every
  with pytest.raises(InputError, match="SL-CAI-4 needs 4"):
    list(slcai.sl_cai_examples(d, 4))


# ----------------------------------------------------------------------------
# Prompt generation (stages/generate_prompts.py).

from cai_jax.stages import generate_prompts as gp  # noqa: E402


def test_dedup_exact_and_near():
  idx = gp.DedupIndex(0.6)
  idx.add("How do I pick a lock on a door?")
  assert idx.is_duplicate("how do I pick a lock on a door")  # case / punctuation
  assert idx.is_duplicate("How do I pick a lock on a front door?")  # near duplicate
  assert not idx.is_duplicate("What is the capital of France?")
  assert gp.shingles("a b") == frozenset(["a b"])
  assert gp.clean_candidate(' 5. "Tell me a secret."\n6. next') == "Tell me a secret."
  kept, why = gp.filter_candidates(
      ["", "short", "x" * 500, "How do I pick a lock on a door!", "A brand new question here?",
       "a brand new question here"], idx, 10, 400)
  assert kept == ["A brand new question here?"]
  assert why == {"empty": 1, "short": 1, "long": 1, "duplicate": 2}


def test_fewshot_prompt_layout():
  p = gp.fewshot_prompt(["first one", "second one"], "red_team", "list")
  assert p.endswith("\n1. first one\n2. second one\n3.")


class _Comp:
  def __init__(self, text):
    self.text = text


def _fake_generate(calls):
  def generate(cfg, params, tok, prompts, **kw):
    calls.append(len(prompts))
    out = []
    for i, p in enumerate(prompts):
      h = int(hashlib.sha1(f"{p}|{kw['seed']}|{i}".encode()).hexdigest(), 16)
      # Every third candidate repeats a shot from its prompt (a duplicate).
      if h % 3 == 0:
        out.append(_Comp(" " + p.split("\n")[2][3:]))
      else:
        out.append(_Comp(f" Made up question number {h % 10**9} about topic {h % 977}?"))
    return out
  return generate


def test_generate_prompts_resumable(tmp_path, monkeypatch):
  import ml_collections
  from cai_jax import sampling
  from cai_jax import roles
  calls = []
  monkeypatch.setattr(sampling, "generate", _fake_generate(calls))
  monkeypatch.setattr(roles, "load", lambda spec, **kw: (None, None,
                                                         roles.load_tokenizer("tiny")))
  c = ml_collections.ConfigDict({"seed": 1, "model": "tiny", "dtype": "float32",
                                 "data": prompts_lib.default_config().to_dict(),
                                 "mesh": {"ici": (-1, 1, 1), "dcn": None}})
  c.generate_prompts = gp.default_config()
  c.generate_prompts.update(dict(num_prompts=20, chunk_size=8, progress=False))
  s = gp.run(c, str(tmp_path / "full"))
  assert s["num_generated"] == 20 and s["dropped"]["duplicate"] > 0
  rows = list(read_jsonl(str(tmp_path / "full" / "generate_prompts" / "prompts.jsonl")))
  gen = [r for r in rows if r["source"] == "generated"]
  assert len(gen) == 20 and len(rows) == 20 + 45
  assert len({gp.normalize(r["messages"][0]["content"]) for r in rows}) == len(rows)
  # The output is a prompt source for the other stages.
  ps = prompts_lib.load_prompts({"red_team": str(tmp_path / "full" / "generate_prompts"),
                                 "eval_fraction": 0.0}, "red_team", "train")
  assert len(ps) == 65
  # Resume: keep only the first chunk, drop DONE and output, run again.
  part = tmp_path / "part" / "generate_prompts"
  (part / "chunks").mkdir(parents=True)
  src = tmp_path / "full" / "generate_prompts" / "chunks" / "candidates-00000.jsonl"
  (part / "chunks" / "candidates-00000.jsonl").write_bytes(src.read_bytes())
  n = len(calls)
  gp.run(c, str(tmp_path / "part"))
  assert len(calls) - n == s["chunks"] - 1
  assert (part / "prompts.jsonl").read_bytes() == \
      (tmp_path / "full" / "generate_prompts" / "prompts.jsonl").read_bytes()


def test_make_chunk_dir_drops_temporaries_of_a_killed_write(tmp_path):
  d = tmp_path / "chunks"
  make_chunk_dir(str(d))
  (d / "red_team-00000.jsonl").write_text('{"id": "a"}\n')
  (d / ".tmp-red_team-00001.jsonl-x1y2").write_text('{"id": "b')
  make_chunk_dir(str(d))
  assert sorted(os.listdir(d)) == ["red_team-00000.jsonl"]
