"""TF-Slim Inception-v1/v2/v4 specs (the thesis' CNNs that keras.applications lacks): Inception [-1, 1]
scaling and the 0.875 central crop."""
from __future__ import annotations

from embjax.models import inception_slim
from embjax.models.specs import IMAGENET_CROP, KERAS_TF, SLIM_ZOO, TF_FORMATS, TORCH_FORMATS, ModelSpec, builder


def _slim(name: str):
    def convert(raw):
        from embjax.models.convert import tf_slim

        return getattr(tf_slim, f"convert_{name}")(raw)

    return convert


def _timm_inception_v4(raw):
    from embjax.models.convert import timm_models

    return timm_models.convert_timm_inception_v4(raw)


def specs() -> list[ModelSpec]:
    out = []
    for name, factory in (("inception_v1", inception_slim.inception_v1), ("inception_v2", inception_slim.inception_v2)):
        # TF-Slim heads: 1001 classes (0 = background).
        out.append(ModelSpec(
            name=name, family=name, build=builder(factory, num_classes=1001), input_size=224, in_channels=3,
            feature_dim=1024, num_classes=1001, background_class=True, **KERAS_TF, **IMAGENET_CROP,
            weight_source=f"TF-Slim {name}_2016_08_28.tar.gz ({name}.ckpt) or its TF-Hub SavedModel ({SLIM_ZOO})",
            converter=_slim(name), weight_formats=TF_FORMATS,
        ))
    # 1000 classes: the head of timm's inception_v4 (timm dropped TF-Slim's background class), the
    # reference this port is checked against; TF-Slim's own checkpoint has 1001 (inception_v4_slim).
    out.append(ModelSpec(
        name="inception_v4", family="inception_v4", build=builder(inception_slim.inception_v4, num_classes=1000),
        input_size=299, in_channels=3, feature_dim=1536, num_classes=1000, **KERAS_TF, **IMAGENET_CROP,
        weight_source="timm inception_v4 (.pth / .safetensors state dict, e.g. inception_v4.tf_in1k)",
        converter=_timm_inception_v4, weight_formats=TORCH_FORMATS,
    ))
    out.append(ModelSpec(
        name="inception_v4_slim", family="inception_v4",
        build=builder(inception_slim.inception_v4, num_classes=1001), input_size=299, in_channels=3,
        feature_dim=1536, num_classes=1001, **KERAS_TF, **IMAGENET_CROP,
        weight_source=f"TF-Slim inception_v4 checkpoint ({SLIM_ZOO})", converter=_slim("inception_v4"),
        weight_formats=TF_FORMATS, background_class=True,
    ))
    return out
