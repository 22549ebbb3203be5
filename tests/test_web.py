"""The run browser: pages list and show runs, files never leave the root, generation returns the model's images."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
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


def _token(base: str) -> str:
    """The generation token a run page's form carries."""
    return re.search(rb'name="token" value="([^"]+)"', _get(base + "/run/tiny")[1]).group(1).decode()


def _generated_png(page: bytes) -> Image.Image:
    data = re.search(rb'src="data:image/png;base64,([^"]+)"', page).group(1)
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def test_generate_shows_the_models_images_on_the_run_page(served):
    from sdtrain.sample.pipeline import Pipeline, make_grid

    root, base = served
    fields = {"model": "tiny/final", "run": "tiny", "prompt": "a <b>red</b> square", "seed": 3, "num": 2}
    status, page = _post(base + "/generate", fields | {"token": _token(base)})
    assert status == 200 and page.startswith(b"<!doctype html>")  # the run's page, not a bare PNG
    model = Pipeline.from_pretrained(root / "runs" / "tiny" / "final", device="cpu")
    expected = make_grid(model.generate("a <b>red</b> square", num_images_per_prompt=2, seed=3).images, columns=2)
    assert _generated_png(page).tobytes() == expected.convert("RGB").tobytes()
    assert b'value="a &lt;b&gt;red&lt;/b&gt; square"' in page and b'name="seed" value="3"' in page  # the form kept
    assert b"<b>red</b>" not in page and b"loss.png" in page
    for bad in ({"model": "tiny/final", "prompt": "x", "num": 99}, {"model": "tiny/final"}):
        status, _ = _post(base + "/generate", bad | {"token": _token(base)})
        assert status == 400
    assert _post(base + "/generate", {"model": "../..", "prompt": "x", "token": _token(base)})[0] == 404


def _post(url: str, fields: dict) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, data=urllib.parse.urlencode(fields).encode(), timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _raw(base: str, request: bytes, timeout: float = 30) -> bytes:
    """Send ``request`` as it is on a socket; the whole answer (b"" if the server closed without one)."""
    host, port = urllib.parse.urlparse(base).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_logged_step_is_escaped_not_run(served):
    root, base = served
    run = root / "runs" / "xss"
    run.mkdir(exist_ok=True)
    (run / "log.jsonl").write_text(json.dumps({"step": "<script>alert(1)</script>", "loss": 0.5}) + "\n")
    status, body = _get(base + "/")
    assert status == 200 and b"<script>" not in body and b"&lt;script&gt;alert(1)&lt;/script&gt;" in body
    status, body = _get(base + "/run/xss")
    assert status == 200 and b"<script>" not in body


def test_only_its_own_host_names_and_own_pages_are_answered(served):
    """DNS rebinding sends another host name; a cross-site form posts from another origin and cannot know the
    token: both get a 400, while the same requests from the server's own pages succeed."""
    _, base = served
    port = urllib.parse.urlparse(base).port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        answer = _raw(base, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.0 400") and b"Runs in" not in answer, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert _raw(base, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()).startswith(
            b"HTTP/1.0 200"
        )
    fields = {"model": "tiny/final", "prompt": "x", "num": 1}
    assert _post(base + "/generate", fields)[0] == 400  # no token
    assert _post(base + "/generate", fields | {"token": "guess"})[0] == 400
    body = urllib.parse.urlencode(fields | {"token": _token(base)}).encode()
    for origin, status in ((b"https://evil.example", b"400"), (f"http://127.0.0.1:{port}".encode(), b"200")):
        request = (
            f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Origin: "
            + origin
            + b"\r\n\r\n"
            + body
        )
        assert _raw(base, request, timeout=120).startswith(b"HTTP/1.0 " + status), origin


def test_links_out_of_the_root_are_not_read(served):
    root, base = served
    run = root / "runs" / "linked"
    run.mkdir(exist_ok=True)
    for name in ("config.yaml", "metrics.json", "log.jsonl", "loss.png"):
        target = run / name
        if not target.is_symlink():
            target.symlink_to(root / "secret.txt")
    (root / "runs" / "outside").unlink(missing_ok=True)
    (root / "runs" / "outside").symlink_to(root / "data", target_is_directory=True)
    status, body = _get(base + "/run/linked")
    assert status == 200 and b"outside the runs folder" not in body and b"loss.png" not in body
    status, body = _get(base + "/")
    assert b"outside the runs folder" not in body and b"/run/outside" not in body
    assert _get(base + "/run/outside")[0] == 404 and _get(base + "/file/linked/config.yaml")[0] == 404


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /file/tiny/loss.png%00.txt HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        b"GET /run/tiny\x00 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        b"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Length: abc\r\nConnection: close\r\n\r\n",
        b"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000000000000000\r\nConnection: close\r\n\r\n",
        b"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Length: -5\r\nConnection: close\r\n\r\n",
        b"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nConnection: close\r\n\r\n\xff\xfe\xfa\xf0",
    ],
    ids=["nul-escaped", "nul-raw", "length-abc", "length-huge", "length-negative", "body-not-utf8"],
)
def test_malformed_requests_get_a_400(served, request_bytes):
    _, base = served
    host = urllib.parse.urlparse(base).netloc.encode()
    answer = _raw(base, request_bytes.replace(b"{host}", host))
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer[:200]


