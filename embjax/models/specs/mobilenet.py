"""MobileNet-v2 specs: keras.applications (alpha 1.0 and 1.4), TF-Slim's 1.4 and the zoo's."""
from __future__ import annotations

from embjax.models import mobilenet
from embjax.models.specs import IMAGENET_CROP, KERAS_TF, SLIM_ZOO, TF_FORMATS, ZOO, ModelSpec, builder


def _keras(alpha: float):
    def convert(raw):
        from embjax.models.convert import keras_mobilenet

        return keras_mobilenet.convert_mobilenet_v2(raw, alpha=alpha)

    return convert


def _slim(raw):
    from embjax.models.convert import tf_slim

    return tf_slim.convert_mobilenet_v2(raw, alpha=1.4)


def specs() -> list[ModelSpec]:
    out = []
    for tag, alpha, dim in (("100", 1.0, 1280), ("140", 1.4, 1792)):
        keras_file = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_224.h5"
        out.append(ModelSpec(
            name=f"mobilenet_v2_{tag}", family="mobilenet_v2", build=builder(mobilenet.MobileNetV2, alpha=alpha),
            input_size=224, in_channels=3, feature_dim=dim, num_classes=1000, **KERAS_TF, **IMAGENET_CROP,
            weight_source=f"keras.applications MobileNetV2 alpha {alpha} ({keras_file})",
            converter=_keras(alpha), weight_formats=("keras_h5",), keras_file=keras_file,
        ))
    out.append(ModelSpec(name="zoo_mobilenet_v2", family="mobilenet_v2",
                         build=builder(mobilenet.small_mobilenet_v2, num_classes=10), feature_dim=160, **ZOO))
    out.append(ModelSpec(
        name="mobilenet_v2_140_slim", family="mobilenet_v2",
        build=builder(mobilenet.MobileNetV2, alpha=1.4, num_classes=1001), input_size=224, in_channels=3,
        feature_dim=1792, num_classes=1001, **KERAS_TF, **IMAGENET_CROP,
        weight_source=f"TF-Slim mobilenet_v2_1.4_224 checkpoint ({SLIM_ZOO})", converter=_slim,
        weight_formats=TF_FORMATS, background_class=True,
    ))
    return out
