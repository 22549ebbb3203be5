"""Time to write (atomically, fsynced, with a sha256 manifest) and to verify + load a training checkpoint.

    python bench/checkpoint_io.py            # the tests' tiny UNet and the demo UNet

Each size is written 5 times; the median is printed. The checkpoint holds what a training run writes: UNet weights,
EMA weights, the AdamW state (two moments) and a JSON state.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from sdtrain.config import UNetConfig
from sdtrain.models.unet import build_unet
from sdtrain.train import checkpoint

SIZES = {
    "tiny (tests)": dict(
        block_out_channels=[16, 32], attention=[False, True], norm_num_groups=8, attention_head_dim=8
    ),
    "demo": dict(block_out_channels=[32, 64, 128], attention=[False, True, True]),
}


def main() -> None:
    for name, kwargs in SIZES.items():
        unet = build_unet(UNetConfig(**kwargs), 4, 16, 384)
        weights = unet.state_dict()
        optimizer = torch.optim.AdamW(unet.parameters())
        unet(torch.randn(1, 4, 16, 16), 1, torch.randn(1, 8, 384)).sample.mean().backward()
        optimizer.step()
        mb = 4 * sum(v.numel() for v in weights.values()) / 2**20
        writes, reads = [], []
        with tempfile.TemporaryDirectory() as root:
            for step in range(1, 6):
                start = time.perf_counter()
                path = checkpoint.save_checkpoint(
                    root, step, {"unet": weights, "ema": weights}, {"optimizer": optimizer.state_dict()}, {"step": 1}
                )
                writes.append(time.perf_counter() - start)
                start = time.perf_counter()
                checkpoint.load_checkpoint(path)  # verifies the manifest first
                reads.append(time.perf_counter() - start)
        write, read = 1000 * statistics.median(writes), 1000 * statistics.median(reads)
        print(
            f"{name:14s} weights {mb:6.1f} MB (checkpoint ~{4 * mb:.0f} MB): "
            f"write {write:4.0f} ms, verify + load {read:4.0f} ms"
        )


if __name__ == "__main__":
    main()
