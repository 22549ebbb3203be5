"""Tiny random components built from configs (never downloaded), saved to folders as a user's would be."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet (GPT-2's bytes_to_unicode), each char alone and word-final, plus the specials."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIPTextModel + CLIPTokenizer (byte-level vocabulary, no merges) saved as a pipeline-style folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    vocab = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24)
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=24,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny AutoencoderKL (factor 2, 4 latent channels) saved to a folder."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
        scaling_factor=3.0,  # ~1 / std of its latents on the test images, as train-vae would set it
    )
    with torch.no_grad():  # a near-deterministic posterior (std ~ 1e-6), as a trained VAE's is, not a random one's
        vae.quant_conv.bias[4:] = -28.0
    vae.save_pretrained(root)
    return root


def tiny_unet(block_out_channels: tuple[int, int] = (16, 32)):
    """A tiny SD UNet for the tiny CLIP (width 32) and VAE (4 channels), seeded."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=block_out_channels, layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip


def save_pipeline(folder: Path, unet, clip_dir: Path, vae_dir: Path, text_encoder=None) -> Path:
    """``unet`` with the tiny VAE and CLIP text encoder (or ``text_encoder``, with the tiny CLIP's tokenizer), saved
    as a StableDiffusionPipeline folder (Euler)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir),
        text_encoder=text_encoder or CLIPTextModel.from_pretrained(clip_dir / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(clip_dir / "tokenizer"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """Random weights in every tensor of the network, scaled so that activations stay O(1) through all its layers
    (batch-norm statistics included), saved as the weight file would be."""
    from sdtrain.evaluate.inception import InceptionFeatures

    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, value in sorted(InceptionFeatures().state_dict().items()):
        if key.endswith("num_batches_tracked"):
            weights[key] = value
        elif key.endswith(("running_var", "bn.weight")):
            weights[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif value.dim() > 1:
            weights[key] = torch.randn(value.shape, generator=generator) * (2 / value[0].numel()) ** 0.5
        else:
            weights[key] = torch.randn(value.shape, generator=generator) * 0.1
    torch.save(weights, path)
    return path


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> Path:
    """FID's Inception network with random weights, as a weight file."""
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "weights.pth")


