"""The pre-flight memory estimate of real-size models, without their weights: every module is built on the meta
device, one forward pass is counted (FLOPs, activation bytes) and the estimate of :mod:`sdtrain.train.perf` is
printed for the settings given. What `sdtrain train` prints before its first step, for a model you do not have here.

    python bench/memory_estimate.py --family flux --resolution 1024 --batch 1 --lora 16 --precision bf16 \
        --checkpointing --quantize nf4 --cache

Frozen weights are held as ``sdtrain.train.placement`` holds them: in the compute dtype (``--frozen-dtype`` to
choose another), a LoRA base quantised with ``--quantize`` and the text encoders with ``--text-quantize``; with
``--cache`` (latents and prompts cached) the text encoders and the autoencoder's encoder are parked on the CPU;
``--offload-blocks N`` swaps the last N transformer blocks of the base (all but the two visiting are off the device).

Sizes are the published configs (SD 1.5; SDXL base 1.0: UNet 2.57 B, CLIP ViT-L and OpenCLIP ViT-bigG; SD 3 medium:
MMDiT 2.03 B, CLIP-L, CLIP-G and T5-XXL, a 16-channel VAE; SD 3.5 large: 8.1 B, the same encoders; FLUX.1 dev: 11.9 B,
CLIP-L and T5-XXL, a 16-channel VAE; Chroma1-HD: 8.9 B, T5-XXL, FLUX.1's VAE; Z-Image: 6.2 B, Qwen3 4B, FLUX.1's VAE;
FLUX.2 dev: 32 B, Mistral Small 3.1 24B with its vision tower; FLUX.2 klein 4B / 9B: 3.9 / 9.1 B, Qwen3 4B / 8B,
FLUX.2's 32-channel VAE; Lumina-Image 2.0: 2.6 B, Gemma 2 2B, FLUX.1's VAE; Qwen-Image: 20.4 B, Qwen2.5-VL 7B with its
vision tower, its own 16-channel video autoencoder; PixArt-Sigma XL 1024: DiT 0.61 B and T5-XXL; Sana 1600M 1024 px:
1.6 B, Gemma 2 2B, the f32c32 deep-compression autoencoder).
"""

from __future__ import annotations

import argparse

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    ChromaTransformer2DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    Lumina2Transformer2DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)

from sdtrain.config import LoRAConfig, OptimConfig, TrainConfig
from sdtrain.models.families import families
from sdtrain.models.lora import add_lora
from sdtrain.models.quantize import hold_in
from sdtrain.train.block_swap import offloaded_bytes
from sdtrain.train.perf import GiB, estimate_memory, profile_denoiser

VIT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
VIT_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")  # fmt: skip
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)  # fmt: skip
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")  # fmt: skip
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, pos_embed_max_size=192)  # fmt: skip
SD3_LARGE = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # fmt: skip
CHROMA1_HD = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
                  approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)  # fmt: skip
Z_IMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
               n_heads=30, n_kv_heads=30, cap_feat_dim=2560)  # fmt: skip
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128)  # fmt: skip
MISTRAL_SMALL_3_1 = dict(
    text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=1540, patch_size=14, head_dim=64),
)  # fmt: skip
KLEIN = {  # FLUX.2 klein's transformers and their Qwen3 text encoders
    "4b": (dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                guidance_embeds=False), dict(QWEN3_4B, tie_word_embeddings=True)),
    "9b": (dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                guidance_embeds=False), dict(QWEN3_4B, hidden_size=4096, intermediate_size=12288)),
}  # fmt: skip
QWEN2_5_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, rope_scaling={"mrope_section": [16, 24, 24],
                     "rope_type": "default", "type": "default"}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
    vocab_size=152064, hidden_size=3584,
)  # fmt: skip
SANA_1600M = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                  num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                  caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1)  # fmt: skip
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256)  # fmt: skip
PIXART_SIGMA = dict(sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4,
                    out_channels=8, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
                    norm_type="ada_norm_single", num_embeds_ada_norm=1000, norm_elementwise_affine=False,
                    norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True,
                    use_additional_conditions=False)  # fmt: skip
