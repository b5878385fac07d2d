"""A study's models: registry names -> `extract.Member`s with variables from the source the config names.

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

from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from embjax import extract

WEIGHT_SOURCES = ("zoo", "pretrained", "files", "random")


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
        return zoo.load_or_train(spec, images, labels, zoo.TrainConfig(**dict(zoo_config or {})),
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


def make_member(name: str, spec, variables, dtype=jnp.float32, num_classes: int | None = None) -> extract.Member:
    """Wrap one registry model: `apply(variables, uint8 images)` -> its whole output dict."""
    module = spec.build(dtype=dtype) if dtype != jnp.float32 else spec.build()

    def apply(v, images, module=module, spec=spec):
        return module.apply(v, spec.preprocess(images).astype(dtype))

    head = None
    classes = spec.num_classes if num_classes is None else num_classes
    if classes:
        head = extract.find_head(variables, spec.feature_dim, classes)
    return extract.Member(name=name, apply=apply, variables=variables, feature_dim=spec.feature_dim,
                          head=head, spec=spec)


def load(names: str | Sequence[str], weights: str = "pretrained", *, weight_files=None, dtype: str = "float32",
         zoo_data=None, zoo_config=None, dataset_tag: str = "", minimum: int = 1,
         log: Callable[[str], None] = print) -> list[extract.Member]:
    """Members for registry `names` (see the module docstring for `weights`)."""
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
        out.append(make_member(name, spec, variables, dt))
    return out
