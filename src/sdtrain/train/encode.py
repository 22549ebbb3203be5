"""``sdtrain cache``: encode a dataset once, with the run's frozen autoencoder and text encoders, into the on-disk
latent cache (:mod:`sdtrain.data.disk_cache`) that training then reads instead of the images."""

from __future__ import annotations

from pathlib import Path

from sdtrain.config import Config, ConfigError
from sdtrain.data.disk_cache import write_cache
from sdtrain.models.families import for_config
from sdtrain.train import placement, text_encoders
from sdtrain.train.run import processes_on_cpu


def cache_dataset(config: Config) -> Path:
    """Encode ``config.data`` into ``data.cache_dir`` (each process of an ``accelerate launch`` its own share, no
    collective waits)."""
    from accelerate import PartialState

    if not config.data.cache_dir:
        raise ConfigError("set data.cache_dir: where the cache is written")
    state = PartialState(cpu=processes_on_cpu())
    family = for_config(config.model)
    components = family.load(config, denoiser=False)
    placement.hold_frozen(family, components, config, state.device)  # as the run encodes: bf16, quantised
    encoders = text_encoders.data_encoders(family, components, config.train)  # tokens where the encoders train
    return write_cache(config.data, encoders, config.train.seed, state.process_index, state.num_processes)
