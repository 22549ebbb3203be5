"""``sdtrain serve``: a small local web page to browse runs and generate from their models (standard library only).

Pages: ``/`` lists every run under the root (a folder holding ``config.yaml``, ``log.jsonl``, ``metrics.json`` or
``fidelity.json``) with its last logged step and loss; ``/run/<path>`` shows one run: its PNGs (loss curve, sample
grids, evaluation grids), its scores (``metrics.json``, ``fidelity.json``), the newest log record and ``config.yaml``,
and a form to generate from each exported model in it (a folder with ``model_index.json``); ``/file/<path>`` serves a
file under the root, nothing outside it. Models are loaded once and kept. It binds to 127.0.0.1 by default: it runs
models on request, so it is not for the open internet.
"""

from __future__ import annotations

import html
import io
import json
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RUN_MARKERS = ("config.yaml", "log.jsonl", "metrics.json", "fidelity.json")
_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}} img{{image-rendering:pixelated;max-width:100%;
border:1px solid #ccc;margin:.3em 0}} pre{{background:#f4f4f4;padding:.8em;overflow:auto}} td,th{{padding:.2em .8em;
text-align:left}} input[type=text]{{width:40em}}</style></head><body>{body}</body></html>"""


def find_runs(root: Path, depth: int = 4) -> list[Path]:
    """Run folders under ``root`` (relative paths), sorted."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_dir()):
        rel = path.relative_to(root)
        if len(rel.parts) <= depth and any((path / m).is_file() for m in RUN_MARKERS):
            if not any(part in ("checkpoints", "final", "tracking") for part in rel.parts):
                found.append(rel)
    return found


def _last_record(run: Path) -> dict[str, Any]:
    """The newest training record of ``log.jsonl`` (a run still writing may have a half line at the end)."""
    log = run / "log.jsonl"
    for line in reversed(log.read_text().splitlines() if log.is_file() else []):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            return record
    return {}


def _models(run: Path) -> list[Path]:
    return sorted(p.parent for p in run.glob("**/model_index.json") if "checkpoints" not in p.parts)


class RunBrowser:
    """The pages, and the models loaded for generation (one at a time per model)."""

    def __init__(self, root: str | Path, device: str | None = None):
        self.root = Path(root).resolve()
        self.device = device
        self._models: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def resolve(self, rel: str) -> Path | None:
        """``rel`` under the root, or None for anything that leaves it (``..``, absolute paths, links out)."""
        path = (self.root / urllib.parse.unquote(rel)).resolve()
        return path if path == self.root or self.root in path.parents else None

    def index(self) -> str:
        rows = []
        for rel in find_runs(self.root):
            record = _last_record(self.root / rel)
            loss = f"{record['loss']:.4f}" if isinstance(record.get("loss"), float) else ""
            link = f'<a href="/run/{urllib.parse.quote(str(rel))}">{html.escape(str(rel))}</a>'
            rows.append(f"<tr><td>{link}</td><td>{record.get('step', '')}</td><td>{loss}</td></tr>")
        table = "<table><tr><th>run</th><th>step</th><th>loss</th></tr>" + "".join(rows) + "</table>"
        return _PAGE.format(title="sdtrain runs", body=f"<h1>Runs in {html.escape(str(self.root))}</h1>{table}")

    def run_page(self, rel: str) -> str | None:
        run = self.resolve(rel)
        if run is None or not run.is_dir():
            return None
        parts = [f'<p><a href="/">all runs</a></p><h1>{html.escape(rel)}</h1>']
        for model in _models(run):
            model_rel = html.escape(str(model.relative_to(self.root)))
            parts.append(
                f'<form method="post" action="/generate"><b>generate</b> from {model_rel}: '
                f'<input type="hidden" name="model" value="{model_rel}">'
                '<input type="text" name="prompt" placeholder="a red circle on a blue background"> '
                'seed <input name="seed" value="0" size="4"> images <input name="num" value="4" size="2"> '
                "<button>generate</button></form>"
            )
        pngs = sorted(p for p in run.glob("*.png")) + sorted(run.glob("samples/*.png"))[-3:]
        for png in pngs:
            src = "/file/" + urllib.parse.quote(str(png.relative_to(self.root)))
            parts.append(f"<h3>{html.escape(png.relative_to(run).as_posix())}</h3><img src='{src}'>")
        for scores in ("metrics.json", "fidelity.json", "final/metrics.json"):  # shapes; FID...; an autoencoder's
            if (run / scores).is_file():
                parts.append(f"<h3>{scores}</h3><pre>{html.escape((run / scores).read_text())}</pre>")
        if record := _last_record(run):
            parts.append(f"<h3>last log record</h3><pre>{html.escape(json.dumps(record, indent=1))}</pre>")
        if (run / "config.yaml").is_file():
            parts.append(f"<h3>config.yaml</h3><pre>{html.escape((run / 'config.yaml').read_text())}</pre>")
        return _PAGE.format(title=html.escape(rel), body="".join(parts))

    def generate(self, model_rel: str, prompt: str, seed: int, num: int) -> bytes | None:
        """A PNG grid of ``num`` images of ``prompt`` (seeds ``seed``, ``seed + 1``, ...), with the model's own
        sampling defaults; None if ``model_rel`` is not a model under the root."""
        from sdtrain.sample.pipeline import Pipeline, make_grid

        model = self.resolve(model_rel)
        if model is None or not (model / "model_index.json").is_file():
            return None
        with self._lock:  # one generation at a time: models are large and the CPU or GPU is shared
            if model not in self._models:
                self._models[model] = Pipeline.from_pretrained(model, device=self.device)
            images = self._models[model].generate(prompt, num_images_per_prompt=num, seed=seed).images
        buffer = io.BytesIO()
        make_grid(images, columns=min(num, 8)).save(buffer, format="PNG")
        return buffer.getvalue()


