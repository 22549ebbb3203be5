"""``make demo``: the whole system on the built-in default, measured.

shapes dataset -> autoencoder (stage 1) -> text-conditioned UNet with the frozen MiniLM encoder (or, with
``config="demo-dit"``, a diffusion transformer trained with flow matching) -> generate -> reconstruct -> evaluate, on
2 CPU cores in about a quarter of an hour. Each stage's output is reused by the next run
(a finished autoencoder or UNet is not retrained; an interrupted one resumes from its checkpoint).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdtrain.config import PRESETS, AutoencoderConfig, Config, load_config
from sdtrain.data.shapes import write_shapes_dataset

# Edit strength of the evaluation's reconstruct (its sampler, steps and guidance are the config's `sample` section):
# with the UNet demo at guidance 1.5 (seed 1), strength 0.6 / 0.7 / 0.8 edit 47.9 / 79.2 / 89.6 % (shape kept 89.6 /
# 91.7 / 95.8 %); 0.8 is diffusers' img2img default.
EDIT_STRENGTH = 0.8

# Minutes the demo took in a fresh clone (dataset to evaluation; `make demo` adds its setup) on two machines, and
# which (docs/demo.md): what the plan printed at the start expects. The steps are fixed: a slower machine takes
# longer for the same training. demo at 3,400 steps of 8 with Muon: 28.0 on 2 cores of an AMD EPYC (2026-12-07,
# alone: the slow machine of issue 26; with AdamW it took 24.9, the UNet stage 1,161 s against Muon's 1,445), and
# about 20 on 2 cores of a Xeon, estimated: AdamW's 16.5 there (2026-12-06, night) with its UNet stage's 796 s
# times the EPYC's 1,445 / 1,161; demo-dit at 3,400 steps of 8: 13.2 on 2 cores of a Xeon (2026-12-06), one core
# scaled from it as 13.2 x 19 / 11.5 (the UNet demo at 1,700 of 16 took 11.5 / 19.0 on the Xeon's 2 cores / one,
# both measured).
EXPECTED_MINUTES = {
    "demo": (20.0, 28.0, "2 cores of a Xeon (estimated), 2 of an AMD EPYC"),
    "demo-dit": (21.5, 31.0, "2 cores of a Xeon (estimated), 2 of an AMD EPYC"),
}

# The share of seen and of held-out prompts each preset's model must draw right in all three (colour, shape,
# background): what the demo's recipe is tuned for, and what its summary checks.
GOALS = {"demo": 0.95, "demo-dit": 0.90}

# The autoencoder each family's pipeline holds, where it is not the demo-vae preset's AutoencoderKL: a SanaPipeline
# reads an AutoencoderDC's config.
AUTOENCODER_KIND = {"sana": "dc"}

# --quick: a few steps per stage instead of thousands (the end-to-end test); the quality targets do not apply.
QUICK = {
    "dataset": {"num_images": 256, "num_eval": 64},
    "vae": ["train.num_steps=30", "train.eval_images=32"],
    "denoiser": ["train.num_steps=40", "train.save_every=20", "train.log_every=5"],
    "evaluate": {"images_per_combo": 1, "num_inference_steps": 8, "edit_count": 8},
}


@contextmanager
def _stage(name: str, seconds: dict[str, float]):
    """Print a stage header and record its duration in ``seconds[name]``."""
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 1)


def run_demo(
    out: str | Path = "runs/demo", data: str | Path = "data/shapes", quick: bool = False, config: str | Path = "demo"
) -> dict[str, Any]:
    """Run (or resume) the demo; returns the metrics written to ``out/metrics.json``.

    Args:
        out: the run folder (the autoencoder in ``out/vae``, the denoiser in ``out/unet`` or ``out/transformer``).
        data: where the shapes dataset is written.
        quick: seconds per stage instead of minutes (the end-to-end test); the quality targets do not apply.
        config: the second stage's config, a preset name (``demo``: the UNet; ``demo-dit``: a diffusion transformer
            with flow matching) or a YAML file; the evaluation samples with its ``sample`` settings.

    ``metrics["seconds"]`` holds each stage's duration in the run that did the work: a reused stage keeps the
    timing recorded when it was trained.
    """
    from sdtrain.models.families import for_config

    out, data = Path(out), Path(data)
    vae_dir = out / "vae" / "final"
    stage = load_config(Config, config)  # both stages read first: a wrong config costs no work
    family = for_config(stage.model)
    vae_overrides = [f"data.path={data / 'train'}", f"eval_data={data / 'eval'}", f"train.output_dir={out / 'vae'}"]
    vae_overrides += autoencoder_overrides(family.name) + (QUICK["vae"] if quick else [])
    vae_config = load_config(AutoencoderConfig, PRESETS / "demo-vae.yaml", vae_overrides)
    name = family.denoiser  # the denoiser's stage is named after it (unet, transformer)
    final = out / name / "final"
    overrides = [f"data.path={data / 'train'}", f"model.vae.path={vae_dir}", f"train.output_dir={out / name}"]
    stage = load_config(Config, config, overrides + (QUICK["denoiser"] if quick else []))
    print(plan(vae_config, stage, name, None if quick else EXPECTED_MINUTES.get(str(config))), flush=True)
    previous = (
        json.loads((out / "metrics.json").read_text()).get("seconds", {}) if (out / "metrics.json").exists() else {}
    )
    seconds: dict[str, float] = {}
    reused: set[str] = set()
    started = time.perf_counter()

    with _stage("dataset", seconds):
        write_shapes_dataset(data, **(QUICK["dataset"] if quick else {}))

    with _stage("autoencoder", seconds):
        if (vae_dir / "metrics.json").exists():
            print(f"reusing {vae_dir}")
            reused.add("autoencoder")
        else:
            from sdtrain.train.autoencoder import train_autoencoder

            train_autoencoder(vae_config)
        vae_metrics = json.loads((vae_dir / "metrics.json").read_text())
        print(
            f"autoencoder: PSNR {vae_metrics['psnr']:.2f} dB, SSIM {vae_metrics['ssim']:.3f}, "
            f"scaling factor {vae_metrics['scaling_factor']:.3f}"
        )

    with _stage(name, seconds):
        if (final / "model_index.json").exists():
            print(f"reusing {final}")
            reused.add(name)
        else:
            from sdtrain.train.loop import train

            train(stage)

    with _stage("evaluate", seconds):
        from sdtrain.evaluate.report import evaluate_shapes_model

        extra = {
            "vae_psnr": vae_metrics["psnr"],
            "vae_ssim": vae_metrics["ssim"],
            "vae_scaling_factor": vae_metrics["scaling_factor"],
        }
        sample = stage.sample
        settings = {"guidance_scale": sample.guidance_scale, "scheduler": sample.scheduler}
        settings |= {"num_inference_steps": sample.num_inference_steps, "edit_strength": EDIT_STRENGTH}
        settings |= QUICK["evaluate"] if quick else {}
        metrics = evaluate_shapes_model(final, data, out, extra=extra, **settings)
    if not quick and str(config) in GOALS:
        goal = GOALS[str(config)]
        metrics["goal"] = {"all_three": goal, "met": min(metrics["seen"]["all"], metrics["held_out"]["all"]) >= goal}
    seconds["total_this_run"] = round(time.perf_counter() - started, 1)
    print(f"\nthis run took {seconds['total_this_run'] / 60:.1f} minutes", flush=True)
    metrics["seconds"] = {k: previous.get(k, v) if k in reused else v for k, v in seconds.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(summary_table(metrics, out))
    return metrics


def autoencoder_overrides(family: str) -> list[str]:
    """What the demo-vae preset changes for the second stage's ``family`` (:data:`AUTOENCODER_KIND`)."""
    return [f"model.kind={AUTOENCODER_KIND[family]}"] if family in AUTOENCODER_KIND else []


