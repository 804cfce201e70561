"""WORKDIR/report.md: what each stage did, the paper's plots and tables, a summary.

The report is rebuilt from files alone (pipeline.json, each stage's DONE summary
and records, evaluate/results.json), so it can be regenerated for any work
directory, finished or not:

  python -m cai_jax.evaluation.report WORKDIR

Plots go to WORKDIR/report_files/. `write_report` also returns ten summary lines,
which `make demo` prints at the end.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

from cai_jax import utils
from cai_jax.evaluation import plots, stats

STAGES = ("revise", "sft", "label", "pm", "ppo", "dpo", "evaluate")
# Summary numbers shown first for each stage (the rest follow in the stage table).
HEADLINE = {"revise": ("frac_revision_changed", "num_red_team", "num_rounds"),
            "sft": ("final_loss", "steps", "num_examples"),
            "label": ("mean_p_a", "mean_confidence", "num_comparisons"),
            "pm": ("eval.ai_accuracy", "eval.ai_ece", "eval.human_accuracy", "final_loss", "steps"),
            "ppo": ("reward_first", "reward_last", "kl_last", "iterations"),
            "dpo": ("eval.ai_accuracy", "eval.human_accuracy", "final_loss", "steps"),
            "evaluate": ("snapshots", "red_team_prompts", "helpful_prompts")}
SNAPSHOT_TITLES = {"helpful": "initial helpful", "sl_cai": "SL-CAI", "rl_cai": "RL-CAI",
                   "dpo_cai": "RL-CAI (DPO)"}
YLABELS = {"loss": "loss (nats)", "accuracy": "pairwise accuracy", "learning_rate": "learning rate",
           "tokens_per_s": "tokens / s", "reward": "PM reward (mean)",
           "kl": "KL k1 (nats / sequence)", "kl_k3": "KL k3 (nats / sequence)",
           "entropy": "entropy (nats / token)", "response_length": "tokens",
           "margin": "β × log-ratio margin (A − B)"}
# Mean |p - 0.5| of the AI labels below this: the feedback model barely prefers either.
LABEL_CHANCE = 0.05


def _load_json(path: str, default=None):
  try:
    return utils.read_json(path, default)
  except (OSError, utils.InputError):
    return default


def _records(path: str, limit: int | None = None) -> list[dict]:
  if not utils.exists(path):
    return []
  out = []
  for r in utils.read_jsonl(path):
    out.append(r)
    if limit is not None and len(out) >= limit:
      break
  return out


def _fmt(x: Any, digits: int = 3) -> str:
  if isinstance(x, bool) or x is None:
    return str(x)
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  if isinstance(x, (float, np.floating)):
    if not np.isfinite(x):
      return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
  return str(x)


def _above(lo: float, hi: float, chance: float) -> str:
  """"yes" when the 95% interval lies above chance; else whether it is at or below it."""
  if isinstance(lo, (int, float)) and np.isfinite(lo) and lo > chance:
    return "yes"
  if isinstance(hi, (int, float)) and np.isfinite(hi) and hi < chance:
    return "no (below)"
  return "no (at chance)"


def _p(p: float, name: str = "p") -> str:
  return f"{name}<0.001" if p < 0.001 else f"{name}={p:.2g}"


def _ci(d: dict) -> str:
  lo, hi = d.get("lo"), d.get("hi")
  if not isinstance(lo, (int, float)) or not np.isfinite(lo):
    return "n/a"
  return f"{_fmt(lo)} to {_fmt(hi)}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(v) for v in r) + " |")
  return "\n".join(lines)


def _headline(stage: str, nums: dict) -> dict:
  first = {k: nums[k] for k in HEADLINE.get(stage, ()) if k in nums}
  return {**first, **{k: v for k, v in nums.items() if k not in first}}


def _flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat_numbers(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[prefix + k] = v
  return out


def _last_text(messages) -> str:
  if isinstance(messages, list) and messages:
    return str(messages[-1].get("content", ""))
  return str(messages)


def _quote(text: str, limit: int = 400) -> str:
  text = text.strip()
  if len(text) > limit:
    text = text[:limit] + " …"
  return "\n".join("> " + ln for ln in (text.splitlines() or [""]))


class _Report:

  def __init__(self, workdir: str):
    self.workdir = utils.resolve_dir(workdir)
    self.files = utils.join(self.workdir, "report_files")
    self.parts: list[str] = []
    self.summary: list[str] = []
    self.timings = _load_json(utils.join(self.workdir, "pipeline.json"), {"stages": {}})
    self.stage_summary = {s: self._done(s) for s in STAGES}
    self.results = _load_json(utils.join(self.workdir, "evaluate", "results.json"), {})

  def _done(self, stage):
    info = _load_json(utils.join(self.workdir, stage, "DONE"))
    if info is None:
      info = self.timings["stages"].get(stage, {}).get("summary")
    return info

  def add(self, text: str):
    self.parts.append(text.rstrip() + "\n")

  def plot(self, fn, name: str, *args, **kw) -> str:
    path = fn(*args, path=utils.join(self.files, name), **kw)
    return f"![{name}]({plots.rel(path, self.workdir)})"

  # -- sections ---------------------------------------------------------------

  def stages(self):
    rows, total = [], 0.0
    for s in STAGES:
      t = self.timings["stages"].get(s)
      done = self.stage_summary[s] is not None
      if t is None and not done:
        continue
      secs = (t or {}).get("seconds", float("nan"))
      total += 0.0 if not np.isfinite(secs) else secs
      nums = _headline(s, _flat_numbers(self.stage_summary[s] or {}))
      key = ", ".join(f"{k}={_fmt(v)}" for k, v in list(nums.items())[:6])
      rows.append([s, "done" if done else (t or {}).get("status", "not run"), secs,
                   (t or {}).get("cpu_seconds", float("nan")), (t or {}).get("attempts", 0), key])
    self.add("## Stages\n")
    self.add(_table(["stage", "status", "wall time (s)", "CPU time (s)", "attempts", "summary"], rows)
             if rows else "No stage has run yet.")
    self.total_seconds = total
    cpu = sum(r[3] for r in rows if np.isfinite(r[3]))
    done = [r[0] for r in rows if r[1] == "done"]
    self.summary.append(f"Wall time: {total:.0f} s (CPU {cpu:.0f} s) over stages "
                        f"{', '.join(done) or 'none'} "
                        f"(last invocation {self.timings.get('last_run_seconds', 0):.0f} s).")

  def revise(self):
    recs = _records(utils.join(self.workdir, "revise", "records.jsonl"))
    if not recs:
      return
    rounds = [len(r.get("rounds", [])) for r in recs]
    changed = [r["rounds"][-1]["revision"].strip() != r["initial_response"].strip()
               for r in recs if r.get("rounds")]
    frac = float(np.mean(changed)) if changed else float("nan")
    self.add("## SL-CAI: critiques and revisions\n")
    self.add(f"{len(recs)} red-team prompts, {max(rounds)} rounds each; the final revision "
             f"differs from the initial response in {100 * frac:.0f}% of them.\n")
    ex = recs[0]
    self.add("Example (first record):\n")
    self.add("**Prompt**\n\n" + _quote(_last_text(ex.get("prompt"))) + "\n")
    self.add("**Initial response**\n\n" + _quote(ex.get("initial_response", "")) + "\n")
    for k, rd in enumerate(ex.get("rounds", []), 1):
      if rd.get("critique"):
        self.add(f"**Critique {k}** ({rd.get('principle_id')})\n\n" + _quote(rd["critique"]) + "\n")
      self.add(f"**Revision {k}**\n\n" + _quote(rd.get("revision", "")) + "\n")
    curves = {}
    for name, label in (("held_out", "held-out judge"), ("in_loop_pm", "in-loop PM")):
      rows = self.results.get("judges", {}).get(name, {}).get("revisions")
      if rows:
        curves[label] = rows
    if curves:
      self.add(self.plot(plots.revision_scores, "revision_scores.png", curves))
      first = next(iter(curves))
      rows = curves[first]
      self.add(_table(["revisions"] + [f"{k} score" for k in curves] + ["95% CI (" + first + ")",
                                                                        "n"],
                      [[r["revision"]] + [c[i]["mean"] if i < len(c) else None
                                          for c in curves.values()]
                       + [f"{_fmt(r['lo'])} to {_fmt(r['hi'])}", r["n"]]
                       for i, r in enumerate(rows)]))
      self.summary.append(f"Revise: {len(recs)} prompts x {max(rounds)} rounds; {first} score "
                          f"{_fmt(rows[0]['mean'])} (initial) -> {_fmt(rows[-1]['mean'])} "
                          f"(revision {rows[-1]['revision']}).")
    else:
      self.summary.append(f"Revise: {len(recs)} prompts x {max(rounds)} rounds; "
                          f"{100 * frac:.0f}% revised.")

  def label(self):
    recs = _records(utils.join(self.workdir, "label", "preferences.jsonl"))
    if not recs:
      return
    p = np.array([r["p_a"] for r in recs], dtype=np.float64)
    self.add("## AI feedback labels\n")
    self.add(f"{len(recs)} comparisons; mean p(A) {p.mean():.3f}, mean confidence "
             f"|p - 0.5| {np.abs(p - 0.5).mean():.3f}, {100 * np.mean((p > 0.4) & (p < 0.6)):.0f}% "
             "within [0.4, 0.6].\n")
    self.add(self.plot(plots.histogram, "label_soft_labels.png", p, xlabel="p(A is better)",
                       title="Soft labels from the feedback model", range_=(0.0, 1.0)))
    self.summary.append(f"Labels: {len(recs)} AI comparisons, mean p(A) {p.mean():.2f}, "
                        f"mean |p-0.5| {np.abs(p - 0.5).mean():.2f}.")

  def training(self):
    rl = {"grpo": "RL-CAI (GRPO)", "rloo": "RL-CAI (RLOO)"}.get(
        (self.stage_summary["ppo"] or {}).get("algorithm"), "RL-CAI (PPO)")
    dpo = f"RL-CAI without a PM ({(self.stage_summary['dpo'] or {}).get('loss', 'soft')} DPO)"
    for stage, title in (("sft", "SL-CAI fine-tuning"), ("pm", "Preference model"),
                         ("ppo", rl), ("dpo", dpo)):
      info = self.stage_summary[stage]
      if info is None:
        continue
      nums = _headline(stage, _flat_numbers(info))
      self.add(f"## {title}\n")
      if stage == "pm" and info.get("human_data") is False:
        self.add("Trained on AI harmlessness labels only: no human helpfulness comparisons "
                 "(`pm.human_data`), unlike the paper's harmlessness + helpfulness mix, so "
                 "this PM rewards harmlessness alone.\n")
      if nums:
        self.add(_table(["metric", "value"], [[k, v] for k, v in nums.items()]))
      curves = self._curves(stage)
      if curves:
        self.add(self.plot(plots.curves, f"{stage}_curves.png", curves, title=title,
                           xlabel="iteration" if stage == "ppo" else "step", ylabels=YLABELS))
        if stage == "ppo":
          self.add("KL panels: `kl` is the k1 estimate (mean log-ratio of policy to reference "
                   "over the response), which can dip below 0 on a batch; `kl_k3` is the "
                   "non-negative k3 estimate. Both in nats per sequence.\n")
      if stage == "ppo" and info.get("online"):
        self.online()
      keys = list(nums.items())[:4]
      self.summary.append(f"{title}: " + (", ".join(f"{k}={_fmt(v)}" for k, v in keys) or "done") + ".")

  def online(self):
    """Online RLAIF: the PM on each refresh's fresh labels, before and after training."""
    recs = [r for r in _records(utils.join(self.workdir, "ppo", "metrics.jsonl"))
            if "online/refresh" in r]
    if not recs:
      return
    self.add("### PM refreshes (online RLAIF)\n")
    self.add("Each refresh labels fresh pairs sampled from the current policy. *Before* is "
             "the PM's agreement with those labels as RL had left it (how far the policy "
             "had drifted from what the PM knew); *after* is once trained on them. Accuracy "
             "counts pairs whose label is not 0.5; a feedback model at chance gives labels "
             "near 0.5, which no PM can agree with beyond chance.\n")
    self.add(_table(["refresh", "after iteration", "new labels", "mean confidence",
                     "accuracy before", "loss before", "accuracy after", "loss after"],
                    [[r["online/refresh"], r.get("iteration"), r.get("online/new_labels"),
                      r.get("online/mean_confidence"), r.get("online/before_accuracy"),
                      r.get("online/before_loss"), r.get("online/after_accuracy"),
                      r.get("online/after_loss")] for r in recs]))

  def _curves(self, stage: str) -> dict:
    path = utils.join(self.workdir, stage, "metrics.jsonl")
    recs = _records(path)
    if len(recs) < 2:
      return {}
    wanted = {"sft": ("loss", "learning_rate", "tokens_per_s"),
              "pm": ("loss", "accuracy", "learning_rate"),
              "ppo": ("reward", "kl", "kl_k3", "entropy", "response_length"),
              "dpo": ("loss", "accuracy", "margin")}[stage]
    out = {}
    for k in wanted:
      pts = [(r.get("step", r.get("iteration", i)), r[k]) for i, r in enumerate(recs)
             if isinstance(r.get(k), (int, float))]
      if len(pts) >= 2:
        out[k] = pts
    return out

  def evaluation(self):
    res = self.results
    if not res:
      return
    self.add("## Evaluation\n")
    snaps = res.get("snapshots", {})
    if snaps:
      self.add(_table(["snapshot", "model"], [[SNAPSHOT_TITLES.get(k, k), v] for k, v in snaps.items()]))
    for name, title in (("held_out", "held-out judge"), ("in_loop_pm", "in-loop PM")):
      g = res.get("judges", {}).get(name)
      if not g:
        continue
      self.add(f"### Scores by the {title}\n")
      if name == "in_loop_pm":
        self.add("The PM that PPO optimised: RL-CAI is graded by its own reward here, so "
                 "this column is no evidence that the method worked.\n")
      rows = [[SNAPSHOT_TITLES.get(sn, sn), v["harmless"]["mean"], _ci(v["harmless"]),
               v["helpful"]["mean"], _ci(v["helpful"]), v["harmless"]["n"]]
              for sn, v in g.get("scores", {}).items()]
      self.add(_table(["snapshot", "harmlessness", "95% CI", "helpfulness", "95% CI",
                       "prompts"], rows))
      self._elo_table(title, g.get("elo", {}), f"elo_{name}.png",
                      "bootstrap over prompts (prompts resampled whole)")
    axes = res.get("axes")
    if axes:
      names = axes["names"]
      self.add("### Scores per axis (in-loop PM, a head per axis)\n")
      self.add("Each axis's mean score per snapshot on red-team (harmless) and helpfulness "
               "(helpful) prompts; the in-loop PM column above weighs the axes' raw scores "
               f"by {', '.join(f'{n} {w:g}' for n, w in zip(names, axes['weights']))}.\n")
      self.add(_table(["snapshot"] + [f"{n} ({k})" for n in names for k in ("harmless", "helpful")],
                      [[SNAPSHOT_TITLES.get(sn, sn)] + [v[n].get(k) for n in names
                                                        for k in ("harmless", "helpful")]
                       for sn, v in axes["scores"].items()]))
      self.add(f"Correlation between the axes over {axes['num_responses']} responses "
               "(Pearson):\n")
      self.add(_table(["axis"] + names, [[n] + row for n, row in zip(names, axes["correlation"])]))
    fb = res.get("elo", {}).get("feedback")
    if fb:
      self.add("### Elo by the feedback model (in-loop)\n")
      self.add("The model that made the AI labels judges here: in-loop, secondary.\n")
      self._elo_table("feedback model (in-loop)", fb, "elo_feedback.png", "see config")
    ev = res.get("evasiveness")
    if ev:
      self.add("### Evasiveness on held-out red-team prompts\n")
      self.add("Share of responses that decline without a reason or an alternative "
               "(`cai_jax.evaluation.evasiveness`, a transparent rule set).\n")
      self.add(_table(["snapshot", "evasive", "explained refusal", "engaged", "n"],
                      [[SNAPSHOT_TITLES.get(s, s), v["evasive"], v["explained_refusal"],
                        v["engaged"], v["n"]] for s, v in ev.items()]))
      self.summary.append("Evasive: " + ", ".join(
          f"{SNAPSHOT_TITLES.get(s, s)} {100 * v['evasive']:.0f}%" for s, v in ev.items()) + ".")
    mc = res.get("multiple_choice")
    if mc:
      self.add("### Multiple-choice evaluations\n")
      rows = [[name, form, v.get("accuracy"), v.get("chance"), v.get("n")]
              for name, forms in mc.items() for form, v in forms.items()]
      self.add(_table(["eval", "formulation", "accuracy", "chance", "n"], rows))
      self.summary.append("Multiple choice: " + ", ".join(
          f"{r[0]}/{r[1]} {100 * r[2]:.0f}% (chance {100 * r[3]:.0f}%)" for r in rows
          if isinstance(r[2], (int, float)) and isinstance(r[3], (int, float))) + ".")
    harm = res.get("harmfulness")
    self.add("### Absolute harmfulness (0-4 scale model)\n")
    if harm:
      model = harm.get("_model", {})
      self.add(f"A scalar head trained with an L2 loss on {model.get('n_train', '?')} rated "
               f"transcripts; held-out mean squared error {_fmt(model.get('eval_mse'))}.\n")
      self.add(_table(["snapshot", "mean predicted harmfulness", "n"],
                      [[SNAPSHOT_TITLES.get(s, s), v["mean"], v["n"]] for s, v in harm.items()
                       if not s.startswith("_")]))
    else:
      self.add("Not run: set `evaluate.harmfulness.data` to an hh-rlhf red-team-attempts file "
               "(transcripts rated 0-4) to train it.\n")
    samples = res.get("samples")
    if samples:
      self.add("### Sample responses to held-out red-team prompts\n")
      for item in samples:
        self.add(f"**Prompt:** {_last_text(item['prompt'])}\n")
        for s, text in item["responses"].items():
          self.add(f"*{SNAPSHOT_TITLES.get(s, s)}*\n\n" + _quote(text, 300) + "\n")
    for note in res.get("notes", []):
      self.add(f"- {note}")

  def _elo_table(self, title: str, ratings: dict, png: str, method: str):
    harm, helpf = ratings.get("harmlessness"), ratings.get("helpfulness")
    if not (harm or helpf):
      return
    rows = []
    for sn in (harm or helpf or {}):
      h, g = (harm or {}).get(sn, {}), (helpf or {}).get(sn, {})
      rows.append([SNAPSHOT_TITLES.get(sn, sn), h.get("elo"), h.get("lo"), h.get("hi"),
                   g.get("elo"), g.get("lo"), g.get("hi")])
    self.add(_table(["snapshot", "harmlessness Elo", "95% lo", "95% hi", "helpfulness Elo",
                     "95% lo", "95% hi"], rows))
    n = ratings.get("num_comparisons")
    if n:
      self.add(f"Elo ({title}): Bradley-Terry fit on {n} comparisons per axis, intervals "
               f"from a {method}; the initial helpful model is pinned at 0.\n")
    if harm and helpf:
      self.add(self.plot(plots.elo_scatter, png, harm, helpf,
                         title=f"Harmlessness vs helpfulness Elo ({title})"))

  # -- the answer first ---------------------------------------------------------

  def did_it_work(self):
    """The opening section: each snapshot's held-out-judge score and its change from
    the initial model, with intervals and significance, in one table and one sentence."""
    g = self.results.get("judges", {}).get("held_out")
    self.add("## Did it work?\n")
    if not g:
      self.add("No held-out judge has scored this run yet (the evaluate stage has not run).\n")
      return
    info = g.get("info", {})
    held = info.get("heldout", {})
    rows, findings = [], []
    tests = [(sn, axis) for sn in g.get("scores", {}) for axis in ("harmless", "helpful")
             if g.get("diff", {}).get(sn, {}).get(axis) is not None]
    adjusted = dict(zip(tests, stats.holm([g["diff"][sn][axis]["p"] for sn, axis in tests])))
    for sn, v in g.get("scores", {}).items():
      d = g.get("diff", {}).get(sn, {})
      row = [SNAPSHOT_TITLES.get(sn, sn)]
      for axis in ("harmless", "helpful"):
        row += [v[axis]["mean"], _ci(v[axis])]
        dd = d.get(axis)
        if dd is None:
          row += ["(baseline)", ""]
          continue
        p_adj = adjusted[(sn, axis)]
        sig = p_adj < 0.05
        row += [f"{dd['mean']:+.3g} ({_ci(dd)})",
                f"{_p(dd['p'])}, {_p(p_adj, 'Holm')}" + (" *" if sig else "")]
        if sig:
          word = {"harmless": ("more harmless", "less harmless"),
                  "helpful": ("more helpful", "less helpful")}[axis][dd["mean"] < 0]
          findings.append(f"{SNAPSHOT_TITLES.get(sn, sn)} is {word} than the initial model "
                          f"(change {dd['mean']:+.3g}, 95% CI {_ci(dd)}, Holm-adjusted "
                          f"{_p(p_adj)})")
      rows.append(row)
    self.add(_table(["snapshot", "harmlessness", "95% CI", "change vs initial", "paired t",
                     "helpfulness", "95% CI", "change vs initial", "paired t"], rows))
    n = next(iter(g.get("scores", {}).values()), {}).get("harmless", {}).get("n", 0)
    judge_chance = stats.at_chance(held.get("lo", np.nan), held.get("hi", np.nan), 0.5)
    if findings:
      sentence = "By the held-out judge: " + "; ".join(findings) + "."
    else:
      sentence = ("No measurable effect: no snapshot differs significantly (Holm-adjusted p < "
                  f"0.05, paired over {n} held-out prompts per axis) from the initial model by "
                  "the held-out judge.")
    if judge_chance:
      sentence += (" The judge itself cannot be told from chance on held-out human "
                   "comparisons, so these scores could not show an effect either way.")
    self.add(sentence + "\n")
    self.summary.append(sentence)
    acc = held.get("accuracy")
    what = ("an exported PM named by `evaluate.judge.path`" if info.get("kind") == "given" else
            f"a preference model trained on {info.get('num_train_pairs', '?')} human comparisons "
            f"only ({', '.join(os.path.basename(str(x).split(':')[0]) for x in info.get('data', []))}), "
            f"base model {info.get('base_model', '?')}")
    if acc is not None:
      self.add(f"Judge: {what}; held-out accuracy {acc:.3f} (95% CI {held['lo']:.3f} to "
               f"{held['hi']:.3f}, n={held['n']}), ECE {_fmt(held.get('ece'))}. It never saw "
               "this run's data and is not the in-loop PM. Scores are the judge's scalar "
               "output (higher = preferred); harmlessness on held-out red-team prompts, "
               "helpfulness on held-out helpfulness prompts. * = p < 0.05 after Holm's "
               "correction for the snapshots x axes tested.\n")
      self.summary.append(f"Judge: held-out accuracy {acc:.3f} (95% CI {held['lo']:.3f}-"
                          f"{held['hi']:.3f}, n={held['n']}), trained on human comparisons only.")
    elo = g.get("elo", {})
    if elo.get("harmlessness") and elo.get("helpfulness"):
      self.add(self.plot(plots.elo_scatter, "frontier.png", elo["harmlessness"],
                         elo["helpfulness"],
                         title="Harmlessness vs helpfulness Elo (held-out judge)"))

  def sanity(self):
    """Each component's own signal against chance, with the numbers."""
    rows = []
    lab = self.stage_summary.get("label") or {}
    recs = _records(utils.join(self.workdir, "label", "preferences.jsonl"))
    if recs:
      conf = stats.mean_ci([abs(float(r["p_a"]) - 0.5) for r in recs])
      rows.append(["AI labels", "mean distance of p(A) from 0.5", conf["mean"], _ci(conf),
                   f"< {LABEL_CHANCE}", "no" if conf["mean"] < LABEL_CHANCE else "yes"])
    elif lab:
      rows.append(["AI labels", "mean confidence", lab.get("mean_confidence"), "", "", "?"])
    pm = (self.stage_summary.get("pm") or {}).get("eval") or {}
    for src, what in (("ai", "held-out AI labels"), ("human", "held-out human comparisons")):
      acc, n = pm.get(f"{src}_accuracy"), pm.get(f"{src}_num_pairs")
      if isinstance(acc, (int, float)) and n:
        p, lo, hi = stats.proportion_ci(round(acc * n), int(n))
        rows.append(["in-loop PM", f"accuracy on {what}", p, f"{lo:.3f} to {hi:.3f} (n={n})",
                     "0.5", _above(lo, hi, 0.5)])
    for name, forms in (self.results.get("multiple_choice") or {}).items():
      for form, v in forms.items():
        if isinstance(v.get("accuracy"), (int, float)) and v.get("n"):
          p, lo, hi = stats.proportion_ci(round(v["accuracy"] * v["n"]), int(v["n"]))
          rows.append([f"multiple choice: {name}", form, p, f"{lo:.3f} to {hi:.3f} (n={v['n']})",
                       _fmt(v.get("chance")), _above(lo, hi, v["chance"])])
    held = ((self.results.get("judges") or {}).get("held_out") or {}).get("info", {}).get(
        "heldout")
    if held:
      rows.append(["held-out judge", "accuracy on held-out human comparisons", held["accuracy"],
                   f"{held['lo']:.3f} to {held['hi']:.3f} (n={held['n']})", "0.5",
                   _above(held["lo"], held["hi"], 0.5)])
    if not rows:
      return
    self.add("### Sanity panel: is each component above chance?\n")
    self.add(_table(["component", "measure", "value", "95% CI", "chance", "above chance?"],
                    rows))
    flagged = [f"{r[0]} ({r[1]})" for r in rows if r[-1] != "yes"]
    if flagged:
      self.add("Not above chance: " + "; ".join(flagged) + ". A component at (or below) chance "
               "passes no signal on, so an effect downstream of it is not expected (a 135M "
               "model is at chance on the paper's evaluations, as the paper's scale results "
               "predict).\n")
      self.summary.append("Not above chance: " + ", ".join(
          dict.fromkeys(r[0] for r in rows if r[-1] != "yes")) + ".")

  def config(self):
    cfg = _load_json(utils.join(self.workdir, "config.json"))
    if cfg is not None:
      self.add("## Configuration\n")
      self.add("```json\n" + json.dumps(cfg, indent=1)[:6000] + "\n```")

  def build(self) -> tuple[str, list[str]]:
    self.add(f"# Constitutional AI run report\n\nWork directory: `{self.workdir}`\n")
    self.did_it_work()
    self.sanity()
    self.stages()
    self.revise()
    self.label()
    self.training()
    self.evaluation()
    self.config()
    summary = self.summary[:10]
    head = "## Summary\n\n" + "\n".join(f"- {s}" for s in summary) + "\n"
    # The answer first: title, "Did it work?" and the sanity panel, then the summary.
    k = next((i for i, p in enumerate(self.parts) if p.startswith("## Stages")), 1)
    body = "\n".join(self.parts[:k]) + "\n" + head + "\n" + "\n".join(self.parts[k:])
    return body, summary


