"""The pre-flight memory estimate of real-size models, without their weights: every module is built on the meta
device, one forward pass is counted (FLOPs, activation bytes) and the estimate of :mod:`sdtrain.train.perf` is
printed for the settings given. What `sdtrain train` prints before its first step, for a model you do not have here.

    python bench/memory_estimate.py --family sdxl --resolution 1024 --batch 1 --lora 16 --precision bf16 \
        --checkpointing --optimizer adamw8bit --frozen-dtype float16

Sizes are the published configs (SDXL base 1.0: UNet 2.57 B, CLIP ViT-L and OpenCLIP ViT-bigG, the SDXL VAE; SD 1.5).
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdtrain.config import LoRAConfig, OptimConfig, TrainConfig
from sdtrain.models.families import families
from sdtrain.models.lora import add_lora
from sdtrain.train.perf import GiB, estimate_memory, profile_denoiser

VIT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
VIT_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")  # fmt: skip
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)  # fmt: skip
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
    parser.add_argument("--family", choices=sorted(UNETS), default="sdxl")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per device")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tune)")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit", "adafactor"], default="adamw")
    parser.add_argument("--checkpointing", action="store_true", help="train.gradient_checkpointing")
    parser.add_argument("--ema", action="store_true", help="an EMA kept on the device")
    parser.add_argument("--frozen-dtype", choices=["float32", "bfloat16", "float16"], default="float16")
    parser.add_argument("--shards", type=int, default=1, help="FSDP2 processes")
    args = parser.parse_args()

    dtype = getattr(torch, args.frozen_dtype)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNETS[args.family])
        frozen = [AutoencoderKL(**SD_VAE).to(dtype), CLIPTextModel(CLIPTextConfig(**VIT_L)).to(dtype)]
        if args.family == "sdxl":
            frozen.append(CLIPTextModelWithProjection(CLIPTextConfig(**VIT_BIG_G)).to(dtype))
    tc = TrainConfig(
        mixed_precision=args.precision, gradient_checkpointing=args.checkpointing, lora=LoRAConfig(rank=args.lora),
        optim=OptimConfig(name=args.optimizer), ema_decay=0.9999 if args.ema else None,
    )  # fmt: skip
    family = families()[args.family]
    if args.lora:
        add_lora(unet, tc.lora, family.lora_targets)
    side = args.resolution // 8
    width = unet.config.cross_attention_dim
    cond = {"encoder_hidden_states": torch.zeros(1, 77, width)}
    if args.family == "sdxl":
        cond |= {"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)}
    profile = profile_denoiser(unet, family.predict, (4, side, side), cond, torch.device("meta"))
    estimate = estimate_memory(unet, frozen, profile, args.batch, tc, shards=args.shards)
    params = sum(p.numel() for p in unet.parameters())
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    print(f"{args.family} UNet {params / 1e9:.3f} B parameters ({trainable / 1e6:.1f} M trainable), "
          f"{profile.train_flops / 1e12:.2f} TFLOPs per image per step at {args.resolution} px")  # fmt: skip
    print(f"memory estimate per device (GiB): {estimate.table()}  ->  {estimate.total / GiB:.1f} GiB")


if __name__ == "__main__":
    main()
