"""The run browser: pages list and show runs, files never leave the root, generation returns the model's images."""

from __future__ import annotations

import io
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from sdtrain.config import Config, load_config
from sdtrain.train.loop import train
from sdtrain.web import find_runs, make_server
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def served(tmp_path_factory, clip_dir, vae_dir):
    from tests.conftest import write_image_folder

    root = tmp_path_factory.mktemp("web")
    data = write_image_folder(root / "data")
    overrides = tiny_overrides(root / "runs" / "tiny", data, vae_dir, str(clip_dir), "text_encoder")
    train(load_config(Config, None, overrides + ["train.num_steps=2", "sample.num_inference_steps=2"]))
    (root / "secret.txt").write_text("outside the runs folder")
    server = make_server(root / "runs", port=0, device="cpu")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_pages_list_and_show_runs(served):
    root, base = served
    with open(root / "runs" / "tiny" / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a run still writing its log
    (root / "runs" / "tiny" / "fidelity.json").write_text('{"fid": 12.5}')  # what sdtrain evaluate --out writes
    assert find_runs(root / "runs") == [Path("tiny")]
    status, body = _get(base + "/")
    assert status == 200 and b'href="/run/tiny"' in body and b"<td>2</td>" in body  # the last whole record
    status, body = _get(base + "/run/tiny")
    assert status == 200
    for part in (b"loss.png", b"config.yaml", b'name="model" value="tiny/final"', b"last log record", b"12.5"):
        assert part in body
    status, png = _get(base + "/file/tiny/loss.png")
    assert status == 200 and Image.open(io.BytesIO(png)).size[0] > 100
    # an autoencoder's run (sdtrain train-vae): its reconstructions and its final/metrics.json
    vae_run = root / "runs" / "vae"
    (vae_run / "final").mkdir(parents=True)
    (vae_run / "log.jsonl").write_text('{"step": 5, "loss": 0.1}\n')
    (vae_run / "final" / "metrics.json").write_text('{"psnr": 27.25}')
    Image.new("RGB", (64, 16)).save(vae_run / "reconstructions.png")
    status, body = _get(base + "/run/vae")
    assert status == 200 and b"27.25" in body and b"/file/vae/reconstructions.png" in body
    assert b'name="model"' not in body  # nothing to generate with


@pytest.mark.parametrize("path", ["/file/../secret.txt", "/file/%2e%2e/secret.txt", "/run/../..", "/file//etc/passwd"])
def test_nothing_outside_the_root_is_served(served, path):
    status, body = _get(served[1] + path)
    assert status == 404 and b"outside" not in body


def test_generate_returns_the_models_images(served):
    from sdtrain.api import StableDiffusion
    from sdtrain.sample.pipeline import make_grid

    root, base = served
    form = urllib.parse.urlencode({"model": "tiny/final", "prompt": "a red square", "seed": 3, "num": 2}).encode()
    with urllib.request.urlopen(base + "/generate", data=form, timeout=120) as response:
        served_png = Image.open(io.BytesIO(response.read())).convert("RGB")
    model = StableDiffusion.from_pretrained(root / "runs" / "tiny" / "final", device="cpu")
    expected = make_grid(model.generate("a red square", num_images_per_prompt=2, seed=3).images, columns=2)
    assert served_png.tobytes() == expected.convert("RGB").tobytes()
    for bad in ({"model": "tiny/final", "prompt": "x", "num": 99}, {"model": "tiny/final"}):
        status, _ = _post(base + "/generate", bad)
        assert status == 400
    assert _post(base + "/generate", {"model": "../..", "prompt": "x"})[0] == 404


def _post(url: str, fields: dict) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, data=urllib.parse.urlencode(fields).encode(), timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
