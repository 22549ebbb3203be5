"""Evaluation: prompt adherence on the shapes dataset, FID / KID / CLIP score on any image-caption data, reconstruction
metrics."""
