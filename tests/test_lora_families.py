"""The LoRA variants on the transformer families (SD's UNet has its own tests in test_engine.py): LoHa and LoKr export
peft's layout, which loads into the base transformer as the merged export, and the LyCORIS-named file ComfyUI loads
(``transformer.<module>.hada_w1_a`` …), whose update, applied as ComfyUI's loaders apply it, gives the merged weights;
DoRA's file loads into the family's plain pipeline with ``load_lora_weights`` and draws the merged export's pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.models.families import families
from sdtrain.train.loop import train
from tests.conftest import pipeline_overrides, write_image_folder
from tests.test_engine import _lycoris_update

LENGTHS = {"qwenimage": 256, "flux2_klein": 96, "zimage": 96, "chroma": 32}  # the tiny tokenizers' lengths


def _fine_tune(tmp_path, folder, family: str, variant: str):
    data = write_image_folder(tmp_path / "data", count=4, size=32)
    extra = ["train.lora.rank=4", "train.lora.alpha=2", "train.optim.lr=1e-2", "train.ema_decay=null",
             "train.num_steps=2", f"train.lora.variant={variant}", f"model.text_encoder.max_length={LENGTHS[family]}",
             "train.objective.timestep_sampling=logit_normal"]  # fmt: skip
    return train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, folder) + extra))


@pytest.mark.parametrize("family, variant", [("qwenimage", "loha"), ("flux2_klein", "lokr")])
def test_loha_and_lokr_on_a_transformer_export_for_peft_and_comfyui(tmp_path, request, family, variant):
    import peft

    folder = request.getfixturevalue(f"{family}_dir")
    final = _fine_tune(tmp_path, folder, family, variant)
    fam = families()[family.replace("_", "-")]
    weights = "transformer/diffusion_pytorch_model.safetensors"
    base, merged = load_file(folder / weights), load_file(final / weights)
    # peft's layout: injected into the base transformer and loaded, it computes the merged weights' update
    transformer = fam.components_of(fam.txt2img.from_pretrained(folder)).transformer
    config = peft.PeftConfig.from_pretrained(final / "lora")
    assert type(config).__name__ == {"loha": "LoHaConfig", "lokr": "LoKrConfig"}[variant]
    peft.inject_adapter_in_model(config, transformer, adapter_name="default")
    result = peft.set_peft_model_state_dict(transformer, load_file(final / "lora" / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    adapted = {name for name, module in transformer.named_modules() if hasattr(module, "get_delta_weight")}
    for name in adapted:
        with torch.no_grad():
            rebuilt = base[f"{name}.weight"] + transformer.get_submodule(name).get_delta_weight("default")
        assert torch.allclose(rebuilt, merged[f"{name}.weight"], atol=1e-6), name
    assert any(not torch.equal(base[f"{name}.weight"], merged[f"{name}.weight"]) for name in adapted)
    # the LyCORIS file: every module by its diffusers name behind "transformer.", the prefix ComfyUI maps for the
    # family; the base weight plus ComfyUI's update is the merged weight
    layers: dict[str, dict] = {}
    for key, value in load_file(final / "lora" / "lora_kohya.safetensors").items():
        prefix, _, param = key.rpartition(".")
        layers.setdefault(prefix, {})[param] = value
    assert layers and all(p.startswith("transformer.") for p in layers)
    assert {p.removeprefix("transformer.") for p in layers} == adapted
    for prefix, params in layers.items():
        name = prefix.removeprefix("transformer.") + ".weight"
        rebuilt = base[name] + _lycoris_update(params, base[name].shape)
        assert torch.allclose(rebuilt, merged[name], atol=1e-6), prefix


def test_dora_on_a_transformer_loads_into_the_plain_pipeline_as_the_merged_export(tmp_path, zimage_dir):
    final = _fine_tune(tmp_path, zimage_dir, "zimage", "dora")
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert any("lora_magnitude_vector" in k for k in adapters)
    pipeline = families()["zimage"].txt2img
    kwargs = dict(prompt="a red square", num_inference_steps=3, output_type="np", max_sequence_length=96, height=32,
                  width=32, guidance_scale=3.0)  # fmt: skip
    base = pipeline.from_pretrained(zimage_dir)
    base.set_progress_bar_config(disable=True)
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base.load_lora_weights(final / "lora")
    with_dora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = pipeline.from_pretrained(final)
    merged.set_progress_bar_config(disable=True)
    merged.scheduler = base.scheduler
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_dora - before).mean() > 1e-4 and np.abs(again - with_dora).max() < 1e-4
