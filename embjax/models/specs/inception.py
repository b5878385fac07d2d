"""Inception-v3 and Inception-ResNet-v2 specs (keras.applications and TF-Slim) and the zoo's Inception."""
from __future__ import annotations

from embjax.models import inception
from embjax.models.specs import IMAGENET_CROP, KERAS_TF, SLIM_ZOO, TF_FORMATS, ZOO, ModelSpec, builder


def _keras(name: str):
    def convert(raw):
        from embjax.models.convert import keras_inception

        return getattr(keras_inception, f"convert_{name}")(raw)

    return convert


def _slim(name: str):
    def convert(raw):
        from embjax.models.convert import tf_slim

        return getattr(tf_slim, f"convert_{name}")(raw)

    return convert


def specs() -> list[ModelSpec]:
    out = []
    for name, cls, dim, keras_file in (
        ("inception_v3", inception.InceptionV3, 2048, "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"),
        ("inception_resnet_v2", inception.InceptionResNetV2, 1536,
         "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels.h5"),
    ):
        out.append(ModelSpec(
            name=name, family=name, build=builder(cls), input_size=299, in_channels=3, feature_dim=dim,
            num_classes=1000, **KERAS_TF, **IMAGENET_CROP,
            weight_source=f"keras.applications {cls.__name__} ({keras_file})",
            converter=_keras(name), weight_formats=("keras_h5",), keras_file=keras_file,
        ))
    out.append(ModelSpec(name="zoo_inception", family="inception",
                         build=builder(inception.small_inception, num_classes=10), feature_dim=128, **ZOO))
    for name, cls, dim in (("inception_v3", inception.InceptionV3, 2048),
                           ("inception_resnet_v2", inception.InceptionResNetV2, 1536)):
        out.append(ModelSpec(
            name=f"{name}_slim", family=name, build=builder(cls, num_classes=1001), input_size=299,
            in_channels=3, feature_dim=dim, num_classes=1001, **KERAS_TF, **IMAGENET_CROP,
            weight_source=f"TF-Slim {name} checkpoint ({SLIM_ZOO})", converter=_slim(name),
            weight_formats=TF_FORMATS, background_class=True,
        ))
    return out
