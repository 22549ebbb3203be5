"""A probe, not a preset: the demo's transformer stage as Sana's transformer on the demo's f4 AutoencoderKL.

    python bench/sana_demo_probe.py --name dit-sana-fix --train-seeds 0
    python bench/sana_demo_probe.py --no-instruction --name dit-sana-noinstr --train-seeds 0

Runs ``bench/demo_recipe.py --config demo-dit model.family=sana`` (its other arguments passed on) with two things a
plain SanaPipeline does not do, so that the transformer can be compared with PixArt's on the same latents:

- the pipeline is taught the AutoencoderKL's scale factor (``SanaPipeline.__init__`` reads an AutoencoderDC's
  ``encoder_block_out_channels``; `sdtrain demo` with a Sana stage trains an AutoencoderDC instead, which needs no
  patch: ``bench/demo_recipe.py --config demo-dit model.family=sana``);
- with ``--no-instruction``, prompts are encoded without the pipeline's complex human instruction, in training and in
  sampling (a plain pipeline call prepends it, and the export would need ``complex_human_instruction=None``).

Prints demo_recipe's rows; the last line is the row (or the seeds' summary) as JSON.
"""

from __future__ import annotations

import inspect
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffusers import DiffusionPipeline, SanaPipeline  # noqa: E402
from diffusers.image_processor import PixArtImageProcessor  # noqa: E402

import sdtrain.models.families.sana as sana  # noqa: E402
from sdtrain.models.text import resolve_minilm  # noqa: E402


def holding_any_autoencoder(self, tokenizer, text_encoder, vae, transformer, scheduler) -> None:
    """``SanaPipeline.__init__`` with the scale factor of an AutoencoderKL's levels as well as an AutoencoderDC's."""
    DiffusionPipeline.__init__(self)
    self.register_modules(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    config = vae.config if vae is not None else None
    levels = getattr(config, "encoder_block_out_channels", None) or getattr(config, "block_out_channels", None)
    self.vae_scale_factor = 2 ** (len(levels) - 1) if levels else 32
    self.image_processor = PixArtImageProcessor(vae_scale_factor=self.vae_scale_factor)


def without_instruction() -> None:
    """Training's encoding and the pipeline's default both without the complex human instruction."""
    sana.INSTRUCTION = None
    call = SanaPipeline.__call__.__wrapped__  # under torch.no_grad's wrapper
    names = list(inspect.signature(call).parameters)
    defaults = list(call.__defaults__)
    defaults[names.index("complex_human_instruction") - (len(names) - len(defaults))] = None
    call.__defaults__ = tuple(defaults)
    assert inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default is None


def main() -> None:
    args = sys.argv[1:]
    if "--no-instruction" in args:
        args.remove("--no-instruction")
        without_instruction()
    SanaPipeline.__init__ = holding_any_autoencoder
    recipe = ["--config", "demo-dit", "--vae", "runs/recipes/vae", *args]
    recipe += ["model.family=sana", f"model.text_encoder.path={resolve_minilm()}"]
    sys.argv = [str(ROOT / "bench" / "demo_recipe.py"), *recipe]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