@pytest.fixture(scope="session")
def clip_model_dir(tmp_path_factory) -> Path:
    """A random CLIPModel (32 px images) and its processor, saved as a hub folder is (for the CLIP score)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip_model")
    vocab = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(root)
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2)
    text.update(num_attention_heads=4, max_position_embeddings=32, eos_token_id=vocab["<|endoftext|>"])
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2)
    vision["num_attention_heads"] = 4
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root)
    return root


def write_image_folder(root: Path, count: int = 8, size: int = 32, manifest: bool = False, seed: int = 0) -> Path:
    """Random coloured-rectangle images with captions, as .txt sidecars or a metadata.jsonl."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50)}
    for i in range(count):
        name = rng.choice(list(colours))
        array = np.full((size, size + 8, 3), 240, dtype=np.uint8)  # not square: exercises resize + crop
        x, y = rng.randrange(0, size // 2), rng.randrange(0, size // 2)
        array[y : y + size // 2, x : x + size // 2] = colours[name]
        Image.fromarray(array).save(root / f"{i:03d}.png")
        caption = f"a {name} square"
        if manifest:
            lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": caption}))
        else:
            (root / f"{i:03d}.txt").write_text(caption)
    if manifest:
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data")


# the training settings of every tiny test run: 4 steps of 4 images, checkpoints every 2, EMA, 4 sampling steps
TINY_TRAINING = [
    "train.batch_size=4",
    "train.num_steps=4",
    "train.save_every=2",
    "train.log_every=1",
    "train.ema_decay=0.99",
    "train.optim.lr=1e-3",
    "sample.num_inference_steps=4",
]


def tiny_overrides(out: Path, data: Path, vae: Path, text: str, subfolder: str | None = None) -> list[str]:
    """Config overrides for a tiny run on the CPU."""
    overrides = [
        f"train.output_dir={out}",
        f"data.path={data}",
        "data.resolution=32",
        "data.caption_dropout=0.2",
        f"model.vae.path={vae}",
        f"model.text_encoder.path={text}",
        "model.unet.block_out_channels=[16, 32]",
        "model.unet.attention=[false, true]",
        "model.unet.norm_num_groups=8",
        "model.unet.attention_head_dim=8",
        *TINY_TRAINING,
    ]
    if subfolder:
        overrides.append(f"model.text_encoder.subfolder={subfolder}")
    return overrides


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory, clip_dir, vae_dir) -> Path:
    """A tiny StableDiffusionXLPipeline folder, as diffusers' own SDXL tests build one: two tiny CLIP text encoders
    (the second wider and with a projection), a UNet with the text_time addition embedding, the tiny VAE, Euler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = tmp_path_factory.mktemp("sdxl")
    vocab = _byte_vocab()
    settings = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=24, projection_dim=32, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**settings))
    # the second is wider, with OpenCLIP's gelu, as ViT-bigG is beside ViT-L (single-file readers tell them apart so)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**(settings | {"hidden_size": 48, "hidden_act": "gelu"}))
    )
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=80, norm_num_groups=8,
    )  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False,
    )  # fmt: skip
    pipe.save_pretrained(root)
    return root


def pipeline_overrides(out: Path, data: Path, pretrained: Path) -> list[str]:
    """A tiny fine-tune of a pipeline folder (SDXL, SD3) on the CPU: the folder is the only model key."""
    return [
        f"train.output_dir={out}",
        f"data.path={data}",
        "data.resolution=32",
        "data.caption_dropout=0.2",
        f"model.pretrained={pretrained}",
        *TINY_TRAINING,
    ]


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory, clip_dir, vae_dir) -> Path:
    """A tiny StableDiffusion3Pipeline folder, as diffusers' own SD3 tests build one: two tiny CLIPs with projection,
    a tiny T5 encoder (the byte-level CLIP tokenizer stands in for T5's: no tokenizer model is downloaded), a
    one-layer SD3Transformer2DModel, the tiny VAE, FlowMatchEulerDiscreteScheduler with SD3's shift."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("sd3")
    vocab = _byte_vocab()
    clip = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=24, projection_dim=32, hidden_act="gelu", bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    t5 = T5Config(
        vocab_size=len(vocab), d_model=64, d_kv=16, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    text_encoder_3 = T5EncoderModel(t5)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
    )  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    t5_tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer", model_max_length=32)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.register_to_config(shift_factor=0.0609)  # SD3's VAE centres its latents before scaling them
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def sd3_two_blocks_dir(tmp_path_factory, sd3_dir) -> Path:
    """``sd3_dir`` with a two-block transformer: a ControlNet copies the first (the last block of an SD3 transformer
    reads the text without updating it, which no ControlNet block does)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp("sd3-two")
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    torch.manual_seed(1)
    pipe.transformer = SD3Transformer2DModel.from_config({**pipe.transformer.config, "num_layers": 2})
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory, clip_dir, vae_dir) -> Path:
    """A tiny FluxPipeline folder, as diffusers' own Flux tests build one: the tiny CLIP, a tiny T5 encoder (the
    byte-level CLIP tokenizer standing in for T5's), a FluxTransformer2DModel with one double- and one single-stream
    block and a guidance embedding (as FLUX.1 dev), the tiny VAE with a shift factor, FLUX.1 dev's scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("flux")
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(_byte_vocab()), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4, decoder_start_token_id=0))  # fmt: skip
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6], guidance_embeds=True,
    )  # fmt: skip
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.register_to_config(shift_factor=0.1159)  # FLUX.1's VAE centres its latents before scaling them
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel.from_pretrained(clip_dir / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(clip_dir / "tokenizer"), text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer.from_pretrained(clip_dir / "tokenizer", model_max_length=32),
        transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def chroma_dir(tmp_path_factory, clip_dir, vae_dir) -> Path:
    """A tiny ChromaPipeline folder, as diffusers' own Chroma tests build one: a tiny T5 encoder (the byte-level CLIP
    tokenizer standing in for T5's), a ChromaTransformer2DModel with one double- and one single-stream block and a
    small modulation approximator, the tiny VAE with Flux's shift factor, Chroma1's dynamically shifted scheduler."""
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("chroma")
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(_byte_vocab()), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4, decoder_start_token_id=0))  # fmt: skip
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=[4, 6, 6], approximator_num_channels=8, approximator_hidden_dim=32,
        approximator_layers=1,
    )  # fmt: skip
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.register_to_config(shift_factor=0.1159)  # Flux's VAE, which Chroma uses, centres its latents
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipe = ChromaPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(clip_dir / "tokenizer", model_max_length=32), transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(root)
    return root


