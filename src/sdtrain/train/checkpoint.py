"""Atomic, verified training checkpoints.

A checkpoint is a folder ``checkpoints/step-XXXXXXXX/`` holding safetensors weights, the optimizer state, a JSON
state and a ``manifest.json`` with the size and sha256 of every file. It is written into a temporary folder, each
file fsynced, then renamed into place and the parent folder fsynced; the ``latest`` pointer is replaced last.
Rotation prunes old checkpoints only after the new one is committed. Loading verifies the manifest and falls back to
the previous checkpoint, with a message, when the newest one is incomplete or corrupt. Nothing is unpickled:
weights are safetensors and the optimizer state is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdtrain import check_torch
from sdtrain.errors import StorageError, UserError, describe_os_error, failed_write
from sdtrain.models.hashing import file_sha256

check_torch(torch.__version__)  # resuming relies on torch.load(weights_only=True) being safe

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PREFIX = "step-"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    objects: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write one checkpoint atomically and prune the old ones.

    Args:
        root: the ``checkpoints`` folder.
        step: optimizer step the checkpoint holds.
        tensors: ``{file stem: flat state dict}`` written as ``stem.safetensors`` (model, EMA).
        objects: ``{file stem: object}`` of tensors and plain values written with ``torch.save`` as ``stem.pt`` and
            read back with ``weights_only=True`` (optimizer, RNG states).
        state: JSON-serialisable counters and settings, written as ``state.json``.
        keep: checkpoints to keep (at least 2).

    Returns:
        The committed checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    for stale in root.glob(".tmp-*"):  # left by a process killed while saving
        if not _writer_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        for stem, tensor_dict in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensor_dict.items()}, tmp / f"{stem}.safetensors")
        for stem, obj in objects.items():
            with open(tmp / f"{stem}.pt", "wb") as f:  # a failed write keeps its OSError (errno) as the context
                torch.save(obj, f)
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for path in files:
            _fsync(path)
        listed = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
        manifest = {"step": step, "files": listed}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if final.exists():  # a stale checkpoint of the same step (e.g. from before a crash): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    _fsync(pointer)
    os.replace(pointer, root / "latest")
    _fsync(root)
    _prune(root, keep)
    return final


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that named ``tmp`` (``.tmp-step-XXXXXXXX-PID``) still runs on this machine (not this one:
    its own leftovers are stale)."""
    pid = tmp.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def save_or_keep_previous(
    root: Path, step: int, tensors: dict, objects: dict[str, Any], state: dict[str, Any], keep: int
) -> Path:
    """:func:`save_checkpoint`, a save that fails for want of space or permission raised as a StorageError that names
    the checkpoint still intact (the failed one's temporary folder is gone) and how to go on."""
    try:
        return save_checkpoint(root, step, tensors, objects, state, keep=keep)
    except Exception as e:
        cause = failed_write(e)
        if cause is None:
            raise
        why = f"could not write the checkpoint of step {step} to {root} ({describe_os_error(cause)})"
        raise StorageError(f"{why}; {resume_note(root)}") from e


def resume_note(root: Path) -> str:
    """What a run whose write failed can go on from: its newest valid checkpoint in ``root``, or none."""
    try:
        previous = find_latest(root)
    except CheckpointError:
        previous = None
    if previous is None:
        return "there is no checkpoint to resume from: free some space and run the same command to start again"
    return f"{previous.name} is intact: free some space and run the same command to resume from it"


def _prune(root: Path, keep: int) -> None:
    committed = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    for old in committed[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def verify(path: str | Path) -> None:
    """Check a checkpoint folder against its manifest.

    Raises:
        CheckpointError: missing manifest, missing file, wrong size or wrong sha256.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)
        for meta in files.values()
    ):
        raise CheckpointError(f"{path}: {MANIFEST} is not a manifest (a files map of sizes and sha256 sums)")
    unlisted = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in files)
    if unlisted:
        raise CheckpointError(f"{path}: {', '.join(unlisted)} not in its {MANIFEST}; a checkpoint loads what it lists")
    for name, meta in files.items():
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"{path}: {MANIFEST} lists {name!r}, which is not a file of the checkpoint")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != meta["size"]:
            raise CheckpointError(f"{path}: {name} has {file.stat().st_size} bytes, manifest says {meta['size']}")
        if file_sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its sha256")


def find_latest(root: str | Path) -> Path | None:
    """Newest checkpoint that verifies; corrupt newer ones are reported with logger.error and skipped."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), reverse=True)
    for candidate in candidates:
        try:
            verify(candidate)
            return candidate
        except CheckpointError as e:
            logger.error("checkpoint %s is unusable, falling back to an older one: %s", candidate.name, e)
    if candidates:
        raise CheckpointError(f"no valid checkpoint in {root}: all {len(candidates)} failed verification")
    return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """Read a verified checkpoint: ``(tensors, objects, state)`` as given to :func:`save_checkpoint`."""
    path = Path(path)
    verify(path)
    tensors = {p.stem: load_file(p) for p in sorted(path.glob("*.safetensors"))}
    objects = {p.stem: torch.load(p, map_location="cpu", weights_only=True) for p in sorted(path.glob("*.pt"))}
    state = json.loads((path / "state.json").read_text())
    return tensors, objects, state