def plan(vae: AutoencoderConfig, stage: Config, name: str, expected: tuple[float, float, str] | None) -> str:
    """What the demo will train, in steps (fixed and seeded: the same training on every machine), and ``expected``,
    the minutes it took on the two machines of :data:`EXPECTED_MINUTES`."""
    tc = stage.train
    lines = [
        f"the autoencoder trains {vae.train.num_steps:,} steps of {vae.train.batch_size} crops, the {name} "
        f"{tc.num_steps:,} steps of {tc.batch_size} images, from fixed seeds (the same weights wherever the CPU and "
        "its thread count are the same)"
    ]
    if expected is not None:
        fast, slow, machines = expected
        lines.append(f"expected: {fast:.0f} to {slow:.0f} minutes on the machines docs/demo.md measured ({machines}); "
                     "each stage's seconds are printed at the end")  # fmt: skip
    return "\n".join(lines)


def goal_line(goal: dict[str, Any] | None) -> list[str]:
    """The summary's line on :data:`GOALS`: nothing for a quick demo or a config of the user's own."""
    if goal is None:
        return []
    verdict = "met" if goal["met"] else "NOT met"
    return [f"goal: seen and held-out prompts all three right >= {goal['all_three']:.0%}: {verdict}"]


def summary_table(metrics: dict[str, Any], out: Path) -> str:
    """The short table `make demo` ends with."""
    s, h, r = metrics["seen"], metrics["held_out"], metrics["reconstruct"]
    edits = (
        f"reconstruct edits: {r['edit_success']:.1%} succeed (colour {r['color_edit_success']:.1%}, background "
        f"{r['background_edit_success']:.1%}), shape kept {r['shape_kept']:.1%}, strength {r['strength']}"
        if r is not None
        else "reconstruct: none (diffusers has no image-to-image pipeline for this family)"
    )
    lines = [
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in metrics["seconds"].items()],
        "",
        f"autoencoder PSNR {metrics['vae_psnr']:.2f} dB, SSIM {metrics['vae_ssim']:.3f}",
        "",
        "| prompts | colour | shape | background | all three |",
        "|---|---|---|---|---|",
        f"| seen | {s['color']:.1%} | {s['shape']:.1%} | {s['background']:.1%} | {s['all']:.1%} |",
        f"| held out | {h['color']:.1%} | {h['shape']:.1%} | {h['background']:.1%} | {h['all']:.1%} |",
        "",
        edits,
        f"guidance {metrics['guidance_scale']}, {metrics['num_inference_steps']} steps, {metrics['scheduler']}",
        *goal_line(metrics.get("goal")),
        "",
        "grids: " + "  ".join(str(out / f"grid_{g}.png") for g in ("seen", "held_out", "reconstruct")[: 2 + bool(r)]),
        f"metrics: {out / 'metrics.json'}",
    ]
    return "\n".join(lines)
