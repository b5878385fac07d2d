"""Configs of the feature extractor: `--config=experiments/configs/extract.py:NAME`.

NAME is one of
  effnet_lite  (default) the three ImageNet EfficientNet-Lite backbones' pre-logit features of Fashion-MNIST
               test[:1000]
  zoo          the zoo models (trained by embjax, cached) on the whole Fashion-MNIST test split
Fields can be overridden, e.g. `--config.models=efficientnet_lite0 --config.outputs=pre_logits,logits
--config.split=train --config.dtype=float16`.
"""

import ml_collections

from experiments.configs import base as base_config


def study_base() -> ml_collections.ConfigDict:
    c = base_config.base(name="extract", checkpoint_every=20)
    # Outputs kept for every model: names of the model's output dict (pre_logits, logits, stem, stage1, ...);
    # a name a model does not have is an error naming the outputs it has.
    c.outputs = "pre_logits"
    c.store_dtype = "float32"  # float32 | float16 | int8 (int8 rounds and clips: for integer-valued outputs)
    c.split = "test"
    c.zoo_split = "train"  # what zoo models are trained on (config.weights = zoo)
    return c


def effnet_lite() -> ml_collections.ConfigDict:
    c = study_base()
    c.name = "extract_effnet_lite"
    c.models = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
    c.split = "test[:1000]"
    return c


def zoo() -> ml_collections.ConfigDict:
    c = study_base()
    c.name = "extract_zoo"
    c.models = "zoo_resnet_v1,zoo_resnet_v2,zoo_inception,zoo_mobilenet_v2,zoo_efficientnet_lite"
    c.weights = "zoo"
    c.batch_size = 256
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return base_config.presets(arg, "effnet_lite", {"effnet_lite": effnet_lite, "zoo": zoo})