UNETS = {
    "sd": dict(cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)),
    "sdxl": dict(
        block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    transformers = ["sd3", "sd3.5-large", "flux", "flux-kontext", "flux2", "flux2-klein-4b", "flux2-klein-9b",
                    "pixart", "sana", "chroma", "zimage", "qwenimage", "lumina2"]  # fmt: skip
    parser.add_argument("--family", choices=sorted([*UNETS, *transformers]), default="sdxl",
                        help="sd3: SD 3 medium; sd3.5-large: SD 3.5 large (8.1 B)")  # fmt: skip
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per device")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tune)")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit", "adafactor"], default="adamw")
    parser.add_argument("--checkpointing", action="store_true", help="train.gradient_checkpointing")
    parser.add_argument("--ema", action="store_true", help="an EMA kept on the device")
    parser.add_argument("--frozen-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="the frozen weights' dtype (default: the compute one, as dtype auto)")  # fmt: skip
    modes = ["none", "fp8", "int8", "nf4"]
    parser.add_argument("--quantize", choices=modes, default="none", help="model.quantize (the LoRA base)")
    parser.add_argument("--text-quantize", choices=modes, default="none", help="model.text_encoder*.quantize")
    parser.add_argument("--cache", action="store_true", help="latents and prompts cached: the encoders parked")
    parser.add_argument("--offload-blocks", type=int, default=0, help="train.offload.blocks (block swap)")
    parser.add_argument("--shards", type=int, default=1, help="FSDP2 processes")
    args = parser.parse_args()

    compute = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    dtype = getattr(torch, args.frozen_dtype) if args.frozen_dtype else compute
    model, frozen, cond, channels = _models(args.family)
    frozen = {name: hold_in(module.requires_grad_(False), dtype) for name, module in frozen.items()}
    tc = TrainConfig(
        mixed_precision=args.precision, gradient_checkpointing=args.checkpointing, lora=LoRAConfig(rank=args.lora),
        optim=OptimConfig(name=args.optimizer), ema_decay=0.9999 if args.ema else None,
    )  # fmt: skip
    family = families()[args.family.split(".")[0].removesuffix("-4b").removesuffix("-9b")]
    if args.lora:
        add_lora(model, tc.lora, family.lora_targets)
    side = args.resolution // (32 if args.family == "sana" else 8)
    if args.family == "flux-kontext":  # the reference's latents, of the image's size, beside the noisy ones
        cond["reference_latents"] = torch.zeros(1, channels, side, side, device="meta")
    if args.family == "lumina2":  # its rotary embedding reads the prompts' lengths off the mask: every token, here
        rope = model.rope_embedder.forward
        model.rope_embedder.forward = lambda x, mask: rope(x, torch.ones(mask.shape, dtype=torch.long))
    profile = profile_denoiser(model, family.predict, (channels, side, side), cond, torch.device("meta"))  # in fp32
    if args.lora and args.shards == 1:
        hold_in(model, dtype)  # the frozen base (its norms fp32), as sdtrain.train.placement holds it
    held = []
    for name, module in frozen.items():
        if name.startswith("text_encoder"):
            if not args.cache:
                held.append((module, args.text_quantize))
        else:  # the autoencoder: its decoder alone with the latents cached
            held += [(module.decoder, "none")] if args.cache else [(module, "none")]
    offloaded = offloaded_bytes(model, args.offload_blocks, args.quantize)
    estimate = estimate_memory(model, held, profile, args.batch, tc, shards=args.shards, base_mode=args.quantize,
                               offloaded=offloaded)  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.family} {family.denoiser} {params / 1e9:.3f} B parameters ({trainable / 1e6:.1f} M trainable), "
          f"{profile.train_flops / 1e12:.2f} TFLOPs per image per step at {args.resolution} px")  # fmt: skip
    print(f"memory estimate per device (GiB): {estimate.table()}  ->  {estimate.total / GiB:.1f} GiB")