def test_an_idle_connection_is_closed(tmp_path, monkeypatch):
    import time

    from sdtrain import web

    monkeypatch.setattr(web, "IDLE_SECONDS", 1.0)
    server = make_server(tmp_path, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # and then nothing
            start = time.monotonic()
            assert sock.recv(100) == b"" and time.monotonic() - start < 10  # closed by the server, not by us
    finally:
        server.shutdown()
        server.server_close()


def test_models_kept_loaded_are_bounded(served):
    import shutil

    from sdtrain.web import RunBrowser

    root, _ = served
    second = root / "runs" / "tiny" / "final-copy"
    if not second.exists():
        shutil.copytree(root / "runs" / "tiny" / "final", second)
    browser = RunBrowser(root / "runs", device="cpu")  # max_models=1 by default
    for model in ("tiny/final", "tiny/final-copy", "tiny/final"):
        assert browser.generate(model, "a red square", 0, 1) is not None
    assert browser.loaded() == [(root / "runs" / "tiny" / "final").resolve()]
    browser = RunBrowser(root / "runs", device="cpu", max_models=2)
    for model in ("tiny/final", "tiny/final-copy"):
        browser.generate(model, "a red square", 0, 1)
    assert len(browser.loaded()) == 2
    shutil.rmtree(second)


def _chromium() -> str:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium here (Debian: apt-get install chromium; .ci/run installs it): the pages are not shot")


def _shoot(url: str, out: Path, size: tuple[int, int] = (1000, 1400)) -> tuple[np.ndarray, str]:
    """Headless Chromium's screenshot of ``url`` (as an array) and the DOM it rendered (as text)."""
    import subprocess

    browser = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size[0]},{size[1]}"]
    subprocess.run([browser, *flags, f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([browser, *flags, "--dump-dom", url], check=True, capture_output=True, timeout=120).stdout
    return np.asarray(Image.open(out).convert("RGB")), dom.decode()


def _contains(shot: np.ndarray, image: Image.Image) -> bool:
    """Whether ``image`` appears in the screenshot pixel for pixel (the pages show images at their own size)."""
    patch = np.asarray(image.convert("RGB"))
    h, w = patch.shape[:2]
    ys, xs = np.nonzero((shot[: shot.shape[0] - h + 1, : shot.shape[1] - w + 1] == patch[0, 0]).all(-1))
    return any((shot[y : y + h, x : x + w] == patch).all() for y, x in zip(ys, xs))


@pytest.mark.slow  # a real browser: make test-all (CI installs Chromium)
def test_the_pages_in_a_real_browser(served, tmp_path):
    """Headless Chromium renders the index, a run page and a generation's result: the index lists the run with its
    step, the run page shows its loss curve and the form, and the result shows the generated images (the very pixels
    the model drew) under the form, which keeps the prompt. The screenshots are kept in tmp_path for a person."""
    from sdtrain.sample.pipeline import Pipeline, make_grid

    root, base = served
    shot, dom = _shoot(base + "/", tmp_path / "index.png")
    assert "Runs in" in dom and 'href="/run/tiny"' in dom and "<td>2</td>" in dom
    assert (shot < 128).all(-1).sum() > 500  # dark text was drawn on the white page

    shot, dom = _shoot(base + "/run/tiny", tmp_path / "run.png")
    assert "generate" in dom and 'name="prompt"' in dom and "config.yaml" in dom
    assert _contains(shot, Image.open(root / "runs" / "tiny" / "loss.png"))  # the loss curve, drawn in full

    fields = {"model": "tiny/final", "run": "tiny", "prompt": "a green circle", "seed": 1, "num": 3}
    status, page = _post(base + "/generate", fields | {"token": _token(base)})
    assert status == 200
    result = tmp_path / "generated.html"  # the POST's answer, shown as the browser shows it (links to the server)
    result.write_bytes(page.replace(b"<head>", f'<head><base href="{base}/">'.encode(), 1))
    shot, dom = _shoot(result.as_uri(), tmp_path / "generated.png")
    assert 'value="a green circle"' in dom and 'class="generated"' in dom
    assert _contains(shot, Image.open(root / "runs" / "tiny" / "loss.png"))  # the run's page around the images
    model = Pipeline.from_pretrained(root / "runs" / "tiny" / "final", device="cpu")
    expected = make_grid(model.generate("a green circle", num_images_per_prompt=3, seed=1).images, columns=3)
    assert _contains(shot, expected)
