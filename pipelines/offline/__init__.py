"""Offline: datasets, the seed model's tokenizer and pre-training, offline evaluation,
ablations and scaling fits (``recloop pretrain``, ``eval``, ``ablate``, ``scaling``)."""
