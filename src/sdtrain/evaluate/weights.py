"""Weight files the evaluators download (FID's Inception, LPIPS' VGG-16 and its channel weights): through torch.hub's
cache, each checked on download against the sha256 its name carries (``name-<first hex digits of sha256>.pth``, the
convention torch.hub checks), so a tampered or truncated download is refused, never loaded."""

from __future__ import annotations

from pathlib import Path

import torch

from sdtrain.errors import UserError


class WeightsNotFound(UserError, FileNotFoundError):
    """A weight file that could not be had: offline, or not the published file."""


def hub_weights(url: str, what: str, file_name: str | None = None, hint: str = "") -> dict[str, torch.Tensor]:
    """The state dict at ``url``, from torch.hub's cache or downloaded into it with its hash checked.

    Args:
        url: the published file.
        what: what it is, for the messages.
        file_name: the name to cache it under (it must carry the sha256 prefix where the URL's name does not).
        hint: how to pass the file instead (a flag or config key), for the message.

    Raises:
        WeightsNotFound: the download failed, or its sha256 is not the published one.
    """
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, weights_only=True, check_hash=True, file_name=file_name
        )
    except OSError as e:  # URLError is an OSError: offline, or the host unreachable
        raise WeightsNotFound(
            f"{what} could not be downloaded ({e}). Fetch {url} where you have a network and pass the file{hint}, "
            f"or put it in {cache}" + (f" as {file_name}" if file_name else "")
        ) from None
    except RuntimeError as e:
        if "invalid hash value" not in str(e):
            raise
        raise WeightsNotFound(
            f"{what} downloaded from {url} is not the published file ({e}); nothing was kept"
        ) from None
