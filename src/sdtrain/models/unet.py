"""The trainable UNet2DConditionModel: built from the article's knobs, or loaded from a pretrained folder / hub id."""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DConditionModel

from sdtrain.config import UNetConfig


def build_unet(
    config: UNetConfig, latent_channels: int, sample_size: int, cross_attention_dim: int, **family: Any
) -> UNet2DConditionModel:
    """A fresh UNet2DConditionModel.

    Args:
        config: widths per level, residual blocks per level, attention per level, dropout.
        latent_channels: channels of the autoencoder's latent (input and output of the UNet).
        sample_size: latent side at the training resolution (recorded in the config, used by pipelines as default).
        cross_attention_dim: the text encoder's hidden size (the text encoders' together).
        family: what the model family adds to the config (SDXL: the text-time embedding of its pooled text and size
            ids).
    """
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention))
    kwargs = dict(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        dropout=config.dropout,
        addition_embed_type="text" if config.text_time_embedding else None,
        transformer_layers_per_block=tuple(config.transformer_layers) if config.transformer_layers else 1,
    )
    return UNet2DConditionModel(**(kwargs | family))


def load_unet(path: str, subfolder: str | None = None) -> UNet2DConditionModel:
    """A pretrained UNet2DConditionModel to fine-tune (fp32 master weights)."""
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return UNet2DConditionModel.from_pretrained(path, **kwargs)
