"""Config: loading, overrides, rejection of bad input before any work, shipped presets, README reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtrain.cli import main
from sdtrain.config import (
    PRESETS,
    AutoencoderConfig,
    Config,
    ConfigError,
    load_config,
    reference_markdown,
    save_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.vae.path=some/vae"]


def test_overrides_are_typed_and_nested():
    config = load_config(
        Config, None, BASE + ["train.optim.lr=1e-3", "train.optim.betas=[0.8, 0.95]", "data.resolution=128"]
    )
    assert config.train.optim.lr == 1e-3 and isinstance(config.train.optim.lr, float)
    assert config.train.optim.betas == (0.8, 0.95)
    assert config.data.resolution == 128


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.optim.lrr=1"], "train.optim.lrr"),
        (["trian.batch_size=4"], "trian"),
        (["train.batch_size=four"], "train.batch_size"),
        (["train.batch_size=true"], "train.batch_size"),
        (["data.random_flip=maybe"], "data.random_flip"),
        (["train.objective.prediction_type=x0"], "train.objective.prediction_type"),
        (["train.optim.betas=[0.9]"], "train.optim.betas"),
        (["model.unet.attention=[true]"], "model.unet.attention"),
        (["train.objective.rescale_zero_terminal_snr=true"], "rescale_zero_terminal_snr"),
        (["train.batch_size=10", "train.gradient_accumulation=3"], "train.gradient_accumulation"),
        (["train.keep_checkpoints=1"], "train.keep_checkpoints"),
        (["data.resolution=60"], "data.resolution"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Config, None, BASE + overrides)


def test_missing_vae_is_rejected():
    with pytest.raises(ConfigError, match="model.vae.path"):
        load_config(Config)


def test_unknown_key_in_yaml_fails_before_any_work(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  vae:\n    path: x\ntrain:\n  output_dir: %s\n  learning_rate: 1\n" % (tmp_path / "run"))
    assert main(["train", "--config", str(path)]) == 2
    assert "train.learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # rejected before the run directory was made


def test_resolved_config_round_trips(tmp_path):
    config = load_config(Config, None, BASE + ["train.sample_prompts=[a, b]"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(Config, tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(config)


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cls = AutoencoderConfig if "vae" in path.name else Config
    config = load_config(cls, path)
    # the same config expressed as dotted overrides (JSON values are YAML) loads to the same thing
    overrides = [f"{key}={json.dumps(value)}" for key, value in _flatten(to_dict(config))]
    assert to_dict(load_config(cls, None, overrides)) == to_dict(config)


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_config_reference_is_in_sync():
    written = (ROOT / "docs" / "config.md").read_text()
    assert written == reference_markdown(), "regenerate with: python -m sdtrain.config docs/config.md"


def test_bare_no_is_the_string_no():
    """YAML 1.1 reads `no` as false: `train.mixed_precision=no` must still mean "no"."""
    config = load_config(Config, None, ["model.vae.path=x", "train.mixed_precision=no"])
    assert config.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(Config, None, ["model.vae.path=x", "train.mixed_precision=yes"])


def test_the_package_and_its_config_are_light():
    """``import sdtrain.config`` and ``sdtrain --help`` load neither torch, diffusers nor accelerate (they are imported
    by the commands that use them)."""
    import subprocess
    import sys

    code = (
        "import sys, sdtrain, sdtrain.config, sdtrain.cli\n"
        "try:\n    sdtrain.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'accelerate', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_a_preset_is_found_by_name_and_a_missing_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anywhere, as after a non-editable install
    assert to_dict(load_config(Config, "demo")) == to_dict(load_config(Config, PRESETS / "demo.yaml"))
    assert to_dict(load_config(Config, "configs/demo.yaml")) == to_dict(load_config(Config, "demo.yaml"))
    with pytest.raises(
        ConfigError, match="no such config file.*presets: chroma-full-8x80gb, .*demo, demo-dit, demo-vae"
    ):
        load_config(Config, "nowhere/demo.yaml")
