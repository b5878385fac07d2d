"""The config block every study shares, and the preset lookup every config file ends with.

A study's config file builds on `base(...)` (data, models, precision and run settings, with the study's
own defaults as keyword arguments), adds its own fields, and defines `get_config(arg)` as
`presets(arg, default, {name: builder})`. `experiments.common.engine(config, workdir)` reads the shared
fields: the members (models, weights, weight_files, dtype, fold_batchnorm, zoo) and the engine
(batch_size, checkpoint_every, prefetch, progress_seconds; dtype sets the matmul precision).
"""

from typing import Callable

import ml_collections


def base(models: bool = True, **defaults) -> ml_collections.ConfigDict:
    """The shared fields (without the model fields when `models` is False: a study that trains its own),
    then `defaults` (a study's own values of them)."""
    c = ml_collections.ConfigDict()
    c.name = ""
    if models:
        c.models = ""  # comma-separated registry names (a string, so --config.models=a,b,c works)
        # Where each model's variables come from: "zoo" (trained by embjax), "pretrained" (installed
        # packages), "files" (config.weight_files: {model name: path}) or "random" (smoke tests only).
        c.weights = "pretrained"
        c.weight_files = ml_collections.ConfigDict()
    c.dataset = "fashion_mnist"
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.manual_dir = ml_collections.config_dict.placeholder(str)
    c.image_size = ml_collections.config_dict.placeholder(int)  # host-side square size (tfds sets)
    if models:
        c.dtype = "float32"  # float32 | bfloat16 (the model compute dtype; float32 also sets float32 matmuls)
        # Extraction with every BatchNorm folded into its convolution (families that implement it): same
        # features within float32 rounding, less work. False runs the modules as trained.
        c.fold_batchnorm = True
    c.batch_size = 32  # global, over all devices and processes
    c.checkpoint_every = 10  # batches
    c.prefetch = 2
    c.progress_seconds = 10.0  # a progress line (images/s, ETA) at most this often; 0 = every batch
    if models:
        # Zoo training (weights="zoo"): one epoch on the first 20,000 training images.
        c.zoo = ml_collections.ConfigDict(dict(epochs=1, batch_size=128, learning_rate=3e-3, weight_decay=1e-4,
                                               seed=0, limit=20000))
    for k, v in defaults.items():
        setattr(c, k, v)
    return c


def presets(arg: str | None, default: str, builders: dict[str, Callable[[], ml_collections.ConfigDict]]):
    """The config of preset `arg` (or `default`); an unknown name is an error listing the presets."""
    name = arg or default
    if name not in builders:
        raise ValueError(f"unknown config '{name}'; choose one of {sorted(builders)}")
    return builders[name]()
