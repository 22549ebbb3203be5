"""Training throughput: sdtrain's loop vs a plain diffusers-example step, same UNet, same batches, same process.

    python bench/train_step.py                       # CPU: the tests' tiny UNet, fp32
    python bench/train_step.py --sd15                # GPU: SD-1.5 UNet, 256 px batch 64 and 512 px batch 32, bf16
    python bench/train_step.py --sd15 --compile      # ... both sides under torch.compile
    python bench/train_step.py --sd15 --full         # one GPU lease: the targets' numbers first (see main)

Both sides train from cached latents (random tensors of the right shape: the UNet's cost does not depend on what
the numbers are) with fp32 master weights, autocast, gradient clipping, EMA and AdamW. The plain step is the loop of
diffusers' examples/text_to_image/train_text_to_image.py: ``randn_like`` noise, ``randint`` timesteps, MSE, a
``gather(...).mean().item()`` per step for logging, clip, ``optimizer.step()``, ``lr_scheduler.step()``, EMA.
Ours is :func:`sdtrain.train.loop.train` itself (images/s read from its log), with checkpoints and export off.

The first ``--warmup`` steps of each side are not timed. Prints images/s of both, the ratio, TFLOP/s (from a FLOP
count of the UNet) and peak memory on CUDA.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import TorchDynamoPlugin
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdtrain.config import Config, load_config
from sdtrain.models.families.sd import FAMILY, Components
from sdtrain.train.loop import train
from sdtrain.train.perf import profile_denoiser


def tiny_unet(cross: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross,
        norm_num_groups=8,
        attention_head_dim=8,
    )


def sd15_unet(sample_size: int) -> UNet2DConditionModel:
    """Stable Diffusion 1.5's UNet (diffusers' defaults are SD 1.x's, with CLIP ViT-L's 768-wide conditioning)."""
    return UNet2DConditionModel(sample_size=sample_size, cross_attention_dim=768)


def frozen_parts(factor: int, hidden: int, tokens: int):
    """A small random VAE (for the latent factor) and CLIP text encoder: not used by the steps, which read cached
    latents, but a run has them (preflight, export)."""
    levels = {2: 2, 8: 4}[factor]
    vae = AutoencoderKL(
        block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=tokens)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=tokens,
        )
    )
    return vae, text, tokenizer


def batches(n: int, batch: int, latent: int, tokens: int, hidden: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "latents": torch.randn(batch, 4, latent, latent, generator=g),
            "prompt_embeds": torch.randn(batch, tokens, hidden, generator=g),
        }
        for _ in range(n)
    ]


def plain_diffusers(unet, data, steps: int, warmup: int, precision: str, compile_: bool) -> float:
    """images/s of diffusers' train_text_to_image.py step."""
    AcceleratorState._reset_state()
    plugin = TorchDynamoPlugin(backend="inductor") if compile_ else None
    accelerator = Accelerator(mixed_precision=precision, dynamo_plugin=plugin)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema_unet = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=0.9999, use_ema_warmup=True)
    ema_unet.to(accelerator.device)
    unet.train()
    train_loss, start = 0.0, None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(accelerator.device)
            start = time.perf_counter()
        batch = data[step % len(data)]
        with accelerator.accumulate(unet):
            latents = batch["latents"].to(accelerator.device)
            encoder_hidden_states = batch["prompt_embeds"].to(accelerator.device)
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps.long())
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            avg_loss = accelerator.gather(loss.repeat(bsz)).mean()
            train_loss += avg_loss.item()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema_unet.step(unet.parameters())
    _sync(accelerator.device)
    return steps * data[0]["latents"].shape[0] / (time.perf_counter() - start)


