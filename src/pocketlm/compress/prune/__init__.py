"""Pruning: unstructured and N:M masks (unstructured.py, sparsify.py) and structured removal (structured.py)."""
