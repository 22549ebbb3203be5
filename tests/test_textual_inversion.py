"""Textual inversion and pivotal tuning (``train.textual_inversion``): new tokens whose embedding rows alone train,
encoded in training as the exported pipeline and the base pipeline with the embedding file loaded by diffusers'
``load_textual_inversion`` encode them; bad tokens and triggers refused before any work."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from sdtrain.config import Config, ConfigError, ObjectiveConfig, load_config
from sdtrain.models.embeddings import NewTokenEmbedding, expand_prompts
from sdtrain.models.families import for_config
from sdtrain.train import text_encoders
from sdtrain.train.export import export_pipeline
from sdtrain.train.loop import train
from sdtrain.train.preflight import check_run
from tests.conftest import pipeline_overrides, save_pipeline, tiny_unet, write_image_folder

PROMPT = "a <zqx> square"
TI = ["train.textual_inversion.tokens=['<zqx>']", "train.textual_inversion.init=[square]"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, clip_dir, vae_dir):
    return save_pipeline(tmp_path_factory.mktemp("ti-base"), tiny_unet(), clip_dir, vae_dir)


def _load_embedding(pipe, family, path):
    """The exported file loaded into the base pipeline as its users would (SDXL: each encoder's vectors)."""
    if family.name == "sd":
        pipe.load_textual_inversion(str(path), token="<zqx>")
        return
    tensors = load_file(path)
    pipe.load_textual_inversion(tensors["clip_l"], token="<zqx>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)  # fmt: skip
    pipe.load_textual_inversion(tensors["clip_g"], token="<zqx>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip


def _pipeline_encoding(pipe, family) -> dict[str, torch.Tensor]:
    out = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": out[0]} | ({"text_embeds": out[2]} if family.name == "sdxl" else {})


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_new_tokens_encode_alike_in_training_the_export_and_load_textual_inversion(tmp_path, name, sd_dir, sdxl_dir):
    folder = sd_dir if name == "sd" else sdxl_dir
    config = load_config(Config, None, [f"model.pretrained={folder}", *TI, "train.textual_inversion.vectors=2"])
    family = for_config(config.model)
    components = family.load(config)
    model = text_encoders.prepare(family, components, family.denoiser_of(components), config.train)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("text_encoders.") and n.endswith(".rows") for n in trained)
    for encoder in model.text_encoders.values():  # as after training: rows away from their init
        table = encoder.get_input_embeddings()
        assert isinstance(table, NewTokenEmbedding) and table.rows.shape[0] == 2
        table.rows.data += torch.randn_like(table.rows)
    tokenizer = components.tokenizer
    assert expand_prompts([PROMPT], tokenizer) == ["a <zqx> <zqx>_1 square"]  # diffusers' multi-vector convention
    tokens = text_encoders.data_encoders(family, components, config.train).encode_text([PROMPT])
    with torch.no_grad():
        training = family.encode_tokens(dict(model.text_encoders), tokens)

    out = export_pipeline(family, text_encoders.components_with(family, components, model), ObjectiveConfig(),
                          tmp_path / "final")  # fmt: skip
    file = out / "embeddings" / "zqx.safetensors"
    keys = {"sd": ["emb_params"], "sdxl": ["clip_g", "clip_l"]}[name]
    assert sorted(load_file(file)) == keys and load_file(file)[keys[0]].shape[0] == 2
    exported = family.txt2img.from_pretrained(out)
    base = family.txt2img.from_pretrained(folder)
    _load_embedding(base, family, file)
    for pipe in (exported, base):
        encoded = _pipeline_encoding(pipe, family)
        for key, value in encoded.items():
            torch.testing.assert_close(value, training[key], rtol=0, atol=1e-5)
    plain = _pipeline_encoding(family.txt2img.from_pretrained(folder), family)  # without the token: another prompt
    assert not torch.allclose(plain["encoder_hidden_states"], training["encoder_hidden_states"])


@pytest.mark.parametrize("pivotal", [False, True])
def test_textual_inversion_trains_the_new_rows_alone_or_with_lora(tmp_path, sd_dir, pivotal):
    data = write_image_folder(tmp_path / "data", count=4)
    overrides = pipeline_overrides(tmp_path / "run", data, sd_dir) + TI + [
        "data.trigger='<zqx>'", "train.num_steps=3", "train.ema_decay=null", "train.textual_inversion.lr=5e-2",
        "train.sample_prompts=['a [trigger] square']",
    ]  # fmt: skip
    if pivotal:
        overrides += ["train.lora.rank=4"]
    final = train(load_config(Config, None, overrides))
    base_te = load_file(sd_dir / "text_encoder" / "model.safetensors")
    te = load_file(final / "text_encoder" / "model.safetensors")
    key = next(k for k in base_te if k.endswith("token_embedding.weight"))
    old, new = base_te[key], te[key]
    assert new.shape[0] == old.shape[0] + 1 and torch.equal(new[: old.shape[0]], old)  # the old rows as they were
    assert all(torch.equal(te[k], base_te[k]) for k in base_te if k != key)  # and every other encoder weight
    init = old[CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")("square", add_special_tokens=False).input_ids]
    assert (new[-1] - init.mean(dim=0)).abs().max() > 1e-3  # the new row trained away from where it started
    assert (final.parent / "samples").is_dir()  # sampled with the new token in the prompt
    emb = load_file(final / "embeddings" / "zqx.safetensors")["emb_params"]
    assert torch.equal(emb[0], new[-1])  # the file holds the row the export holds
    base_unet = load_file(sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    unet = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    same = all(torch.equal(unet[k], base_unet[k]) for k in base_unet)
    assert same != pivotal  # textual inversion alone leaves the denoiser; pivotal tuning trains its LoRA too
    assert (final / "lora").is_dir() == pivotal


def test_a_new_row_starts_at_its_init_words_mean_embedding(tmp_path, sd_dir):
    config = load_config(Config, None, [f"model.pretrained={sd_dir}", *TI])
    family = for_config(config.model)
    components = family.load(config)
    base_table = components.text_encoder.get_input_embeddings().weight.detach().clone()
    model = text_encoders.prepare(family, components, family.denoiser_of(components), config.train)
    table = model.text_encoders["text_encoder"].get_input_embeddings()
    ids = components.tokenizer("square", add_special_tokens=False).input_ids
    torch.testing.assert_close(table.rows[0], base_table[ids].mean(dim=0))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.textual_inversion.tokens=[z]", "train.textual_inversion.init=[square]"], "'z' is already a token"),
        (["data.trigger=zqx"], r"splits 'zqx' into 3 tokens"),
        (["data.datasets=[{path: DATA, trigger: ab}]"], r"data.datasets\[0\].trigger='ab'"),
    ],
)
def test_known_tokens_and_split_triggers_are_refused_before_any_work(tmp_path, sd_dir, extra, message):
    data = write_image_folder(tmp_path / "data", count=2)
    overrides = pipeline_overrides(tmp_path / "run", data, sd_dir) + [e.replace("DATA", str(data)) for e in extra]
    with pytest.raises(ConfigError, match=message):
        check_run(load_config(Config, None, overrides))
    assert not (tmp_path / "run").exists()
    if "trigger" in message:  # allowed when asked for
        check_run(load_config(Config, None, overrides + ["data.allow_split_trigger=true"]))


def test_textual_inversion_settings_that_cannot_work_are_refused(flux_dir):
    with pytest.raises(ConfigError, match="one word per token"):
        load_config(Config, None, ["model.pretrained=x", "train.textual_inversion.tokens=['<a>', '<b>']",
                                   "train.textual_inversion.init=[dog]"])  # fmt: skip
    with pytest.raises(ConfigError, match="not flux"):
        check_run(load_config(Config, None, [f"model.pretrained={flux_dir}", *TI]), data=False)
