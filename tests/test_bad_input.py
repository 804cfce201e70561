"""Bad input through the command line: one line on stderr naming the field or file,
exit status 2, and the work directory left as it was (absent, for a fresh one).

Each case runs `python -m cai_jax.main` on configs/tiny.py, as a user would.
"""
import json
import os
import struct
import subprocess
import sys

import pytest
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"--config={ROOT}/configs/tiny.py"
# The tests simulate 8 devices: training batches must divide the data axis.
BASE = ["--config.sft.batch_size=8", "--config.pm.batch_size=8", "--config.compilation_cache="]


def _tree(path):
  if not os.path.lexists(path):
    return None
  if os.path.isfile(path):
    return open(path, "rb").read()
  return {f: _tree(os.path.join(path, f)) for f in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """An HF directory of the tiny model (config.json, safetensors, tokenizer files)."""
  from cai_jax import models, roles
  import jax
  d = str(tmp_path_factory.mktemp("export") / "tiny")
  cfg = roles.tiny_config()
  models.save_pretrained(cfg, models.init_params(cfg, jax.random.PRNGKey(0)), d,
                         roles.load_tokenizer("tiny"))
  return d


def _copy_export(src, dst, drop=()):
  import shutil
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
  return str(dst)


def _safetensors_with_header(path, header):
  hb = json.dumps(header).encode()
  hb += b" " * (-len(hb) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(hb)) + hb + b"\0" * 64)


def _constitution(tmp, edit):
  c = json.load(open(os.path.join(ROOT, "constitutions", "harmlessness.json")))
  edit(c)
  p = tmp / "const.json"
  p.write_text(json.dumps(c))
  return str(p)


# --------------------------------------------------------------- the cases
# name -> (function of (tmp_path, tiny_export) returning extra arguments, the
# text the error line must hold). Every value is one a user has typed or a file
# one has had.
def _const(edit):
  return lambda t, e: [f"--config.constitution={_constitution(t, edit)}"]


def _export_variant(fix):
  def make(t, e):
    d = _copy_export(e, t / "model")
    fix(d)
    return [f"--config.model={d}"]
  return make


def _prompts(text):
  def make(t, e):
    (t / "red.jsonl").write_text(text)
    return [f"--config.data.red_team={t / 'red.jsonl'}"]
  return make


def _workdir_file(t, e):
  (t / "afile").write_text("x")
  return {"workdir": str(t / "afile" / "run")}


def _pipeline_json(t, e):
  w = t / "w"
  w.mkdir()
  (w / "pipeline.json").write_text("{not json")
  return {"workdir": str(w)}


def _pipeline_json_list(t, e):
  w = t / "w"
  w.mkdir()
  (w / "pipeline.json").write_text("[]")
  return {"workdir": str(w)}


