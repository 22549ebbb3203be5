"""Textual inversion's new tokens (``train.textual_inversion``): each added to a tokenizer with its own embedding rows
in the text encoder, the only weights of the encoder that train; and the files people load them from.

A token with ``vectors`` > 1 is added as ``TOKEN TOKEN_1 ... TOKEN_{n-1}`` and a prompt's ``TOKEN`` stands for all of
them, the convention of diffusers' ``load_textual_inversion`` (whose pipelines expand prompts so:
:func:`expand_prompts` is the same rule for training). The encoder's input embedding becomes a
:class:`NewTokenEmbedding`: the frozen table (in whatever precision it is held) and a small float32 matrix of the
new rows, so the optimizer holds moments for the new rows alone and nothing else of the table can move (diffusers'
script trains the whole table and restores the old rows after every step). Exports merge the rows into a plain
``nn.Embedding`` (:func:`merged_tables`) and write one file per token in the layout A1111 and ComfyUI load
(``emb_params`` for one encoder; ``clip_l`` / ``clip_g`` for SDXL's two), which ``load_textual_inversion`` reads too.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

EMBEDDINGS_FOLDER = "embeddings"


class NewTokenEmbedding(torch.nn.Module):
    """An embedding table with rows appended: ids below ``first`` read the frozen ``base``, ids from ``first`` on
    read ``rows`` (trainable, float32, cast to the base's dtype in the forward)."""

    def __init__(self, base: torch.nn.Embedding, first: int, rows: torch.Tensor, groups: dict[str, list[int]]):
        super().__init__()
        self.base, self.first = base, first
        self.rows = torch.nn.Parameter(rows.detach().float().clone())
        self.groups = groups  # each new token's rows (its vectors), by token

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        known = self.base(ids.clamp(max=self.first - 1))
        new = self.rows.to(known.dtype)[(ids - self.first).clamp(min=0, max=len(self.rows) - 1)]
        return torch.where((ids >= self.first).unsqueeze(-1), new, known)

    @property
    def weight(self) -> torch.Tensor:
        """The merged table (no gradient), for what reads an embedding's weight."""
        return self.merged().weight

    def merged(self) -> torch.nn.Embedding:
        """A plain embedding holding the base rows and the new ones (at their ids), in the base's dtype."""
        base = self.base.weight.detach()
        size = max(base.shape[0], self.first + len(self.rows))
        table = torch.nn.Embedding(size, base.shape[1], padding_idx=self.base.padding_idx, device=base.device,
                                   dtype=base.dtype)  # fmt: skip
        with torch.no_grad():
            table.weight[: base.shape[0]] = base
            table.weight[self.first : self.first + len(self.rows)] = self.rows.to(base.dtype)
        table.requires_grad_(self.base.weight.requires_grad)
        return table


def token_names(token: str, vectors: int) -> list[str]:
    """The tokenizer entries of ``token`` with ``vectors`` vectors: ``[TOKEN, TOKEN_1, ...]`` (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def pieces(tokenizer, word: str) -> list[str]:
    """The tokens ``tokenizer`` reads ``word`` as."""
    return tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids)


def check_tokens(tokenizer, tokens: list[str], init: list[str], name: str = "tokenizer") -> None:
    """What :func:`add_tokens` would refuse, before any work: a token the tokenizer already reads as one token of its
    own (it would not be new: its meaning would change in every prompt that holds it), an init word it reads as no
    tokens.

    Raises:
        ValueError: naming the token or word.
    """
    for token in tokens:
        if len(pieces(tokenizer, token)) == 1:
            raise ValueError(f"train.textual_inversion.tokens: {token!r} is already a token of the {name}: choose a "
                             "string it does not know, such as '<zqx>'")  # fmt: skip
    for word in init:
        if not pieces(tokenizer, word):
            raise ValueError(f"train.textual_inversion.init: the {name} reads {word!r} as no tokens")


def check_trigger(tokenizer, trigger: str, new: list[str], key: str, name: str = "tokenizer") -> None:
    """Each word of a trigger is one token of ``tokenizer`` (or one of the ``new`` tokens): a word split into pieces
    teaches the pieces, each of which other prompts also hold (DreamBooth's advice: a rare single token).

    Raises:
        ValueError: naming the word, its pieces and the ways out.
    """
    for word in trigger.split():
        split = pieces(tokenizer, word)
        if word not in new and len(split) > 1:
            raise ValueError(
                f"{key}={trigger!r}: the {name} splits {word!r} into {len(split)} tokens {split}, so the concept is "
                "learned by pieces that other words share: choose a word it reads as one token (check with "
                "tokenizer.tokenize), teach the word as a new token (train.textual_inversion.tokens), or set "
                "data.allow_split_trigger=true"
            )


def add_tokens(tokenizer, text_encoder, tokens: list[str], init: list[str], vectors: int = 1) -> list[int]:
    """Add ``tokens`` (each ``vectors`` entries) to ``tokenizer`` and their rows to ``text_encoder``, each row the
    mean embedding of its ``init`` word's tokens; only the new rows train. Returns the new ids.

    Raises:
        ValueError: as :func:`check_tokens`.
    """
    check_tokens(tokenizer, tokens, init)
    table = text_encoder.get_input_embeddings()
    names = [n for token in tokens for n in token_names(token, vectors)]
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    first = ids[0]
    if ids != list(range(first, first + len(ids))):
        raise ValueError(f"the tokenizer gave the new tokens ids {ids}, not consecutive ones")
    rows = []
    with torch.no_grad():
        for word in init:
            start = table.weight[tokenizer(word, add_special_tokens=False).input_ids].float().mean(dim=0)
            rows += [start] * vectors
    groups = {token: list(range(i * vectors, (i + 1) * vectors)) for i, token in enumerate(tokens)}
    text_encoder.set_input_embeddings(NewTokenEmbedding(table, first, torch.stack(rows), groups))
    return ids


def new_tokens(text_encoder) -> NewTokenEmbedding | None:
    """The encoder's :class:`NewTokenEmbedding`, if it has new tokens."""
    table = text_encoder.get_input_embeddings()
    return table if isinstance(table, NewTokenEmbedding) else None


def expand_prompts(prompts: list[str], tokenizer) -> list[str]:
    """Each prompt's multi-vector tokens written out (``TOKEN`` -> ``TOKEN TOKEN_1 ...``), as diffusers' pipelines
    do before tokenizing (``TextualInversionLoaderMixin.maybe_convert_prompt``)."""
    added = tokenizer.added_tokens_encoder
    out = []
    for prompt in prompts:
        for token in sorted({t for t in tokenizer.tokenize(prompt) if t in added and f"{t}_1" in added}):
            names, i = [token], 1
            while f"{token}_{i}" in added:
                names.append(f"{token}_{i}")
                i += 1
            prompt = prompt.replace(token, " ".join(names))
        out.append(prompt)
    return out


@contextlib.contextmanager
def merged_tables(text_encoders: list[torch.nn.Module]):
    """Within: every encoder with new tokens holds a plain merged embedding and says its size in its config
    (``vocab_size``, as ``resize_token_embeddings`` leaves it): what a saved model must hold."""
    swapped = [(e, t, e.config.vocab_size) for e in text_encoders if (t := new_tokens(e)) is not None]
    for encoder, table, _ in swapped:
        merged = table.merged()
        encoder.set_input_embeddings(merged)
        encoder.config.vocab_size = merged.num_embeddings
    try:
        yield
    finally:
        for encoder, table, size in swapped:
            encoder.set_input_embeddings(table)
            encoder.config.vocab_size = size


def file_name(token: str) -> str:
    """A token's embedding file name: its word characters (``<zqx>`` -> ``zqx.safetensors``), the name A1111 and
    ComfyUI prompts call it by."""
    return (re.sub(r"[^\w.-]", "", token) or "embedding") + ".safetensors"


def save_embeddings(text_encoders: dict[str, torch.nn.Module], keys: dict[str, str], out_dir: Path) -> list[Path]:
    """One file per new token in ``out_dir``: its vectors in each encoder under that encoder's key (``keys``, by
    encoder name: ``emb_params`` for SD 1.x / 2.x, ``clip_l`` / ``clip_g`` for SDXL), float32. None: no new tokens."""
    from safetensors.torch import save_file

    tables = {name: table for name, encoder in text_encoders.items() if (table := new_tokens(encoder)) is not None}
    if not tables:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for token in next(iter(tables.values())).groups:
        tensors = {keys[name]: t.rows.detach()[t.groups[token]].float().cpu() for name, t in tables.items()}
        path = out_dir / file_name(token)
        save_file(tensors, path, metadata={"token": token})
        written.append(path)
    return written
