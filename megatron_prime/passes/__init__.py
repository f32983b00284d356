"""The Megatron passes: rollout batches as tensors, log-prob and loss passes through megatron-core's
pipeline schedules, the trainable and frozen models with their optimizers, data-parallel row
plumbing, and offloading training state between phases."""