def _custom_code(t, e):
  d = _copy_export(e, t / "model")
  marker = t / "RAN"
  with open(os.path.join(d, "tokenization_evil.py"), "w") as f:
    f.write(f"open({str(marker)!r}, 'w').write('ran')\n"
            "from transformers import PreTrainedTokenizerFast\n"
            "class EvilTokenizer(PreTrainedTokenizerFast):\n  pass\n")
  cfg_path = os.path.join(d, "tokenizer_config.json")
  tc = json.load(open(cfg_path))
  tc["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
  tc["tokenizer_class"] = "EvilTokenizer"
  json.dump(tc, open(cfg_path, "w"))
  return [f"--config.model={d}"]


def _list_header(d):
  _safetensors_with_header(os.path.join(d, "model.safetensors"), [1, 2, 3])


def _negative_offset(d):
  _safetensors_with_header(os.path.join(d, "model.safetensors"),
                           {"model.norm.weight": {"dtype": "F32", "shape": [16],
                                                  "data_offsets": [-64, 0]}})


def _rm(*names):
  def fix(d):
    for n in names:
      os.remove(os.path.join(d, n))
  return fix


def _write(name, text):
  def fix(d):
    with open(os.path.join(d, name), "w") as f:
      f.write(text)
  return fix


CASES = {
    # sizes and ranges
    "sft_batch_zero": (["--config.sft.batch_size=0"], "config.sft.batch_size=0"),
    "sft_batch_negative": (["--config.sft.batch_size=-1"], "config.sft.batch_size=-1"),
    "sft_max_len_zero": (["--config.sft.max_len=0"], "config.sft.max_len=0"),
    "sft_lr_nan": (["--config.sft.optim.learning_rate=nan"], "config.sft.optim.learning_rate=nan"),
    "sft_schedule": (["--config.sft.optim.schedule=step"], "config.sft.optim.schedule"),
    "sft_batch_vs_devices": (["--config.sft.batch_size=6"], "data-parallel size 8"),
    "sft_micro_batches": (["--config.sft.micro_batches=3"], "config.sft.micro_batches=3"),
    "frozen_dtype": (["--config.frozen_dtype=int8"], "config.frozen_dtype='int8'"),
    "pm_batch_zero": (["--config.pm.batch_size=0"], "config.pm.batch_size=0"),
    "pm_human_fraction": (["--config.pm.human_fraction=1.5"], "config.pm.human_fraction=1.5"),
    "ppo_batch_zero": (["--config.ppo.batch_size=0"], "config.ppo.batch_size=0"),
    "ppo_minibatches": (["--config.ppo.batch_size=6", "--config.ppo.num_minibatches=4"],
                        "config.ppo.num_minibatches=4"),
    "ppo_iterations_zero": (["--config.ppo.num_iterations=0"], "config.ppo.num_iterations=0"),
    "ppo_lr_negative": (["--config.ppo.policy_optim.learning_rate=-1e-6"],
                        "config.ppo.policy_optim.learning_rate"),
    "ppo_kl_kind": (["--config.ppo.kl.kind=exp"], "config.ppo.kl.kind"),
    "ppo_algorithm": (["--config.ppo.algorithm=reinforce"], "config.ppo.algorithm"),
    "ppo_reward": (["--config.ppo.reward=human"], "config.ppo.reward"),
    "online_with_ai_reward": (["--config.ppo.reward=ai", "--config.ppo.online.refresh_every=2"],
                              "config.ppo.online.refresh_every=2"),
    "online_pm_batch_vs_devices": (["--config.ppo.online.refresh_every=1",
                                    "--config.ppo.online.pm_batch_size=6"],
                                   "config.ppo.online.pm_batch_size=6"),
    "online_human_fraction": (["--config.ppo.online.human_fraction=2.0"],
                              "config.ppo.online.human_fraction=2.0"),
    "dpo_loss": (["--config.stages=dpo", "--config.dpo.loss=kto"], "config.dpo.loss"),
    "dpo_beta": (["--config.stages=dpo", "--config.dpo.beta=0"], "config.dpo.beta=0"),
    "grpo_group_one": (["--config.ppo.algorithm=grpo", "--config.ppo.group_size=1"],
                       "config.ppo.group_size=1"),
    "rloo_group_divides": (["--config.ppo.algorithm=rloo", "--config.ppo.batch_size=6",
                            "--config.ppo.num_minibatches=1", "--config.ppo.group_size=4"],
                           "config.ppo.group_size=4"),
    "grpo_kl_in": (["--config.ppo.algorithm=grpo", "--config.ppo.kl_in=logits"],
                   "config.ppo.kl_in"),
    "evaluate_samples_zero": (["--config.evaluate.samples_per_prompt=0"],
                              "config.evaluate.samples_per_prompt=0"),
    "evaluate_judges": (["--config.evaluate.judges=pm,oracle"], "oracle"),
    "judge_heldout": (["--config.evaluate.judge.heldout_fraction=1.0"],
                      "config.evaluate.judge.heldout_fraction"),
    "revise_rounds_zero": (["--config.revise.num_revisions=0"], "config.revise.num_revisions=0"),
    "revise_top_p_zero": (["--config.revise.top_p=0.0"], "config.revise.top_p"),
    "revise_temperature": (["--config.revise.temperature=-1.0"], "config.revise.temperature"),
    "label_principles_zero": (["--config.label.num_principles=0"],
                              "config.label.num_principles=0"),
    "label_debias_mean": (["--config.label.debias_mean=median"], "config.label.debias_mean"),
    "num_red_team_zero": (["--config.data.num_red_team=0"], "config.data.num_red_team=0"),
    "eval_fraction_one": (["--config.data.eval_fraction=1.0"], "config.data.eval_fraction"),
    "dtype": (["--config.dtype=float17"], "float17"),
    "mesh": (["--config.mesh.ici=(3,1,1)"], "config.mesh.ici"),
    "prompt_format": (["--config.prompt_format=xml"], "config.prompt_format"),
    "unknown_stage": (["--config.stages=revise,critique"], "critique"),
    "misspelt_field": (["--config.data.num_red_tem=3"], "num_red_tem"),
    "wrong_type": (["--config.seed=abc"], "--config.seed=abc"),
    "reuse_without_from": (["--config.reuse_stages=revise"], "config.reuse_from"),
    "rerun_unknown": (["--rerun=critique"], "--rerun=critique"),
    # constitutions
    "constitution_missing": (["--config.constitution=no_such_constitution"],
                             "no_such_constitution"),
    "choice_principles_number": (_const(lambda c: c.update(choice_principles=5)),
                                 "choice_principles"),
    "choice_principles_absent": (_const(lambda c: (c.pop("choice_principles"), c.pop("axes"))),
                                 "no choice_principles"),
    "principles_empty": (_const(lambda c: c.update(principles=[])), "principles"),
    # prompt sets
    "red_team_missing": (["--config.data.red_team=/no/such/prompts.jsonl"],
                         "/no/such/prompts.jsonl"),
    "red_team_empty": (_prompts(""), "red.jsonl"),
    "red_team_bad_line": (_prompts('{"prompt": "hi"}\n{oops\n'), "red.jsonl"),
    # models and checkpoints
    "model_missing": (["--config.model=/no/such/model"], "/no/such/model"),
    "model_not_gguf": (lambda t, e: (t / "m.bin").write_text("x") and
                       [f"--config.model={t / 'm.bin'}"], "not a GGUF file"),
    "model_no_tokenizer": (_export_variant(_rm("tokenizer.json")), "no tokenizer files"),
    "model_config_corrupt": (_export_variant(_write("config.json", "{")), "config.json"),
    "safetensors_list_header": (_export_variant(_list_header), "model.safetensors"),
    "safetensors_negative_offset": (_export_variant(_negative_offset), "model.norm.weight"),
    "safetensors_missing": (_export_variant(_rm("model.safetensors")), "model.safetensors"),
    "feedback_model_missing": (["--config.feedback_model=/no/such/fb"], "/no/such/fb"),
    "ppo_pm_missing": (["--config.ppo.pm=/no/such/pm"], "config.ppo.pm"),
    "custom_tokenizer_code": (_custom_code, "own Python code"),
    # the work directory
    "workdir_under_a_file": (_workdir_file, "is a file"),
    "workdir_under_proc": (lambda t, e: {"workdir": "/proc/cai_jax_run"}, "/proc"),
    "pipeline_json_corrupt": (_pipeline_json, "pipeline.json"),
    "pipeline_json_not_a_record": (_pipeline_json_list, "pipeline.json"),
    "positional_argument": (["stray"], "unexpected arguments stray"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_export):
  """Every case's (exit status, stderr, work directory before, after), run two at a time."""
  from concurrent.futures import ThreadPoolExecutor
  env = dict(os.environ, JAX_PLATFORMS="cpu")

  def one(name):
    tmp = tmp_path_factory.mktemp(name)
    make, _ = CASES[name]
    extra = make(tmp, tiny_export) if callable(make) else list(make)
    workdir = str(tmp / "run")
    if isinstance(extra, dict):
      workdir, extra = extra["workdir"], extra.get("args", [])
    before = _tree(workdir)
    r = subprocess.run([sys.executable, "-m", "cai_jax.main", TINY, f"--workdir={workdir}",
                        *BASE, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stderr, before, _tree(workdir), (tmp / "RAN").exists()

  with ThreadPoolExecutor(2) as pool:
    return dict(zip(sorted(CASES), pool.map(one, sorted(CASES))))


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_one_line_exit_2_nothing_written(name, outcomes):
  code, err, before, after, ran = outcomes[name]
  needle = CASES[name][1]
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert code == 2, err
  assert len(lines) == 1, err
  assert lines[0].startswith("cai-jax: error: ") and needle in lines[0], lines[0]
  assert after == before, "the work directory changed"
  assert not ran, "the checkpoint's code ran"


def test_the_table_holds_every_reported_kind():
  """At least the 36 kinds of bad input the issue lists."""
  assert len(CASES) >= 36


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, mask):
  from cai_jax import utils
  old = os.umask(mask)
  try:
    utils.atomic_write_text(str(tmp_path / "a.txt"), "x")
    utils.write_json(str(tmp_path / "b.json"), {"x": 1})
    utils.write_once(str(tmp_path / "c.jsonl"), "{}\n")
  finally:
    os.umask(old)
  for f in ("a.txt", "b.json", "c.jsonl"):
    assert os.stat(tmp_path / f).st_mode & 0o777 == 0o666 & ~mask, f


def test_over_long_red_team_prompt_is_shortened_and_counted(tmp_path):
  """A red-team prompt longer than the context: revise and label keep its end (as the
  sampler does) and count it in their summaries, rather than failing in label."""
  red = tmp_path / "red.jsonl"
  red.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "Tell me how to pick a lock. " *
                                     (900 if i == 0 else 1)}) + "\n" for i in range(8)))
  w = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "cai_jax.main", TINY, f"--workdir={w}",
                      "--config.compilation_cache=", f"--config.data.red_team={red}",
                      "--config.stages=revise,sft,label", "--config.data.eval_fraction=0.0"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  revise = json.loads((w / "revise" / "DONE").read_text())
  label = json.loads((w / "label" / "DONE").read_text())
  assert revise["prompts_shortened"] >= 1 and label["questions_shortened"] >= 1
  assert label["num_comparisons"] == 6


def test_over_long_multiple_choice_question_is_one_line(tmp_path):
  item = {"prompt": "Which is right? " * 3000 + "The answer is:", "corrects": [" (A)"],
          "incorrects": [" (B)"]}
  data = tmp_path / "mc.jsonl"
  data.write_text(json.dumps(item) + "\n")
  r = subprocess.run([sys.executable, "-m", "cai_jax.evaluation.multiple_choice", "--model",
                      "tiny", "--data", str(data), "--no_progress"], cwd=ROOT,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                     timeout=300)
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
  assert "do not fit the model's context of 2048" in lines[0]
