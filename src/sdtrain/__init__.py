"""sdtrain: train your own text-to-image latent diffusion models (the Stable Diffusion family) with diffusers."""

import torch as _torch

MIN_TORCH = (2, 6)


def check_torch(version: str) -> None:
    """Refuse a torch older than 2.6: before it, ``torch.load(weights_only=True)`` could still be made to run code
    (CVE-2025-32434), and resuming a checkpoint relies on that guard.

    Raises:
        RuntimeError: naming the version found and the one needed.
    """
    parts = version.split("+")[0].split(".")
    found = tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts[:2])
    if found < MIN_TORCH:
        raise RuntimeError(
            f"sdtrain needs torch >= {'.'.join(map(str, MIN_TORCH))} (safe checkpoint loading), found {version}: "
            "pip install -U 'torch>=2.6'"
        )


check_torch(_torch.__version__)


def _import_quietly():
    """Import the API with transformers' import-time notices (torchvision-less image processors, which text-to-image
    training never uses) silenced; the user's transformers verbosity is restored afterwards."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        from sdtrain.api import StableDiffusion
    finally:
        hf_logging.set_verbosity(previous)
    return StableDiffusion


StableDiffusion = _import_quietly()

__version__ = "0.1.0"
__all__ = ["StableDiffusion", "__version__", "check_torch"]
