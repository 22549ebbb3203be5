"""The new-run form: built from the config's dataclasses (:func:`sdtrain.config.fields_of`, the source of
``docs/config.md``), read back into ``sdtrain train`` arguments, validated by the config system before anything
starts, every path in it held to the served root."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import PurePosixPath
from typing import Any

import yaml

from sdtrain.config import PRESETS, Config, ConfigError, fields_of, load_config, to_dict
from sdtrain.web.files import Root
from sdtrain.web.queue import device_env
from sdtrain.web.runs import flatten

SECTIONS = ("model", "data", "train", "sample")
ESTIMATE_SECONDS = 600  # the models are loaded on the CPU to count them


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml") if p.stem != "demo-vae")  # train-vae's, not train's


def form(preset: str | None) -> list[dict[str, Any]]:
    """The form's sections: each key with its kind, choices, help, and the value it has under ``preset`` (the
    defaults without one). A list of sections (``data.datasets[]``) is given as a further override instead."""
    values = flatten(to_dict(load_config(Config, preset))) if preset in presets() else {}
    sections: dict[str, list[dict[str, Any]]] = {name: [] for name in SECTIONS}
    for f in fields_of(Config):
        if "[]" in f.key or f.key.split(".")[0] not in sections:
            continue
        value = values.get(f.key, f.default)
        shown = value if isinstance(value, str) else json.dumps(value)
        sections[f.key.split(".")[0]].append({"key": f.key, "kind": f.kind, "choices": [str(c) for c in f.choices],
                                              "type": f.type, "help": f.help, "value": shown})  # fmt: skip
    return [{"name": name, "fields": fields} for name, fields in sections.items()]


def _scalars(value: Any):
    if isinstance(value, list | tuple):
        for item in value:
            yield from _scalars(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _scalars(item)
    elif isinstance(value, str):
        yield value


def check_paths(root: Root, overrides: list[str]) -> None:
    """Every value that names a local path (absolute, ``~``, ``..``, or an existing file or folder) lies under the
    root; other strings (hub ids, prompts, names) are left alone.

    Raises:
        ConfigError: naming the key and the path.
    """
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        for text in _scalars(value):
            looks = text.startswith(("/", "~", "\\")) or ".." in PurePosixPath(text).parts
            exists = not looks and (root.path / text).exists()
            if (looks or exists) and root.resolve(text) is None:
                raise ConfigError(f"{key}: {text} is outside the folder this server serves ({root.path})")


def request_overrides(body: dict[str, Any]) -> list[str]:
    """The form's values (only the keys given) and its further ``key=value`` lines, as overrides."""
    known = {f.key for f in fields_of(Config)}
    overrides = []
    for key, value in (body.get("values") or {}).items():
        if str(value).strip() == "":
            continue
        if key not in known:
            raise ConfigError(f"{key}: not a config key")
        overrides.append(f"{key}={value}")
    for line in str(body.get("extra") or "").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            overrides.append(line.strip())
    return overrides


def resolve_request(root: Root, body: dict[str, Any]) -> tuple[str, list[str]]:
    """The run folder (relative to the root) and ``sdtrain train``'s arguments of a form, checked by the config
    system (its types, choices and contradictions) and held to the root, before anything starts.

    Raises:
        UserError: the message the page shows.
    """
    preset = str(body.get("preset") or "")
    if preset not in presets():
        raise ConfigError(f"preset: choose one of {', '.join(presets())}")
    name = str(body.get("name") or f"runs/{preset}-{time.strftime('%Y%m%d-%H%M%S')}").strip().rstrip("/")
    folder = root.resolve(name)
    if folder is None or folder == root.path or not root.visible(folder):
        raise ConfigError(f"run name: {name} must be a folder under {root.path} (not hidden, not the root)")
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"run name: {name} exists already; resume it from its page, or choose another name")
    overrides = request_overrides(body)
    if body.get("data"):
        overrides.append(f"data.path={body['data']}")
    overrides.append(f"train.output_dir={name}")
    check_paths(root, overrides)
    config = load_config(Config, preset, overrides)
    from sdtrain.train.preflight import check_run

    check_run(config, models=False, data=False)  # what needs no model or data: objective, conditions, encoders
    return root.relative(folder), ["train", "--config", preset, *overrides]


def estimate(root: Root, command: list[str]) -> dict[str, Any]:
    """The run's own memory estimate (``sdtrain train --estimate`` in a process of its own, on the CPU, in the root
    like the run): GiB per part and in total, or ``{"error": the run's one-line refusal}``."""
    estimate_command = [sys.executable, "-m", "sdtrain", *command, "--estimate"]
    try:
        done = subprocess.run(estimate_command, cwd=root.path, capture_output=True, text=True,
                              timeout=ESTIMATE_SECONDS, env=device_env("cpu"))  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"the estimate took over {ESTIMATE_SECONDS} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    return {"error": errors[-1] if errors else f"sdtrain train --estimate exited {done.returncode}"}
