"""Evaluate stage: the paper's evaluations of the helpful, SL-CAI and RL-CAI snapshots.

On the held-out red-team and helpfulness prompts (`load_prompts(..., split="eval")`)
each snapshot answers; then

- the preference model (WORKDIR/pm/final) scores every response (harmlessness on
  red-team prompts, helpfulness on helpfulness prompts) and the revise records
  (PM score against revision number, paper Fig. 5);
- Elo ratings between snapshots are fitted by Bradley-Terry from pairwise
  comparisons judged by the PM and by the feedback model (Fig. 2/3);
- the evasiveness detector classifies the red-team responses;
- optional multiple-choice evals (HHH / paper files) and the 0-4 harmfulness model.

Responses are cached per snapshot in WORKDIR/evaluate/responses/, so an
interrupted run resumes without sampling again. Numbers go to
WORKDIR/evaluate/results.json, which the report renders.
"""
from __future__ import annotations

import dataclasses
import gc
import json

import ml_collections
import numpy as np

from cai_jax import constitution as constitution_lib
from cai_jax import feedback, interrupts, sampling, utils
from cai_jax.data import prompts as prompts_lib
from cai_jax.evaluation import elo, evasiveness, harmfulness, judges
from cai_jax.evaluation import judge as judge_lib
from cai_jax.runtime import StageContext, parse_list, provenance, stage_settings
from cai_jax.utils import InputError

STAGE = "evaluate"
SNAPSHOTS = ("helpful", "sl_cai", "rl_cai", "dpo_cai")
USES = ("seed", "model", "feedback_model", "dtype", "prompt_format", "constitution", "data",
        "label")
VOLATILE = ("batch_size", "num_report_samples", "judge.progress", "judge.cache_dir")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_prompts = -1          # held-out prompts per kind (-1 = the whole eval split)
  c.samples_per_prompt = 1    # responses per prompt and snapshot (more = tighter Elo)
  c.max_new_tokens = 96       # response length limit
  c.temperature = 0.7         # sampling temperature of the snapshots' responses
  c.top_p = 0.95              # nucleus sampling
  c.batch_size = 16           # prompts per sampler / scorer batch
  c.pm = ""                   # preference model; "" = WORKDIR/pm
  c.pm_max_len = 0            # tokens of a scored conversation (end kept); 0 = pm.max_len
  # The held-out judge (a PM trained on human comparisons only) grades every snapshot;
  # the in-loop judges are secondary columns: "pm" (the reward PPO optimised) and/or
  # "feedback" (the model that made the labels).
  c.judge = judge_lib.default_config()
  c.judges = ("pm", "feedback")  # in-loop judges
  c.feedback_debias = True    # feedback judge scores both option orders and averages
  c.elo_method = "bootstrap"  # the feedback judge's Elo intervals: "fisher" or "bootstrap"
  c.elo_bootstrap = 200       # bootstrap resamples of prompts for PM-judged Elo intervals
  c.revision_records = -1     # revise records scored for PM-vs-revision (-1 = all)
  c.mc_files = ()             # multiple-choice evals (jsonl or BIG-bench task.json)
  c.mc_max_items = -1         # items per multiple-choice file (-1 = all)
  c.mc_few_shot = 0           # few-shot examples for the multiple-choice formulation
  c.mc_debias_max_options = 4  # average over cyclic option orders when items have <= this many
  c.mc_pm = True              # also answer the multiple-choice evals with the in-loop PM
  c.harmfulness = harmfulness.default_config()  # absolute 0-4 harmfulness model (optional)
  c.num_report_samples = 3    # red-team prompts whose responses the report shows
  return c


def settings(config, workdir: str) -> dict:
  return stage_settings(config, workdir, STAGE, USES, VOLATILE)


