"""``sdtrain caption``: a tiny random vision-language model (LLaVA-shaped, built and saved offline, loaded back through
AutoProcessor / AutoModelForImageTextToText as a hub model would be) captions the images that have no caption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sdtrain.cli import main
from sdtrain.data.autocaption import caption_folder, one_line

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "describe", "the", "image"]
WORDS += [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA (CLIP vision tower, Llama text model) with a word-level tokenizer and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )  # fmt: skip

    root = tmp_path_factory.mktemp("vlm")
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")  # fmt: skip
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
        "{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8, num_additional_image_tokens=1,
                   vision_feature_select_strategy="default", chat_template=template).save_pretrained(root)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)  # fmt: skip
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=4,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)  # fmt: skip
    LlavaForConditionalGeneration(config).save_pretrained(root)
    return root


def _folder(root: Path) -> Path:
    root.mkdir()
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]):
        Image.new("RGB", (40, 32), colour).save(root / f"{i}.png")
    (root / "1.txt").write_text("a green picture\n")  # captioned already
    Image.new("L", (40, 32), 255).save(root / "0.mask.png")  # a mask, not an image to caption
    (root / "broken.png").write_bytes(b"not a png")
    return root


def test_images_without_captions_are_captioned_with_the_trigger(tmp_path, vlm_dir):
    folder = _folder(tmp_path / "images")
    report = caption_folder(folder, str(vlm_dir), "describe the image", trigger="zqx", batch_size=2,
                            max_new_tokens=4, device="cpu")  # fmt: skip
    assert sorted(p.name for p in report.written) == ["0.txt", "2.txt", "3.txt"]
    assert report.kept == 1 and dict(report.skipped) == {"not_an_image": 1}
    assert (folder / "1.txt").read_text() == "a green picture\n"  # left alone
    assert not (folder / "0.mask.txt").exists()
    for name in ("0", "2", "3"):
        caption = (folder / f"{name}.txt").read_text()
        words = caption.strip().split(", ", 1)
        assert words[0] == "zqx" and len(words[1].split()) == 4 and all(w in WORDS for w in words[1].split())
    # a rerun has nothing left to do; --overwrite captions every image, the same answers for the same images
    assert caption_folder(folder, str(vlm_dir), "describe the image", max_new_tokens=4, device="cpu").written == []
    before = (folder / "2.txt").read_text()
    assert main(["caption", str(folder), "--model", str(vlm_dir), "--prompt", "describe the image", "--trigger",
                 "zqx", "--overwrite", "--max-new-tokens", "4", "--device", "cpu"]) == 0  # fmt: skip
    assert (folder / "1.txt").read_text() != "a green picture\n" and (folder / "2.txt").read_text() == before


def test_an_answer_becomes_one_line():
    assert one_line('  "A red\n square  on white." ') == "A red square on white."
