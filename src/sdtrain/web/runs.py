"""What the pages show of a run: its log's records, progress and time left, samples as a timeline, scores, config
and the log tail; and what they show of several runs side by side."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from sdtrain.train.tracking import read_log
from sdtrain.web.files import Root

SCORES = ("metrics.json", "fidelity.json", "final/metrics.json")  # shapes scores; FID, KID, CLIP; an autoencoder's
SAMPLE = re.compile(r"step-(\d+)\.png$")
TAIL_LINES = 40


def records(root: Root, run: Path) -> list[dict[str, Any]]:
    """The run's log records (one per step, a half-written last line left out); [] outside the root."""
    log = run / "log.jsonl"
    return read_log(log) if root.inside(log) and log.is_file() else []


def config_of(root: Root, run: Path) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` ({} if it has none or it does not parse)."""
    text = root.read_text(run / "config.yaml")
    try:
        loaded = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def samples(root: Root, run: Path) -> list[dict[str, Any]]:
    """The run's sample grids (``samples/step-XXXXXX.png``) as a timeline, oldest first."""
    found = []
    for png in sorted((run / "samples").glob("step-*.png")):
        if (match := SAMPLE.search(png.name)) and root.inside(png):
            found.append({"step": int(match.group(1)), "file": root.relative(png)})
    return found


def scores(root: Root, run: Path) -> dict[str, Any]:
    """The run's scores, flattened (``metrics.json``'s, ``fidelity.json``'s, an autoencoder's
    ``final/metrics.json``)."""
    found: dict[str, Any] = {}
    for name in SCORES:
        text = root.read_text(run / name)
        try:
            loaded = json.loads(text) if text else None
        except json.JSONDecodeError:
            continue
        if isinstance(loaded, dict):
            found |= {k: v for k, v in flatten(loaded).items() if isinstance(v, int | float | str)}
    return found


def tail(root: Root, path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file under the root ("" otherwise)."""
    if not root.inside(path) or not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def progress(config: dict[str, Any], log: list[dict[str, Any]]) -> dict[str, Any]:
    """Step, the newest loss, learning rate and images per second, and the time left at that speed."""
    train = config.get("train", {}) if isinstance(config.get("train"), dict) else {}
    last = next((r for r in reversed(log) if "loss" in r), {})
    step, total = last.get("step", 0), train.get("num_steps")
    speed, batch = last.get("images_per_s"), train.get("batch_size")
    left = None
    if isinstance(total, int) and isinstance(speed, int | float) and speed > 0 and isinstance(batch, int):
        left = max(0, total - step) * batch / speed
    return {"step": step, "num_steps": total, "loss": last.get("loss"), "lr": last.get("lr"),
            "images_per_s": speed, "seconds_left": left}  # fmt: skip


def finished(root: Root, run: Path) -> bool:
    """Whether the run exported its model (``final/``)."""
    return root.inside(run / "final") and (run / "final" / "model_index.json").is_file()


def models(root: Root, run: Path) -> list[str]:
    """The exported models in a run (folders with ``model_index.json``), relative; checkpoints, samples and the
    trackers' folders are not walked (a watched run is looked at every second)."""
    found = []
    for folder, subfolders, files in os.walk(run):
        subfolders[:] = [d for d in subfolders if d not in ("checkpoints", "samples", "tracking", "fidelity")]
        if "model_index.json" in files and root.inside(Path(folder) / "model_index.json"):
            found.append(root.relative(Path(folder)))
    return sorted(found)


def compare(root: Root, runs: list[Path]) -> dict[str, Any]:
    """Several runs side by side: their configs (every key any of them has, the differing ones marked), the newest
    sample grid of each (with the prompts and seed it was drawn from, to say whether they are comparable) and their
    scores in one table."""
    configs = [flatten(config_of(root, run)) for run in runs]
    keys = sorted(set().union(*configs)) if configs else []
    rows = []
    for key in keys:
        values = [json.dumps(c.get(key)) if key in c else "" for c in configs]
        rows.append({"key": key, "values": values, "differs": len(set(values)) > 1})
    all_scores = [scores(root, run) for run in runs]
    score_keys = sorted(set().union(*all_scores)) if all_scores else []
    newest = [(samples(root, run) or [None])[-1] for run in runs]
    prompts = {json.dumps([c.get("train.sample_prompts"), c.get("train.seed")]) for c in configs}
    return {"runs": [root.relative(r) for r in runs], "config": rows, "samples": newest,
            "same_prompts": len(prompts) == 1, "scores": [{"key": k, "values": [s.get(k) for s in all_scores]}
                                                          for k in score_keys]}  # fmt: skip
