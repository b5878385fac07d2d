"""A study's models: registry names -> `Member`s with variables from the source the config names.

Every study loads its backbones here: `load(names, weights=...)` resolves every name first (an unknown
name fails before any weights are read), then takes each model's variables from one of

  "zoo"         trained by embjax on the study's data (embjax.zoo; cached), zoo_* models only
  "pretrained"  weights installed as packages (EfficientNet-Lite0/1/2)
  "files"       a file per model the user has (`weight_files={name: path}`; .h5, .pth, .safetensors,
                TensorFlow checkpoints, orbax directories: `registry.load_weights`)
  "random"      NumPy-initialized, for smoke tests and throughput runs only

and wraps the module so that preprocessing (resize, crop, scaling) runs on device inside the jitted step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


WEIGHT_SOURCES = ("zoo", "pretrained", "files", "random")


@dataclasses.dataclass(eq=False)
class Member:
    """One backbone of a study.

    `apply(variables, images_uint8)` must return the model's output dict (`pre_logits`, `logits` and
    any named intermediates); it includes the model's own preprocessing so that resizing and scaling run
    on device inside the jitted step. `head` is the `(kernel (d, classes), bias (classes,))` of the
    model's own classifier (None for a model without one); `spec` the registry spec it was built from.
    An Engine built over a member replaces its `variables` with the copies it placed on its devices
    (on one process), so the host copies are not held twice.
    """

    name: str
    apply: Callable[[Any, jax.Array], dict]
    variables: Any
    feature_dim: int
    head: tuple[Any, Any] | None = None
    spec: Any = None
    num_params: int = 0  # trainable parameters of the model as published (before any BatchNorm folding)


def find_head(variables, feature_dim: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The classifier `(kernel, bias)` inside a backbone's params: the one 2-D kernel of shape
    (feature_dim, num_classes) (embjax.models.layers.classifier_path)."""
    from embjax.models import layers

    path = layers.classifier_path(variables["params"], feature_dim, num_classes)
    leaf = layers.subtree(variables["params"], path)
    if "bias" not in leaf:
        raise ValueError(f"classifier {'/'.join(path)} has no bias")
    return np.asarray(leaf["kernel"]), np.asarray(leaf["bias"])


def identity(name: str, width: int, offset: int = 0, key: str = "pre_logits") -> Member:
    """A member that returns columns offset..offset+width of an array source's rows (embjax.data.RowSource)
    as its output `key`: how feature files and stores go through the engine like images through a model."""
    def apply(variables, rows):
        return {key: rows[:, offset:offset + width]}

    return Member(name=name, apply=apply, variables={}, feature_dim=int(width))


