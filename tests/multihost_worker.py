"""One process of the two-process test (and the code of its 8-device reference).

Run as `python tests/multihost_worker.py PROCESS_ID PORT OUT_DIR` with
XLA_FLAGS giving 4 CPU devices: joins the other process over 127.0.0.1 through
`sharding.maybe_initialize_distributed`, runs `run_all` on the 8-device mesh and
writes its results to OUT_DIR/proc<ID>.npz (+ .json). Imported by
tests/test_multihost.py, the same `run_all` gives the single-process numbers.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import models, multihost, sharding

MESHES = {"dp2_fsdp2_tp2": (2, 2, 2), "fsdp4_tp2": (1, 4, 2)}
GLOBAL_BATCH = 8
LENGTH = 12


def tiny_cfg():
  return models.tiny(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)


def global_tokens():
  """A fixed left-padded global batch; every process can build it, each feeds its rows."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 128, size=(GLOBAL_BATCH, LENGTH)).astype(np.int32)
  lengths = np.array([12, 7, 9, 12, 3, 10, 5, 11])
  mask = np.arange(LENGTH)[None, :] >= (LENGTH - lengths)[:, None]
  return np.where(mask, tokens, 0).astype(np.int32), mask


def local_rows(x, mesh):
  """This process's block of a global batch (all of it with one process)."""
  return x[multihost.host_batch_slice(mesh, x.shape[0], x.ndim)]


def forward_logits(cfg, params, mesh):
  tokens, mask = global_tokens()
  batch = sharding.make_global_batch({"tokens": local_rows(tokens, mesh),
                                      "mask": local_rows(mask, mesh)}, mesh)
  fn = jax.jit(lambda p, t, m: models.forward(cfg, p, t, models.positions_from_mask(m), m)
               ["logits"])
  return multihost.to_host(fn(params, batch["tokens"], batch["mask"]))


def checkpoint_roundtrip(cfg, params, mesh, other_mesh, directory):
  """Saves params sharded on `mesh`, restores them resharded onto `other_mesh`."""
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
  mngr.save(1, args=ocp.args.StandardSave(params))
  mngr.wait_until_finished()
  abstract, specs = models.abstract_params(cfg)
  target = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
      sharding.tree_shardings(abstract, specs, other_mesh))
  restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(target))
  mngr.close()
  ok_sharding = all(r.sharding == t.sharding for r, t in zip(
      jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(target)))
  return restored, ok_sharding


def sft_batch():
  """Fixed global SFT batch: inputs, next-token targets, loss on the last 6 tokens."""
  rng = np.random.default_rng(1)
  seq = rng.integers(3, 128, size=(GLOBAL_BATCH, LENGTH + 1)).astype(np.int32)
  lengths = np.array([13, 9, 11, 13, 6, 12, 8, 10])
  valid = np.arange(LENGTH + 1)[None, :] < lengths[:, None]
  seq = np.where(valid, seq, 0)
  loss = valid & (np.arange(LENGTH + 1)[None, :] >= lengths[:, None] - 6)
  return {"tokens_BxL": seq[:, :-1], "targets_BxL": seq[:, 1:],
          "loss_mask_BxL": (loss[:, 1:] & valid[:, 1:]).astype(np.float32),
          "mask_BxL": valid[:, :-1]}


def pair_batch():
  """Fixed global preference batch with soft labels."""
  rng = np.random.default_rng(2)
  out = {}
  for side, lens in (("a", [12, 5, 9, 7, 12, 3, 10, 8]), ("b", [6, 12, 11, 4, 9, 12, 7, 5])):
    t = rng.integers(3, 128, size=(GLOBAL_BATCH, LENGTH)).astype(np.int32)
    m = np.arange(LENGTH)[None, :] < np.array(lens)[:, None]
    out[f"tokens_{side}_BxL"], out[f"mask_{side}_BxL"] = np.where(m, t, 0).astype(np.int32), m
  out["p_B"] = np.array([0.9, 0.1, 0.5, 0.7, 0.2, 0.6, 1.0, 0.0], np.float32)
  return out


def train_steps(cfg, host_params, mesh, loss_fn, batch, num_steps=2):
  """The project's sharded train step (training.make_train_step) on global batches
  assembled from this host's rows; returns per-step metrics and final params."""
  import ml_collections
  from cai_jax import training
  oc = training.default_optim_config()
  oc.learning_rate = 1e-2
  tx = training.make_optimizer(ml_collections.ConfigDict(oc))
  state = training.create_train_state(host_params, tx, cfg, mesh)
  step = training.make_train_step(loss_fn, tx, state, mesh, batch)
  metrics = []
  for i in range(num_steps):
    local = {k: local_rows(v, mesh) for k, v in batch.items()}
    state, m = step(state, sharding.make_global_batch(local, mesh), jax.random.PRNGKey(i))
    metrics.append({k: float(v) for k, v in multihost.to_host(m).items()})
  return metrics, multihost.to_host(state.params)


