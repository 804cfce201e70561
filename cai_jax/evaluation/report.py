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
import sys
from typing import Any

import numpy as np

from cai_jax import utils
from cai_jax.evaluation import plots

STAGES = ("revise", "sft", "label", "pm", "ppo", "evaluate")
# Summary numbers shown first for each stage (the rest follow in the stage table).
HEADLINE = {"revise": ("frac_revision_changed", "num_red_team", "num_rounds"),
            "sft": ("final_loss", "steps", "num_examples"),
            "label": ("mean_p_a", "mean_confidence", "num_comparisons"),
            "pm": ("eval.ai_accuracy", "eval.ai_ece", "eval.human_accuracy", "final_loss", "steps"),
            "ppo": ("reward_first", "reward_last", "kl_last", "iterations"),
            "evaluate": ("snapshots", "red_team_prompts", "helpful_prompts")}
SNAPSHOT_TITLES = {"helpful": "initial helpful", "sl_cai": "SL-CAI", "rl_cai": "RL-CAI"}


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
    rev = self.results.get("revision_scores")
    if rev:
      self.add(self.plot(plots.revision_scores, "revision_scores.png", rev))
      self.add(_table(["revisions", "PM score", "stderr", "n"],
                      [[r["revision"], r["mean"], r.get("mean_se"), r.get("n")] for r in rev]))
      self.summary.append(f"Revise: {len(recs)} prompts x {max(rounds)} rounds; PM score "
                          f"{_fmt(rev[0]['mean'])} (initial) -> {_fmt(rev[-1]['mean'])} "
                          f"(revision {rev[-1]['revision']}).")
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
    for stage, title in (("sft", "SL-CAI fine-tuning"), ("pm", "Preference model"),
                         ("ppo", "RL-CAI (PPO)")):
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
                           xlabel="iteration" if stage == "ppo" else "step"))
      keys = list(nums.items())[:4]
      self.summary.append(f"{title}: " + (", ".join(f"{k}={_fmt(v)}" for k, v in keys) or "done") + ".")

  def _curves(self, stage: str) -> dict:
    path = utils.join(self.workdir, stage, "metrics.jsonl")
    recs = _records(path)
    if len(recs) < 2:
      return {}
    wanted = {"sft": ("loss",), "pm": ("loss", "accuracy"),
              "ppo": ("reward", "kl", "entropy", "response_length")}[stage]
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
    pm = res.get("pm_scores")
    if pm:
      self.add("### Preference-model scores on held-out prompts\n")
      rows = [[SNAPSHOT_TITLES.get(s, s), v.get("harmless"), v.get("harmless_se"),
               v.get("helpful"), v.get("helpful_se"), v.get("n_harmless")] for s, v in pm.items()]
      self.add(_table(["snapshot", "harmlessness", "stderr", "helpfulness", "stderr", "n"], rows))
      vals = {s: {"red-team prompts": v["harmless"], "helpfulness prompts": v["helpful"]}
              for s, v in pm.items()}
      errs = {s: {"red-team prompts": v.get("harmless_se", 0.0),
                  "helpfulness prompts": v.get("helpful_se", 0.0)} for s, v in pm.items()}
      self.add(self.plot(plots.grouped_bars, "pm_scores.png", vals, ylabel="mean PM score",
                         title="PM score per snapshot", errors=errs))
      self.summary.append("PM harmlessness score: " + ", ".join(
          f"{SNAPSHOT_TITLES.get(s, s)} {_fmt(v['harmless'])}" for s, v in pm.items()) + ".")
    for judge, ratings in res.get("elo", {}).items():
      harm, helpf = ratings.get("harmlessness"), ratings.get("helpfulness")
      self.add(f"### Elo ({judge} as judge)\n")
      rows = []
      for s in (harm or helpf or {}):
        h = (harm or {}).get(s, {})
        g = (helpf or {}).get(s, {})
        rows.append([SNAPSHOT_TITLES.get(s, s), h.get("elo"), h.get("lo"), h.get("hi"),
                     g.get("elo"), g.get("lo"), g.get("hi")])
      self.add(_table(["snapshot", "harmlessness Elo", "95% lo", "95% hi", "helpfulness Elo",
                       "95% lo", "95% hi"], rows))
      n = ratings.get("num_comparisons")
      if n:
        self.add(f"Bradley-Terry fit on {n} comparisons per axis; intervals from the Fisher "
                 "information; the initial helpful model is pinned at 0.\n")
      if harm and helpf:
        self.add(self.plot(plots.elo_scatter, f"elo_{judge}.png", harm, helpf,
                           title=f"Harmlessness vs helpfulness Elo ({judge})"))
      if harm:
        self.summary.append(f"Harmlessness Elo ({judge}): " + ", ".join(
            f"{SNAPSHOT_TITLES.get(s, s)} {v['elo']:+.0f}±{(v['hi'] - v['lo']) / 2:.0f}"
            for s, v in harm.items()) + ".")
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

  def config(self):
    cfg = _load_json(utils.join(self.workdir, "config.json"))
    if cfg is not None:
      self.add("## Configuration\n")
      self.add("```json\n" + json.dumps(cfg, indent=1)[:6000] + "\n```")

  def build(self) -> tuple[str, list[str]]:
    self.add(f"# Constitutional AI run report\n\nWork directory: `{self.workdir}`\n")
    self.stages()
    self.revise()
    self.label()
    self.training()
    self.evaluation()
    self.config()
    summary = self.summary[:10]
    head = "## Summary\n\n" + "\n".join(f"- {s}" for s in summary) + "\n"
    body = self.parts[0] + "\n" + head + "\n" + "\n".join(self.parts[1:])
    return body, summary