# Qwen3's chat template as far as ZImagePipeline uses it: a user turn and the generation prompt (thinking on: nothing
# more; off: an empty think block), tokenised here by the byte-level tokenizer standing in for Qwen's
QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="session")
def zimage_dir(tmp_path_factory, clip_dir, vae_dir) -> Path:
    """A tiny ZImagePipeline folder, as diffusers' own Z-Image tests build one: a tiny Qwen3 (the byte-level CLIP
    tokenizer with Qwen's chat template standing in for Qwen's tokenizer), a ZImageTransformer2DModel with two layers
    and one refiner layer each, the tiny VAE with FLUX.1's shift factor, Z-Image's statically shifted scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import CLIPTokenizer, Qwen3Config, Qwen3Model

    root = tmp_path_factory.mktemp("zimage")
    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(_byte_vocab()), hidden_size=32, intermediate_size=37,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=8, max_position_embeddings=128))  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer", model_max_length=96)
    tokenizer.chat_template = QWEN_CHAT
    transformer = ZImageTransformer2DModel(
        in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=[4, 6, 6], axes_lens=[256, 128, 128],
    )  # fmt: skip
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.register_to_config(shift_factor=0.1159)  # FLUX.1's VAE, which Z-Image uses, centres its latents
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def qwenimage_dir(tmp_path_factory, clip_dir) -> Path:
    """A tiny QwenImagePipeline folder, as diffusers' own Qwen-Image tests build one: a tiny Qwen2.5-VL (the
    byte-level CLIP tokenizer standing in for Qwen's, so the pipeline's template is some 200 tokens here), a
    QwenImageTransformer2DModel with two blocks, a tiny AutoencoderKLQwenImage (factor 4, 16 channels, per-channel
    statistics of its own), Qwen-Image's scheduler (dynamic exponential shift, the terminal sigma 0.02)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import CLIPTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    root = tmp_path_factory.mktemp("qwenimage")
    torch.manual_seed(0)
    vocab = len(_byte_vocab())
    rope = {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, rope_scaling=rope, rope_theta=1e6, vocab_size=vocab,
                max_position_embeddings=512)  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, vocab_size=vocab, hidden_size=16, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 2, image_token_id=vocab - 1, video_token_id=vocab - 1,
    ))  # fmt: skip
    stats = torch.Generator().manual_seed(1)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=(torch.randn(16, generator=stats) * 0.2).tolist(),
        latents_std=(0.5 + torch.rand(16, generator=stats)).tolist(),
    )  # fmt: skip
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer", model_max_length=256)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)  # fmt: skip
    pipe.save_pretrained(root)
    return root


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]  # fmt: skip


def qwen_vl_processor(image_processor, tokenizer):
    """A ``Qwen2VLProcessor`` of these parts, its class's own code. Its constructor checks each part's class, and
    the video processor's lookup needs torchvision (no CPU build here imports beside this torch): without it, the
    instance is made without that check and without a video processor, which the edit pipelines never call."""
    from transformers import Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor())  # fmt: skip
    processor = object.__new__(Qwen2VLProcessor)
    processor.image_processor, processor.tokenizer, processor.chat_template = image_processor, tokenizer, None
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    ids = tokenizer.convert_tokens_to_ids([processor.image_token, processor.video_token])
    processor.image_token_id, processor.video_token_id = ids
    return processor


@pytest.fixture(scope="session")
def qwen_processor_files():
    """Where torchvision is missing, ``Qwen2VLProcessor`` loads and saves as its files hold it (the image
    processor's config and the tokenizer, read and written by their own classes) through :func:`qwen_vl_processor`;
    with torchvision, as transformers does."""
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        yield
        return
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    def from_pretrained(cls, path, subfolder=None, **kwargs):
        where = {"subfolder": subfolder} if subfolder else {}
        return qwen_vl_processor(Qwen2VLImageProcessorPil.from_pretrained(path, **where),
                                 AutoTokenizer.from_pretrained(path, **where))  # fmt: skip

    def save_pretrained(self, path, **kwargs):
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Qwen2VLProcessor, "from_pretrained", classmethod(from_pretrained))
        patch.setattr(Qwen2VLProcessor, "save_pretrained", save_pretrained)
        yield