def snapshot_paths(config, workdir: str) -> dict[str, str]:
  """Snapshots that exist: the initial model, SL-CAI and RL-CAI exports (the ppo
  stage's, whichever algorithm it ran, and the dpo stage's)."""
  out = {"helpful": config.model}
  for name, sub in (("sl_cai", "sft"), ("rl_cai", "ppo"), ("dpo_cai", "dpo")):
    p = utils.join(utils.resolve_dir(workdir), sub, "final")
    if utils.isdir(p):
      out[name] = p
  return out


def _pm_len(config) -> int:
  n = int(config.evaluate.pm_max_len)
  return n if n > 0 else int(config.pm.max_len if "pm" in config else 512)


class _Models:
  """Loads each model once at a time; keeps only the one still needed."""

  def __init__(self, ctx):
    self.ctx = ctx
    self.cache: dict = {}

  def get(self, path: str, heads=("lm",)):
    if path not in self.cache:
      self.drop()
      self.cache[path] = self.ctx.load(path, heads=heads)
    return self.cache[path]

  def drop(self):
    self.cache.clear()
    gc.collect()


def _prompts(config) -> dict[str, list[dict]]:
  n = int(config.evaluate.num_prompts)
  out = {}
  for kind in ("red_team", "helpful"):
    ps = prompts_lib.load_prompts(config.data, kind, split="eval")
    out[kind] = ps if n < 0 else ps[:n]
  if not out["red_team"] and not out["helpful"]:
    raise InputError("evaluate: the eval split has no prompts; raise config.data.eval_fraction "
                     "or config.data.num_red_team / num_helpful")
  return out


def _responses(config, workdir, models: _Models, name: str, path: str, prompts) -> dict:
  """{kind: [[response per sample] per prompt]}, cached in responses/<name>.jsonl."""
  ec = config.evaluate
  cache = utils.join(utils.resolve_dir(workdir), "evaluate", "responses", f"{name}.jsonl")
  want = {(kind, p["id"], s) for kind, ps in prompts.items() for p in ps
          for s in range(ec.samples_per_prompt)}
  # The model as the workdir names it ($WORKDIR/sft/final): a moved workdir keeps its cache.
  named = provenance.relativize(path, workdir)
  got = {}
  if utils.exists(cache):
    got = {(r["kind"], r["id"], r["sample"]): r["response"] for r in utils.read_jsonl(cache)
           if r.get("model") == named}
  if not want <= set(got):
    cfg, params, tok = models.get(path)
    todo = [(kind, p, s) for kind, ps in prompts.items() for p in ps
            for s in range(ec.samples_per_prompt)]
    for s in range(ec.samples_per_prompt):
      batch = [(kind, p) for kind, p, s2 in todo if s2 == s]
      comps = sampling.generate(
          cfg, params, tok, [p["messages"] for _, p in batch], fmt=config.prompt_format,
          max_new_tokens=ec.max_new_tokens, temperature=ec.temperature, top_p=ec.top_p,
          seed=config.seed + 1000 * s, batch_size=ec.batch_size, truncate_long_prompts=True,
          desc=f"evaluate: {name} responses")
      for (kind, p), c in zip(batch, comps):
        got[(kind, p["id"], s)] = c.text.strip()
    if models.ctx.is_main:
      utils.write_jsonl(cache, [{"model": named, "kind": k, "id": i, "sample": s, "response": r}
                                for (k, i, s), r in sorted(got.items())])
  return {kind: [[got[(kind, p["id"], s)] for s in range(ec.samples_per_prompt)] for p in ps]
          for kind, ps in prompts.items()}


def _flat(prompts, responses, kind):
  msgs, texts, index = [], [], []
  for i, p in enumerate(prompts[kind]):
    for s, r in enumerate(responses[kind][i]):
      msgs.append(p["messages"])
      texts.append(r)
      index.append((i, s))
  return msgs, texts, index


def _fit(comps, players, method):
  if not comps:
    return None
  return elo.fit_elo(comps, players, anchor=players[0], method=method).as_dict()