def write_report(workdir: str) -> dict:
  """Writes WORKDIR/report.md; returns {"path", "summary": ten lines}."""
  rep = _Report(workdir)
  text, summary = rep.build()
  path = utils.join(rep.workdir, "report.md")
  utils.atomic_write_text(path, text)
  return {"path": path, "summary": summary}


def write_sweep_summary(workdir: str, runs: list[tuple[str, str]]) -> str:
  """WORKDIR/sweep.md: one row per sweep point with its headline numbers, and a plot."""
  rows, series = [], {}
  for name, d in runs:
    res = _load_json(utils.join(d, "evaluate", "results.json"), {})
    t = _load_json(utils.join(d, "pipeline.json"), {"stages": {}})
    secs = sum(s.get("seconds", 0.0) for s in t["stages"].values())
    pm = res.get("pm_scores", {})
    e = res.get("elo", {}).get("pm", {}).get("harmlessness") or {}
    ev = res.get("evasiveness", {})
    last = "rl_cai" if "rl_cai" in pm else "sl_cai"
    row = [name, secs, pm.get("sl_cai", {}).get("harmless"), pm.get("rl_cai", {}).get("harmless"),
           e.get(last, {}).get("elo"), ev.get(last, {}).get("evasive")]
    rows.append(row)
    for label, v in (("PM harmlessness (SL-CAI)", row[2]), ("PM harmlessness (RL-CAI)", row[3])):
      if isinstance(v, (int, float)):
        series.setdefault(label, []).append((len(rows) - 1, v))
  text = ["# Sweep summary\n", _table(["point", "wall time (s)", "PM harmless SL-CAI",
                                       "PM harmless RL-CAI", "harmlessness Elo (PM)", "evasive"],
                                      rows), ""]
  text += [f"- [{name}]({plots.rel(utils.join(d, 'report.md'), workdir)})" for name, d in runs]
  if series:
    p = plots.curves(series, path=utils.join(workdir, "sweep.png"), title="Sweep",
                     xlabel="point (row of the table)")
    text.append(f"\n![sweep]({plots.rel(p, workdir)})")
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
