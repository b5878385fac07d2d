"""ResNet v1 / v2 specs: keras.applications (v1 18-152, v2 50-152), TF-Slim's 152s and the zoo's two."""
from __future__ import annotations

from embjax.models import resnet
from embjax.models.specs import IMAGENET_CROP, KERAS_CAFFE, KERAS_TF, SLIM_ZOO, TF_FORMATS, VGG_RGB, ZOO, \
    ModelSpec, builder


def _keras(depth: int, version: int):
    def convert(raw):
        from embjax.models.convert import keras_resnet

        return keras_resnet.convert_resnet(raw, depth=depth, version=version)

    return convert


def _slim(depth: int, version: int):
    def convert(raw):
        from embjax.models.convert import tf_slim

        return tf_slim.convert_resnet(raw, depth=depth, version=version)

    return convert


def specs() -> list[ModelSpec]:
    out = []
    for depth in (18, 34, 50, 101, 152):
        keras_file = None if depth < 50 else f"resnet{depth}_weights_tf_dim_ordering_tf_kernels.h5"
        out.append(ModelSpec(
            name=f"resnet{depth}_v1", family="resnet_v1", build=builder(resnet.resnet, depth=depth, version=1),
            input_size=224, in_channels=3, feature_dim=512 if depth < 50 else 2048, num_classes=1000,
            **KERAS_CAFFE, **IMAGENET_CROP,
            weight_source=(f"keras.applications ResNet{depth} ({keras_file})" if keras_file else
                           "none published in a format embjax converts (keras.applications has no ResNet"
                           f"{depth}); pass an orbax directory of converted variables"),
            converter=_keras(depth, 1) if keras_file else None,
            weight_formats=("keras_h5",) if keras_file else (),
            keras_file=keras_file,
        ))
    for depth in (50, 101, 152):
        keras_file = f"resnet{depth}v2_weights_tf_dim_ordering_tf_kernels.h5"
        out.append(ModelSpec(
            name=f"resnet{depth}_v2", family="resnet_v2", build=builder(resnet.resnet, depth=depth, version=2),
            input_size=224, in_channels=3, feature_dim=2048, num_classes=1000, **KERAS_TF, **IMAGENET_CROP,
            weight_source=f"keras.applications ResNet{depth}V2 ({keras_file})",
            converter=_keras(depth, 2), weight_formats=("keras_h5",), keras_file=keras_file,
        ))
    out.append(ModelSpec(name="zoo_resnet_v1", family="resnet_v1",
                         build=builder(resnet.small_resnet_v1, num_classes=10), feature_dim=64, **ZOO))
    out.append(ModelSpec(name="zoo_resnet_v2", family="resnet_v2",
                         build=builder(resnet.small_resnet_v2, num_classes=10), feature_dim=96, **ZOO))
    # TF-Slim's preprocessing_factory: vgg (RGB mean subtraction) for resnet_v1, inception ([-1, 1]) for v2.
    for version, classes, scaling in ((1, 1000, VGG_RGB), (2, 1001, KERAS_TF)):
        out.append(ModelSpec(
            name=f"resnet_v{version}_152_slim", family=f"resnet_v{version}",
            build=builder(resnet.slim_resnet, depth=152, version=version, num_classes=classes),
            input_size=224, in_channels=3, feature_dim=2048, num_classes=classes, **scaling, **IMAGENET_CROP,
            weight_source=f"TF-Slim resnet_v{version}_152 checkpoint ({SLIM_ZOO})",
            converter=_slim(152, version), weight_formats=TF_FORMATS,
            # TF-Slim's resnet_v1 weights were converted from Caffe with 1000 classes, no background.
            background_class=classes == 1001,
        ))
    return out
