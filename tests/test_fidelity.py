"""FID / KID / CLIP score: our Inception network against torch-fidelity's own code, the scores of a tiny model on
a folder (CLI), the CLIP score against its formula, errors raised before any image is drawn, shards as a source."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdtrain.cli import main
from sdtrain.evaluate.fidelity import EvaluationError, evaluate_fidelity, load_clip, reference_pairs
from sdtrain.evaluate.inception import load_inception
from tests.conftest import save_pipeline, write_image_folder

REFERENCE = Path(__file__).resolve().parents[1] / ".venv" / "reference"


def _torch_fidelity_inception(tmp_path: Path, monkeypatch):
    """torch-fidelity's FeatureExtractorInceptionV3, loaded from its wheel (``make test`` downloads it) without its
    package __init__, which imports torchvision."""
    wheels = sorted(REFERENCE.glob("torch_fidelity-*.whl"))
    assert wheels, f"torch-fidelity's wheel is not in {REFERENCE}: run `make test` (it downloads it there)"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(tmp_path, [n for n in wheel.namelist() if n.startswith("torch_fidelity/")])
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(tmp_path / "torch_fidelity")]
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    for name in [n for n in sys.modules if n.startswith("torch_fidelity.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def test_inception_features_equal_torch_fidelitys(inception_file, tmp_path, monkeypatch):
    reference_class = _torch_fidelity_inception(tmp_path, monkeypatch)
    reference = reference_class("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_file))
    ours = load_inception(inception_file)
    generator = torch.Generator().manual_seed(1)
    for size in ((64, 80), (331, 300)):  # upsampled and downsampled to 299 by TensorFlow 1.x's bilinear rule
        images = torch.randint(0, 256, (2, 3, *size), generator=generator, dtype=torch.uint8)
        expected = reference(images)[0]
        got = ours(images)
        assert got.shape == (2, 2048) and expected.abs().mean() > 0.1  # activations survived every layer
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _tiny_pipeline(root: Path, clip_dir: Path, vae_dir: Path) -> Path:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return save_pipeline(root, unet, clip_dir, vae_dir)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, clip_dir, vae_dir, inception_file, clip_model_dir):
    """The CLI's scores of a tiny model on a folder holding 7 usable pairs, a corrupt image and an uncaptioned one."""
    root = tmp_path_factory.mktemp("fidelity")
    model = _tiny_pipeline(root / "model", clip_dir, vae_dir)
    clip = clip_model_dir
    data = write_image_folder(root / "data", count=9)
    (data / "007.png").write_bytes(b"not a png")
    (data / "008.txt").unlink()
    args = ["evaluate", "--model", str(model), "--data", str(data), "--out", str(root / "out"), "--num", "20"]
    args += ["--batch-size", "4", "--inception", str(inception_file), "--clip-model", str(clip), "--device", "cpu"]
    assert main(args + ["--steps", "2", "--guidance", "3"]) == 0
    return root, json.loads((root / "out" / "fidelity.json").read_text())


def test_cli_scores_a_model_against_a_folder(scored):
    from PIL import Image

    root, scores = scored
    assert scores["num_images"] == 7 and scores["skipped"] == {"not_an_image": 1, "no_caption": 1}
    assert scores["resolution"] == 32 and scores["num_inference_steps"] == 2 and scores["guidance_scale"] == 3
    assert scores["fid"] > 0 and math.isfinite(scores["fid"])
    assert math.isfinite(scores["kid_mean"]) and scores["kid_std"] >= 0 and scores["kid_subset_size"] == 7
    assert 0 <= scores["clip_score"] <= 100 and 0 <= scores["clip_score_real"] <= 100
    grid = Image.open(root / "out" / "grid_fidelity.png")  # 7 pairs: 4 real over 4 drawn (the odd 3 left out)
    assert grid.size[0] >= 4 * 32 and 2 * 32 <= grid.size[1] < 3 * 32


def test_scores_are_deterministic_and_clip_score_is_its_formula(scored, inception_file, clip_model_dir):
    from sdtrain.api import StableDiffusion

    root, scores = scored
    again = evaluate_fidelity(
        StableDiffusion.from_pretrained(root / "model", device="cpu"),  # a loaded model (after fit, say) as well
        root / "data",
        root / "again",
        metrics=["fid", "clip"],
        num_images=20,
        inception=inception_file,
        clip_model=str(clip_model_dir),
        num_inference_steps=2,
        guidance_scale=3,
        batch_size=3,  # other batches, the same images: image i is seeded seed + i
    )
    assert "kid_mean" not in again and again["model"] == "StableDiffusion"
    for key in ("fid", "clip_score", "clip_score_real"):
        assert again[key] == pytest.approx(scores[key], rel=1e-3), key
    # CLIP score of the real images from CLIP's own forward: its logits are exp(logit_scale) * cosine
    model, processor = load_clip(str(clip_model_dir), torch.device("cpu"))
    pairs = list(reference_pairs(root / "data", 20, 32))
    inputs = processor(text=[c for _, c in pairs], images=[im for im, _ in pairs], return_tensors="pt", padding=True)
    with torch.no_grad():
        cosine = model(**inputs).logits_per_image.diagonal() / model.logit_scale.exp()
    expected = (100 * cosine).clamp(min=0).mean().item()
    assert expected > 0 and scores["clip_score_real"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow  # long scoring runs (make test-all)
def test_accelerate_launch_shares_the_images_out_and_scores_as_one_process(
    scored, inception_file, clip_model_dir, tmp_path
):
    from tests.test_faults import _env, _free_port

    root, scores = scored
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), "-m", "sdtrain", "evaluate", "--model", str(root / "model")]
    launch += ["--data", str(root / "data"), "--out", str(tmp_path), "--num", "20", "--batch-size", "4"]
    launch += ["--inception", str(inception_file), "--clip-model", str(clip_model_dir)]
    launch += ["--steps", "2", "--guidance", "3"]  # as the one-process run
    result = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "fidelity.json").read_text())
    assert two["processes"] == 2 and scores["processes"] == 1 and two["num_images"] == 7
    for key in ("fid", "kid_mean", "clip_score", "clip_score_real"):
        assert two[key] == pytest.approx(scores[key], rel=1e-3), key


