"""`ModelSpec`: how to build a backbone, feed it, and where its weights come from; and the presets
that several families share (Keras' preprocessing modes, the ImageNet evaluation crop, the zoo's input).

Each family's specs are listed in the module of the same name here (`embjax.models.specs.resnet.specs()`,
...), beside the family's architecture module; embjax.models.registry indexes them by name. A spec
imports its family's module and, only when weights are converted, the family's converters.

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
from typing import Any, Callable

import jax
import jax.numpy as jnp

LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601, for RGB images fed to a grayscale model
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530  # Fashion-MNIST pixel mean / std after /255

# Keras' imagenet_utils modes: 'tf' scales to [-1, 1]; 'caffe' subtracts the BGR mean, no scaling.
KERAS_TF = dict(scaling="tf", pixel_scale=127.5, mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0), channel_order="RGB")
KERAS_CAFFE = dict(scaling="caffe", pixel_scale=1.0, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0),
                   channel_order="BGR")
# TF-Slim's vgg_preprocessing (its resnet_v1 weights): RGB mean subtraction, no scaling.
VGG_RGB = dict(scaling="vgg", pixel_scale=1.0, mean=(123.68, 116.78, 103.94), std=(1.0, 1.0, 1.0),
               channel_order="RGB")
IMAGENET_CROP = dict(crop_fraction=0.875, resize_method="bilinear", antialias=True)
ZOO = dict(
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
# Zoo models trained apart (thesis §6.1): registry name `<zoo model>_<variant>` is the zoo model trained
# the standard way but for one thing; embjax.zoo.VARIANTS says how each trains (and keys its cache).
ZOO_VARIANTS = {
    "cosine": "a cosine-softmax classifier with an additive margin (CosFace): normalized features and classes",
    "half_a": "trained on half A of the training images (a fixed seeded split; embjax.zoo.half_rows)",
    "half_b": "trained on half B, disjoint from half A",
    "seed1": "the standard training with another seed: independent initial weights and batch order",
    "half_b_seed1": "trained on half B with another seed: disjoint data and independent initial weights",
}
TF_FORMATS = ("tf_checkpoint", "tf_saved_model")  # TF-Slim checkpoints and TF-Hub SavedModels
TORCH_FORMATS = ("torch", "safetensors")
SLIM_ZOO = "TF-Slim model zoo / TF-Hub (docs/thesis_weights.md)"


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
    weight_formats: tuple[str, ...] = ()  # file kinds the converter reads (embjax.weights.formats)
    keras_file: str | None = None  # the keras.applications file name, when that is the source
    # Weights installed as a package (EfficientNet-Lite0/1/2): pretrained(cache_dir) -> variables.
    pretrained: Callable[..., dict] | None = None
    # TF-Slim heads: logit 0 is "background" and logits 1..1000 are the ImageNet classes (1001 in all);
    # `imagenet_logits` drops it so every head is scored on the same 1000 classes.
    background_class: bool = False
    # A zoo model trained apart: one of ZOO_VARIANTS ("" for the standard zoo training).
    zoo_variant: str = ""

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
                x = jnp.sum(x * jnp.asarray(LUMINANCE, jnp.float32), axis=-1, keepdims=True)
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


def builder(factory: Callable[..., Any], **fixed) -> Callable[..., Any]:
    """A spec's `build`: build(**overrides) -> factory(**fixed, **overrides)."""

    def build(**overrides):
        return factory(**{**fixed, **overrides})

    build.__qualname__ = build.__name__ = f"build_{factory.__name__}"
    build.__doc__ = f"{factory.__module__}.{factory.__name__}(**{fixed!r}, **overrides)"
    return build


__all__ = ["ModelSpec", "builder", "KERAS_TF", "KERAS_CAFFE", "VGG_RGB", "IMAGENET_CROP", "ZOO", "ZOO_VARIANTS",
           "TF_FORMATS", "TORCH_FORMATS", "SLIM_ZOO", "LUMINANCE"]
