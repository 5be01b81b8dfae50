"""Training: NeuraLadder curriculum, rewards, GRPO algorithms, rollout engines, the DeepSpeed trainer."""