@pytest.fixture(scope="session")
def qwenimage_edit_dir(tmp_path_factory, qwenimage_dir, qwen_processor_files) -> Path:
    """A tiny QwenImageEditPipeline folder: Qwen-Image's tiny transformer, autoencoder and scheduler, a tiny
    Qwen2.5-VL with a one-block vision tower, and a real ``Qwen2VLProcessor``: a byte-level ``Qwen2Tokenizer`` (no
    merges) with Qwen's special tokens, and the image processor sized so a reference gives a few vision tokens."""
    from diffusers import QwenImageEditPipeline, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    root = tmp_path_factory.mktemp("qwenimage-edit")
    chars = [c for c in _byte_vocab() if not c.endswith("</w>") and not c.startswith("<|")]
    vocab = {c: i for i, c in enumerate(chars + QWEN_SPECIALS)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                               pad_token="<|endoftext|>", model_max_length=512)  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
    torch.manual_seed(0)
    rope = {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, rope_scaling=rope, rope_theta=1e6, vocab_size=len(vocab),
                max_position_embeddings=512)  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                  fullatt_block_indexes=[0])  # fmt: skip
    ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, vocab_size=len(vocab), hidden_size=16, vision_start_token_id=ids[0],
        vision_end_token_id=ids[1], image_token_id=ids[2], video_token_id=ids[3],
    ))  # fmt: skip
    base = QwenImagePipeline.from_pretrained(qwenimage_dir)
    pipe = QwenImageEditPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=text_encoder,
                                 tokenizer=tokenizer, processor=qwen_vl_processor(image_processor, tokenizer),
                                 transformer=base.transformer)  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def qwenimage_edit_plus_dir(tmp_path_factory, qwenimage_edit_dir) -> Path:
    """The tiny Qwen-Image-Edit components saved as a QwenImageEditPlusPipeline folder (the same architecture)."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    root = tmp_path_factory.mktemp("qwenimage-edit-plus")
    QwenImageEditPlusPipeline(**QwenImageEditPipeline.from_pretrained(qwenimage_edit_dir).components).save_pretrained(
        root
    )
    return root


# Mistral's chat format as far as Flux2Pipeline uses it (a system and a user turn, each a list of text parts),
# tokenised here by the byte-level tokenizer standing in for the Pixtral processor's tokenizer
MISTRAL_CHAT = (
    "{% for m in messages %}[{{ m['role'] }}]{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
    "[/{{ m['role'] }}]{% endfor %}"
)


@pytest.fixture(scope="session")
def flux2_dir(tmp_path_factory, clip_dir) -> Path:
    """A tiny Flux2Pipeline folder, as diffusers' own FLUX.2 tests build one: a tiny Mistral 3 of 31 layers (the
    pipeline stacks its hidden states 10, 20 and 30; the byte-level CLIP tokenizer with a Mistral chat template
    stands in for the Pixtral processor, which needs torchvision), a guidance-distilled Flux2Transformer2DModel with
    one double- and one single-stream block, the tiny AutoencoderKLFlux2 of flux2_klein_dir, a shifted Euler."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import CLIPTokenizer, Mistral3Config, Mistral3ForConditionalGeneration

    root = tmp_path_factory.mktemp("flux2")
    torch.manual_seed(0)
    vocab = len(_byte_vocab())
    text = dict(model_type="mistral", vocab_size=vocab, hidden_size=16, intermediate_size=16, num_hidden_layers=31,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512)  # fmt: skip
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8, head_dim=8)  # fmt: skip
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(text_config=text, vision_config=vision, image_token_index=vocab - 1)
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
    )  # fmt: skip
    stats = torch.Generator().manual_seed(1)
    vae.bn.running_mean.copy_(torch.randn(16, generator=stats) * 0.2)
    vae.bn.running_var.copy_(0.5 + torch.rand(16, generator=stats))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    )  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer", model_max_length=320)
    tokenizer.chat_template = MISTRAL_CHAT
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def flux2_klein_dir(tmp_path_factory, clip_dir) -> Path:
    """A tiny Flux2KleinPipeline folder, as diffusers' own FLUX.2 klein tests build one: a tiny Qwen3 of 28 layers (the
    pipeline stacks its hidden states 9, 18 and 27; the byte-level CLIP tokenizer with Qwen's chat template stands in
    for Qwen's), a Flux2Transformer2DModel with one double- and one single-stream block, a tiny AutoencoderKLFlux2
    (factor 2, 4 channels, its batch norm's running statistics set away from 0 / 1), a dynamically shifted Euler."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import CLIPTokenizer, Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("flux2-klein")
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(_byte_vocab()), hidden_size=16, intermediate_size=16,
                                                num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=8, max_position_embeddings=128))  # fmt: skip
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
    )  # fmt: skip
    stats = torch.Generator().manual_seed(1)
    vae.bn.running_mean.copy_(torch.randn(16, generator=stats) * 0.2)
    vae.bn.running_var.copy_(0.5 + torch.rand(16, generator=stats))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer", model_max_length=96)
    tokenizer.chat_template = QWEN_CHAT
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def lumina2_dir(tmp_path_factory, clip_dir) -> Path:
    """A tiny Lumina2Pipeline folder, as diffusers' own Lumina 2 tests build one: a tiny Gemma 2 (the byte-level CLIP
    tokenizer standing in for Gemma's), a Lumina2Transformer2DModel with two layers and two refiner layers each, a
    tiny AutoencoderKL of factor 8 (the pipeline's, which it does not read from the autoencoder) with FLUX.1's shift
    factor, a dynamically shifted Euler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import CLIPTokenizer, Gemma2Config, Gemma2Model

    root = tmp_path_factory.mktemp("lumina2")
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(_byte_vocab()), hidden_size=16, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        pad_token_id=_byte_vocab()["<|endoftext|>"],
    ))  # fmt: skip
    transformer = Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=2,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 4, 4), axes_lens=(300, 64, 64),
        cap_feat_dim=16,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        scaling_factor=1.5, shift_factor=0.1159,  # FLUX.1's VAE, which Lumina 2 uses, centres its latents
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer", model_max_length=256)
    pipe = Lumina2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           transformer=transformer)  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def sana_dir(tmp_path_factory, clip_dir) -> Path:
    """A tiny SanaPipeline folder, as diffusers' own Sana tests build one: a tiny Gemma 2 (the byte-level CLIP
    tokenizer standing in for Gemma's), a one-block SanaTransformer2DModel, a tiny AutoencoderDC (factor 2), Sana's
    DPM-Solver on flow sigmas."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import CLIPTokenizer, Gemma2Config, Gemma2Model

    root = tmp_path_factory.mktemp("sana")
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(_byte_vocab()), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=4096, pad_token_id=_byte_vocab()["<|endoftext|>"],
    ))  # fmt: skip
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )  # fmt: skip
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=16,
    )  # fmt: skip
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer", model_max_length=24)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def pixart_dir(tmp_path_factory, clip_dir, vae_dir) -> Path:
    """A tiny PixArtSigmaPipeline folder, as diffusers' own PixArt tests build one: a tiny T5 encoder (the byte-level
    CLIP tokenizer standing in for T5's), a PixArtTransformer2DModel with a learned-variance half, the tiny VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("pixart")
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(_byte_vocab()), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4))  # fmt: skip
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer", model_max_length=24)
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=AutoencoderKL.from_pretrained(vae_dir),
        transformer=transformer, scheduler=DDIMScheduler(),
    )  # fmt: skip
    pipe.save_pretrained(root)
    return root


