"""``sdtrain`` sub-commands, each a thin wrapper over one public function."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sdtrain.config import SCHEDULER_NAMES

EXAMPLES = {
    "train": """example:
  sdtrain train --config demo train.output_dir=runs/mine train.optim.lr=1e-3 data.path=data/pets
  (resumes from runs/mine/checkpoints if it exists; the model is exported to runs/mine/final)
  accelerate launch --multi_gpu --num_processes 8 -m sdtrain train ...                   (DDP)
  accelerate launch --use_fsdp --fsdp_version 2 --num_processes 8 -m sdtrain train ...   (FSDP2: sharded)
  accelerate launch --use_deepspeed --zero_stage 2 --num_processes 8 -m sdtrain train ... (DeepSpeed ZeRO-2)""",
    "generate": """example:
  sdtrain generate --model runs/demo/final --out out/ --seed 0 --steps 30 --guidance 7.5 \\
      "a red circle on a blue background" "a green square on a yellow background"
  sdtrain generate --model runs/edit/final --reference circle.png "make the circle red"   # an edit model\"""",
    "reconstruct": """example:
  sdtrain reconstruct --model runs/demo/final --image dog.png --strength 0.6 --out out/ \\
      "a dog with blue fur and yellow eyes\"""",
    "cache": """example:
  sdtrain cache --config scratch-256 data.cache_dir=cache/laion-256
  accelerate launch -m sdtrain cache --config scratch-256 data.cache_dir=cache/laion-256  # N GPUs
  sdtrain train --config scratch-256 data.cache_dir=cache/laion-256         # trains from the cache""",
    "export": """example:
  sdtrain export --run runs/demo/unet --step 500 --out runs/demo/step-500   # EMA weights of that checkpoint""",
    "convert": """examples:
  sdtrain convert runs/demo/final model.safetensors --half       # for A1111 / ComfyUI (SD 1.x layout)
  sdtrain convert model.safetensors sd15/ --config stable-diffusion-v1-5/stable-diffusion-v1-5""",
    "serve": """example:
  sdtrain serve --root . --port 8000          # then open http://127.0.0.1:8000/
  sdtrain serve --root ~/work --devices cuda:0,cuda:1   # two runs at a time, one per GPU""",
    "train-vae": """examples:
  sdtrain train-vae --config demo-vae data.path=data/shapes/train train.max_minutes=3
  sdtrain train-vae --config sd15-vae-ft data.path=data/my-images    # SD 1.5's decoder, fine-tuned""",
    "evaluate": """examples:
  sdtrain evaluate --model runs/demo/final --data data/shapes --out runs/demo      # the shapes dataset's own scores
  sdtrain evaluate --model runs/mine/final --data data/pets-heldout --num 2000 \\
      --metrics fid,kid,clip --clip-model openai/clip-vit-large-patch14          # FID / KID / CLIP score
  accelerate launch -m sdtrain evaluate --model runs/mine/final --data data/heldout --num 10000   # N GPUs""",
    "caption": """examples:
  sdtrain caption data/sks-dog --trigger sks          # NAME.txt for every image without a caption
  sdtrain caption data/style --model Qwen/Qwen2.5-VL-7B-Instruct --batch-size 8 --overwrite""",
    "demo": """example:
  sdtrain demo --out runs/demo            # what `make demo` runs; finished stages are reused
  sdtrain demo --config demo-dit          # a diffusion transformer with flow matching instead of the UNet""",
}


