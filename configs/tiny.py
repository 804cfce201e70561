"""A random tiny model through every stage in under 3 minutes on 2 CPU cores; tests use it.

  python -m cai_jax.main --config=configs/tiny.py --workdir=/tmp/cai_tiny
"""
from cai_jax import pipeline


def get_config(arg=None):
  del arg
  c = pipeline.base_config()
  c.model = "tiny"             # random 2-layer d=64 model with SmolLM2's tokenizer
  c.data.num_red_team = 10     # 8 train + 2 held out with eval_fraction=0.2
  c.data.num_helpful = 10
  c.data.eval_fraction = 0.2
  return c
