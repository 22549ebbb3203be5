"""Where a model comes from: a folder here, or a Hugging Face Hub id. Checked before any work, so that a mistyped
path is one line naming the key before the run folder is made, not a loader's traceback minutes in."""

from __future__ import annotations

import re
from pathlib import Path

from sdtrain.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # ORG/NAME, as the hub spells repository ids


class ModelNotFound(UserError):
    """A model that is neither a folder here nor a hub id that can be loaded."""


def check_model_source(path: str | Path, what: str) -> None:
    """``path`` is a folder or file here, or a hub id (``ORG/NAME``) that loading can fetch: in the local cache, or
    with the hub reachable (``HF_HUB_OFFLINE`` unset).

    Args:
        what: how the user named it (``model.vae.path``, ``--model``), for the message.

    Raises:
        ModelNotFound: naming ``what``, the path and what to do.
    """
    text = str(path)
    if Path(text).expanduser().exists():
        return
    if not HUB_ID.match(text):
        raise ModelNotFound(f"{what}: {text} is no folder here (and not a Hugging Face Hub id, which is ORG/NAME)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not constants.HF_HUB_OFFLINE:
        return  # loading downloads it (or says why it could not: hub_failure)
    try:
        snapshot_download(text, local_files_only=True)
    except LocalEntryNotFoundError:
        raise ModelNotFound(
            f"{what}: {text} is no folder here, and this hub id is not in the local Hugging Face cache while "
            "HF_HUB_OFFLINE is set: download it where there is a network (`hf download " + text + "`) or give its "
            "folder"
        ) from None


def hub_failure(error: BaseException) -> str | None:
    """What went wrong fetching a model from the Hugging Face Hub, where ``error`` is (or was raised while handling)
    such a failure: no network, an unknown or gated repository, a file it lacks; None otherwise."""
    from huggingface_hub import errors

    kinds = (
        errors.HfHubHTTPError,
        errors.LocalEntryNotFoundError,
        errors.RepositoryNotFoundError,
        errors.GatedRepoError,
        errors.RevisionNotFoundError,
        errors.EntryNotFoundError,
        errors.OfflineModeIsEnabled,
    )
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, kinds):
            return " ".join(str(error).split())[:400]
        current = current.__cause__ or current.__context__
    return None
