"""Evaluation: prompt adherence on the shapes dataset, reconstruction metrics."""
