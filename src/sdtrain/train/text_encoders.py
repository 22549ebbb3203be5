"""Training the text encoders with the denoiser (``train.text_encoder``: LoRA adapters or every weight, at their own
learning rate), as kohya-ss' and OneTrainer's SD and SDXL trainers offer; and textual inversion
(``train.textual_inversion``: new tokens whose embedding rows alone train, :mod:`sdtrain.models.embeddings`), alone
with the denoiser frozen, or with the denoiser's LoRA (pivotal tuning).

The loop trains one module either way. With frozen encoders it is the denoiser, called through the family's
``predict``. With trained ones it is :class:`WithTextEncoders`: the denoiser and the encoders in one module whose
``forward`` encodes the batch's token ids (the data layer serves tokens, :func:`data_encoders`) and calls the
denoiser, so that DDP, the optimizer, EMA and checkpoints see all trained weights as one model. What samples and
exports takes the encoders back out (:func:`components_with`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

from sdtrain.config import ConfigError, TrainConfig
from sdtrain.models.embeddings import add_tokens, expand_prompts
from sdtrain.models.families import Conditioning, Encoders, Family
from sdtrain.models.lora import add_text_lora


class WithTextEncoders(torch.nn.Module):
    """The denoiser and the text encoders that train with it: ``forward(noisy, timesteps, tokens)`` encodes the
    tokens (the family's ``encode_tokens``) and returns the denoiser's output (the family's ``predict``)."""

    def __init__(self, family: Family, denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module]):
        super().__init__()
        self.family = family  # not a module: its functions only
        self.denoiser = denoiser
        self.text_encoders = torch.nn.ModuleDict(text_encoders)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        encoded = self.family.encode_tokens(dict(self.text_encoders), cond)
        return self.family.predict(self.denoiser, noisy, timesteps, encoded)

    @property
    def config(self):
        """The denoiser's config (what sample sizes and exports read)."""
        return self.denoiser.config

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()
        for encoder in self.text_encoders.values():
            encoder.gradient_checkpointing_enable()


def predict_with_text(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning):
    """The ``predict`` of a :class:`WithTextEncoders` (through its ``forward``, so that DDP sees the call)."""
    return model(noisy, timesteps, cond)


def trains_text(tc: TrainConfig) -> bool:
    """Whether the text encoders run with gradients every step: they train, or new tokens' rows do."""
    return tc.text_encoder.mode != "frozen" or bool(tc.textual_inversion.tokens)


def denoiser_frozen(tc: TrainConfig) -> bool:
    """Textual inversion alone: new tokens without the denoiser's LoRA leave the denoiser as it is."""
    return bool(tc.textual_inversion.tokens) and not tc.lora.rank


def tokenizer_of(components, encoder: str):
    """The tokenizer of a text encoder: ``text_encoder_2``'s is ``tokenizer_2``."""
    return getattr(components, encoder.replace("text_encoder", "tokenizer"))


def check(family: Family, tc: TrainConfig, text_dtypes: list[torch.dtype] | None = None) -> None:
    """Whether the family can train its text encoders as ``tc`` asks.

    Raises:
        ValueError: the family's encoders only stay frozen, or an encoder is loaded in half precision.
    """
    if not trains_text(tc):
        return
    if family.tokenize is None or not family.text_encoders:
        if tc.text_encoder.mode == "frozen":
            raise ConfigError(f"train.textual_inversion: new tokens are trained for the families whose text encoders "
                              f"train (sd, sdxl), not {family.name}")  # fmt: skip
        raise ConfigError(f"train.text_encoder.mode={tc.text_encoder.mode}: {family.name} models train with frozen "
                         "text encoders here (train.text_encoder.mode=frozen)")  # fmt: skip
    if tc.text_encoder.mode != "frozen" and text_dtypes and any(d != torch.float32 for d in text_dtypes):
        raise ConfigError("trained text encoders keep float32 weights: set model.text_encoder*.dtype=float32")


def prepare(family: Family, components, denoiser: torch.nn.Module, tc: TrainConfig) -> torch.nn.Module:
    """What trains: ``denoiser`` alone, or with the text encoders (adapters added, or every weight unfrozen)."""
    if not trains_text(tc):
        return denoiser
    encoders = {name: getattr(components, name) for name in family.text_encoders}
    check(family, tc, [e.dtype for e in encoders.values()])
    ti = tc.textual_inversion
    for name, encoder in encoders.items():
        if tc.text_encoder.mode == "lora":
            add_text_lora(encoder, tc.text_encoder)
        else:
            encoder.requires_grad_(tc.text_encoder.mode == "full")
        if ti.tokens:  # the new rows train, whatever else does
            try:
                add_tokens(tokenizer_of(components, name), encoder, ti.tokens, ti.init, ti.vectors)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        encoder.train()
    if denoiser_frozen(tc):
        denoiser.requires_grad_(False)
    return WithTextEncoders(family, denoiser, encoders)


def predictor(family: Family, tc: TrainConfig):
    """The call of what :func:`prepare` returns: ``(model, noisy, timesteps, cond) -> output``."""
    return predict_with_text if trains_text(tc) else family.predict


def components_with(family: Family, components, model: torch.nn.Module):
    """``components`` with ``model``'s weights: the denoiser, and the text encoders where they trained."""
    if isinstance(model, WithTextEncoders):
        components = dataclasses.replace(components, **dict(model.text_encoders))
        model = model.denoiser
    return family.with_denoiser(components, model)


def frozen(family: Family, components, tc: TrainConfig) -> dict[str, torch.nn.Module]:
    """The family's frozen modules less the text encoders that train."""
    trained = family.text_encoders if trains_text(tc) else ()
    return {k: v for k, v in family.frozen(components).items() if k not in trained}


def data_encoders(family: Family, components, tc: TrainConfig) -> Encoders:
    """What the data layer encodes with: the family's frozen encoding, or, when the encoders train, their tokens
    (the caches' fingerprint then holds the tokenizers, not the encoders' weights)."""
    encoders = family.encoders(components)
    if not trains_text(tc):
        return encoders
    tokenizers = [tokenizer_of(components, name) for name in family.text_encoders]
    first = getattr(components, family.text_encoders[0])

    def encode_text(prompts: list[str]) -> Conditioning:  # multi-vector tokens written out, as the pipelines do
        tokens = family.tokenize(components, expand_prompts(prompts, tokenizers[0]))
        return {k: v.to(first.device) for k, v in tokens.items()}

    return dataclasses.replace(
        encoders,
        encode_text=encode_text,
        text_identity=lambda: {"tokens": [_tokenizer_identity(t) for t in tokenizers]},
    )


def _tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What a tokenizer's ids depend on: its class, vocabulary (hashed) and length."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "vocab": hashlib.sha256(vocab.encode()).hexdigest()[:16],
        "max_length": tokenizer.model_max_length,
    }


def lr_scale(name: str, tc: TrainConfig) -> float:
    """The learning-rate scale of parameter ``name`` of what trains: the new tokens' or the text encoders' lr over the
    denoiser's."""
    if not (trains_text(tc) and name.startswith("text_encoders.")):
        return 1.0
    if name.endswith(".rows") and tc.textual_inversion.lr is not None:  # a NewTokenEmbedding's rows
        return tc.textual_inversion.lr / tc.optim.lr
    if not name.endswith(".rows") and tc.text_encoder.lr is not None:
        return tc.text_encoder.lr / tc.optim.lr
    return 1.0
