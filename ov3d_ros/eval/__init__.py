"""Evaluation metrics (never imported by the nodes)."""
