"""Data: folder and manifest sources, decoding policy, transforms, batch streams and caches, the shapes dataset."""
