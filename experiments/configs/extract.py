"""Configs of the feature extractor: `--config=experiments/configs/extract.py:NAME`.

NAME is one of
  effnet_lite  (default) the three ImageNet EfficientNet-Lite backbones' pre-logit features of Fashion-MNIST
               test[:1000]
  zoo          the zoo models (trained by embjax, cached) on the whole Fashion-MNIST test split
Fields can be overridden, e.g. `--config.models=efficientnet_lite0 --config.outputs=pre_logits,logits
--config.split=train --config.dtype=float16`.
"""

import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "extract"
    c.models = ""  # comma-separated registry names
    c.weights = "pretrained"  # zoo | pretrained | files | random (see embjax.members)
    c.weight_files = ml_collections.ConfigDict()
    # Outputs kept for every model: names of the model's output dict (pre_logits, logits, stem, stage1, ...);
    # a name a model does not have is an error naming the outputs it has.
    c.outputs = "pre_logits"
    c.store_dtype = "float32"  # float32 | float16 | int8 (int8 rounds and clips: for integer-valued outputs)
    c.dataset = "fashion_mnist"
    c.split = "test"
    c.zoo_split = "train"  # what zoo models are trained on (config.weights = zoo)
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.manual_dir = ml_collections.config_dict.placeholder(str)
    c.image_size = ml_collections.config_dict.placeholder(int)
    c.dtype = "float32"
    c.batch_size = 32
    c.checkpoint_every = 20
    c.prefetch = 2
    c.progress_seconds = 10.0
    c.zoo = ml_collections.ConfigDict(dict(epochs=1, batch_size=128, learning_rate=3e-3, weight_decay=1e-4,
                                           seed=0, limit=20000))
    return c


def effnet_lite() -> ml_collections.ConfigDict:
    c = base()
    c.name = "extract_effnet_lite"
    c.models = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
    c.split = "test[:1000]"
    return c


def zoo() -> ml_collections.ConfigDict:
    c = base()
    c.name = "extract_zoo"
    c.models = "zoo_resnet_v1,zoo_resnet_v2,zoo_inception,zoo_mobilenet_v2,zoo_efficientnet_lite"
    c.weights = "zoo"
    c.batch_size = 256
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = {"effnet_lite": effnet_lite, "zoo": zoo}
    name = arg or "effnet_lite"
    if name not in presets:
        raise ValueError(f"unknown config '{name}'; choose one of {sorted(presets)}")
    return presets[name]()