def sample_batch(cfg, host_params, mesh):
  """The sampler on the mesh: same prompts on every host, global output."""
  from cai_jax import sampling
  tokens, mask = global_tokens()
  params = sharding.shard_params(host_params, cfg, mesh)
  out = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(7), max_new_tokens=6,
                        temperature=0.8, top_p=0.9, eos_ids=(2,), mesh=mesh)
  prompts = [list(map(int, t[m])) for t, m in zip(tokens, mask)]
  conts = [list(map(int, t[:n])) for t, n in zip(out.tokens_BxN, out.lengths_B)]
  scored = sampling.score_tokens(cfg, params, prompts, conts, batch_size=GLOBAL_BATCH, mesh=mesh)
  return {"tokens": np.asarray(out.tokens_BxN), "logprobs": np.asarray(out.logprobs_BxN),
          "lengths": np.asarray(out.lengths_B),
          "scored": np.concatenate([np.asarray(x, np.float32) for x in scored])}


def records_roundtrip(directory):
  """Host-sharded record generation gathered over the collectives."""
  del directory
  items = [{"id": i, "prompt": f"prompt {i} ünï"} for i in range(11)]
  mine = multihost.host_shard(items)
  done = [dict(it, response=it["prompt"].upper(), host=jax.process_index()) for it in mine]
  return {"mine": [r["id"] for r in done], "gathered": multihost.gather_records(done)}


def stage_config():
  """Tiny-model revise and label runs: 6 red-team prompts in chunks of 2 (3 chunks),
  2 helpfulness prompts (1 chunk), so both hosts get chunks of both stages.

  batch_size 16 gives every device at least 2 sampler rows in both runs (16 rows
  over 8 devices here, over each host's 4 there): XLA's CPU path for a single
  row rounds differently from its path for several, and the random model's flat
  distribution turns such 1e-6 differences into other tokens.
  """
  import ml_collections
  from cai_jax.data import prompts as prompts_lib
  from cai_jax.stages import label, revise
  c = ml_collections.ConfigDict()
  c.seed = 3
  c.model = "tiny"
  c.feedback_model = ""
  c.dtype = "float32"
  c.prompt_format = "raw"
  c.constitution = "harmlessness"
  c.mesh = ml_collections.ConfigDict({"ici": (-1, 1, 1), "dcn": None})
  c.data = prompts_lib.default_config()
  c.data.num_red_team = 6
  c.data.num_helpful = 2
  c.revise = revise.default_config()
  c.revise.update(dict(num_revisions=1, max_new_tokens=6, critique_max_new_tokens=6,
                       revision_max_new_tokens=6, num_fewshot=1, helpful_samples=1,
                       chunk_size=2, batch_size=16, progress=False, write_tfds=False))
  c.label = label.default_config()
  c.label.update(dict(max_new_tokens=6, num_fewshot=1, chunk_size=2, batch_size=16,
                      progress=False, write_tfds=False))
  return c


def _read_text(path):
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read()


def run_stages(workdir):
  """The revise and label stages into this process's own workdir (no disk shared
  between hosts, so the records must travel over the collectives), run twice:
  the second run finds process 0's DONE. Returns summaries and the files each
  process holds (name -> text)."""
  from cai_jax import sampling
  from cai_jax.stages import label, revise
  c = stage_config()
  mesh, batch_size = sampling.generation_mesh(c, c.revise.batch_size)
  out = {"mesh": {"shape": dict(mesh.shape), "batch_size": batch_size,
                  "local": all(d.process_index == jax.process_index() for d in mesh.devices.flat)}}
  out.update(revise=revise.run(c, workdir), label=label.run(c, workdir))
  out["revise_again"] = revise.run(c, workdir)
  out["label_again"] = label.run(c, workdir)
  files = {}
  for stage in ("revise", "label"):
    for dirpath, _, names in os.walk(os.path.join(workdir, stage)):
      for name in names:
        path = os.path.join(dirpath, name)
        files[os.path.relpath(path, workdir)] = _read_text(path)
  out["files"] = files
  return out


def pipeline_config():
  """configs/tiny.py through every stage on the 8-device mesh both runs share: batch
  sizes that divide over 8 devices, enough prompts to fill them."""
  from cai_jax.tools.config_file import load
  c = load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "tiny.py"))
  c.compilation_cache = ""
  c.data.num_red_team = 10
  c.revise.update(dict(num_revisions=1, batch_size=16, chunk_size=4, progress=False))
  c.sft.update(dict(batch_size=8, max_steps=2, progress=False))
  c.label.update(dict(batch_size=16, chunk_size=4, progress=False))
  c.pm.update(dict(batch_size=8, max_steps=2, progress=False))
  c.ppo.update(dict(batch_size=8, num_minibatches=1, num_iterations=2, progress=False))
  c.evaluate.update(dict(batch_size=16, judges=("pm",)))
  return c


