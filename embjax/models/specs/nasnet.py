"""NASNet-A-Large and PNASNet-5-Large specs: keras.applications / timm heads (1000 classes) and TF-Slim's
checkpoints (1001, background first)."""
from __future__ import annotations

from embjax.models import nasnet
from embjax.models.specs import IMAGENET_CROP, KERAS_TF, SLIM_ZOO, TF_FORMATS, TORCH_FORMATS, ModelSpec, builder


def _keras_nasnet(raw):
    from embjax.models.convert import keras_nasnet

    return keras_nasnet.convert_nasnet(raw)


def _timm_pnasnet(raw):
    from embjax.models.convert import timm_models

    return timm_models.convert_timm_pnasnet(raw)


def _slim(name: str):
    def convert(raw):
        from embjax.models.convert import tf_slim

        return getattr(tf_slim, f"convert_{name}")(raw)

    return convert


def specs() -> list[ModelSpec]:
    common = dict(input_size=331, in_channels=3, **KERAS_TF, **IMAGENET_CROP)
    return [
        # 1000 classes: keras.applications NASNetLarge's head (TF-Slim's nasnet-a_large checkpoint has 1001).
        ModelSpec(
            name="nasnet_large", family="nasnet", build=builder(nasnet.nasnet_large, num_classes=1000),
            feature_dim=4032, num_classes=1000, **common,
            weight_source="keras.applications NASNetLarge (NASNet-large.h5, under keras-applications/nasnet/)",
            converter=_keras_nasnet, weight_formats=("keras_h5",),
            keras_file="nasnet/NASNet-large.h5",  # under the keras-applications bucket
        ),
        # 1000 classes: timm pnasnet5large's head (TF-Slim's pnasnet-5_large checkpoint has 1001).
        ModelSpec(
            name="pnasnet_large", family="pnasnet", build=builder(nasnet.pnasnet_large, num_classes=1000),
            feature_dim=4320, num_classes=1000, **common,
            weight_source="timm pnasnet5large (.pth / .safetensors state dict, e.g. pnasnet5large.tf_in1k)",
            converter=_timm_pnasnet, weight_formats=TORCH_FORMATS,
        ),
        ModelSpec(
            name="nasnet_large_slim", family="nasnet", build=builder(nasnet.nasnet_large, num_classes=1001),
            feature_dim=4032, num_classes=1001, **common,
            weight_source=f"TF-Slim nasnet-a_large checkpoint ({SLIM_ZOO})", converter=_slim("nasnet_large"),
            weight_formats=TF_FORMATS, background_class=True,
        ),
        ModelSpec(
            name="pnasnet_large_slim", family="pnasnet", build=builder(nasnet.pnasnet_large, num_classes=1001),
            feature_dim=4320, num_classes=1001, **common,
            weight_source=f"TF-Slim pnasnet-5_large checkpoint ({SLIM_ZOO})", converter=_slim("pnasnet_large"),
            weight_formats=TF_FORMATS, background_class=True,
        ),
    ]
