"""iResNet (insightface ArcFace) specs: 18, 34, 50 and 100 layers, 112-px aligned faces, no classifier."""
from __future__ import annotations

from embjax.models import iresnet
from embjax.models.specs import TORCH_FORMATS, ModelSpec, builder


def _convert(depth: int):
    def convert(state_dict):
        from embjax.models.convert import insightface

        return insightface.convert_iresnet(state_dict, stage_sizes=iresnet.STAGE_SIZES[depth])

    return convert


def specs() -> list[ModelSpec]:
    return [ModelSpec(
        name=f"iresnet{depth}", family="iresnet", build=builder(iresnet.iresnet, depth=depth), input_size=112,
        in_channels=3, feature_dim=512,
        num_classes=None,  # a face-embedding model: no classifier
        # insightface feeds aligned 112×112 RGB crops as (x − 127.5) / 127.5.
        scaling="arcface", pixel_scale=1.0, mean=(127.5,) * 3, std=(127.5,) * 3, channel_order="RGB",
        crop_fraction=1.0, resize_method="bilinear", antialias=True,
        weight_source=f"insightface arcface_torch backbone.pth of an iresnet{depth} (not installable offline; "
                      "pass the file)",
        converter=_convert(depth), weight_formats=TORCH_FORMATS,
    ) for depth in (18, 34, 50, 100)]
