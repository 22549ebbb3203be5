"""``sdtrain serve``: a small local web page to browse runs and generate from their models (standard library only).

Pages: ``/`` lists every run under the root (a folder holding ``config.yaml``, ``log.jsonl``, ``metrics.json`` or
``fidelity.json``) with its last logged step and loss; ``/run/<path>`` shows one run: its PNGs (loss curve, sample
grids, evaluation grids), its scores (``metrics.json``, ``fidelity.json``), the newest log record and ``config.yaml``,
and a form to generate from each exported model in it (a folder with ``model_index.json``), whose images come back on
the same page; ``/file/<path>`` serves a file under the root.

Its doors: every file it reads is resolved under the root (a link out of it reads nothing); it answers only requests
addressed to the host names it is bound to (a page elsewhere cannot reach it through DNS rebinding); a generation is a
POST from its own pages (same origin, and a token each server process draws at start); request lines, headers and
bodies are checked (400 for what is malformed, bodies capped at 64 KiB, idle sockets closed); at most ``max_models``
models stay loaded. It binds to 127.0.0.1 by default: it runs models on request, so it is not for the open internet.
"""

from __future__ import annotations

import base64
import errno
import html
import io
import json
import secrets
import socket
import threading
import urllib.parse
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sdtrain.errors import UserError

