"""Moved to ``recloop.checkpoint`` (the ground floor: serving, the trainer and the DPO
sampler all load checkpoints, and serving must not import training code). This module
re-exports it so that existing imports keep working; new code imports
``recloop.checkpoint``."""

from recloop.checkpoint import (
    BASELINE_FORMAT,
    BASELINE_KINDS,
    FILES,
    FORMAT,
    REWARD_FORMAT,
    BaselineCheckpoint,
    Checkpoint,
    CheckpointError,
    RewardCheckpoint,
    checkpoint_format,
    context_builder,
    load_baseline,
    load_checkpoint,
    load_reward,
    save_baseline,
    save_checkpoint,
    save_reward,
    validate_checkpoint,
)

__all__ = [
    "BASELINE_FORMAT",
    "BASELINE_KINDS",
    "FILES",
    "FORMAT",
    "REWARD_FORMAT",
    "BaselineCheckpoint",
    "Checkpoint",
    "CheckpointError",
    "RewardCheckpoint",
    "checkpoint_format",
    "context_builder",
    "load_baseline",
    "load_checkpoint",
    "load_reward",
    "save_baseline",
    "save_checkpoint",
    "save_reward",
    "validate_checkpoint",
]