def run_pipeline(workdir):
  """Every stage into one directory both processes see (as a gs:// bucket is
  shared): returns the summaries, and which files each host wrote as DONE markers
  and model exports (the main host alone must write them)."""
  from cai_jax import models, pipeline, utils
  wrote = {"done": [], "exports": []}
  real_done, real_save = utils.mark_done, models.save_pretrained

  def mark_done(stage_dir, info=None):
    wrote["done"].append(os.path.relpath(str(stage_dir), workdir))
    return real_done(stage_dir, info)

  def save_pretrained(cfg, params, out_dir, *a, **kw):
    wrote["exports"].append(os.path.relpath(str(out_dir), workdir))
    return real_save(cfg, params, out_dir, *a, **kw)

  utils.mark_done, models.save_pretrained = mark_done, save_pretrained
  try:
    res = pipeline.run(pipeline_config(), workdir, write_report=False)
  finally:
    utils.mark_done, models.save_pretrained = real_done, real_save
  summaries = {k: v.get("summary") for k, v in res.items()}
  files = sorted(os.path.relpath(os.path.join(d, f), workdir)
                 for d, _, fs in os.walk(workdir) for f in fs
                 if f in ("DONE", "model.safetensors", "settings.json"))
  return {"summaries": json.loads(json.dumps(summaries, default=float)), "wrote": wrote,
          "files": files}


def run_all(workdir):
  """Everything both runs compute; returns (arrays dict, json-able dict)."""
  cfg = tiny_cfg()
  # Same host params everywhere (deterministic init); shard_params places each
  # process's part of them on its devices.
  host_params = jax.tree_util.tree_map(np.asarray, models.init_params(cfg, jax.random.PRNGKey(0)))
  arrays, info = {}, {}
  meshes = {k: sharding.make_mesh(v) for k, v in MESHES.items()}
  for name, mesh in meshes.items():
    params = sharding.shard_params(host_params, cfg, mesh)
    arrays[f"logits/{name}"] = forward_logits(cfg, params, mesh)
  params = sharding.shard_params(host_params, cfg, meshes["dp2_fsdp2_tp2"])
  restored, ok = checkpoint_roundtrip(cfg, params, meshes["dp2_fsdp2_tp2"],
                                      meshes["fsdp4_tp2"], os.path.join(workdir, "ckpt"))
  info["restored_sharding_ok"] = ok
  for path, leaf in jax.tree_util.tree_flatten_with_path(multihost.to_host(restored))[0]:
    arrays["restored/" + jax.tree_util.keystr(path)] = leaf
  info["records"] = records_roundtrip(workdir)
  info["stages"] = run_stages(os.path.join(workdir, f"stages-{jax.process_index()}"))
  info["pipeline"] = run_pipeline(os.path.join(workdir, "pipeline"))
  from cai_jax.training import objectives
  mesh = meshes["dp2_fsdp2_tp2"]
  info["sft_metrics"], sft_params = train_steps(cfg, host_params, mesh,
                                                objectives.sft_loss_fn(cfg), sft_batch())
  pm_host = jax.tree_util.tree_map(np.asarray, models.add_score_head(
      cfg, host_params, jax.random.PRNGKey(3), init_std=0.1))
  info["pm_metrics"], pm_params = train_steps(cfg, pm_host, meshes["fsdp4_tp2"],
                                              objectives.pm_loss_fn(cfg), pair_batch())
  for tag, tree in (("sft", sft_params), ("pm", pm_params)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      arrays[f"{tag}_params/" + jax.tree_util.keystr(path)] = leaf
  for k, v in sample_batch(cfg, host_params, mesh).items():
    arrays["sample/" + k] = v
  info["process_count"] = jax.process_count()
  info["device_count"] = jax.device_count()
  return arrays, info


def main(argv):
  pid, port, out = int(argv[1]), int(argv[2]), os.path.abspath(argv[3])
  os.environ.update(CAI_JAX_DISTRIBUTED="1", COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    NUM_PROCESSES="2", PROCESS_ID=str(pid))
  assert sharding.maybe_initialize_distributed()
  arrays, info = run_all(os.path.join(out, "work"))
  np.savez(os.path.join(out, f"proc{pid}.npz"), **arrays)
  with open(os.path.join(out, f"proc{pid}.json"), "w") as f:
    json.dump(info, f)
  multihost.sync("done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
