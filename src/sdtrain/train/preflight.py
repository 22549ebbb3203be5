"""What a run is checked for before its folder is made, so that a mistake costs one line and leaves nothing behind:
the objective and sampler against the family, the text encoders' training mode, every model it loads (a folder here
or a hub id), and its data (a source that exists and holds a usable sample, or a complete latent cache)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from sdtrain import objective
from sdtrain.config import AutoencoderConfig, Config, ConfigError, DataConfig, ModelConfig, data_sources
from sdtrain.data.disk_cache import check_cache
from sdtrain.data.folder import training_records
from sdtrain.data.sources import check_condition_files, check_masks, check_usable, is_shards, list_records
from sdtrain.models.embeddings import check_tokens, check_trigger
from sdtrain.models.families import IN_MEMORY, for_config
from sdtrain.models.hub import check_model_source
from sdtrain.models.text import MINILM
from sdtrain.sample.pipeline import sampling_scheduler
from sdtrain.train import placement, prior, text_encoders


def check_objective(config: Config) -> str:
    """The objective the run trains (:func:`sdtrain.objective.kind_of`), checked with the sampler of ``sample``
    against what the family's pipelines run.

    Raises:
        ConfigError: the family cannot train or sample it (a flow-matching PixArt sampled with ``euler``).
    """
    family = for_config(config.model)
    kind = objective.kind_of(config.train.objective, family)
    sampling_scheduler(config.train.objective, config.sample.scheduler, kind, family.flow_samplers)
    if kind == "ddpm":
        check_pretrained_prediction(config)
    return kind


def check_pretrained_prediction(config: Config) -> None:
    """A denoiser fine-tuned from a pipeline folder trains what its scheduler samples: the same prediction type and
    zero-terminal-SNR schedule (SD 2.x 768 and the demo predict v). Training another target unlearns the model.

    Raises:
        ConfigError: naming the keys to set.
    """
    m = config.model
    index = Path(m.pretrained or "", "scheduler", "scheduler_config.json")
    own_unet = m.unet.from_scratch or m.unet.pretrained
    if not m.pretrained or m.pretrained == IN_MEMORY or own_unet or not index.is_file():
        return
    theirs = objective.from_scheduler(SimpleNamespace(config=json.loads(index.read_text())))
    keys = ("prediction_type", "rescale_zero_terminal_snr")
    differ = {k: getattr(theirs, k) for k in keys if getattr(theirs, k) != getattr(config.train.objective, k)}
    if theirs.kind == "ddpm" and differ:
        settings = " ".join(
            f"train.objective.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in differ.items()
        )
        raise ConfigError(
            f"model.pretrained={m.pretrained} samples {theirs.prediction_type} (its scheduler"
            f"{', zero terminal SNR' if theirs.rescale_zero_terminal_snr else ''}): training it otherwise "
            f"unlearns it; set {settings}"
        )


def check_run(config: Config, models: bool = True, data: bool = True) -> str:
    """Everything :func:`sdtrain.train.loop.train` can refuse before any work; returns the objective's kind.

    Args:
        models: check the model sources (not where the Python API hands the components over).
        data: check ``config.data`` (not where the Python API hands the batches over).

    Raises:
        UserError: a ConfigError, ModelNotFound or DataError naming the key and what to do.
    """
    check_device_memory(config.train.needs_gib)  # a preset on too small a card: the first thing said
    if models:
        check_model_sources(config.model)
    kind = check_objective(config)
    check_conditions(config, data)
    text_encoders.check(for_config(config.model), config.train)
    if models:
        check_new_tokens(config)
    placement.check(config)  # quantisation: LoRA on a base that re-reads, an installed library
    prior.check(config)  # class images to draw, and a base model to draw them
    if data:
        check_data(config.data, config.train.seed)
    return kind


def check_conditions(config: Config, data: bool = True) -> None:
    """The condition images the data and the samples give match what the family takes: an edit model's reference
    (a ControlNet's control) named in data.conditions and given for each of train.sample_prompts in sample.images,
    and none for a text-to-image model.

    Raises:
        ConfigError: naming the keys to set.
    """
    family, names, images = for_config(config.model), config.data.conditions, config.sample.images
    kind = family.condition
    if config.train.lora.rank and not family.lora_targets:
        raise ConfigError(f"train.lora: the {family.name} family trains a model of its own, wholly (no LoRA)")
    if config.model.controlnet and family.condition != "control":
        raise ConfigError(f"model.controlnet: the {family.name} family has no ControlNet (model.family="
                          "sd-controlnet, sdxl-controlnet, sd3-controlnet or flux-controlnet)")  # fmt: skip
    if kind is None and names:
        raise ConfigError(f"data.conditions={names}: the {family.name} family draws from text alone and takes no "
                          "condition images (an edit model or a ControlNet does)")  # fmt: skip
    if kind is None and images:
        raise ConfigError(f"sample.images: the {family.name} family draws from text alone and takes no images")
    if config.data.condition_resolution is not None and not family.references_own_size:
        raise ConfigError(f"data.condition_resolution: the {family.name} family reads its {kind or 'condition'} "
                          "image pixel for pixel beside its image (of the image's size): leave it unset (it is for "
                          "models that take references at their own size: FLUX.1 Kontext, FLUX.2, "
                          "Qwen-Image-Edit)")  # fmt: skip
    if kind and data and not names and family.condition_required:
        raise ConfigError(f"the {family.name} family draws from a {kind} image: name it in data.conditions "
                          f"(data.conditions=[{kind}] reads NAME.{kind}.png beside each NAME.png)")  # fmt: skip
    prompts = config.train.sample_prompts
    if family.shared_references and images and len(images) != len(names):
        raise ConfigError(f"sample.images: the {family.name} family's samples take the references every prompt "
                          f"shares, one per data.conditions name ({len(names)}); {len(images)} given")  # fmt: skip
    needed = family.condition_required or bool(names)
    if kind and prompts and needed and not family.shared_references and len(images) not in (1, len(prompts)):
        count = f"{len(images)} for {len(prompts)} prompts"
        raise ConfigError(f"sample.images: the {family.name} family draws each of train.sample_prompts from a "
                          f"{kind} image: give one, or one per prompt ({count})")  # fmt: skip
    for path in images:
        if not Path(path).is_file():
            raise ConfigError(f"sample.images: {path} is not a file")


def check_new_tokens(config: Config) -> None:
    """Textual inversion's tokens are new to every tokenizer of the family and its init words are read as tokens;
    each trigger word (data.trigger, each dataset's) is one token or a new one. The tokenizers alone are loaded.

    Raises:
        ConfigError: naming the token or word and the tokenizer.
    """
    ti, data = config.train.textual_inversion, config.data
    triggers = [] if data.allow_split_trigger else [(k.replace(".path", ".trigger"), s.trigger)
                                                    for k, s in data_sources(data) if s.trigger]  # fmt: skip
    family = for_config(config.model)
    if not (ti.tokens or triggers) or family.load_tokenizers is None:
        return  # text_encoders.check refuses new tokens for a family without tokenizers to add them to
    for name, tokenizer in family.load_tokenizers(config).items():
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        try:
            check_tokens(tokenizer, ti.tokens, ti.init, tokenizer_name)
            for key, trigger in triggers:
                check_trigger(tokenizer, trigger, ti.tokens, key, tokenizer_name)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_device_memory(needs_gib: float | None) -> None:
    """A GPU with less memory than a preset needs (``train.needs_gib``, at most 90 % of the card) is refused.

    Raises:
        ConfigError: naming the card, its memory, what the config needs and the ways out.
    """
    import torch

    if needs_gib is None or not torch.cuda.is_available():
        return
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    total = properties.total_memory / 2**30
    if needs_gib > 0.9 * total:
        raise ConfigError(
            f"train.needs_gib={needs_gib:g}: this config needs about {needs_gib:g} GiB of GPU memory and "
            f"{properties.name} has {total:.1f} GiB (a run keeps 10 % for the CUDA context and fragmentation): "
            "choose the preset for a smaller card (sdtrain's configs end in -24gb, -12gb, -8gb), or quantise the "
            "base (model.quantize=nf4); train.needs_gib=null tries anyway"
        )


def check_model_sources(model: ModelConfig) -> None:
    """Every model ``model`` names is a folder here or a hub id loading can fetch (:func:`check_model_source`)."""
    sources = {"model.pretrained": model.pretrained, "model.vae.path": model.vae.path}
    sources["model.unet.pretrained"] = model.unet.pretrained
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        sources[f"model.{name}.path"] = getattr(model, name).path
    for key, path in sources.items():
        if path and path not in (IN_MEMORY, MINILM):
            check_model_source(path, key)


def check_data(data: DataConfig, seed: int) -> None:
    """``data.cache_dir`` holds a complete cache of every source (the class images' too) whose parts have their sizes
    and headers (:func:`check_cache`; opening it checks their bytes), or every source of ``data.path`` and
    ``data.datasets`` exists and holds a usable sample (shards are streamed: they are checked as they are read)."""
    if data.cache_dir:  # each source's own cache, the class images' too
        for _, source in data_sources(data, classes=True):
            check_cache(source, thorough=False)
        return
    for key, source in data_sources(data):
        if not is_shards(source.path):
            records = training_records(source, seed)
            check_usable(records, f"{key}={source.path}")
            if source.conditions:
                check_condition_files(records, source.conditions, f"{key}={source.path}")
            if source.masked_loss:
                check_masks(records, f"{key}={source.path}")


def check_autoencoder_run(config: AutoencoderConfig) -> None:
    """What ``sdtrain train-vae`` can refuse before its run folder is made: the model it fine-tunes, and data that
    exists and holds a decodable image (captions are not read)."""
    if config.model.pretrained:
        check_model_source(config.model.pretrained, "model.pretrained")
    data = config.data
    for key, path in (("data.path", data.path), ("eval_data", config.eval_data)):
        if path and not is_shards(path):
            check_usable(list_records(path, data.image_column, data.caption_column, data.skip_bad_rows),
                         f"{key}={path}", captions=False)  # fmt: skip
