"""Captions for teaching a subject or a style from a few images: a trigger word, and tags shuffled or dropped each time
a caption is drawn (kohya's ``shuffle_caption`` / ``keep_tokens`` / ``caption_tag_dropout_rate``).

A caption is read as comma-separated tags. ``data.trigger`` replaces ``[trigger]`` wherever a caption holds it and
is put in front of a caption that does not (``WORD, caption``); ``sample_prompts`` get the same replacement (not the
prepending: a prompt without ``[trigger]`` is asked as written). ``data.shuffle_tags`` reorders the tags past the
first ``data.keep_tokens``; ``data.tag_dropout`` drops each of them with that probability, never the tag holding
``[trigger]``, and a prepended trigger stays first, since the tags are edited before it is put in. The edits draw
from the sample's own seeded generator (the one that chooses its crop and flip), so a resumed run and any number of
data workers edit alike. A latent cache encodes each caption once: the trigger reaches it, the per-draw edits cannot
(the config refuses them together).
"""

from __future__ import annotations

import random

from sdtrain.config import DataConfig
from sdtrain.data.decode import caption_options, choose_caption

TRIGGER = "[trigger]"


def with_trigger(caption: str, trigger: str | None) -> str:
    """``caption`` with ``[trigger]`` replaced by ``trigger``, or ``trigger`` in front where it has none; as it is
    without a trigger."""
    if not trigger:
        return caption
    if TRIGGER in caption:
        return caption.replace(TRIGGER, trigger)
    return f"{trigger}, {caption}" if caption else trigger


def in_prompts(prompts: list[str], trigger: str | None) -> list[str]:
    """Sample prompts with ``[trigger]`` replaced (a prompt without it is left as written)."""
    return [p.replace(TRIGGER, trigger) if trigger else p for p in prompts]


def edit_tags(caption: str, rng: random.Random, keep: int = 0, shuffle: bool = False, dropout: float = 0.0) -> str:
    """The tags of ``caption`` past the first ``keep``, each dropped with probability ``dropout`` (never one holding
    ``[trigger]``), then shuffled; joined by ``", "``."""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    head, tail = tags[:keep], tags[keep:]
    if dropout:
        tail = [tag for tag in tail if rng.random() >= dropout or TRIGGER in tag]
    if shuffle:
        rng.shuffle(tail)
    return ", ".join(head + tail)


def training_caption(caption: object, rng: random.Random, config: DataConfig) -> str:
    """The training caption of a sample read online: one option chosen, its tags edited as ``config`` asks (drawing
    from ``rng``, the sample's seeded generator), the trigger put in."""
    text = choose_caption(caption, rng)
    if config.shuffle_tags or config.tag_dropout:
        text = edit_tags(text, rng, config.keep_tokens, config.shuffle_tags, config.tag_dropout)
    return with_trigger(text, config.trigger)


def cached_captions(caption: object, config: DataConfig) -> list[str]:
    """Every option of a caption with the trigger put in, as a latent cache encodes them."""
    return [with_trigger(text, config.trigger) for text in caption_options(caption)]
