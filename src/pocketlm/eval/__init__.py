"""Evaluation: one protocol (protocol.py) over quality, efficiency and energy; scores and reports."""