def parse_names(models: str | Sequence[str], minimum: int = 1) -> list[str]:
    """A comma-separated string (as given on the command line) or a sequence of names -> list of names."""
    names = [m.strip() for m in models.split(",") if m.strip()] if isinstance(models, str) else list(models)
    if len(names) < minimum:
        raise ValueError(f"config.models must name at least {minimum} model(s), got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"config.models names a model twice: {names}")
    return names


def compute_dtype(name: str):
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
    except KeyError:
        raise ValueError(f"config.dtype must be 'float32' or 'bfloat16', not {name!r}") from None


def variables_for(name: str, spec, weights: str, *, weight_files: Mapping[str, str] | None = None,
                  zoo_data: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
                  zoo_config: Mapping[str, Any] | None = None, dataset_tag: str = "",
                  log: Callable[[str], None] = print):
    """Variables of one model from the named source (see the module docstring)."""
    from embjax.models import registry

    if weights == "zoo":
        from embjax import zoo

        if not name.startswith("zoo_"):
            raise ValueError(f"config.weights='zoo' trains only zoo_* models; {name} is not one: set "
                             f"config.weights to 'pretrained' or 'files' (with config.weight_files.{name})")
        if zoo_data is None:
            raise ValueError(f"{name}: zoo weights need training data (zoo_data)")
        images, labels = zoo_data()
        return zoo.load_or_train(spec, images, labels, zoo.train_config(**dict(zoo_config or {})),
                                 dataset=dataset_tag, log=log)
    if weights == "pretrained":
        return registry.load_pretrained(name)
    if weights == "files":
        files = dict(weight_files or {})
        if name not in files:
            raise FileNotFoundError(
                f"no weight file for {name}: pass --config.weight_files.{name}=/path/to/weights "
                f"(a keras.applications .h5, a .pth, .safetensors, a TensorFlow checkpoint or a converted "
                f"orbax directory)")
        return registry.load_weights(name, files[name])
    if weights == "random":
        from embjax import zoo

        x = jnp.zeros((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
        return zoo.numpy_init(spec.build(), x, seed=0)
    raise ValueError(f"config.weights must be one of {', '.join(WEIGHT_SOURCES)}, not {weights!r}")


def make_member(name: str, spec, variables, dtype=jnp.float32, input_size: int | None = None,
                fold_batchnorm: bool = True) -> Member:
    """Wrap one registry model: `apply(variables, uint8 images)` -> its whole output dict.

    `input_size` runs the model at another square size than its registry default (the thesis ran every
    CNN on 331-px crops); the module is convolutional up to a global pooling, so its variables fit any
    size. A TF-Slim head with a "background" logit 0 (`spec.background_class`) is scored on the other
    1000 logits, so every model is scored on the same ImageNet classes.

    With `fold_batchnorm` (the default), a family that implements it runs in inference mode: every
    BatchNorm folded into the convolution before it (embjax.models.folding), the same outputs within
    float32 rounding at less cost; other families run as they are.
    """
    import jax

    from embjax.models import conv_matmul, folding

    if input_size:
        spec = dataclasses.replace(spec, input_size=int(input_size))
    module = spec.build(dtype=dtype) if dtype != jnp.float32 else spec.build()
    num_params = int(sum(np.size(x) for x in jax.tree.leaves(dict(variables).get("params", {}))))
    if fold_batchnorm and "fold_bn" in {f.name for f in dataclasses.fields(module)}:
        sample = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
        variables = folding.fold_variables(module, variables, sample)
        module = folding.fold_module(module)

    def apply(v, images, module=module, spec=spec):
        with conv_matmul.on_cpu():  # convolutions as matmuls where that measured faster (CPU only)
            return module.apply(v, spec.preprocess(images).astype(dtype))

    head = None
    if spec.num_classes:
        kernel, bias = find_head(variables, spec.feature_dim, spec.num_classes)
        head = (kernel[:, 1:], bias[1:]) if getattr(spec, "background_class", False) else (kernel, bias)
    return Member(name=name, apply=apply, variables=variables, feature_dim=spec.feature_dim,
                          head=head, spec=spec, num_params=num_params)


def load(names: str | Sequence[str], weights: str = "pretrained", *, weight_files=None, dtype: str = "float32",
         zoo_data=None, zoo_config=None, dataset_tag: str = "", minimum: int = 1,
         input_sizes: Mapping[str, int] | None = None, fold_batchnorm: bool = True,
         log: Callable[[str], None] = print) -> list[Member]:
    """Members for registry `names` (see the module docstring for `weights`). `input_sizes` maps a
    model name (or "*" for every model not named) to the square size it runs at (absent or 0: the
    registry's own)."""
    from embjax.models import registry

    names = parse_names(names, minimum)
    if weights not in WEIGHT_SOURCES:
        raise ValueError(f"config.weights must be one of {', '.join(WEIGHT_SOURCES)}, not {weights!r}")
    specs = [registry.get(name) for name in names]  # unknown names fail here, before any loading
    dt = compute_dtype(dtype)
    out = []
    for name, spec in zip(names, specs):
        variables = variables_for(name, spec, weights, weight_files=weight_files, zoo_data=zoo_data,
                                  zoo_config=zoo_config, dataset_tag=dataset_tag, log=log)
        sizes = dict(input_sizes or {})
        out.append(make_member(name, spec, variables, dt, sizes.get(name, sizes.get("*", 0)), fold_batchnorm))
    return out
