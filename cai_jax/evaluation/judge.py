"""The evaluation judge: a preference model trained on human comparisons only.

The in-loop PM is what PPO optimised and the feedback model made its labels, so
neither can grade RL-CAI. The paper graded with crowdworkers and with PMs trained
on human comparisons; this judge is the latter. It is trained on hh-rlhf
comparison files (by default the held-out harmless-base split in
../shared/data, whose last `heldout_fraction` is never trained on and gives the
judge's own accuracy), once per (base model, data, settings), and cached outside
the work directory so that sweeps and reruns grade with the same judge. A config
may instead name any exported PM directory (`evaluate.judge.path`).

  j = judge.get(config)                 # trains or loads; j.info holds its accuracy
  scores = j.scores(prompts, responses)  # read where a PM is read (text.conversation)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

from absl import logging
import ml_collections
import numpy as np

from cai_jax import models, multihost, roles, sampling, utils
from cai_jax.evaluation import stats
from cai_jax.text.conversation import ConversationEncoder
from cai_jax.utils import InputError

HARMLESS_BASE = os.path.join("hh_rlhf", "harmless-base", "test.jsonl.gz")
INFO_FILE = "judge.json"


def default_config() -> ml_collections.ConfigDict:
  """The `config.evaluate.judge` section."""
  c = ml_collections.ConfigDict()
  c.path = ""               # an exported PM directory to judge with; "" = train one (cached)
  c.model = ""              # base model of a trained judge; "" = config.model
  c.data = ()               # hh-rlhf comparison files; () = ../shared/data harmless-base split
  c.heldout_fraction = 0.2  # share of the pairs never trained on: the judge's own accuracy
  c.max_pairs = -1          # pairs read per file (-1 = all)
  c.max_eval_pairs = -1     # held-out pairs scored for its accuracy (-1 = all)
  c.max_len = 128           # tokens per conversation (the end is kept)
  c.steps = 150             # training steps (batches)
  c.batch_size = 8          # pairs per step
  c.learning_rate = 3e-4    # AdamW peak rate, cosine decay with a 10% warm-up
  c.train_top_layers = 4    # blocks trained above a frozen trunk (-1 = all)
  c.cache_dir = "~/.cache/cai_jax/judges"  # trained judges, keyed by what made them
  c.progress = True         # training progress bar
  return c


def data_files(jc) -> list[str]:
  items = [jc.data] if isinstance(jc.data, str) else list(jc.data or ())
  files = [p.strip() for x in items for p in str(x).split(",") if p.strip()]
  if files:
    return [str(f) for f in files]
  default = os.path.join(utils.shared_data_dir(), HARMLESS_BASE)
  if not os.path.exists(default):
    raise InputError(f"evaluate.judge: no data given and {default} is missing; set "
                     "config.evaluate.judge.data to hh-rlhf comparison files or "
                     "config.evaluate.judge.path to an exported preference model")
  return [default]


def _file_id(path: str) -> str:
  st = os.stat(path)
  return f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"


def key_of(jc, base_model: str, fmt: str, dtype: str) -> tuple[str, dict]:
  """The cache key of a trained judge and what it is made of."""
  what = {"base_model": base_model, "format": fmt, "dtype": dtype,
          "data": [_file_id(p) for p in data_files(jc)],
          **{k: jc[k] for k in ("heldout_fraction", "max_pairs", "max_len", "steps",
                                "batch_size", "learning_rate", "train_top_layers")}}
  if base_model not in roles.BUILTIN and os.path.exists(os.path.expanduser(base_model)):
    what["base_model_id"] = _file_id(os.path.expanduser(base_model))
  text = json.dumps(what, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16], what


@dataclasses.dataclass
class Judge:
  cfg: object
  params: dict
  tokenizer: object
  fmt: str
  max_len: int
  info: dict
  # A PM with a head per axis: grade one axis (`column`), or the weighted sum of the
  # axes' raw scores (`weights`; equal weights when None).
  column: Optional[int] = None
  weights: Optional[tuple] = None

  def scores(self, prompts, responses) -> np.ndarray:
    enc = ConversationEncoder(self.tokenizer, self.fmt)
    s = sampling.pm_scores(self.cfg, self.params, enc, prompts, responses,
                           max_len=self.max_len)
    if s.ndim == 2 and self.column is not None:
      return s[:, self.column]
    return sampling.combine_axes(s, self.weights)


def _heldout(cfg, params, tok, fmt, pairs, max_len) -> dict:
  """Accuracy (Wilson 95% interval), ECE and loss of the judge on held-out human pairs."""
  from cai_jax import sharding
  from cai_jax.training import preferences
  enc = ConversationEncoder(tok, fmt)
  encoded = preferences.encode_pairs(enc, pairs, max_len, seed=0)
  mesh = sharding.make_mesh((1, 1, 1), devices=[__import__("jax").local_devices()[0]])
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  ev = preferences.evaluate_pairs(cfg, params, encoded, max_len, pad, 8, mesh,
                                  sharding.DEFAULT_RULES, 10)
  decided = [p for p in encoded if p.p_a != 0.5]
  k = round(ev["accuracy"] * len(decided))
  acc, lo, hi = stats.proportion_ci(k, len(decided))
  return {"accuracy": acc, "lo": lo, "hi": hi, "n": len(decided), "ece": ev["ece"],
          "loss": ev["loss"]}


def get(config, *, progress: Optional[bool] = None) -> Judge:
  """The judge of this config: the named PM directory, or a cached/trained one."""
  jc = config.evaluate.judge
  fmt = str(config.prompt_format)
  max_len = int(jc.max_len)
  if str(jc.path):
    cfg, params, tok = roles.load(str(jc.path), heads=("lm", "score"), field="evaluate.judge.path")
    if "score_kernel" not in params:
      raise InputError(f"evaluate.judge.path: {jc.path} has no scalar head; point it at an "
                       "exported preference model")
    info = {"kind": "given", "path": str(jc.path), "key": str(jc.path)}
    held = _load_heldout(jc)
    if held:
      info["heldout"] = _heldout(cfg, params, tok, fmt, held, max_len)
    return Judge(cfg, params, tok, fmt, max_len, info)
  base = str(jc.model) or str(config.model)
  dtype = str(config.get("dtype", "float32"))
  key, what = key_of(jc, base, fmt, dtype)
  out = os.path.join(os.path.expanduser(str(jc.cache_dir)), key)
  info_path = os.path.join(out, INFO_FILE)
  # Every host trains together (the step is collective) when any host's cache lacks it.
  if any(multihost.gather_records([not os.path.exists(info_path)])):
    _train(config, jc, base, fmt, out, key, what,
           bool(jc.progress) if progress is None else progress)
  info = json.loads(utils.read_text(info_path))
  cfg, params, tok = roles.load(os.path.join(out, "final"), heads=("lm", "score"))
  return Judge(cfg, params, tok, fmt, max_len, info)


def _split(jc):
  from cai_jax.training import data, preferences
  pairs = preferences.read_human_pairs(data_files(jc), int(jc.max_pairs))
  if len(pairs) < 4:
    raise InputError(f"evaluate.judge.data: {len(pairs)} comparisons; give more hh-rlhf pairs")
  tr, ev = data.split_eval(len(pairs), float(jc.heldout_fraction), seed=0)
  k = int(jc.max_eval_pairs)
  held = [pairs[i] for i in ev][:k if k >= 0 else None]
  return [pairs[i] for i in tr], held


def _load_heldout(jc):
  try:
    return _split(jc)[1]
  except InputError:
    return []


def _train(config, jc, base, fmt, out, key, what, progress) -> None:
  """Trains the judge into `out` (resumable: its checkpoints live there too)."""
  import jax
  from cai_jax import sharding as shd
  from cai_jax.training import data, fit, objectives, preferences
  train_pairs, held = _split(jc)
  cfg, params, tok = roles.load(base, seed=0, dtype=config.get("dtype", None),
                                field="evaluate.judge.model")
  params = models.add_score_head(cfg, models.drop_heads(params, ()), jax.random.PRNGKey(0))
  enc = ConversationEncoder(tok, fmt)
  L, B = int(jc.max_len), int(jc.batch_size)
  encoded = preferences.encode_pairs(enc, train_pairs, L, seed=0)
  pad = tok.pad_token_id if tok.pad_token_id is not None else (cfg.pad_token_id or 0)
  mesh, rules = shd.mesh_from_config(config), shd.rules_from_config(config)
  if B % shd.batch_divisor(mesh, rules) or len(encoded) < B:
    raise InputError(f"evaluate.judge.batch_size={B}: must divide over the data-parallel "
                     f"size {shd.batch_divisor(mesh, rules)} and fit the {len(encoded)} pairs")
  make = lambda idx: data.pair_batch([encoded[i] for i in idx], L, pad)  # noqa: E731
  batches = data.BatchIterator(data.ShuffledIndex(len(encoded), B, 0), make)
  from cai_jax.training import optim
  opt = optim.default_optim_config()
  opt.update(learning_rate=float(jc.learning_rate), schedule="cosine",
             warmup_steps=max(int(jc.steps) // 10, 1))
  logging.info("evaluate: training the held-out judge %s on %d human pairs (%s)", key,
               len(encoded), ", ".join(what["data"]))
  res = fit.fit("judge", cfg=cfg, params=params, tokenizer=tok, batches=batches,
                example_batch=make(np.arange(B)), 
                loss_for=lambda c, s: objectives.pm_loss_fn(c),
                num_steps=int(jc.steps), optim_config=opt, mesh=mesh, rules=rules,
                directory=out, keep=1, every=max(int(jc.steps) // 3, 1), async_save=False,
                log_every=10, progress=progress, trainable_layers=int(jc.train_top_layers))
  host = multihost.to_host(res.state.params)
  info = {"kind": "trained", "key": key, "path": out, **what, "num_train_pairs": len(encoded),
          "steps": res.step, "final_loss": res.history[-1]["loss"] if res.history else None}
  # The cache is each host's own disk: the main host writes first, then any host
  # whose cache does not show its files (not a shared disk) writes its own copy.
  for turn in (True, False):
    if multihost.is_main() == turn and not os.path.exists(os.path.join(out, INFO_FILE)):
      tmp = os.path.join(out, "final.tmp")
      utils.remove(tmp)
      models.save_pretrained(cfg, host, tmp, tokenizer=tok)
      utils.remove(os.path.join(out, "final"))
      os.replace(tmp, os.path.join(out, "final"))
      cfg2, params2, tok2 = roles.load(os.path.join(out, "final"), heads=("lm", "score"))
      info["heldout"] = _heldout(cfg2, params2, tok2, fmt, held, L)
      utils.write_json(os.path.join(out, INFO_FILE), info)
      h = info["heldout"]
      logging.info("evaluate: judge %s held-out accuracy %.3f (95%% CI %.3f-%.3f, n=%d)",
                   key, h["accuracy"], h["lo"], h["hi"], h["n"])
    multihost.sync("judge: written")


# ---------------------------------------------------------------- grading snapshots
KINDS = (("red_team", "harmless"), ("helpful", "helpful"))
ELO_AXIS = {"harmless": "harmlessness", "helpful": "helpfulness"}


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def grade(judge: Judge, prompts: dict, responses: dict, baseline: str = "helpful",
          elo_bootstrap: int = 200, seed: int = 0) -> dict:
  """Scores every snapshot's responses with `judge`.

  prompts: {kind: [{id, messages}]}; responses: {snapshot: {kind: [[text per sample]
  per prompt]}}. Returns, per snapshot and axis (harmless: red-team prompts, helpful:
  helpfulness prompts), the mean score with its 95% interval, the paired difference
  from `baseline` over the same prompts (t test), Elo from every pair of snapshots
  (outcome sigmoid(r_a - r_b) per prompt and sample, bootstrap intervals resampling
  prompts), and the per-prompt rows.
  """
  from cai_jax.evaluation import elo
  snaps = list(responses)
  per = {s: {} for s in snaps}       # snapshot -> axis -> [prompt] -> [sample scores]
  rows = []
  for s in snaps:
    for kind, axis in KINDS:
      msgs, texts, index = [], [], []
      for i, p in enumerate(prompts.get(kind, [])):
        for k, r in enumerate(responses[s][kind][i]):
          msgs.append(p["messages"])
          texts.append(r)
          index.append((i, k))
      sc = judge.scores(msgs, texts) if texts else np.zeros((0,))
      grid = [[] for _ in prompts.get(kind, [])]
      for (i, k), v in zip(index, sc):
        grid[i].append(float(v))
        rows.append({"snapshot": s, "kind": kind, "id": prompts[kind][i]["id"], "sample": k,
                     "score": float(v)})
      per[s][axis] = grid
  out = {"info": judge.info, "scores": {}, "diff": {}, "elo": {}}
  for s in snaps:
    out["scores"][s] = {axis: stats.mean_ci([np.mean(g) for g in per[s][axis] if g])
                        for _, axis in KINDS}
    if s != baseline and baseline in per:
      out["diff"][s] = {axis: stats.paired_difference(
          [np.mean(g) for g in per[s][axis]], [np.mean(g) for g in per[baseline][axis]])
          for _, axis in KINDS if per[s][axis]}
  for kind, axis in KINDS:
    comps, groups = [], []
    for a_i, a in enumerate(snaps):
      for b in snaps[a_i + 1:]:
        for i, (ga, gb) in enumerate(zip(per[a][axis], per[b][axis])):
          for va, vb in zip(ga, gb):
            comps.append((a, b, float(_sigmoid(va - vb))))
            groups.append(i)
    if comps and len(snaps) > 1:
      fit = elo.fit_elo(comps, snaps, anchor=snaps[0], method="bootstrap",
                        num_bootstrap=elo_bootstrap, seed=seed, groups=groups)
      out["elo"][ELO_AXIS[axis]] = fit.as_dict()
      out["elo"]["num_comparisons"] = len(comps)
  out["rows"] = rows
  return out


def revision_curve(judge: Judge, records: list) -> list:
  """Paper Fig. 5: the judge's score of the initial response (0) and of each
  revision round of the revise stage's records, with 95% intervals."""
  msgs, texts, rev = [], [], []
  for r in records:
    chain = [r["initial_response"]] + [rd["revision"] for rd in r.get("rounds", [])]
    for k, t in enumerate(chain):
      msgs.append(r["prompt"])
      texts.append(t)
      rev.append(k)
  if not texts:
    return []
  sc = judge.scores(msgs, texts)
  rev = np.asarray(rev)
  return [{"revision": int(k), **stats.mean_ci(sc[rev == k])} for k in sorted(set(rev.tolist()))]
