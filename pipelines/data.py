"""Moved to ``recloop.data`` (the ground floor: serving builds its baseline arms, the stack
its Feast profiles and the simulator its users from the same data). This module
re-exports it so that existing imports keep working; new code imports ``recloop.data``."""

from recloop.data import (
    ML100K_GENRES,
    OCCUPATIONS,
    InteractionData,
    load,
    load_movielens,
    synthetic,
)

__all__ = ["ML100K_GENRES", "OCCUPATIONS", "InteractionData", "load", "load_movielens", "synthetic"]
