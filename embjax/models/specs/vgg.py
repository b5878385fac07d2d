"""VGG16 spec (keras.applications)."""
from __future__ import annotations

from embjax.models import vgg
from embjax.models.specs import IMAGENET_CROP, KERAS_CAFFE, ModelSpec, builder


def _convert(raw):
    from embjax.models.convert import keras_vgg

    return keras_vgg.convert_vgg16(raw)


def specs() -> list[ModelSpec]:
    return [ModelSpec(
        name="vgg16", family="vgg16", build=builder(vgg.VGG16),
        input_size=224,  # fixed: fc1's kernel is sized for the 7x7x512 flatten of a 224-px input
        in_channels=3, feature_dim=4096, num_classes=1000, **KERAS_CAFFE, **IMAGENET_CROP,
        weight_source="keras.applications VGG16 (vgg16_weights_tf_dim_ordering_tf_kernels.h5)",
        converter=_convert, weight_formats=("keras_h5",), keras_file="vgg16_weights_tf_dim_ordering_tf_kernels.h5",
    )]
