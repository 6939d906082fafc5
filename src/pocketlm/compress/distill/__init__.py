"""Distillation and checkpoint merging (merge.py: linear, SLERP, TIES)."""
