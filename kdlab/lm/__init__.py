"""Causal language-model distillation: models, store, system and pipeline for token-level KD."""