def ours(unet, parts, data, steps, warmup, precision, compile_, resolution, extra=()) -> float:
    """images/s of sdtrain's loop (the log's windows after the warm-up)."""
    vae, text, tokenizer = parts
    batch = data[0]["latents"].shape[0]
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"train.output_dir={out}",
            "model.vae.path=unused",
            f"data.resolution={resolution}",
            "data.caption_dropout=0",
            f"train.batch_size={batch}",
            f"train.num_steps={warmup + steps}",
            f"train.log_every={warmup}",  # window 1 = warm-up, then timed windows of `warmup` steps
            f"train.save_every={10 * (warmup + steps)}",
            "train.final_checkpoint=false",
            "train.export=false",
            "train.trackers=[]",
            "train.optim.lr=1e-4",
            "train.ema_decay=0.9999",
            f"train.mixed_precision={precision}",
            f"train.compile={str(compile_).lower()}",
            *extra,
        ]
        config = load_config(Config, None, overrides)
        AcceleratorState._reset_state()
        train(config, components=Components(vae, text, tokenizer, unet), batches=data)
        records = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
    return statistics.mean(r["images_per_s"] for r in records[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _release() -> None:
    """Free what the last side left on the GPU (compiled graphs, cached blocks) before the next side starts, and
    undo the global setting our loop makes (``train.cudnn_benchmark``): the plain step runs with torch's default."""
    gc.collect()
    torch._dynamo.reset()
    torch.backends.cudnn.benchmark = False
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def profile_plain(unet, data, steps: int, path: Path) -> None:
    """A torch.profiler table (CUDA time by kernel) of a few eager plain steps, for the speed work."""
    from torch.profiler import ProfilerActivity, profile

    _release()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        plain_diffusers(unet, data, steps, 2, "bf16", False)
    path.write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))


class Case:
    """One UNet size and batch: the initial weights (the same for every side) and the cached batches."""

    def __init__(self, name, make_unet, parts, batch, latent, tokens, hidden, resolution):
        self.name, self.make_unet, self.parts, self.resolution = name, make_unet, parts, resolution
        self.latent, self.tokens, self.hidden = latent, tokens, hidden
        pin = torch.cuda.is_available()  # both sides copy the same pinned batches to the GPU
        self.data = [
            {k: v.pin_memory() if pin else v for k, v in b.items()} for b in batches(4, batch, latent, tokens, hidden)
        ]
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # SD 1.5's init is slow on a CPU
            self.state = {k: v.cpu() for k, v in self.make_unet().state_dict().items()}
        self.flops = None

    def unet(self) -> UNet2DConditionModel:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with device:
            unet = self.make_unet()
        unet.load_state_dict(self.state)
        if self.flops is None:
            cond = {"encoder_hidden_states": torch.randn(1, self.tokens, self.hidden)}
            self.flops = profile_denoiser(
                unet, FAMILY.predict, (4, self.latent, self.latent), cond, device
            ).train_flops
        return unet

    def side(self, label: str, run) -> dict:
        """Run one side; its images/s, TFLOP/s and peak memory (None and the error when it failed)."""
        _release()
        started = time.perf_counter()
        try:
            images_per_s, error = run(self.unet()), None
        except Exception as e:  # one failed variant (out of memory, a compiler error) must not end the benchmark
            images_per_s, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        row = {
            "case": self.name,
            "side": label,
            "images_per_s": images_per_s,
            "tflops": images_per_s * self.flops / 1e12 if images_per_s else None,
            "peak_gib": peak,
            "seconds": time.perf_counter() - started,
            "error": error,
        }
        _release()
        return row


def print_row(row: dict, baseline: dict | None, log: Path | None) -> None:
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    ratio = None
    if baseline and baseline["images_per_s"] and row["images_per_s"]:
        ratio = row["images_per_s"] / baseline["images_per_s"]
    print(
        f"| {row['case']} | {row['side']} | {num(row['images_per_s'], '.1f')} | {num(ratio, '.2f')} | "
        f"{num(row['tflops'], '.0f')} | {num(row['peak_gib'], '.1f')} | {row['seconds']:.0f} | {row['error'] or ''} |",
        flush=True,
    )
    if log is not None:
        with open(log, "a") as f:
            f.write(json.dumps({**row, "ratio": ratio}) + "\n")