def _sampling_parsers(add) -> None:
    """``generate`` and ``reconstruct``'s arguments (``add``: the subcommand maker of :func:`_parser`)."""
    for name, help_ in (
        ("generate", "Text to image (an edit model: a reference edited; a ControlNet: a control drawn to)."),
        ("reconstruct", "Image to image under a prompt (SDEdit)."),
    ):
        p = add(name, help_)
        p.add_argument("--model", required=True, help="pipeline folder (e.g. runs/x/final) or hub id")
        p.add_argument("--out", type=Path, default=Path("out"), help="output folder for PNGs and grid.png")
        p.add_argument("--negative", default=None, help="negative prompt")
        p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, else 30)")
        p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's, else 7.5)")
        p.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i")
        p.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES, help="the sampler")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        p.add_argument("--lora-scale", type=float, default=None, help="a LoRA run's export: its adapters at this "
                       "strength (1: as exported, 0: the base model)")  # fmt: skip
        if name == "generate":
            p.add_argument("--num", type=int, default=1, help="images per prompt")
            p.add_argument("--height", type=int, default=None)
            p.add_argument("--width", type=int, default=None)
            p.add_argument(
                "--reference",
                type=Path,
                action="append",
                default=None,
                help="edit models: the image to edit (once for all prompts, or once per prompt)",
            )
            p.add_argument(
                "--control",
                type=Path,
                action="append",
                default=None,
                help="ControlNets: the control image (once for all prompts, or once per prompt)",
            )
            p.add_argument(
                "--image-guidance",
                type=float,
                default=None,
                help="edit models with image guidance: how closely to keep the reference (default: "
                "the model's, else 1.5)",
            )
            p.add_argument("prompts", nargs="+", help="one or more prompts")
        else:
            p.add_argument("--image", type=Path, required=True, help="input image")
            p.add_argument("--strength", type=float, default=0.6, help="0 keeps the image, 1 ignores it")
            p.add_argument("prompt", help="the prompt")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtrain", description="Train your own Stable Diffusion model.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add("train", "Train the UNet (resumes from the run directory's newest valid checkpoint).")
    p.add_argument("--config", type=Path, help="YAML config (see README's config reference)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.optim.lr=1e-3")
    p.add_argument("--estimate", action="store_true", help="print the memory estimate (models loaded on the CPU) "
                   "as one JSON line and exit without training")  # fmt: skip

    p = add("cache", "Encode a dataset's latents and caption embeddings once into data.cache_dir.")
    p.add_argument("--config", type=Path, help="the training config (its model and data sections are used)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")

    p = add("export", "Export a training checkpoint (EMA weights) as a diffusers pipeline folder.")
    p.add_argument("--run", type=Path, required=True, help="the run's output_dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest valid one)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/export/step-XXXXXXXX)")
    p.add_argument("--trust-remote-code", action="store_true", help="let the text encoder's own code run (the "
                   "run's config.yaml is not asked)")  # fmt: skip

    p = add("train-vae", "Train an autoencoder (stage 1): AutoencoderKL, VQModel or AutoencoderDC.")
    p.add_argument("--config", type=Path, help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")

    _sampling_parsers(add)

    p = add(
        "evaluate",
        "Score a model: FID, KID and CLIP score against image-caption data, or, on the built-in shapes dataset, "
        "prompt adherence and reconstruct edits.",
    )
    p.add_argument("--model", required=True, help="pipeline folder")
    p.add_argument("--data", default="data/shapes", help="shapes dataset root, or image-caption data as in data.path")
    p.add_argument("--out", type=Path, default=None, help="where the scores and grids go (default: the model's run)")
    p.add_argument("--metrics", default=None, help="shapes, or some of fid,kid,clip (default: shapes on its dataset)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's, else 7.5)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, else 30)")
    p.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES, help="sampler (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="seeds the images (and, for FID / KID, picks the pairs)")
    p.add_argument("--strength", type=float, default=0.8, help="shapes edits: 0 keeps the image, 1 ignores it")
    p.add_argument("--images-per-combo", type=int, default=2, help="shapes: images per combination")
    p.add_argument("--num", type=int, default=1000, help="FID / KID / CLIP: image-caption pairs to score")
    p.add_argument("--batch-size", type=int, default=16, help="FID / KID / CLIP: images drawn at a time")
    p.add_argument("--inception", type=Path, default=None, help="FID's Inception weights (default: torch.hub's cache)")
    p.add_argument("--clip-model", default=None, help="CLIP score's model, hub id or folder (default: CLIP ViT-L/14)")
    p.add_argument("--device", default=None, help="default: CUDA if available")
    p.add_argument("--image-column", default="file_name", help="as data.image_column")
    p.add_argument("--caption-column", default="text", help="as data.caption_column")

    p = add("convert", "A pipeline folder to a single-file (LDM layout) checkpoint, or a single file to a folder.")
    p.add_argument("source", type=Path, help="pipeline folder, or .safetensors / .ckpt file")
    p.add_argument("out", type=Path, help="the .safetensors file, or the folder, to write")
    p.add_argument("--config", default=None, help="for a single file: the pipeline folder or hub id it matches")
    p.add_argument("--half", action="store_true", help="write fp16 weights")

    p = add("serve", "A local web UI: start, watch, stop, resume and compare runs, edit captions, generate.")
    p.add_argument("--root", "--runs", dest="root", type=Path, default=Path("."),
                   help="the folder served: runs and data folders under it; nothing outside it is read")  # fmt: skip
    p.add_argument("--devices", default="default", help="comma-separated devices runs queue for, one run at a time "
                   "each: cuda:0,cuda:1 or cpu (default: as sdtrain train would choose, one at a time)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (it runs models on request: keep it local)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="where models run (default: CUDA if available)")
    p.add_argument("--max-models", type=int, default=1, help="models kept loaded (the least recently used goes)")
    p.add_argument("--allow-host", action="append", default=[], help="a further host name the page is reached by")

    p = add("caption", "Caption the images of a folder that have none, with a vision-language model (NAME.txt).")
    p.add_argument("folder", type=Path, help="a folder of images")
    p.add_argument("--model", default=None, help="vision-language model, hub id or folder (default: Qwen2.5-VL 3B)")
    p.add_argument("--prompt", default=None, help="the instruction the model answers for each image")
    p.add_argument("--trigger", default=None, help="a word put in front of every caption")
    p.add_argument("--overwrite", action="store_true", help="caption images that have a caption too")
    p.add_argument("--batch-size", type=int, default=4, help="images captioned at once")
    p.add_argument("--max-new-tokens", type=int, default=96, help="the longest caption, in tokens")
    p.add_argument("--device", default=None, help="default: CUDA if available")
    p.add_argument("--trust-remote-code", action="store_true", help="let the model's own code run")

    p = add("demo", "The built-in default: shapes data -> autoencoder -> UNet -> generate -> reconstruct -> evaluate.")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/ and the config's name)")
    p.add_argument("--data", type=Path, default=Path("data/shapes"), help="where the dataset is written")
    p.add_argument("--config", default="demo", help="the denoiser's config: demo (a UNet), demo-dit, or a YAML file")
    p.add_argument("--quick", action="store_true", help="a shortened demo (seconds per stage) for tests")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``sdtrain``: one rule for every verb. An error the user can act on (:class:`sdtrain.errors.UserError`, or a
    write refused for want of space or permission) is one line on stderr and exit 2; a stop on SIGTERM exits 75;
    anything else is a bug, said in one line, its traceback written to the run folder's ``errors.log`` (or a
    temporary file) that the line names, and exit 1."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from sdtrain.config import ConfigError
    from sdtrain.errors import UserError, describe_os_error, failed_write

    try:
        return _run(args)
    except ConfigError as e:
        print(f"sdtrain: config error: {_one_line(e)}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"sdtrain: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtrain: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from sdtrain.errors import in_chain
        from sdtrain.train.preemption import EXIT_PREEMPTED, Preempted

        preempted = in_chain(e, Preempted)  # (a stop while loading: a library may have wrapped it)
        if preempted is not None:
            print(f"sdtrain: {preempted}", file=sys.stderr)
            return EXIT_PREEMPTED
        cause = failed_write(e)
        if cause is not None:
            what = f"could not write {cause.filename}" if cause.filename else "a write failed"
            print(f"sdtrain: {what} ({describe_os_error(cause)}){_go_on(args)}", file=sys.stderr)
            return 2
        from sdtrain.models.hub import hub_failure

        hub = hub_failure(e)
        if hub is not None:
            print(f"sdtrain: could not load a model from the Hugging Face Hub ({hub}): check its id, the network and "
                  "your access (`hf auth login`), or give its folder", file=sys.stderr)  # fmt: skip
            return 2
        where = _write_traceback(args)
        print(f"sdtrain: internal error, a bug in sdtrain ({type(e).__name__}: {_one_line(e)}); please report it "
              f"with {where}", file=sys.stderr)  # fmt: skip
        return 1
    finally:
        _close_process_group()


def _read_image(path: Path, flag: str = "--image"):
    """``--image`` (or ``flag``), decoded as training decodes images (EXIF orientation, alpha on white), or a
    one-line error."""
    from sdtrain.data.decode import DataError, Skip, decode_image

    try:
        return decode_image(path)
    except Skip as skip:
        detail = str(skip).partition(": ")[2] if skip.reason in ("corrupt", "too_large") else ""
        what = {"missing": "no such file", "empty": "an empty file", "not_an_image": "not an image file"}
        why = what.get(skip.reason, skip.reason.replace("_", " ")) + (f" ({detail})" if detail else "")
        raise DataError(f"{flag} {path}: {why}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _go_on(args: argparse.Namespace) -> str:
    """How a run whose write failed goes on: from its newest valid checkpoint."""
    run = getattr(args, "run_dir", None)
    if run is None or args.command not in ("train", "train-vae", "demo"):
        return ": free some space and run the same command again"
    from sdtrain.train.checkpoint import resume_note

    return f"; {resume_note(Path(run) / 'checkpoints')}"


def _write_traceback(args: argparse.Namespace) -> str:
    """The current exception's traceback, appended to the run folder's ``errors.log`` where there is a run folder,
    else to a new temporary file; returns where it went."""
    import tempfile
    import time
    import traceback

    text = f"{time.strftime('%Y-%m-%d %H:%M:%S')} sdtrain {' '.join(sys.argv[1:])}\n{traceback.format_exc()}\n"
    run = getattr(args, "run_dir", None)
    if run is not None and Path(run).is_dir():
        try:
            with open(Path(run) / "errors.log", "a") as f:
                f.write(text)
            return str(Path(run) / "errors.log")
        except OSError:
            pass
    try:
        fd, path = tempfile.mkstemp(prefix="sdtrain-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    except OSError:
        return "the traceback (it could not be written to a file: run again with python -X faulthandler)"


def _close_process_group() -> None:
    """Under `accelerate launch`, leave the process group before the interpreter exits: gloo's threads still running
    at exit abort the process ("terminate called without an active exception") when the machine is busy."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _print_estimate(config) -> int:
    """``sdtrain train --estimate``: the pre-flight memory estimate as one JSON line (GiB per part and in total)."""
    from sdtrain.train.loop import estimate

    print(json.dumps({k: round(v, 4) for k, v in estimate(config).gib().items()}))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from sdtrain.config import Config, load_config
        from sdtrain.train.loop import train

        config = load_config(Config, args.config, args.overrides)
        if args.estimate:
            return _print_estimate(config)
        args.run_dir = config.train.output_dir
        final = train(config)
        if int(os.environ.get("RANK", "0")) == 0:  # once, not once per process
            print(f"exported {final}" if config.train.export else f"finished: {config.train.output_dir}")
    elif args.command == "cache":
        from sdtrain.config import Config, load_config
        from sdtrain.train.encode import cache_dataset

        print(f"cached into {cache_dataset(load_config(Config, args.config, args.overrides))}")
    elif args.command == "export":
        from sdtrain.train.export import export_checkpoint

        args.run_dir = args.run
        print(f"exported {export_checkpoint(args.run, args.step, args.out, args.trust_remote_code)}")
    elif args.command == "train-vae":
        from sdtrain.config import AutoencoderConfig, load_config
        from sdtrain.train.autoencoder import train_autoencoder

        config = load_config(AutoencoderConfig, args.config, args.overrides)
        args.run_dir = config.train.output_dir
        result = train_autoencoder(config)
        print(f"exported {result['path']}  psnr {result['psnr']:.2f} dB  ssim {result['ssim']:.3f}")
    elif args.command in ("generate", "reconstruct"):
        from sdtrain.sample.pipeline import Pipeline, save_images

        pipe = Pipeline.from_pretrained(args.model, device=args.device, scheduler=args.scheduler)
        if args.lora_scale is not None:
            pipe.set_lora_scale(args.lora_scale)
        common = dict(
            negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed
        )
        if args.command == "generate":
            images = {k: [_read_image(p, f"--{k}") for p in v] for k in ("reference", "control")
                      if (v := getattr(args, k))}  # fmt: skip
            out = pipe.generate(
                args.prompts, num_images_per_prompt=args.num, height=args.height, width=args.width,
                image_guidance_scale=args.image_guidance, **images, **common,
            )  # fmt: skip
        else:
            image = _read_image(args.image)
            out = pipe.reconstruct(args.prompt, image, strength=args.strength, **common)
        grid = save_images(out.images, args.out, prefix=args.command)
        print(f"wrote {len(out.images)} images and {grid}")
    elif args.command == "evaluate":
        from sdtrain.evaluate.fidelity import DEFAULT_CLIP, METRICS, evaluate_fidelity

        out = args.out or Path(args.model).parent
        shapes = (Path(args.data) / "combos.json").is_file()
        metrics = args.metrics or ("shapes" if shapes else ",".join(METRICS))
        if metrics == "shapes":
            from sdtrain.evaluate.report import evaluate_shapes_model

            scores = evaluate_shapes_model(
                args.model,
                args.data,
                out,
                guidance_scale=args.guidance,
                num_inference_steps=args.steps,
                images_per_combo=args.images_per_combo,
                edit_strength=args.strength,
                scheduler=args.scheduler,
                seed=args.seed,
            )
            print(f"seen {scores['seen']}\nheld_out {scores['held_out']}\nwrote {out / 'metrics.json'}")
        else:
            scores = evaluate_fidelity(
                args.model,
                args.data,
                out,
                metrics=[m.strip() for m in metrics.split(",") if m.strip()],
                num_images=args.num,
                inception=args.inception,
                clip_model=args.clip_model or DEFAULT_CLIP,
                guidance_scale=args.guidance,
                num_inference_steps=args.steps,
                scheduler=args.scheduler,
                batch_size=args.batch_size,
                seed=args.seed,
                device=args.device,
                image_column=args.image_column,
                caption_column=args.caption_column,
            )
            shown = {k: round(v, 4) for k, v in scores.items() if k.startswith(("fid", "kid_m", "kid_s", "clip_s"))}
            print(f"{shown} on {scores['num_images']} images\nwrote {out / 'fidelity.json'}")
    elif args.command == "convert":
        from sdtrain.models.single_file import convert

        print(f"wrote {convert(args.source, args.out, args.config, args.half)}")
    elif args.command == "serve":
        from sdtrain.web import serve

        devices = tuple(d.strip() for d in args.devices.split(",") if d.strip())
        serve(args.root, args.host, args.port, args.device, args.max_models, tuple(args.allow_host), devices)
    elif args.command == "caption":
        from sdtrain.data.autocaption import DEFAULT_MODEL, DEFAULT_PROMPT, caption_folder

        report = caption_folder(
            args.folder, args.model or DEFAULT_MODEL, args.prompt or DEFAULT_PROMPT, args.trigger, args.overwrite,
            args.batch_size, args.max_new_tokens, args.device, args.trust_remote_code,
        )  # fmt: skip
        print(f"wrote {len(report.written)} captions; {report.kept} images had one already; "
              f"skipped: {report.skipped.summary()}")  # fmt: skip
    elif args.command == "demo":
        from sdtrain.demo import run_demo

        out = args.out or Path("runs", Path(args.config).stem)
        args.run_dir = out
        run_demo(out, args.data, quick=args.quick, config=args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
