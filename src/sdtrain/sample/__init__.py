"""Sampling: scheduler map, pipeline assembly, text-to-image and image-to-image."""
