"""``sdtrain cache``: encode a dataset once, with the run's frozen autoencoder and text encoders, into the on-disk
latent cache (:mod:`sdtrain.data.disk_cache`) that training then reads instead of the images."""

from __future__ import annotations

import logging
from pathlib import Path

from sdtrain.config import Config, ConfigError, data_sources
from sdtrain.data.disk_cache import write_cache
from sdtrain.models.families import for_config
from sdtrain.train import placement, text_encoders
from sdtrain.train.prior import check, draw_class_images
from sdtrain.train.run import processes_on_cpu

logger = logging.getLogger(__name__)


def cache_dataset(config: Config) -> Path:
    """Encode every source of ``config.data`` (data.path, data.datasets, data.prior's class images, drawn first where
    missing) into its cache under ``data.cache_dir``, each process of an ``accelerate launch`` its own share (no
    collective waits while encoding)."""
    from accelerate import PartialState

    if not config.data.cache_dir:
        raise ConfigError("set data.cache_dir: where the cache is written")
    state = PartialState(cpu=processes_on_cpu())
    if config.data.prior.path:
        check(config, caching=True)
        if state.is_main_process:
            draw_class_images(config, state.device)
        state.wait_for_everyone()
    family = for_config(config.model)
    components = family.load(config, denoiser=False)
    placement.hold_frozen(family, components, config, state.device)  # as the run encodes: bf16, quantised
    encoders = text_encoders.data_encoders(family, components, config.train)  # tokens where the encoders train
    for key, source in data_sources(config.data, classes=True):
        logger.info("caching %s=%s into %s", key, source.path, source.cache_dir)
        write_cache(source, encoders, config.train.seed, state.process_index, state.num_processes)
    return Path(config.data.cache_dir)
