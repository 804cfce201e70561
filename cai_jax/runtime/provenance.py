"""Per-stage settings snapshots: a stage's results belong to the settings that made them.

Each stage records the settings that change its results (`settings`) in
WORKDIR/<stage>/settings.json once its inputs have loaded, so a start that
fails on a bad input never blocks its own fix. Paths inside the workdir are
written relative to it ($WORKDIR/...), so a moved workdir resumes. A rerun
or resume whose settings differ, for a finished or a partly done stage, stops
with one line naming the differing fields and the two fixes.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from cai_jax import utils
from cai_jax.utils import InputError

SNAPSHOT = "settings.json"
WORKDIR_TOKEN = "$WORKDIR"


def _plain(x):
  """ConfigDicts, tuples and numbers as JSON values."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  return json.loads(json.dumps(x, default=str))


def relativize(obj: Any, workdir: str) -> Any:
  """Strings naming paths inside `workdir` rewritten as $WORKDIR/…"""
  root = utils.resolve_dir(workdir).rstrip("/")
  if isinstance(obj, str):
    if obj == root:
      return WORKDIR_TOKEN
    if obj.startswith(root + "/"):
      return WORKDIR_TOKEN + obj[len(root):]
    return obj
  if isinstance(obj, dict):
    return {k: relativize(v, workdir) for k, v in obj.items()}
  if isinstance(obj, list):
    return [relativize(v, workdir) for v in obj]
  return obj


def stage_settings(config, workdir: str, stage: str, uses: Sequence[str],
                   volatile: Sequence[str] = (), extra: dict | None = None) -> dict:
  """The settings a stage's results depend on: the top-level fields it `uses`,
  its own section without the `volatile` fields (progress bars, logging,
  checkpoint cadence, memory knobs), and any `extra` (a constitution's hash)."""
  out = {k: _plain(config.get(k)) for k in uses if k in config}
  if stage in config:
    sec = _plain(config[stage])
    for field in volatile:  # "a" or "a.b" (a field of a sub-section)
      node, *path = field.split(".")
      d = sec
      while path and isinstance(d.get(node), dict):
        d, node, path = d[node], path[0], path[1:]
      if not path:
        d.pop(node, None)
    out[stage] = sec
  out.update(_plain(extra or {}))
  return relativize(out, workdir)


def flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


# Fields added after snapshots were first recorded, with the value that behaves as
# the code did before them: a snapshot without the field ran with that value.
LATER_FIELDS = {
    "ppo.algorithm": "ppo", "ppo.reward": "pm", "ppo.group_size": 4, "ppo.group_std": True,
    "ppo.kl_in": "reward", "frozen_dtype": "", "label.per_axis": False,
    "pm.per_axis_heads": False, "pm.human_axis": "helpfulness", "ppo.axis_weights": "",
    "ppo.online.refresh_every": 0,
    **{f"{s}.lora.{k}": v for s in ("sft", "ppo") for k, v in (
        ("rank", 0), ("alpha", 16.0), ("targets", ["q", "k", "v", "o", "gate", "up", "down"]))},
}


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
  a, b = flatten(old), flatten(new)
  for k, v in LATER_FIELDS.items():
    if k not in a and b.get(k, "<unset>") == v:
      a[k] = v
  return [(k, a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(set(a) | set(b))
          if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _short(v) -> str:
  s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
  return s if len(s) <= 60 else s[:57] + "..."


def recorded(stage_dir: str) -> dict | None:
  return utils.read_json(utils.join(stage_dir, SNAPSHOT))


def check(stage_dir: str, stage: str, settings: dict) -> None:
  """InputError naming the differing fields when `stage_dir` holds results made
  with other settings; nothing when it holds none."""
  old = recorded(stage_dir)
  if old is None:
    return
  diffs = differences(old, settings)
  if not diffs:
    return
  # Fields whose value changed first: a switch that brings in a section's other
  # fields (<unset> before) is the change to name.
  diffs.sort(key=lambda d: d[1] == "<unset>" or d[2] == "<unset>")
  shown = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in diffs[:4])
  more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
  state = "finished" if utils.is_done(stage_dir) else "started"
  raise InputError(f"{stage_dir}: the {stage} stage {state} with other settings ({shown}{more}); "
                   f"use a fresh --workdir, or --rerun={stage} to discard {stage} and the stages "
                   "after it and run them again")


def record(stage_dir: str, settings: dict) -> None:
  if recorded(stage_dir) is None:
    utils.write_json(utils.join(stage_dir, SNAPSHOT), settings)
