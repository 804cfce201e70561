"""Reinforcement learning from a reward model: PPO maths, control, rollout, update."""
from cai_jax.rl.control import (AdaptiveKLController, FixedKLController, RunningMeanStd,
                                make_kl_controller)
from cai_jax.rl.losses import (Transition, entropy_from_logits, explained_variance, gae,
                               kl_estimators, logprobs_of, masked_mean, masked_sum,
                               masked_var, policy_loss, token_rewards, value_loss, whiten)