def run_plain(case: Case, steps: int, warmup: int, precision: str, compile_: bool, log) -> dict:
    row = case.side("plain diffusers", lambda u: plain_diffusers(u, case.data, steps, warmup, precision, compile_))
    print_row(row, None, log)
    return row


def run_ours(case: Case, sides, steps: int, warmup: int, precision: str, compile_: bool, log, plain=None) -> list:
    """Each of our variants (label, config overrides), with its ratio to the ``plain`` row; returns their rows."""
    rows = []
    for label, extra in sides:
        row = case.side(
            label,
            lambda u, extra=extra: ours(
                u, case.parts, case.data, steps, warmup, precision, compile_, case.resolution, extra
            ),
        )
        print_row(row, plain, log)
        rows.append(row)
    return rows


def run_sides(case: Case, sides, steps: int, warmup: int, precision: str, compile_: bool, log) -> list:
    """The plain step, then each of our variants."""
    plain = run_plain(case, steps, warmup, precision, compile_, log)
    return run_ours(case, sides, steps, warmup, precision, compile_, log, plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15", action="store_true", help="SD-1.5 UNet on the GPU (256 px b64, 512 px b32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides")
    parser.add_argument("--full", action="store_true", help="--sd15: one lease's plan, compiled (see main)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per side")
    parser.add_argument("--precision", default=None, choices=["no", "bf16", "fp16"])
    parser.add_argument("--log", type=Path, default=None, help="append each row as a JSON line to this file")
    parser.add_argument("--profile", type=Path, default=None, help="--full: a profiler table of eager plain steps")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print("| case | side | img/s | ratio to plain | TFLOP/s | peak GiB | s | error |")
    print("|---|---|---|---|---|---|---|---|")
    if not args.sd15:
        steps, warmup, precision = args.steps or 60, args.warmup or 20, args.precision or "no"
        parts = frozen_parts(2, 32, 8)
        case = Case(f"tiny UNet 32 px b8 {precision}", lambda: tiny_unet(32), parts, 8, 16, 8, 32, 32)
        run_sides(case, [("sdtrain", [])], steps, warmup, precision, args.compile, args.log)
        return
    if not torch.cuda.is_available():
        raise SystemExit("--sd15 needs a CUDA GPU")
    steps, warmup, precision = args.steps or 30, args.warmup or 10, args.precision or "bf16"
    parts = frozen_parts(8, 768, 77)
    cases = {
        px: Case(f"SD-1.5 {px} px b{b} {precision}", lambda px=px: sd15_unet(px // 8), parts, b, px // 8, 77, 768, px)
        for px, b in ((256, 64), (512, 32))
    }
    if not args.full:
        for case in cases.values():
            run_sides(case, [("sdtrain", [])], steps, warmup, precision, args.compile, args.log)
        return
    # one GPU lease (a command may run 10 minutes; each compiled side compiles for about 2 of them): the numbers the
    # targets are about first, each row printed as it ends, so that a lease cut short still reports them. Eager at
    # 256 px (seconds), then our compiled step at 256 px, the same with train.ema_every=10 (the same graphs: the
    # inductor cache makes its compilation short), at 512 px, and last the compiled plain step at 256 px, the base
    # of the compiled rows' ratio (printed at the end)
    fast = ["train.channels_last=true"]  # the fastest of our eager variants on the H200 (bench/RESULTS.md)
    run_sides(cases[256], [("sdtrain channels_last", fast)], steps, warmup, precision, False, args.log)
    if args.profile:
        profile_plain(cases[256].unet(), cases[256].data, 3, args.profile)
    compiled = [("sdtrain channels_last", fast), ("sdtrain channels_last ema_every=10", fast + ["train.ema_every=10"])]
    rows = run_ours(cases[256], compiled, steps, warmup, precision, True, args.log)
    run_ours(cases[512], compiled[:1], steps, warmup, precision, True, args.log)
    plain = run_plain(cases[256], steps, warmup, precision, True, args.log)
    print("compiled at 256 px, ratio to the compiled plain step:")
    for row in rows:
        print_row(row, plain, None)


if __name__ == "__main__":
    main()