def _revise_records(config, workdir) -> list:
  path = utils.join(utils.resolve_dir(workdir), "revise", "records.jsonl")
  if not utils.exists(path):
    return []
  recs = list(utils.read_jsonl(path))
  n = int(config.evaluate.revision_records)
  return recs if n < 0 else recs[:n]


def _grade(name, j, config, workdir, prompts, responses, results) -> None:
  """One judge's scores, paired differences, Elo and revision curve of every snapshot."""
  ec = config.evaluate
  g = judge_lib.grade(j, prompts, responses, elo_bootstrap=int(ec.elo_bootstrap),
                      seed=int(config.seed))
  g["revisions"] = judge_lib.revision_curve(j, _revise_records(config, workdir))
  for row in g.pop("rows"):
    results["_rows"].setdefault((row["snapshot"], row["kind"], row["id"], row["sample"]),
                                {})[name] = row["score"]
  results["judges"][name] = g


def _held_out_section(config, workdir, models, prompts, responses, results):
  """The evaluation judge: a PM trained on human comparisons only, never in the loop."""
  models.drop()
  j = judge_lib.get(config)
  _grade("held_out", j, config, workdir, prompts, responses, results)


def _pm_section(config, workdir, models, snaps, prompts, responses, results):
  """The in-loop PM (the reward PPO optimised): a secondary, in-loop column."""
  ec = config.evaluate
  pm_path = ec.pm or utils.join(utils.resolve_dir(workdir), "pm")
  if not utils.isdir(pm_path):
    results["notes"].append(f"No preference model at {pm_path}: in-loop PM scores skipped.")
    return
  pm = models.get(pm_path)
  if "score_kernel" not in pm[1]:
    raise InputError(f"evaluate.pm: {pm_path} has no scalar head (score.weight); "
                     "point it at the PM stage's export (WORKDIR/pm)")
  names = list(pm[0].score_labels)
  weights = None
  if names:  # a head per axis: the column is the axes' weighted sum, as PPO weighed them
    from cai_jax.rl import control
    weights = tuple(control.parse_axis_weights(
        config.ppo.get("axis_weights", "") if "ppo" in config else "", names))
  j = judge_lib.Judge(pm[0], pm[1], pm[2], config.prompt_format, _pm_len(config),
                      {"kind": "in-loop", "path": pm_path, "key": pm_path}, weights=weights)
  _grade("in_loop_pm", j, config, workdir, prompts, responses, results)
  results["_pm"] = pm_path
  if names:
    for a, name in enumerate(names):
      _grade(f"in_loop_pm_{name}", dataclasses.replace(j, column=a), config, workdir, prompts,
             responses, results)
    results["axes"] = axis_summary(names, weights, results)


def axis_summary(names, weights, results) -> dict:
  """Each axis's mean score per snapshot (harmless: red-team prompts, helpful:
  helpfulness prompts) and the Pearson correlations between the axes over every
  evaluated response."""
  keys = [f"in_loop_pm_{n}" for n in names]
  rows = [[v[k] for k in keys] for v in results["_rows"].values() if all(k in v for k in keys)]
  x = np.asarray(rows, np.float64).reshape(-1, len(names))
  corr = np.corrcoef(x, rowvar=False) if len(x) > 1 else np.full((len(names),) * 2, np.nan)
  per_axis = {n: results["judges"][k]["scores"] for n, k in zip(names, keys)}
  scores = {snap: {n: {kind: v["mean"] for kind, v in per_axis[n][snap].items()} for n in names}
            for snap in per_axis[names[0]]}
  return {"names": list(names), "weights": list(weights), "num_responses": len(x),
          "correlation": np.atleast_2d(corr).tolist(), "scores": scores}