def write_report(workdir: str) -> dict:
  """Writes WORKDIR/report.md; returns {"path", "summary": ten lines}."""
  rep = _Report(workdir)
  text, summary = rep.build()
  path = utils.join(rep.workdir, "report.md")
  utils.atomic_write_text(path, text)
  return {"path": path, "summary": summary}


def _swept_values(points: list[dict]):
  """(field, values) of the one setting the points vary (None when several or none)."""
  keys = [k for k in dict.fromkeys(k for p in points for k in p) if not k.startswith("reuse_")]
  varied = [k for k in keys if len({json.dumps(p.get(k), default=str) for p in points}) > 1]
  if len(varied) != 1:
    return None, None
  return varied[0], [p.get(varied[0]) for p in points]


def write_sweep_summary(workdir: str, runs: list) -> str:
  """WORKDIR/sweep.md: one row per sweep point, graded by the held-out judge, and
  sweep.png with the swept value on the x axis.

  runs: [(name, workdir)] or [(name, workdir, point)] where point is the setting dict
  of the sweep point (what varies gives the x axis)."""
  rows, points, judged = [], [], []
  judge_acc = ""
  for run in runs:
    name, d = run[0], run[1]
    points.append(run[2] if len(run) > 2 else {})
    res = _load_json(utils.join(d, "evaluate", "results.json"), {})
    t = _load_json(utils.join(d, "pipeline.json"), {"stages": {}})
    secs = sum(s.get("seconds", 0.0) for s in t["stages"].values())
    g = res.get("judges", {}).get("held_out", {})
    sc = g.get("scores", {})
    # The point's RL-CAI snapshot: the ppo stage's (any algorithm) or the dpo stage's.
    rl = next((k for k in ("rl_cai", "dpo_cai") if k in sc), None)
    last = rl or "sl_cai"
    rl_done = _load_json(utils.join(d, "ppo" if rl == "rl_cai" else "dpo", "DONE"), {}) \
        if rl else {}
    resident = rl_done.get("resident_gib") or {}
    key = g.get("info", {}).get("key")
    judged.append(key)
    held = g.get("info", {}).get("heldout")
    if held:
      judge_acc = (f" Its held-out accuracy on human comparisons: {held['accuracy']:.3f} "
                   f"(95% CI {held['lo']:.3f} to {held['hi']:.3f}, n={held['n']}), ECE "
                   f"{_fmt(held.get('ece'))}.")
    ev = res.get("evasiveness", {})
    rows.append([name, secs, sc.get("sl_cai", {}).get("harmless", {}).get("mean"),
                 sc.get(rl, {}).get("harmless", {}).get("mean"),
                 g.get("diff", {}).get(last, {}).get("harmless", {}).get("mean"),
                 ev.get(last, {}).get("evasive"), key,
                 sc.get("sl_cai", {}).get("helpful", {}).get("mean"),
                 sc.get(rl, {}).get("helpful", {}).get("mean"),
                 g.get("diff", {}).get(last, {}).get("helpful", {}).get("mean"),
                 rl_done.get("kl_k3_last"),
                 sum(resident.values()) if resident else None,
                 (t["stages"].get("ppo" if rl == "rl_cai" else "dpo") or {}).get("seconds")
                 if rl else None])
  field, values = _swept_values(points)
  numeric = values is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for v in values)
  xs = list(values) if numeric else list(range(len(rows)))
  series = {}
  for x, row in zip(xs, rows):
    for label, v in (("SL-CAI harmlessness (held-out judge)", row[2]),
                     ("RL-CAI harmlessness (held-out judge)", row[3])):
      if isinstance(v, (int, float)):
        series.setdefault(label, []).append((x, v))
  one_judge = len(set(judged)) == 1 and judged[0] is not None
  text = ["# Sweep summary\n",
          (f"Every point is graded by the same held-out judge (`{judged[0]}`).{judge_acc}"
           if one_judge else
           "The points were graded by different judges: their scores are not comparable."),
          "", _table(["point", "wall time (s)", "SL-CAI harmlessness", "RL-CAI harmlessness",
                      "final vs initial", "evasive", "judge"], [r[:7] for r in rows]), ""]
  if any(r[8] is not None or r[10] is not None for r in rows):
    text += ["Helpfulness by the same judge, the RL stage's cost and its distance from the "
             "reference (KL: the last iteration's k3 estimate per sequence; DPO samples "
             "nothing while training, so it has none). Resident: the train state plus the "
             "frozen models the RL stage holds (reference, PM or feedback model).", "",
             _table(["point", "SL-CAI helpfulness", "RL-CAI helpfulness",
                     "final vs initial (helpful)", "KL to reference", "RL stage (s)",
                     "resident (GiB)"],
                    [[r[0], r[7], r[8], r[9], "n/a" if r[10] is None else r[10], r[12], r[11]]
                     for r in rows]), ""]
  online = [(run[0], _load_json(utils.join(run[1], "ppo", "DONE"), {}).get("online"))
            for run in runs]
  if any(o for _, o in online):
    text += ["Online RLAIF: the PM's accuracy on each refresh's fresh labels before and "
             "after training on them (the refresh's section of each point's report has "
             "the losses).", "",
             _table(["point", "refreshes", "accuracy before", "accuracy after"],
                    [[name, (o or {}).get("refreshes", 0),
                      ", ".join(_fmt(x) for x in (o or {}).get("accuracy_before", [])) or "-",
                      ", ".join(_fmt(x) for x in (o or {}).get("accuracy_after", [])) or "-"]
                     for name, o in online]), ""]
  text += [f"- [{r[0]}]({plots.rel(utils.join(run[1], 'report.md'), workdir)})"
           for r, run in zip(rows, runs)]
  if series:
    labels = None if numeric else [str(v) if values is not None else r[0]
                                   for v, r in zip(values or [None] * len(rows), rows)]
    p = plots.curves(series, path=utils.join(workdir, "sweep.png"),
                     title="Sweep (held-out judge)", xlabel=field or "point",
                     ylabels={k: "judge score (harmlessness)" for k in series},
                     xticklabels=labels)
    text.append(f"\n![sweep]({plots.rel(p, workdir)})")
  utils.write_json(utils.join(workdir, "sweep.json"),
                   {"field": field, "values": values, "judges": judged,
                    "rows": [dict(zip(("point", "seconds", "sl_cai", "rl_cai", "diff",
                                       "evasive", "judge", "sl_cai_helpful", "rl_cai_helpful",
                                       "diff_helpful", "kl_k3", "resident_gib",
                                       "rl_seconds"), r)) for r in rows]})
  path = utils.join(workdir, "sweep.md")
  utils.atomic_write_text(path, "\n".join(text) + "\n")
  return path


if __name__ == "__main__":
  if len(sys.argv) != 2:
    print("usage: python -m cai_jax.evaluation.report WORKDIR", file=sys.stderr)
    sys.exit(2)
  out = write_report(sys.argv[1])
  print(out["path"])
  print("\n".join(out["summary"]))
