"""sdtrain: train your own text-to-image latent diffusion models (the Stable Diffusion family) with diffusers.

The package itself is light: ``import sdtrain.config`` or ``sdtrain --help`` load neither torch nor diffusers.
``sdtrain.StableDiffusion`` (the Python facade, :mod:`sdtrain.api`) is imported on first use.
"""

MIN_TORCH = (2, 6)
__version__ = "0.1.0"
__all__ = ["StableDiffusion", "__version__", "check_torch"]


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


def __getattr__(name: str):
    if name == "StableDiffusion":  # loads torch, diffusers and transformers: only when asked for
        return _import_quietly()
    raise AttributeError(f"module 'sdtrain' has no attribute {name!r}")