def _handler(browser: RunBrowser) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _not_found(self) -> None:
            self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = urllib.parse.urlparse(self.path).path
            if path == "/":
                self._send(HTTPStatus.OK, browser.index().encode(), "text/html; charset=utf-8")
            elif path.startswith("/run/"):
                page = browser.run_page(path[len("/run/") :])
                self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8") if page else self._not_found()
            elif path.startswith("/file/"):
                file = browser.resolve(path[len("/file/") :])
                if file is None or not file.is_file():
                    return self._not_found()
                kinds = {".png": "image/png", ".json": "application/json", ".jsonl": "text/plain"}
                self._send(HTTPStatus.OK, file.read_bytes(), kinds.get(file.suffix, "text/plain; charset=utf-8"))
            else:
                self._not_found()

        def do_POST(self) -> None:  # noqa: N802
            if urllib.parse.urlparse(self.path).path != "/generate":
                return self._not_found()
            length = int(self.headers.get("Content-Length", 0))
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            try:
                prompt = form["prompt"][0]
                seed, num = int(form.get("seed", ["0"])[0]), int(form.get("num", ["4"])[0])
                if not 1 <= num <= 16:
                    raise ValueError("num must be 1 to 16")
            except (KeyError, ValueError) as e:
                return self._send(HTTPStatus.BAD_REQUEST, f"bad request: {e}".encode(), "text/plain")
            png = browser.generate(form.get("model", [""])[0], prompt, seed, num)
            self._send(HTTPStatus.OK, png, "image/png") if png else self._not_found()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            pass  # quiet; errors still reach stderr through log_error

    return Handler


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str | None = None):
    """A ThreadingHTTPServer for ``root`` (``port=0``: any free port); call ``serve_forever()`` on it."""
    return ThreadingHTTPServer((host, port), _handler(RunBrowser(root, device)))


def serve(root: str | Path = "runs", host: str = "127.0.0.1", port: int = 8000, device: str | None = None) -> None:
    """Serve the run browser until interrupted."""
    server = make_server(root, host, port, device)
    print(f"sdtrain: browsing {Path(root).resolve()} at http://{host}:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
