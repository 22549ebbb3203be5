"""``sdtrain serve``'s Starlette application: the pages (runs, new run, a run watched live, compare, captions), the
JSON API they call, server-sent events, and the doors every request passes (:class:`Doors`)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import secrets
import threading
import urllib.parse
from collections import OrderedDict
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from sdtrain.config import SCHEDULER_NAMES
from sdtrain.errors import UserError
from sdtrain.models.lora import LORA_FOLDER, LORA_WEIGHTS
from sdtrain.web import captions, form, runs
from sdtrain.web.files import Root
from sdtrain.web.queue import LOG_NAME, Queue

HERE = Path(__file__).parent
MAX_BODY = 64 * 1024  # bytes of a request body (a form's values, a caption)
EVENT_SECONDS = 1.0  # how often a watched run is looked at
# scripts and styles from this server only (none inline), images from it or drawn by the page, no framing
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]  # fmt: skip
TEXT = "text/plain; charset=utf-8"
KINDS = {  # what /file/ serves: the pages' images and the runs' text files
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
    ".json": "application/json",
    ".jsonl": TEXT,
    ".txt": TEXT,
    ".yaml": TEXT,
    ".log": TEXT,
}


class Doors:
    """ASGI middleware: what every request passes before a route sees it. A NUL in the path is a 400; a request that
    changes anything (any method but GET / HEAD) must carry the root's token (.sdtrain/token) in ``X-Sdtrain-Token``
    (only its own pages hold it: a page elsewhere cannot read them, and a cross-site form cannot set a header), an
    ``Origin`` of its own where one is sent, and a body of at most ``MAX_BODY`` bytes; every response carries the
    security headers."""

    def __init__(self, app, token: str, hosts: set[str]):
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)

        async def secured(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        refusal = self._refusal(scope, headers)
        if refusal:
            return await PlainTextResponse(f"bad request: {refusal}", 400)(scope, receive, secured)
        if scope["method"] not in ("GET", "HEAD"):
            receive = _capped(receive, MAX_BODY)
        await self.app(scope, receive, secured)

    def _refusal(self, scope, headers: Headers) -> str | None:
        if "\x00" in scope["path"] or b"%00" in scope.get("raw_path", b"").lower():
            return "a NUL in the path"
        if scope["method"] in ("GET", "HEAD"):
            return None
        origin = headers.get("origin")
        if origin is not None and urllib.parse.urlparse(origin).netloc.lower() not in self.hosts:
            return "a change is asked for from this server's own pages only"
        if not secrets.compare_digest(headers.get("x-sdtrain-token", ""), self.token):
            return "a change is asked for from this server's own pages only (no valid token)"
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY:
            return f"Content-Length must be a number of bytes up to {MAX_BODY}"
        return None


def _capped(receive, limit: int):
    """``receive`` that stops a body longer than ``limit`` (whatever Content-Length said)."""
    seen = 0

    async def capped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BadBody(f"the body is over {limit} bytes")
        return message

    return capped


class BadBody(ValueError):
    """A request body that is too long or not what the route reads."""


class Models:
    """Models loaded for generation: one generation at a time, at most ``limit`` kept (least recently used out)."""

    def __init__(self, device: str | None, limit: int = 1):
        self.device, self.limit = device, max(1, limit)
        self._loaded: OrderedDict[Path, Any] = OrderedDict()
        self._scales: dict[Path, float] = {}  # a LoRA export's scale, where one was asked for
        self.lock = threading.Lock()

    def get(self, folder: Path):
        if folder in self._loaded:
            self._loaded.move_to_end(folder)
            return self._loaded[folder]
        while len(self._loaded) >= self.limit:
            self._scales.pop(self._loaded.popitem(last=False)[0], None)
            _release_device_memory()
        from sdtrain.sample.pipeline import Pipeline

        self._loaded[folder] = Pipeline.from_pretrained(folder, device=self.device)
        return self._loaded[folder]

    def loaded(self) -> list[Path]:
        return list(self._loaded)

    def draw(self, folder: Path, asked: dict[str, Any]) -> bytes:
        """A PNG grid of what the model in ``folder`` draws for ``asked`` (:meth:`Pipeline.generate`'s arguments),
        one generation at a time (models are large and the device is shared)."""
        from sdtrain.sample.pipeline import make_grid

        asked = dict(asked)
        scale = asked.pop("lora_scale", None)
        with self.lock:
            model = self.get(folder)
            if scale is not None or self._scales.get(folder, 1.0) != 1.0:  # asked, or back to 1 when not
                model.set_lora_scale(1.0 if scale is None else scale)
                self._scales[folder] = 1.0 if scale is None else scale
            images = model.generate(**asked).images
        buffer = io.BytesIO()
        make_grid(images, columns=min(len(images), 8)).save(buffer, format="PNG")
        return buffer.getvalue()


def _release_device_memory() -> None:
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Site:
    """The routes, over a root, its queue and the models loaded for generation."""

    def __init__(self, root: Root, queue: Queue, models: Models, token: str):
        self.root, self.queue, self.models, self.token = root, queue, models, token
        self.templates = Jinja2Templates(directory=HERE / "templates")

    def page(self, request: Request, name: str, **context) -> Response:
        return self.templates.TemplateResponse(request, name, {"token": self.token, "root": self.root.path} | context)

    # --- pages

    async def index(self, request: Request) -> Response:
        rows = await run_in_threadpool(self._run_rows)
        return self.page(request, "index.html", runs=rows, jobs=self.queue.list())

    def _run_rows(self) -> list[dict[str, Any]]:
        rows = []
        for rel in self.root.find_runs():
            run = self.root.path / rel
            state = runs.progress(runs.config_of(self.root, run), runs.records(self.root, run))
            rows.append({"run": rel.as_posix(), "status": self._status(rel.as_posix()), **state})
        return rows

    def _status(self, rel: str) -> str:
        job = self.queue.latest(rel)
        if job is not None:
            return job.state
        return "finished" if runs.finished(self.root, self.root.path / rel) else ""

    async def new_run(self, request: Request) -> Response:
        preset = request.query_params.get("preset") or "demo"
        if preset not in form.presets():
            preset = "demo"
        sections = await run_in_threadpool(form.form, preset)
        return self.page(request, "new.html", presets=form.presets(), preset=preset, sections=sections)

    async def run_page(self, request: Request) -> Response:
        run = self.root.resolve(request.path_params["path"])
        if run is None or not run.is_dir():
            return PlainTextResponse("not found", 404)
        rel = self.root.relative(run)
        models = runs.models(self.root, run)
        lora = [m for m in models if (self.root.path / m / LORA_FOLDER / LORA_WEIGHTS).is_file()]
        return self.page(request, "run.html", run=rel, models=models, lora_models=lora, samplers=SCHEDULER_NAMES)

    async def compare_page(self, request: Request) -> Response:
        chosen = [self.root.resolve(r) for r in request.query_params.getlist("run")]
        chosen = [r for r in chosen if r is not None and r.is_dir()]
        table = await run_in_threadpool(runs.compare, self.root, chosen)
        curves = {self.root.relative(r): _curve(runs.records(self.root, r)) for r in chosen}
        return self.page(request, "compare.html", table=table, curves=json.dumps(curves),
                         all_runs=[r.as_posix() for r in self.root.find_runs()])  # fmt: skip

    async def captions_page(self, request: Request) -> Response:
        rel = request.query_params.get("path", "")
        listed = await run_in_threadpool(captions.list_captions, self.root, rel) if rel else None
        return self.page(request, "captions.html", listed=listed, path=rel)

    async def file(self, request: Request) -> Response:
        path = self.root.resolve(request.path_params["path"])
        if path is None or not path.is_file() or not self.root.visible(path) or path.suffix.lower() not in KINDS:
            return PlainTextResponse("not found", 404)  # the kinds the pages show, out of hidden folders
        return FileResponse(path, media_type=KINDS[path.suffix.lower()])

    # --- the API the pages call

    async def browse(self, request: Request) -> Response:
        found = await run_in_threadpool(self.root.browse, request.query_params.get("path", "."))
        return JSONResponse(found) if found is not None else JSONResponse({"error": "not found"}, 404)

    async def check(self, request: Request) -> Response:
        """A form's config checked (and with ``estimate``, its memory estimated); starts nothing."""
        body = await _json(request)
        try:
            run, command = await run_in_threadpool(form.resolve_request, self.root, body)
        except UserError as e:
            return JSONResponse({"ok": False, "error": str(e)}, 400)
        answer = {"ok": True, "run": run, "command": command}
        if body.get("estimate"):
            answer["estimate"] = await run_in_threadpool(form.estimate, self.root, command)
        return JSONResponse(answer)

    async def start(self, request: Request) -> Response:
        body = await _json(request)
        try:
            run, command = await run_in_threadpool(form.resolve_request, self.root, body)
            job = self.queue.submit(run, command)
        except UserError as e:
            return JSONResponse({"ok": False, "error": str(e)}, 400)
        return JSONResponse({"ok": True, "run": run, "job": job.id, "state": job.state})

    async def control(self, request: Request) -> Response:
        """Stop or resume a run."""
        rel = self._run_rel(request)
        if rel is None or request.path_params["action"] not in ("stop", "resume"):
            return JSONResponse({"ok": False, "error": "not a run under the served folder"}, 404)
        action = self.queue.stop if request.path_params["action"] == "stop" else self.queue.resume
        try:
            job = action(rel)
        except UserError as e:
            return JSONResponse({"ok": False, "error": str(e)}, 400)
        return JSONResponse({"ok": True, "state": job.state})

    async def save_captions(self, request: Request) -> Response:
        body = await _json(request)
        try:
            if body.get("trigger") is not None:
                changed = await run_in_threadpool(captions.add_trigger, self.root, str(body.get("folder", "")),
                                                  str(body["trigger"]))  # fmt: skip
                return JSONResponse({"ok": True, "changed": changed})
            await run_in_threadpool(captions.save_caption, self.root, str(body.get("folder", "")),
                                    str(body.get("image", "")), str(body.get("caption", "")))  # fmt: skip
        except UserError as e:
            return JSONResponse({"ok": False, "error": str(e)}, 400)
        return JSONResponse({"ok": True})

    async def generate(self, request: Request) -> Response:
        """A PNG grid drawn by an exported model under the root."""
        body = await _json(request)
        try:
            asked = _generation(body)
            model = self.root.resolve(str(body.get("model", "")))
            if model is None or self.root.read_text(model / "model_index.json") is None:
                return JSONResponse({"error": "not a model under the served folder"}, 404)
            images = {k: self._image(body.get(k), k) for k in ("reference", "control") if body.get(k)}
            png = await run_in_threadpool(self.models.draw, model, asked | images)
        except UserError as e:  # Unsupported too: a LoRA scale for a model without adapters
            return JSONResponse({"error": str(e)}, 400)
        return Response(png, media_type="image/png")

    def _image(self, rel: Any, what: str):
        from PIL import Image

        path = self.root.resolve(str(rel))
        if path is None or not path.is_file():
            raise UserError(f"{what}: {rel} is not an image under the served folder")
        with Image.open(path) as image:
            return image.convert("RGB")

    def _run_rel(self, request: Request) -> str | None:
        run = self.root.resolve(request.path_params["path"])
        return self.root.relative(run) if run is not None and run != self.root.path else None

    async def events(self, request: Request) -> Response:
        """Server-sent events of a run: its state whenever it changes (the log records it has not sent yet)."""
        run = self.root.resolve(request.path_params["path"])
        if run is None or not run.is_dir():
            return PlainTextResponse("not found", 404)
        rel = self.root.relative(run)

        async def stream():
            sent, last, quiet = 0, None, 0
            while True:
                state = await run_in_threadpool(self._state, run, rel, sent)
                digest = hashlib.sha1(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()
                if digest != last:
                    yield f"data: {json.dumps(state, default=str)}\n\n"
                    sent, last, quiet = sent + len(state["records"]), digest, 0
                elif (quiet := quiet + 1) >= 15:  # a comment now and then keeps proxies from closing the stream
                    yield ": idle\n\n"
                    quiet = 0
                await asyncio.sleep(EVENT_SECONDS)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    def _state(self, run: Path, rel: str, sent: int) -> dict[str, Any]:
        log = runs.records(self.root, run)
        job = self.queue.latest(rel)
        return {
            "run": rel,
            "status": self._status(rel),
            "job": job.id if job else None,
            "progress": runs.progress(runs.config_of(self.root, run), log),
            "records": _curve(log[sent:]),
            "from": sent,
            "samples": runs.samples(self.root, run),
            "scores": runs.scores(self.root, run),
            "models": runs.models(self.root, run),
            "log": runs.tail(self.root, run / LOG_NAME),
        }


def _curve(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points a chart draws: step, loss and learning rate of each training record."""
    return [{"step": r["step"], "loss": r.get("loss"), "lr": r.get("lr")} for r in log if "loss" in r]


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, BadBody) as e:
        raise BadJSON(str(e)) from None
    if not isinstance(body, dict):
        raise BadJSON("the body must be a JSON object")
    return body


class BadJSON(ValueError):
    """A body that is not a JSON object."""


def _generation(body: dict[str, Any]) -> dict[str, Any]:
    """:meth:`Pipeline.generate`'s arguments from a request, checked."""
    try:
        asked = {"prompt": str(body["prompt"]), "seed": int(body.get("seed", 0)),
                 "num_images_per_prompt": int(body.get("num", 4))}  # fmt: skip
        for key, name, kind in (("steps", "num_inference_steps", int), ("guidance", "guidance_scale", float),
                                ("width", "width", int), ("height", "height", int),
                                ("image_guidance", "image_guidance_scale", float),
                                ("lora_scale", "lora_scale", float)):  # fmt: skip
            if body.get(key) not in (None, ""):
                asked[name] = kind(body[key])
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"prompt, seed, num, steps, guidance, width, height: {e}") from None
    if not 1 <= asked["num_images_per_prompt"] <= 16 or not 0 <= asked["seed"] < 2**63:
        raise UserError("num must be 1 to 16 and seed a non-negative integer")
    if not 1 <= asked.get("num_inference_steps", 1) <= 1000:
        raise UserError("steps must be 1 to 1000")
    for side in ("width", "height"):
        if not 8 <= asked.get(side, 8) <= 4096:
            raise UserError(f"{side} must be 8 to 4096 pixels")
    if body.get("sampler"):
        if body["sampler"] not in SCHEDULER_NAMES:
            raise UserError(f"sampler: choose one of {', '.join(SCHEDULER_NAMES)}")
        asked["scheduler"] = body["sampler"]
    return asked


async def _bad_json(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"bad request: {exc}"}, 400)


def make_app(root: Root, queue: Queue, models: Models, hosts: set[str], token: str | None = None) -> Starlette:
    """The application over ``root``: requests addressed to ``hosts`` (``name:port``) only."""
    token = token or secrets.token_urlsafe(24)
    site = Site(root, queue, models, token)
    routes = [
        Route("/", site.index),
        Route("/new", site.new_run),
        Route("/run/{path:path}", site.run_page),
        Route("/compare", site.compare_page),
        Route("/captions", site.captions_page),
        Route("/file/{path:path}", site.file),
        Route("/api/browse", site.browse),
        Route("/api/check", site.check, methods=["POST"]),
        Route("/api/runs", site.start, methods=["POST"]),
        Route("/api/runs/{action:str}/{path:path}", site.control, methods=["POST"]),
        Route("/api/captions", site.save_captions, methods=["POST"]),
        Route("/api/generate", site.generate, methods=["POST"]),
        Route("/events/run/{path:path}", site.events),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    names = sorted({h.rsplit(":", 1)[0].strip("[]") for h in hosts})
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=names), Middleware(Doors, token=token, hosts=hosts)]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={BadJSON: _bad_json})
    app.state.site = site
    return app