def test_bad_requests_fail_before_any_image_is_drawn(scored, clip_model_dir, tmp_path, monkeypatch, capsys):
    from sdtrain.api import StableDiffusion

    root, _ = scored
    monkeypatch.setattr(StableDiffusion, "generate", lambda *a, **k: pytest.fail("an image was drawn"))
    base = ["evaluate", "--model", str(root / "model"), "--out", str(tmp_path), "--device", "cpu"]
    data, clip = ["--data", str(root / "data")], ["--metrics", "clip", "--clip-model", str(clip_model_dir)]
    cases = {
        "unknown metrics ['fld']": data + ["--metrics", "fid,fld"],
        "weights-inception-2015-12-05": data + ["--inception", str(tmp_path / "none.pth")],
        "CLIP score needs a CLIP model": data + ["--metrics", "clip", "--clip-model", str(tmp_path)],
        "nothing: no such file or folder": ["--data", str(tmp_path / "nothing")] + clip,
    }
    for message, args in cases.items():
        assert main(base + args) == 2, message
        assert message in capsys.readouterr().err
    with pytest.raises(EvaluationError, match="at least 2"):
        evaluate_fidelity(root / "model", root / "data", tmp_path, num_images=1)


def test_reference_pairs_read_shards_in_order(tmp_path):
    from tests.test_shards import write_shards

    spec = write_shards(tmp_path / "shards", shards=2, per_shard=3)
    pairs = list(reference_pairs(spec, 4, 48))
    assert [caption for _, caption in pairs] == [f"image {i}" for i in range(4)]
    assert all(image.dtype == torch.uint8 and image.shape == (3, 48, 48) for image, _ in pairs)


def test_training_scores_its_ema_model_every_n_steps(tmp_path, clip_dir, vae_dir, inception_file, clip_model_dir):
    """Steps 2 and 3 (the end) are scored; the last scores are those of the exported model (EMA weights, the sample
    settings) scored afresh by evaluate_fidelity against the same reference set."""
    from sdtrain.config import Config, load_config
    from sdtrain.data.folder import validation_records
    from sdtrain.train.loop import train
    from sdtrain.train.tracking import read_log
    from tests.conftest import tiny_overrides

    run = tmp_path / "run"
    data = write_image_folder(tmp_path / "data", count=10)
    overrides = tiny_overrides(run, data, vae_dir, str(clip_dir), "text_encoder")
    fidelity = ["every=2", "metrics=[fid,kid,clip]", "num_images=4", "batch_size=3", f"inception={inception_file}"]
    overrides += [f"train.fidelity.{o}" for o in fidelity + [f"clip_model={clip_model_dir}"]]
    config = load_config(Config, None, overrides + ["train.num_steps=3", "data.validation_split=4"])
    train(config)
    records = [r for r in read_log(run / "log.jsonl") if "fid" in r]
    assert [r["step"] for r in records] == [2, 3]
    assert all(math.isfinite(r["fid"]) and math.isfinite(r["kid_mean"]) and r["clip_score"] >= 0 for r in records)
    assert (run / "fidelity" / "step-000002" / "grid_fidelity.png").is_file()
    again = evaluate_fidelity(
        run / "final",
        validation_records(config.data, config.train.seed),
        tmp_path / "again",
        metrics=["fid", "kid", "clip"],
        num_images=4,
        inception=inception_file,
        clip_model=str(clip_model_dir),
        batch_size=3,
        seed=config.train.seed,
        device="cpu",
    )
    for key in ("fid", "kid_mean", "clip_score"):
        assert again[key] == pytest.approx(records[-1][key], rel=1e-4, abs=1e-6), key


def test_training_refuses_fidelity_it_cannot_score(tmp_path, clip_dir, vae_dir, image_folder):
    from sdtrain.config import Config, ConfigError, load_config
    from sdtrain.train.loop import train
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(tmp_path / "run", image_folder, vae_dir, str(clip_dir), "text_encoder")
    with pytest.raises(ConfigError, match="needs reference images"):
        load_config(Config, None, overrides + ["train.fidelity.every=2"])
    with pytest.raises(ConfigError, match="fld"):
        load_config(Config, None, overrides + ["train.fidelity.metrics=[fid,fld]"])
    missing = [f"inception={tmp_path / 'none.pth'}", "every=2", "metrics=[fid]"]
    overrides += [f"train.fidelity.{o}" for o in missing] + ["data.validation_split=2"]
    with pytest.raises(EvaluationError, match="Inception weights"):
        train(load_config(Config, None, overrides))
    assert not (tmp_path / "run" / "log.jsonl").exists()  # stopped before the first step
