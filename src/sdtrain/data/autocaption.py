"""``sdtrain caption FOLDER``: captions for the images of a folder that have none, written by a vision-language model
through transformers (``AutoModelForImageTextToText`` with its processor's chat template: Qwen2.5-VL, Qwen3-VL,
SmolVLM, LLaVA, Gemma 3 and the like, from a hub id or a folder).

Each caption is the model's greedy answer to one instruction about the image, made one line, with the trigger word
put in front where one is given; it is written as ``NAME.txt`` beside the image (whole, through a temporary file),
so an interrupted run keeps what it wrote and a rerun captions only the rest. Images with a caption already
(``.txt`` or ``.caption``) are left alone unless ``overwrite``; loss masks (``NAME.mask.png``) are not images to
caption; an image that cannot be decoded is skipped and counted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtrain.data.captions import with_trigger
from sdtrain.data.decode import DataError, Skip, SkipCounter, decode_image
from sdtrain.data.sources import CAPTION_SUFFIXES, IMAGE_SUFFIXES, is_mask_file
from sdtrain.errors import MissingPackage

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"  # 7.5 GB in bf16: a 12 GB card captions beside nothing else
DEFAULT_PROMPT = (
    "Write one caption for this image, as for training a text-to-image model: the subject, its appearance, what it "
    "does, the setting, the lighting and the style, in one sentence. Do not begin with 'The image' or 'This image'."
)


@dataclass
class CaptionReport:
    """What :func:`caption_folder` did: the captions written, the images left as they were (captioned already), and
    the images skipped by reason."""

    written: list[Path] = field(default_factory=list)
    kept: int = 0
    skipped: SkipCounter = field(default_factory=SkipCounter)


def to_caption(folder: Path, overwrite: bool = False) -> tuple[list[Path], int]:
    """The images of ``folder`` to caption (sorted), and how many already have a caption (left alone)."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask_file(p))
    if overwrite:
        return images, 0
    todo = [p for p in images if not any(p.with_suffix(s).exists() for s in CAPTION_SUFFIXES)]
    return todo, len(images) - len(todo)


def one_line(text: str) -> str:
    """A model's answer as one caption line: whitespace collapsed, surrounding quotes gone."""
    return " ".join(text.split()).strip().strip('"').strip()


def load_captioner(model: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """``(processor, model)`` of a vision-language model, the processor padding on the left (batched generation)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
    except ImportError as e:  # Qwen-VL's video processor, for one, needs torchvision
        raise MissingPackage(f"the captioning model {model} needs a package its processor imports ({e}); install "
                             "it (torchvision: the build that matches your torch)") from e  # fmt: skip
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
    return processor, net.to(device).eval()


@torch.no_grad()
def describe(processor, model, images: list, prompt: str, max_new_tokens: int) -> list[str]:
    """The model's greedy caption of each image, asked ``prompt`` through its chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True)
    inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [one_line(a) for a in answers]


def caption_folder(
    folder: str | Path,
    model: str = DEFAULT_MODEL,
    prompt: str = DEFAULT_PROMPT,
    trigger: str | None = None,
    overwrite: bool = False,
    batch_size: int = 4,
    max_new_tokens: int = 96,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> CaptionReport:
    """Caption the images of ``folder`` that have no caption (see the module docstring).

    Args:
        folder: a folder of images.
        model: a vision-language model, hub id or folder, that ``AutoModelForImageTextToText`` loads.
        prompt: the instruction the model answers for each image.
        trigger: a word put in front of every caption (``WORD, caption``).
        overwrite: caption images that have a caption too (their ``.txt`` is replaced).
        batch_size: images captioned at once.
        max_new_tokens: the longest caption, in tokens.
        device: where the model runs (default: CUDA if available, in bf16 there; float32 on the CPU).
        trust_remote_code: let the model's own code run.

    Raises:
        DataError: ``folder`` is not a folder.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    todo, kept = to_caption(folder, overwrite)
    report = CaptionReport(kept=kept)
    if not todo:
        return report
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if where.type == "cuda" else torch.float32
    processor, net = load_captioner(model, where, dtype, trust_remote_code)
    with tqdm(total=len(todo), desc="caption", unit="image") as bar:
        for start in range(0, len(todo), batch_size):
            paths, images = [], []
            for path in todo[start : start + batch_size]:
                try:
                    images.append(decode_image(path, cover=(768, 768)))  # the processor resizes it anyway
                    paths.append(path)
                except Skip as skip:
                    report.skipped.update([skip.reason])
            for path, answer in zip(paths, describe(processor, net, images, prompt, max_new_tokens) if images else []):
                tmp = path.with_name(f".{path.stem}.txt.tmp")
                tmp.write_text(with_trigger(answer, trigger) + "\n")
                os.replace(tmp, path.with_suffix(".txt"))
                report.written.append(path.with_suffix(".txt"))
            bar.update(len(todo[start : start + batch_size]))
    if report.skipped:
        logger.warning("skipped: %s", report.skipped.summary())
    return report