RUN_MARKERS = ("config.yaml", "log.jsonl", "metrics.json", "fidelity.json")
MAX_BODY = 64 * 1024  # bytes of a POST body (a prompt and a few numbers)
IDLE_SECONDS = 20.0  # a connection that sends nothing for this long is closed
# the pages run no script at all; images come from the server or from the generation's data: URL
CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; form-action 'self'"
_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}} img{{image-rendering:pixelated;max-width:100%;
border:1px solid #ccc;margin:.3em 0}} pre{{background:#f4f4f4;padding:.8em;overflow:auto}} td,th{{padding:.2em .8em;
text-align:left}} input[type=text]{{width:40em}} .generated{{background:#eef6ee;padding:.5em 1em}}</style></head>
<body>{body}</body></html>"""


class BadRequest(ValueError):
    """A request that is not answered beyond a 400 (malformed, or not from this server's own pages)."""


def find_runs(root: Path, depth: int = 4) -> list[Path]:
    """Run folders under ``root`` (relative paths), sorted; folders reached through links out of the root are not
    runs of it."""
    root = root.resolve()
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_dir()):
        rel = path.relative_to(root)
        if not _inside(root, path) or len(rel.parts) > depth:
            continue
        if any(_inside(root, path / m) and (path / m).is_file() for m in RUN_MARKERS):
            if not any(part in ("checkpoints", "final", "tracking") for part in rel.parts):
                found.append(rel)
    return found


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path`` resolves (links followed) to ``root`` or below it."""
    resolved = path.resolve()
    return resolved == root or root in resolved.parents


def _last_record(text: str) -> dict[str, Any]:
    """The newest training record of a ``log.jsonl`` text (a run still writing may have a half line at the end)."""
    for line in reversed(text.splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "loss" in record:
            return record
    return {}


class RunBrowser:
    """The pages, and the models loaded for generation (one generation at a time; ``max_models`` kept loaded)."""

    def __init__(self, root: str | Path, device: str | None = None, max_models: int = 1):
        self.root = Path(root).resolve()
        self.device = device
        self.max_models = max(1, max_models)
        self.token = secrets.token_urlsafe(24)  # a generation needs it: only this server's own pages hold it
        self._models: OrderedDict[Path, Any] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, rel: str) -> Path | None:
        """``rel`` under the root, or None for anything that leaves it (``..``, absolute paths, links out, NULs)."""
        rel = urllib.parse.unquote(rel)
        if "\x00" in rel:
            return None
        path = self.root / rel
        return path.resolve() if _inside(self.root, path) else None

    def read_text(self, path: Path) -> str | None:
        """A file's text where the file is under the root (its links followed), else None."""
        if not _inside(self.root, path) or not path.is_file():
            return None
        return path.read_text(errors="replace")

    def index(self) -> str:
        rows = []
        for rel in find_runs(self.root):
            record = _last_record(self.read_text(self.root / rel / "log.jsonl") or "")
            loss = f"{record['loss']:.4f}" if isinstance(record.get("loss"), float) else ""
            link = f'<a href="/run/{urllib.parse.quote(str(rel))}">{html.escape(str(rel))}</a>'
            step = html.escape(str(record.get("step", "")))
            rows.append(f"<tr><td>{link}</td><td>{step}</td><td>{loss}</td></tr>")
        table = "<table><tr><th>run</th><th>step</th><th>loss</th></tr>" + "".join(rows) + "</table>"
        return _PAGE.format(title="sdtrain runs", body=f"<h1>Runs in {html.escape(str(self.root))}</h1>{table}")

    def run_page(self, rel: str, generated: dict[str, Any] | None = None) -> str | None:
        """The page of run ``rel``; ``generated`` (model, prompt, seed, num, png) shows a generation's images under
        its form, which keeps what was asked."""
        run = self.resolve(rel)
        if run is None or not run.is_dir():
            return None
        parts = [f'<p><a href="/">all runs</a></p><h1>{html.escape(rel)}</h1>']
        for model in self._models_of(run):
            model_rel = str(model.relative_to(self.root))
            asked = generated if generated and generated["model"] == model_rel else {}
            parts.append(self._form(rel, model_rel, asked))
            if asked:
                data = base64.b64encode(asked["png"]).decode()
                parts.append(f'<div class="generated"><img alt="generated" src="data:image/png;base64,{data}"></div>')
        pngs = sorted(run.glob("*.png")) + sorted(run.glob("samples/*.png"))[-3:]
        for png in (p for p in pngs if _inside(self.root, p)):
            src = "/file/" + urllib.parse.quote(str(png.relative_to(self.root)))
            parts.append(f"<h3>{html.escape(png.relative_to(run).as_posix())}</h3><img src='{html.escape(src)}'>")
        for scores in ("metrics.json", "fidelity.json", "final/metrics.json"):  # shapes; FID...; an autoencoder's
            if (text := self.read_text(run / scores)) is not None:
                parts.append(f"<h3>{scores}</h3><pre>{html.escape(text)}</pre>")
        if record := _last_record(self.read_text(run / "log.jsonl") or ""):
            parts.append(f"<h3>last log record</h3><pre>{html.escape(json.dumps(record, indent=1))}</pre>")
        if (config := self.read_text(run / "config.yaml")) is not None:
            parts.append(f"<h3>config.yaml</h3><pre>{html.escape(config)}</pre>")
        return _PAGE.format(title=html.escape(rel), body="".join(parts))

    def _models_of(self, run: Path) -> list[Path]:
        found = (p.parent for p in run.glob("**/model_index.json") if "checkpoints" not in p.parts)
        return sorted(p for p in found if _inside(self.root, p / "model_index.json"))

    def _form(self, run_rel: str, model_rel: str, asked: dict[str, Any]) -> str:
        value = lambda key, default: html.escape(str(asked.get(key, default)), quote=True)  # noqa: E731
        return (
            f'<form method="post" action="/generate"><b>generate</b> from {html.escape(model_rel)}: '
            f'<input type="hidden" name="model" value="{html.escape(model_rel, quote=True)}">'
            f'<input type="hidden" name="run" value="{html.escape(run_rel, quote=True)}">'
            f'<input type="hidden" name="token" value="{self.token}">'
            f'<input type="text" name="prompt" value="{value("prompt", "")}" '
            'placeholder="a red circle on a blue background"> '
            f'seed <input name="seed" value="{value("seed", 0)}" size="4"> '
            f'images <input name="num" value="{value("num", 4)}" size="2"> <button>generate</button></form>'
        )

    def generate(self, model_rel: str, prompt: str, seed: int, num: int) -> bytes | None:
        """A PNG grid of ``num`` images of ``prompt`` (seeds ``seed``, ``seed + 1``, ...), with the model's own
        sampling defaults; None if ``model_rel`` is not a model under the root."""
        from sdtrain.sample.pipeline import make_grid

        model = self.resolve(model_rel)
        if model is None or self.read_text(model / "model_index.json") is None:
            return None
        with self._lock:  # one generation at a time: models are large and the CPU or GPU is shared
            images = self._model(model).generate(prompt, num_images_per_prompt=num, seed=seed).images
        buffer = io.BytesIO()
        make_grid(images, columns=min(num, 8)).save(buffer, format="PNG")
        return buffer.getvalue()

    def _model(self, folder: Path):
        """The loaded model of ``folder``; the least recently used one is unloaded past ``max_models``."""
        if folder in self._models:
            self._models.move_to_end(folder)
            return self._models[folder]
        while len(self._models) >= self.max_models:
            self._models.popitem(last=False)
            _release_device_memory()
        from sdtrain.sample.pipeline import Pipeline

        self._models[folder] = Pipeline.from_pretrained(folder, device=self.device)
        return self._models[folder]

    def loaded(self) -> list[Path]:
        """The models kept loaded, least recently used first."""
        return list(self._models)


def _release_device_memory() -> None:
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _form_fields(body: bytes) -> dict[str, str]:
    """A POST body's fields (the first value of each)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8") from None
    return {k: v[0] for k, v in urllib.parse.parse_qs(text, strict_parsing=False).items()}


def _handler(browser: RunBrowser, hosts: set[str]) -> type[BaseHTTPRequestHandler]:
    """The request handler of ``browser``, answering requests addressed to ``hosts`` (``name:port``) only."""

    class Handler(BaseHTTPRequestHandler):
        timeout = IDLE_SECONDS  # socket timeout: an idle or slow client is dropped, its thread freed

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", CSP)
            self.end_headers()
            self.wfile.write(body)

        def _html(self, page: str | None) -> None:
            self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8") if page else self._not_found()

        def _not_found(self) -> None:
            self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def _check(self) -> str:
            """The request's path, once its host is one of ours and it has no NUL; raises BadRequest."""
            if self.headers.get("Host", "").lower() not in hosts:
                raise BadRequest("unknown host")
            path = urllib.parse.urlparse(self.path).path
            if "\x00" in path or "%00" in path.lower():
                raise BadRequest("a NUL in the path")
            return path

        def _answer(self, method) -> None:
            try:
                method()
            except BadRequest as e:
                self._send(HTTPStatus.BAD_REQUEST, f"bad request: {e}".encode(), "text/plain")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._answer(self._get)

        def do_POST(self) -> None:  # noqa: N802
            self._answer(self._post)

        def _get(self) -> None:
            path = self._check()
            if path == "/":
                self._html(browser.index())
            elif path.startswith("/run/"):
                self._html(browser.run_page(path[len("/run/") :]))
            elif path.startswith("/file/"):
                file = browser.resolve(path[len("/file/") :])
                if file is None or not file.is_file():
                    return self._not_found()
                kinds = {".png": "image/png", ".json": "application/json", ".jsonl": "text/plain"}
                self._send(HTTPStatus.OK, file.read_bytes(), kinds.get(file.suffix, "text/plain; charset=utf-8"))
            else:
                self._not_found()

        def _post(self) -> None:
            path = self._check()
            if path != "/generate":
                return self._not_found()
            origin = self.headers.get("Origin")
            if origin is not None and urllib.parse.urlparse(origin).netloc.lower() not in hosts:
                raise BadRequest("a generation is asked for from this server's own pages only")
            length = self.headers.get("Content-Length", "")
            if not length.isdigit() or int(length) > MAX_BODY:
                raise BadRequest(f"Content-Length must be a number of bytes up to {MAX_BODY}")
            form = _form_fields(self.rfile.read(int(length)))
            if not secrets.compare_digest(form.get("token", ""), browser.token):
                raise BadRequest("a generation is asked for from this server's own pages only (no valid token)")
            try:
                prompt, model = form["prompt"], form.get("model", "")
                seed, num = int(form.get("seed", "0")), int(form.get("num", "4"))
            except (KeyError, ValueError) as e:
                raise BadRequest(f"prompt, seed and num: {e}") from None
            if not 1 <= num <= 16 or not 0 <= seed < 2**63:
                raise BadRequest("num must be 1 to 16 and seed a non-negative integer")
            png = browser.generate(model, prompt, seed, num)
            if png is None:
                return self._not_found()
            asked = {"model": str(browser.resolve(model).relative_to(browser.root)), "prompt": prompt}
            asked |= {"seed": seed, "num": num, "png": png}
            run = form.get("run") or str(Path(asked["model"]).parent)
            self._html(browser.run_page(run, asked))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            pass  # quiet; errors still reach stderr through log_error

    return Handler


def _host_names(host: str, port: int, allowed: tuple[str, ...] = ()) -> set[str]:
    """The ``Host`` values a server bound to ``host:port`` answers: the bound name, the loopback names for a loopback
    (or any-address) bind, and the ``allowed`` names (how others reach a server bound to 0.0.0.0)."""
    names = {host.lower(), *(name.lower() for name in allowed)} - {"", "0.0.0.0", "::"}
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names}
    return {f"{name}:{port}" for name in names} | (names if port == 80 else set())


def make_server(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | None = None,
    max_models: int = 1,
    allowed_hosts: tuple[str, ...] = (),
) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer for ``root`` (``port=0``: any free port); call ``serve_forever()`` on it.

    Args:
        root: the folder of runs.
        host, port: where to bind.
        device: where models run (default CUDA if available).
        max_models: models kept loaded; the least recently used is unloaded past it.
        allowed_hosts: further host names requests may be addressed to (the loopback names always are).
    """
    try:
        server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server?): choose another with --port, "
                            f"say --port {port + 1}") from None  # fmt: skip
        if e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
            raise UserError(f"cannot listen on {host}: not an address of this machine (--host)") from None
        if e.errno == errno.EACCES:
            raise UserError(f"port {port} is privileged: choose one over 1023 with --port") from None
        raise
    hosts = _host_names(host, server.server_address[1], allowed_hosts)
    server.RequestHandlerClass = _handler(RunBrowser(root, device, max_models), hosts)
    return server


def serve(
    root: str | Path = "runs",
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | None = None,
    max_models: int = 1,
    allowed_hosts: tuple[str, ...] = (),
) -> None:
    """Serve the run browser until interrupted (the arguments are :func:`make_server`'s)."""
    server = make_server(root, host, port, device, max_models, allowed_hosts)
    print(f"sdtrain: browsing {Path(root).resolve()} at http://{host}:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
