"""Exact identities of models: what a cache of their outputs depends on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (hashlib releases the GIL: threads hash files in parallel)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_hash(model: torch.nn.Module) -> str:
    """sha256 of a model's class, config and every weight (names and bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        items = config.to_dict().items() if hasattr(config, "to_dict") else dict(config).items()
        digest.update(
            json.dumps({k: v for k, v in items if not k.startswith("_")}, sort_keys=True, default=str).encode()
        )
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        tensor = tensor.detach()
        if type(tensor) is not torch.Tensor:  # quantised (sdtrain.models.quantize): the values it computes with
            digest.update(type(tensor).__name__.encode())
            tensor = tensor.dequantize()
        # flattened: a 0-dim tensor (a batch norm's num_batches_tracked, in FLUX.2's autoencoder) has no byte view
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
