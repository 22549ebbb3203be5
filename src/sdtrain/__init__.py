"""sdtrain: train your own text-to-image latent diffusion models (the Stable Diffusion family) with diffusers."""

from sdtrain.api import StableDiffusion

__version__ = "0.1.0"
__all__ = ["StableDiffusion", "__version__"]
