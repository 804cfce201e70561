"""Training machinery shared by the SFT, preference-model and PPO stages.

  optim       make_optimizer(cfg), schedules, trainable_mask
  losses      masked_cross_entropy, ranking_loss
  state       TrainState, create_train_state
  checkpoint  Manager (one Orbax CheckpointManager per stage), init_from helpers
  data        tokenisation to tokens + loss masks, SFT/pair batches, ShuffledIndex
  objectives  model-aware loss fns (SFT chunked cross-entropy, PM ranking)
  loop        make_train_step, train (the one generic loop)
"""
from cai_jax.training import checkpoint, data, flops, losses, loop, objectives, optim, state
from cai_jax.training.checkpoint import Manager
from cai_jax.training.loop import TrainingDivergedError, make_train_step, train
from cai_jax.training.optim import default_optim_config, make_optimizer, trainable_mask
from cai_jax.training.state import TrainState, create_train_state
