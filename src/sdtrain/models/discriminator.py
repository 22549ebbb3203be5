"""The PatchGAN discriminator of stage 1's adversarial loss (diffusers ships none: it does not train autoencoders).

The layout is pix2pix's ``NLayerDiscriminator`` as taming-transformers and latent-diffusion use it for their VQGAN and
KL autoencoders: 4 x 4 convolutions, ``layers`` of them with stride 2 (widths ``channels * min(2**n, 8)``), one more
with stride 1, then a 1-channel map of logits, one per overlapping patch (70 x 70 pixels for 3 layers). Batch norm
and LeakyReLU(0.2) between them; weights drawn from N(0, 0.02) (batch norm's scales from N(1, 0.02)).
"""

from __future__ import annotations

import torch
from torch import nn


def smallest_input(layers: int) -> int:
    """The smallest image side that leaves the discriminator at least one patch: ``layers`` halvings, then two
    4 x 4 convolutions with stride 1 that each take one pixel."""
    return 3 * 2**layers


class PatchDiscriminator(nn.Sequential):
    """Images (B x 3 x H x W in [-1, 1]) -> patch logits (B x 1 x H' x W'): real > 0, reconstructed < 0."""

    def __init__(self, layers: int = 3, channels: int = 64, in_channels: int = 3) -> None:
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            blocks += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        super().__init__(*blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)


def hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: ``(mean(relu(1 - real)) + mean(relu(1 + fake))) / 2``."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
