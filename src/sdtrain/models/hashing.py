"""Exact identities of models: what a cache of their outputs depends on."""

from __future__ import annotations

import hashlib
import json

import torch


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
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