def evaluate_and_serve(root: Path, data: Path, final: Path, out: Path, inception: Path, clip: Path, num: int):
    """`sdtrain evaluate` (FID, KID, CLIP score, 2 steps) of an export on ``data``, and a 2-image generation from it
    as the web UI serving ``root`` draws it: ``(fidelity.json's scores, the generated grid)``."""
    import io
    import json

    from sdtrain.cli import main
    from sdtrain.web.app import Models
    from sdtrain.web.files import Root

    args = ["evaluate", "--model", str(final), "--data", str(data), "--out", str(out), "--num", str(num)]
    args += ["--batch-size", str(num // 2), "--inception", str(inception), "--clip-model", str(clip)]
    assert main(args + ["--steps", "2", "--device", "cpu"]) == 0
    model = Root(root).resolve(str(final.relative_to(root)))  # as the web UI finds it: under its root
    png = Models("cpu").draw(model, {"prompt": "a red square", "seed": 0, "num_images_per_prompt": 2})
    return json.loads((out / "fidelity.json").read_text()), Image.open(io.BytesIO(png))


def assert_comfyui_transformer_layout(adapters: dict, pipeline_folder: Path) -> None:
    """The adapters are laid out as ComfyUI reads a diffusers-format transformer LoRA (SD3, Flux, PixArt; its
    comfy/lora.py maps ``transformer.<diffusers weight name minus .weight>`` and reads ``.lora_A.weight`` /
    ``.lora_B.weight``, alpha 1 where none is given): every key names a weight of the pipeline's transformer."""
    from safetensors import safe_open

    with safe_open(str(Path(pipeline_folder, "transformer", "diffusion_pytorch_model.safetensors")), "pt") as f:
        weights = set(f.keys())
    for key in adapters:
        module, _, suffix = key.rpartition(".lora_")
        assert key.startswith("transformer.") and suffix in ("A.weight", "B.weight"), key
        assert module.removeprefix("transformer.") + ".weight" in weights, key


def resumes_and_shares(tmp_path: Path, folder: Path, extra: list[str], tolerance: float = 1e-6) -> None:
    """A family's slow-tier checks on a tiny pipeline folder: SIGKILL mid-accumulation after a checkpoint, then a rerun
    from it, ends with the uninterrupted run's losses and transformer weights bit for bit; 2 processes train what one
    does under DDP (the weights within ``tolerance``: the processes' gradients are summed in another order than one
    process's) and under FSDP2 (each process holding about half of the transformer, a unit per block of its
    ``_no_split_modules``; within 1e-5). The data's 5 images end an epoch mid-batch. (A torn save is the same for
    every family: tests/test_faults.py.)"""
    import re

    from tests.test_distributed import ADAM_EPS, _launch_ddp, _launch_fsdp
    from tests.test_faults import KILLED, _losses, _train

    data = write_image_folder(tmp_path / "data", count=5, size=40)
    extra = ["train.gradient_accumulation=2", "train.num_steps=6", "train.save_every=3", ADAM_EPS, *extra]

    def weights(run: str) -> dict:
        from safetensors.torch import load_file

        return load_file(tmp_path / run / "final" / "transformer" / "diffusion_pytorch_model.safetensors")

    assert _train(pipeline_overrides(tmp_path / "a", data, folder) + extra).returncode == 0
    overrides = pipeline_overrides(tmp_path / "b", data, folder) + extra
    # a kill in step 4's second micro-batch, after the save of step 3: the rerun resumes mid-run from a checkpoint
    assert _train(overrides, "kill_micro=8").returncode == KILLED
    assert (tmp_path / "b" / "checkpoints" / "step-00000003").is_dir()
    assert _train(overrides).returncode == 0
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    a, b = weights("a"), weights("b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = _launch_ddp(pipeline_overrides(tmp_path / "two", data, folder) + extra)
    assert result.returncode == 0 and "world size 2" in result.stderr, result.stderr[-3000:]
    (steps_a, losses_a), (steps_b, losses_b) = zip(*_losses(tmp_path / "a")), zip(*_losses(tmp_path / "two"))
    assert steps_a == steps_b and losses_b == pytest.approx(losses_a, rel=1e-5)
    two = weights("two")
    assert max((a[k] - two[k]).abs().max().item() for k in a) < tolerance
    result = _launch_fsdp(pipeline_overrides(tmp_path / "fsdp", data, folder) + extra)
    assert result.returncode == 0, result.stderr[-3000:]
    units, held, total = map(
        int, re.search(r"(\d+) units; this process holds (\d+) of the denoiser's (\d+)", result.stderr).groups()
    )
    assert units > 2 and held < 0.6 * total  # its blocks sharded, not the whole model as one unit
    assert [s for s, _ in _losses(tmp_path / "fsdp")] == list(steps_a)
    assert [loss for _, loss in _losses(tmp_path / "fsdp")] == pytest.approx(list(losses_a), rel=1e-5)
    sharded = weights("fsdp")
    assert max((a[k] - sharded[k]).abs().max().item() for k in a) < 1e-5