def _models(name: str) -> tuple[torch.nn.Module, dict, dict, int]:
    """The family's denoiser and frozen modules by component name on the meta device, a batch-1 conditioning, its
    latent channels."""
    with torch.device("meta"):
        if name.startswith("sd3"):
            model = SD3Transformer2DModel(**(SD3_LARGE if name == "sd3.5-large" else SD3_MEDIUM))
            vae = AutoencoderKL(**(SD_VAE | {"latent_channels": 16}))
            frozen = {
                "vae": vae,
                "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**VIT_L)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**VIT_BIG_G)),
                "text_encoder_3": T5EncoderModel(T5Config(**T5_XXL)),
            }
            cond = {
                "encoder_hidden_states": torch.zeros(1, 77 + 256, 4096),
                "pooled_projections": torch.zeros(1, 2048),
            }
            return model, frozen, cond, 16
        if name in ("flux", "flux-kontext"):  # Kontext-dev is FLUX.1 dev's transformer
            model = FluxTransformer2DModel(**FLUX_DEV)
            vae = AutoencoderKL(**(SD_VAE | {"latent_channels": 16}))
            frozen = {"vae": vae, "text_encoder": CLIPTextModel(CLIPTextConfig(**VIT_L)),
                      "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL))}  # fmt: skip
            cond = {"encoder_hidden_states": torch.zeros(1, 512, 4096), "pooled_projections": torch.zeros(1, 768)}
            return model, frozen, cond, 16
        if name == "chroma":
            model = ChromaTransformer2DModel(**CHROMA1_HD)
            frozen = {"vae": AutoencoderKL(**(SD_VAE | {"latent_channels": 16})),
                      "text_encoder": T5EncoderModel(T5Config(**T5_XXL))}  # fmt: skip
            cond = {"encoder_hidden_states": torch.zeros(1, 512, 4096), "attention_mask": torch.ones(1, 512)}
            return model, frozen, cond, 16
        if name == "zimage":
            # predict keeps each prompt's real tokens (a boolean index): on the meta device, every token of the mask
            torch.fx.experimental._config.meta_nonzero_assume_all_nonzero = True
            model = ZImageTransformer2DModel(**Z_IMAGE)
            frozen = {"vae": AutoencoderKL(**(SD_VAE | {"latent_channels": 16})),
                      "text_encoder": Qwen3Model(Qwen3Config(**QWEN3_4B))}  # fmt: skip
            cond = {"encoder_hidden_states": torch.zeros(1, 512, 2560), "attention_mask": torch.ones(1, 512)}
            return model, frozen, cond, 16
        if name == "flux2":
            model = Flux2Transformer2DModel()  # its defaults are FLUX.2 dev's
            encoder = Mistral3ForConditionalGeneration(Mistral3Config(**MISTRAL_SMALL_3_1))
            frozen = {"vae": AutoencoderKLFlux2(), "text_encoder": encoder}
            cond = {"encoder_hidden_states": torch.zeros(1, 512, 15360)}
            return model, frozen, cond, 32
        if name.startswith("flux2-klein"):
            knobs, text = KLEIN[name.rpartition("-")[2]]
            model = Flux2Transformer2DModel(**knobs)
            frozen = {"vae": AutoencoderKLFlux2(), "text_encoder": Qwen3ForCausalLM(Qwen3Config(**text))}
            cond = {"encoder_hidden_states": torch.zeros(1, 512, knobs["joint_attention_dim"])}
            return model, frozen, cond, 32
        if name == "lumina2":
            model = Lumina2Transformer2DModel(cap_feat_dim=2304)  # the rest of its defaults are Lumina-Image 2.0's
            frozen = {"vae": AutoencoderKL(**(SD_VAE | {"latent_channels": 16})),
                      "text_encoder": Gemma2Model(Gemma2Config(**GEMMA2_2B))}  # fmt: skip
            cond = {"encoder_hidden_states": torch.zeros(1, 256, 2304), "encoder_attention_mask": torch.ones(1, 256)}
            return model, frozen, cond, 16
        if name == "qwenimage":
            model = QwenImageTransformer2DModel()  # its defaults are Qwen-Image's
            encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN2_5_VL_7B))
            frozen = {"vae": AutoencoderKLQwenImage(), "text_encoder": encoder}
            cond = {"encoder_hidden_states": torch.zeros(1, 512, 3584), "attention_mask": torch.ones(1, 512)}
            return model, frozen, cond, 16
        if name == "sana":
            model = SanaTransformer2DModel(**SANA_1600M)
            frozen = {"vae": AutoencoderDC(), "text_encoder": Gemma2Model(Gemma2Config(**GEMMA2_2B))}  # f32c32
            cond = {"encoder_hidden_states": torch.zeros(1, 300, 2304), "encoder_attention_mask": torch.ones(1, 300)}
            return model, frozen, cond, 32
        if name == "pixart":
            model = PixArtTransformer2DModel(**PIXART_SIGMA)
            frozen = {"vae": AutoencoderKL(**SD_VAE), "text_encoder": T5EncoderModel(T5Config(**T5_XXL))}
            cond = {"encoder_hidden_states": torch.zeros(1, 300, 4096), "encoder_attention_mask": torch.ones(1, 300)}
            return model, frozen, cond, 4
        model = UNet2DConditionModel(**UNETS[name])
        frozen = {"vae": AutoencoderKL(**SD_VAE), "text_encoder": CLIPTextModel(CLIPTextConfig(**VIT_L))}
        cond = {"encoder_hidden_states": torch.zeros(1, 77, model.config.cross_attention_dim)}
        if name == "sdxl":
            frozen["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**VIT_BIG_G))
            cond |= {"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)}
        return model, frozen, cond, 4


if __name__ == "__main__":
    main()
