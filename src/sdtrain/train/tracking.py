"""Where a run reports: log.jsonl (always), accelerate's trackers (TensorBoard by default, Weights & Biases), and
``loss.png`` drawn at the end. Only the main process writes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sdtrain.errors import MissingPackage

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}

logger = logging.getLogger(__name__)


def log_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` of every complete line of ``log.jsonl``. A last line cut short (a kill mid-write) is
    dropped; a damaged line elsewhere is dropped with a warning: a log never stops a run or its resume."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    parsed = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer step")
        except ValueError as e:
            if number < len(lines):
                logger.warning("%s:%d is not a log record (%s): dropped", path, number, e)
            continue
        parsed.append((line if line.endswith("\n") else line + "\n", record))
    return parsed


def check_trackers(names: list[str]) -> None:
    """Fail before any work when a tracker's package is missing."""
    import importlib.util

    for name in names:
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise MissingPackage(f'train.trackers has "{name}", which needs {package}: pip install {package}')


def log_images(accelerator, images: list[Image.Image], step: int, tag: str = "samples") -> None:
    """Send validation images to every tracker that takes images (TensorBoard, W&B)."""
    arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(a) for a in arrays]}, step=step)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The log's records, one per step: records of the same step written one after the other (a step's training
    record, then its validation loss or fidelity scores, appended as they come) are merged, later values winning."""
    records: list[dict[str, Any]] = []
    for _, record in log_lines(path):
        if records and records[-1]["step"] == record["step"]:
            records[-1] = records[-1] | record
        else:
            records.append(record)
    return records


def plot_losses(log_path: str | Path, out: str | Path, size: tuple[int, int] = (800, 450)) -> Path:
    """Draw training loss (and validation loss where logged) against steps into a PNG, log-scaled loss axis."""
    records = read_log(Path(log_path))
    series = {
        "train loss": [(r["step"], r["loss"]) for r in records if _finite(r.get("loss"))],
        "validation loss": [(r["step"], r["val_loss"]) for r in records if _finite(r.get("val_loss"))],
    }
    colours = {"train loss": (31, 119, 180), "validation loss": (214, 39, 40)}
    width, height = size
    left, right, top, bottom = 70, 20, 30, 45
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for s in series.values() for p in s]
    if not points:
        draw.text((left, top), "no finite loss logged", fill="black")
        image.save(out)
        return Path(out)
    x_max = max(p[0] for p in points)
    logs = [math.log10(p[1]) for p in points if p[1] > 0] or [0.0]
    y_lo, y_hi = min(logs), max(logs)
    if y_hi - y_lo < 1e-6:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * step / max(x_max, 1)
        y = top + (height - top - bottom) * (y_hi - math.log10(max(value, 1e-12))) / (y_hi - y_lo)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for fraction in (0.0, 0.5, 1.0):
        value = 10 ** (y_lo + fraction * (y_hi - y_lo))
        y = xy(0, value)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
        step = fraction * x_max
        x = xy(step, 1)[0]
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 12, height - bottom + 8), f"{step:.0f}", fill="black")
    draw.text(((width - 40) // 2, height - 18), "step", fill="black")
    legend_x = left + 10
    for name, pts in series.items():
        if not pts:
            continue
        if len(pts) > 1:
            draw.line([xy(*p) for p in pts], fill=colours[name], width=2)
        for p in pts if len(pts) < 50 else pts[-1:]:
            x, y = xy(*p)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[name])
        draw.text((legend_x, 8), name, fill=colours[name])
        legend_x += 130
    image.save(out)
    return Path(out)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