def _feedback_section(config, models, snaps, prompts, responses, results):
  """Elo judged by the feedback model through the label stage's machinery (few-shot
  multiple-choice questions, principles drawn from the constitution, both orders)."""
  import dataclasses
  path = models.ctx.role_spec("feedback")
  cfg, params, tok = models.get(path)
  const = constitution_lib.load(config.constitution)
  lc = ml_collections.ConfigDict(config.label.to_dict())
  lc.cot = False          # judge by the answer probabilities directly
  lc.hard_labels = False  # soft outcomes feed the Bradley-Terry fit
  helpful_const = dataclasses.replace(const, choice_principles=[
      constitution_lib.ChoicePrinciple("helpfulness", judges.HELPFUL_PRINCIPLE)])
  rng = np.random.default_rng(config.seed)
  players = list(snaps)
  out = {}
  for kind, axis, c in (("red_team", "harmlessness", const), ("helpful", "helpfulness", helpful_const)):
    items, owners = [], []
    for a, b in judges.pairs(players):
      m, ta, _ = _flat(prompts, responses[a], kind)
      _, tb, _ = _flat(prompts, responses[b], kind)
      for x, y, z in zip(m, ta, tb):
        items.append({"prompt": x, "response_a": y, "response_b": z})
        owners.append((a, b))
    if not items:
      continue
    labeller = feedback.make_labeller(config.prompt_format, lc, cfg, params, tok, c)
    labels = labeller(items, rng, config.seed)
    comps = [(a, b, float(r["p_a"])) for (a, b), r in zip(owners, labels)]
    out[axis] = _fit(comps, players, config.evaluate.elo_method)
    out["num_comparisons"] = len(comps)
  results["elo"]["feedback"] = out
  results["_feedback"] = path


def _mc_section(config, models, results):
  from cai_jax.evaluation import multiple_choice
  ec = config.evaluate
  files = parse_list(ec.mc_files)
  if not files:
    return
  out = {}
  for f in files:
    if not utils.exists(f):
      results["notes"].append(f"Multiple-choice file {f} not found: skipped.")
      continue
    items = multiple_choice.load_items(f, seed=config.seed)
    if ec.mc_max_items >= 0:
      items = items[:ec.mc_max_items]
    name = f.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
    if name == "task":  # BIG-bench: name by the task directory
      name = f.rstrip("/").rsplit("/", 2)[-2]
    forms = {}
    cfg, params, tok = models.get(models.ctx.role_spec("feedback"))
    # Debiasing costs one question per option order: N orders for N options.
    debias = all(it.listed is not None and len(it.options) <= ec.mc_debias_max_options
                 for it in items)
    r = multiple_choice.evaluate(cfg, params, tok, items, formulation="mc", few_shot=ec.mc_few_shot,
                                 debias=debias, fmt=config.prompt_format, seed=config.seed)
    forms["feedback model" + (" (debiased)" if debias else "")] = {
        k: r[k] for k in ("accuracy", "n", "chance", "ece")}
    if results.get("_pm") and ec.mc_pm:
      cfg, params, tok = models.get(results["_pm"])
      r = multiple_choice.evaluate(cfg, params, tok, items, formulation="pm",
                                   fmt=config.prompt_format, seed=config.seed,
                                   axis_weights=results.get("axes", {}).get("weights"))
      forms["PM"] = {k: r[k] for k in ("accuracy", "n", "chance", "ece")}
    out[name] = forms
  if out:
    results["multiple_choice"] = out


