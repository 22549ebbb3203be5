"""LPIPS (Zhang et al. 2018, v0.1, VGG-16 trunk): the perceptual distance of stage 1's loss and of its metrics.

The distance of two images in [-1, 1]: both are shifted and scaled to the trunk's input statistics, run through
VGG-16's convolutions up to relu5_3, and at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 each feature vector is
unit-normalised over channels; the squared differences are weighted per channel by a learned 1 x 1 convolution,
averaged over the image and summed over the five layers. This is the ``lpips`` package's ``LPIPS(net="vgg")``
computation (``tests/test_autoencoder.py`` checks ours against its code); we carry our own because that package
imports torchvision, whose exact torch pin would replace a user's torch.

Weights, two files: torchvision's ImageNet VGG-16 (``VGG_URL``, its ``features.*`` tensors load here by name) and the
LPIPS v0.1 channel weights (``LIN_URL``, the ``lpips`` package's ``weights/v0.1/vgg.pth``; a path to the package's
wheel is read too). torch.hub keeps downloads in ``~/.cache/torch/hub/checkpoints``; offline, pass the files' paths.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from sdtrain.evaluate.weights import WeightsNotFound, hub_weights

VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/v0.1/lpips/weights/v0.1/vgg.pth"
# the name it is cached under: the upstream "vgg.pth" says too little, and carries no hash for torch.hub to check
LIN_FILE = "lpips-v0.1-vgg-a78928a0.pth"  # sha256 a78928a0af1e5f0f... of the file in the lpips 0.1.4 wheel
LIN_IN_WHEEL = "lpips/weights/v0.1/vgg.pth"
# VGG-16 up to relu5_3 (torchvision's ``vgg16().features[:30]``): widths, "M" a 2 x 2 max pool
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in that Sequential
_WIDTHS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """``lpips(a, b)``: B images against B images (B x 3 x H x W in [-1, 1]) -> B distances (0: identical)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in _VGG16:
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(width, 1, 1, bias=False) for width in _WIDTHS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = (torch.cat([a, b]) - self.shift) / self.scale  # one pass over both halves
        distance = torch.zeros(a.shape[0], device=a.device, dtype=torch.float32)
        lins = dict(zip(_TAPS, self.lins))  # the features end at the last tap, relu5_3
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in lins:
                fa, fb = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in x.chunk(2))
                distance = distance + lins[index]((fa - fb).pow(2)).mean((1, 2, 3)).float()
        return distance


def load_lpips(vgg: str | Path | None = None, lin: str | Path | None = None) -> LPIPS:
    """LPIPS with its two weight files, frozen, in eval mode.

    Args:
        vgg: torchvision's ``vgg16-397923af.pth``; ``None`` takes it from torch.hub's cache (downloading it there
            once where the machine is online).
        lin: the LPIPS v0.1 VGG channel weights: ``vgg.pth`` of the ``lpips`` package, or that package's wheel
            (``pip download lpips==0.1.4 --no-deps``); ``None``: torch.hub's cache, as for ``vgg``.
    """
    network = LPIPS()
    trunk = _load(vgg, VGG_URL, None, "torchvision's VGG-16 weights")
    depth = len(network.features)  # torchvision's features[:30]; its later pool and the classifier are not used
    network.features.load_state_dict(
        {k.removeprefix("features."): v for k, v in trunk.items() if k.startswith("features.") and _index(k) < depth}
    )
    heads = _load(lin, LIN_URL, LIN_FILE, "the LPIPS v0.1 VGG weights")
    network.lins.load_state_dict({f"{k}.weight": heads[f"lin{k}.model.1.weight"] for k in range(len(_WIDTHS))})
    return network.requires_grad_(False).eval()


def _index(key: str) -> int:
    return int(key.split(".")[1])


def _load(path: str | Path | None, url: str, file_name: str | None, what: str) -> dict[str, torch.Tensor]:
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise WeightsNotFound(f"{what}: {path} not found (the file is {url})")
        if path.suffix == ".whl":  # the lpips package's wheel: read its weight file without installing it
            with zipfile.ZipFile(path) as wheel:
                return torch.load(io.BytesIO(wheel.read(LIN_IN_WHEEL)), map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    return hub_weights(url, f"LPIPS' {what}", file_name, " (train.lpips_vgg / train.lpips_lin)")