def _harmfulness_section(config, workdir, models, snaps, prompts, responses, results):
  hc = config.evaluate.harmfulness
  if not hc.data:
    return
  data = harmfulness.load_ratings(hc.data)
  train_set, eval_set = harmfulness.split(data, hc.eval_fraction, seed=config.seed)
  cfg, params, tok = models.get(hc.init_from or config.model, heads=("lm",))
  params, hist = harmfulness.train(cfg, dict(params), tok, train_set, steps=hc.steps,
                                   batch_size=hc.batch_size, learning_rate=hc.learning_rate,
                                   weight_decay=hc.weight_decay, max_len=hc.max_len,
                                   fmt=config.prompt_format, seed=config.seed,
                                   directory=utils.join(utils.resolve_dir(workdir), "evaluate",
                                                        "harmfulness"))
  models.drop()
  pred = harmfulness.predict(cfg, params, tok, [d.messages for d in eval_set],
                             fmt=config.prompt_format, max_len=hc.max_len)
  ratings = np.array([d.rating for d in eval_set])
  out = {"_model": {"eval_mse": float(np.mean((pred - ratings) ** 2)) if len(pred) else None,
                    "n_train": len(train_set), "final_train_loss": float(np.mean(hist[-10:]))}}
  for name in snaps:
    msgs, texts, _ = _flat(prompts, responses[name], "red_team")
    convs = [list(m) + [{"role": "assistant", "content": t}] for m, t in zip(msgs, texts)]
    p = harmfulness.predict(cfg, params, tok, convs, fmt=config.prompt_format, max_len=hc.max_len)
    out[name] = {"mean": float(np.mean(p)) if len(p) else float("nan"), "n": int(len(p))}
  results["harmfulness"] = out


def run(config, workdir: str) -> dict:
  ctx = StageContext(config, workdir, STAGE, default_config())
  ec = ctx.section
  done = ctx.done()
  if done is not None:
    return done
  judges_on = set(parse_list(ec.judges))
  snaps = snapshot_paths(config, workdir)
  prompts = _prompts(config)
  ctx.begin(settings(config, workdir))
  models = _Models(ctx)
  responses = {name: _responses(config, workdir, models, name, path, prompts)
               for name, path in snaps.items()}
  results = {"snapshots": snaps, "elo": {}, "notes": [], "judges": {}, "_rows": {},
             "num_prompts": {k: len(v) for k, v in prompts.items()},
             "samples_per_prompt": int(ec.samples_per_prompt)}
  results["evasiveness"] = {
      name: evasiveness.rates([r for rs in responses[name]["red_team"] for r in rs])
      for name in snaps}
  # Responses are cached and the judge resumes from its checkpoints; the scoring
  # sections are short, so a signal stops the stage between them.
  interrupts.check("evaluate, before the held-out judge")
  _held_out_section(config, workdir, models, prompts, responses, results)
  if "pm" in judges_on:
    interrupts.check("evaluate, before the in-loop PM")
    _pm_section(config, workdir, models, snaps, prompts, responses, results)
  if "feedback" in judges_on:
    interrupts.check("evaluate, before the feedback model's Elo")
    _feedback_section(config, models, snaps, prompts, responses, results)
  interrupts.check("evaluate, before the multiple-choice evaluations")
  _mc_section(config, models, results)
  interrupts.check("evaluate, before the harmfulness model")
  _harmfulness_section(config, workdir, models, snaps, prompts, responses, results)
  models.drop()
  k = int(ec.num_report_samples)
  results["samples"] = [{"prompt": p["messages"],
                         "responses": {n: responses[n]["red_team"][i][0] for n in snaps}}
                        for i, p in enumerate(prompts["red_team"][:k])]
  # Every judge's score of every response: any comparison can be redone from it.
  ctx.write_jsonl("scores.jsonl", [
      {"snapshot": s, "kind": k, "id": i, "sample": n,
       "response": responses[s][k][[p["id"] for p in prompts[k]].index(i)][n], **v}
      for (s, k, i, n), v in sorted(results["_rows"].items())])
  results = {k: v for k, v in results.items() if not k.startswith("_")}
  ctx.write_text("results.json", json.dumps(results, indent=1, default=float) + "\n")
  summary = {"snapshots": len(snaps), "red_team_prompts": len(prompts["red_team"]),
             "helpful_prompts": len(prompts["helpful"])}
  held = results["judges"].get("held_out", {})
  for name, v in held.get("scores", {}).items():
    summary[f"judge_harmless_{name}"] = v["harmless"]["mean"]
  if held:
    summary["judge_accuracy"] = held["info"].get("heldout", {}).get("accuracy")
  for name, v in results["evasiveness"].items():
    summary[f"evasive_{name}"] = v["evasive"]
  return ctx.finish(summary)
