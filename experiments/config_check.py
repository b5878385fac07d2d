"""Every study's command line checked before any work: one line on stderr naming the flag, exit status 2.

A study's `common.main` (and `experiments.features`) hands its flags parser and its parsed config here
before it trains a zoo model, loads a model or reads data:

    app.run(_main, flags_parser=config_check.flags_parser("open_set", config_file))  # presets, fields, types
    config_check.check_or_exit("open_set", config, workdir)                          # values, workdir

What is checked is data, below: for each study the fields and what each may hold (`FIELDS`), plus the
few rules that relate fields (classes against the dataset, outputs against the models, the zoo against
zoo models). A problem is printed as

    embjax: error: --config.batch_size=0: must be a whole number >= 1

(one line, the flag and its value first), and the process exits with status 2, the usual status of a
command line a program refuses; EMBJAX_TRACEBACK=1 raises instead, for the traceback. Unknown presets and
fields list the valid ones; a stray argument is named.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Callable, Mapping

EXIT_USAGE = 2


class ConfigError(ValueError):
    """A command-line value a study cannot run with; `str()` is the one line printed."""

    def __init__(self, flag: str, value: Any, why: str):
        self.flag, self.value, self.why = flag, value, why
        shown = value if isinstance(value, str) else _show(value)
        if not flag:
            super().__init__(why)
        elif value is None:
            super().__init__(f"{flag}: {why}")
        else:
            super().__init__(f"{flag}={shown}: {why}")


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------------------
# What a field may hold


@dataclasses.dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None
    optional: bool = False  # None (a placeholder left unset) allowed

    def __call__(self, v):
        if v is None and self.optional:
            return
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be a whole number")
        if self.lo is not None and v < self.lo:
            raise ValueError(f"must be a whole number >= {self.lo}")
        if self.hi is not None and v > self.hi:
            raise ValueError(f"must be a whole number <= {self.hi}")


@dataclasses.dataclass(frozen=True)
class Float:
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False  # lo itself excluded
    optional: bool = False

    def __call__(self, v):
        if v is None and self.optional:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        if self.lo is not None and (v <= self.lo if self.open_lo else v < self.lo):
            raise ValueError(f"must be {'>' if self.open_lo else '>='} {self.lo:g}")
        if self.hi is not None and v > self.hi:
            raise ValueError(f"must be <= {self.hi:g}")


@dataclasses.dataclass(frozen=True)
class Choice:
    options: tuple

    def __call__(self, v):
        if v not in self.options:
            raise ValueError(f"must be one of {', '.join(map(str, self.options))}")


@dataclasses.dataclass(frozen=True)
class Bool:
    def __call__(self, v):
        if not isinstance(v, bool):
            raise ValueError("must be true or false")


@dataclasses.dataclass(frozen=True)
class Text:
    """A string; `pattern` (a regex) when it must have a form, `empty` whether "" is allowed."""
    empty: bool = True
    optional: bool = False
    pattern: str | None = None
    form: str = ""

    def __call__(self, v):
        if v is None and self.optional:
            return
        if not isinstance(v, str):
            raise ValueError("must be text")
        if not v and not self.empty:
            raise ValueError("must not be empty")
        if v and self.pattern and not re.fullmatch(self.pattern, v):
            raise ValueError(f"must be {self.form}")


@dataclasses.dataclass(frozen=True)
class Numbers:
    """A tuple or comma-separated list of numbers, each checked by `each`."""
    each: Callable
    nonempty: bool = True
    text: bool = False  # given as a comma-separated string (the config holds a string)

    def __call__(self, v):
        values = _split_numbers(v) if self.text else v
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = (values,)
        if not isinstance(values, (tuple, list)):
            raise ValueError("must be a comma-separated list of numbers")
        if self.nonempty and not values:
            raise ValueError("must name at least one value")
        for x in values:
            try:
                self.each(x)
            except ValueError as e:
                raise ValueError(f"each value {e} (got {x})") from None


def _split_numbers(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (v,)
    if not isinstance(v, str):
        return v
    out = []
    for part in (p.strip() for p in v.split(",")):
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            try:
                out.append(float(part))
            except ValueError:
                raise ValueError(f"must be a comma-separated list of numbers, not {part!r}") from None
    return tuple(out)


class Models:
    """Comma-separated registry names, each once, at least `minimum` (the registry is asked lazily)."""

    def __init__(self, minimum: int = 1, empty: bool = False):
        self.minimum, self.empty = minimum, empty

    def __call__(self, v):
        if not isinstance(v, str):
            raise ValueError("must be comma-separated model names")
        names = model_names(v)
        if self.empty and not names:
            return
        if len(names) < self.minimum:
            raise ValueError(f"must name at least {self.minimum} model(s)")
        if len(set(names)) != len(names):
            raise ValueError("names a model twice")
        known = _registry_names()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; known: {', '.join(sorted(known))}")


class ClassSpec:
    """Classes as "a-b" ranges joined by commas ("0-4", "0-2,7"), or "even" / "odd"; "" when `empty`."""

    def __init__(self, empty: bool = False):
        self.empty = empty

    def __call__(self, v):
        if self.empty and v == "":
            return
        parse_class_spec(v)


def parse_class_spec(v) -> tuple[str, list[tuple[int, int]]]:
    spec = str(v).strip()
    if spec in ("even", "odd"):
        return spec, []
    ranges = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if not m:
            raise ValueError("must be ranges like 0-4 or 0-2,7, or even / odd")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise ValueError(f"range {part.strip()} is empty")
        ranges.append((lo, hi))
    return "ranges", ranges


def model_names(v: str) -> list[str]:
    return [m.strip() for m in v.split(",") if m.strip()]


def _registry_names() -> set[str]:
    from embjax.models import registry

    return set(registry.names()) | set(registry.variant_names())


# ---------------------------------------------------------------------------------------------------
# The studies' fields

POSITIVE, NONNEG = Int(lo=1), Int(lo=0)
RATE, WEIGHT, SECONDS = Float(lo=0, open_lo=True), Float(lo=0), Float(lo=0)
DTYPE = Choice(("float32", "bfloat16"))
WEIGHTS = Choice(("zoo", "pretrained", "files", "random"))
SPLIT = Text(empty=False, pattern=r"[A-Za-z0-9_]+(\[[^\]]*\])?(\+[A-Za-z0-9_]+(\[[^\]]*\])?)*",
             form="a tfds split such as train, test[:1000] or train+validation")
NAME = Text(pattern=r"[A-Za-z0-9][A-Za-z0-9_.+-]*", form="letters, digits and _ . + - (it names directories)")
DIR = Text(optional=True)

TRAINING = {"epochs": POSITIVE, "batch_size": POSITIVE, "learning_rate": RATE, "weight_decay": WEIGHT,
            "seed": NONNEG}
ZOO = {**{f"zoo.{k}": v for k, v in TRAINING.items()}, "zoo.limit": NONNEG}
DATA = {"dataset": Text(empty=False), "data_dir": DIR, "manual_dir": DIR, "image_size": Int(lo=1, optional=True)}
ENGINE = {"batch_size": POSITIVE, "checkpoint_every": POSITIVE, "prefetch": NONNEG, "progress_seconds": SECONDS,
          "dtype": DTYPE}
MEMBERS = {"weights": WEIGHTS}  # weight_files: checked by _check_weight_files
LEARNED = {"learned.families": Numbers(Choice(("learned", "learned_mlp")), nonempty=False),
           "learned.loss": Choice(("task", "regression")), "learned.hidden": POSITIVE, "learned.rank": NONNEG,
           **{f"learned.{k}": v for k, v in TRAINING.items()}}

FIELDS: dict[str, dict[str, Callable]] = {
    "affine_equivalence": {
        **DATA, **ENGINE, **MEMBERS, **ZOO, "name": NAME, "models": Models(minimum=2),
        "fit_split": SPLIT, "eval_split": SPLIT, "input_size": NONNEG, "native_size_models": Models(empty=True),
        "num_classes": POSITIVE, "heads": Choice(("native", "linear")), "ridge": WEIGHT,
        "fold_batchnorm": Bool(), "precision_check_images": NONNEG,
        **{f"linear_head.{k}": v for k, v in TRAINING.items()}, **LEARNED,
    },
    "open_set": {
        **DATA, **ENGINE, **MEMBERS, **ZOO, "name": NAME, "models": Models(minimum=2),
        "fit_split": SPLIT, "eval_split": SPLIT, "fit_classes": ClassSpec(), "eval_classes": ClassSpec(),
        "zoo_classes": ClassSpec(empty=True), "num_fit": NONNEG, "num_eval": NONNEG, "ridge": WEIGHT,
        "rank": POSITIVE, "fars": Numbers(Float(lo=0, hi=1, open_lo=True)), "verification_bins": Int(lo=2),
        "recall_ks": Numbers(POSITIVE), "kfold_pairs_per_fold": POSITIVE, "kfold_seed": NONNEG,
        "query_block": POSITIVE, "cca_dims": NONNEG, "mutual_knn_k": POSITIVE,
        "curve_fit_sizes": Numbers(POSITIVE, nonempty=False), "curve_ranks": Numbers(POSITIVE, nonempty=False),
        "curve_families": Numbers(Choice(("affine", "ridge", "procrustes", "reduced_rank")), nonempty=False),
        "hub_ranks": Numbers(POSITIVE, nonempty=False), "hub_methods": Numbers(Choice(("gcca", "procrustes"))),
        "hub_ridge": WEIGHT, "procrustes_iters": POSITIVE, **LEARNED,
    },
    "full_network_embedding": {
        **DATA, **ENGINE, **MEMBERS, **ZOO, "name": NAME, "models": Models(minimum=1),
        "train_split": SPLIT, "test_split": SPLIT, "num_classes": Int(lo=2), "download": Bool(),
        "train_sizes": Numbers(lambda n: Int(lo=-1)(n) if n == -1 else POSITIVE(n), text=True),
        "activation": Choice(("pre", "post")), "layer_set": Choice(("conv", "block")), "low": Float(), "high": Float(), "degenerate_rtol": WEIGHT,
        "svm.C": RATE, "svm.tol": RATE, "svm.max_iter": POSITIVE, "svm.solver": Choice(("dual_cd", "lbfgs")),
    },
    "backward_compatible": {
        **DATA, "batch_size": POSITIVE, "checkpoint_every": POSITIVE, "prefetch": NONNEG,
        "progress_seconds": SECONDS, "name": NAME, "train_split": SPLIT, "eval_split": SPLIT,
        "num_classes": Int(lo=2), "old_model": Models(), "new_model": Models(),
        "old_data": Choice(("classes", "fraction")), "old_classes": Numbers(NONNEG, nonempty=False),
        "old_fraction": Float(lo=0, hi=1, open_lo=True), "held_out_classes": Numbers(NONNEG, nonempty=False),
        **{f"{t}.{k}": v for t in ("old_train", "new_train")
           for k, v in {**TRAINING, "warmup_steps": NONNEG, "checkpoint_every": POSITIVE,
                        "log_seconds": SECONDS, "xla_cpu_defaults": Bool(), "limit": NONNEG}.items()},
        "bct.influence_weight": WEIGHT, "bct.normalize": Choice(("none", "unit", "old_norm")),
        "bct.compare_unnormalized": Bool(), "l2_weight": WEIGHT, "maps.ridge": WEIGHT, "maps.fit_samples": NONNEG,
        "retrieval_metric": Choice(("cosine", "l2")), **LEARNED,
    },
    "canonical_space": {
        **DATA, **ENGINE, **MEMBERS, **ZOO, "name": NAME, "models": Models(minimum=2),
        "fit_split": SPLIT, "eval_split": SPLIT, "input_size": NONNEG, "native_size_models": Models(empty=True),
        "num_classes": POSITIVE, "heads": Choice(("native", "linear")), "ridge": WEIGHT,
        "fold_batchnorm": Bool(), "precision_check_images": NONNEG,
        **{f"linear_head.{k}": v for k, v in TRAINING.items()},
        "methods": Text(empty=False, pattern=r"(gcca|procrustes)(\s*,\s*(gcca|procrustes))*",
                        form="comma-separated hubs: gcca, procrustes"),
        "ranks": Text(pattern=r"(\d+(\s*,\s*\d+)*)?", form="comma-separated hub widths, or empty for the curve"),
        "hub_ridge": WEIGHT, "tolerance": WEIGHT, "procrustes_iters": POSITIVE,
        "eigensolver": Choice(("divide_and_conquer", "qr", "subset")),
    },
    "extract": {
        **DATA, **ENGINE, **MEMBERS, **ZOO, "name": NAME, "models": Models(minimum=1), "split": SPLIT,
        "zoo_split": SPLIT, "outputs": Text(empty=False, pattern=r"[A-Za-z0-9_/]+(\s*,\s*[A-Za-z0-9_/]+)*\s*,?",
                                            form="comma-separated output names such as pre_logits,logits or "
                                                 "block_3/expand_conv"),
        "store_dtype": Choice(("float32", "float16", "int8")),
    },
    # experiments.features has plain flags (no config): --FLAG=VALUE
    "features": {
        "batch_size": POSITIVE, "ridge": WEIGHT, "progress_seconds": SECONDS, "cca_dims": NONNEG,
        "similarity_rows": NONNEG, "similarity": Bool(), "name": NAME,
    },
}

# Classes of the datasets the studies name (labels 0 .. n-1), for class lists given on the command line.
DATASET_CLASSES = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000,
                   "caltech101": 102, "oxford_flowers102": 102, "caltech_birds2011": 200, "food101": 101,
                   "dtd": 47, "lfw": 5749}


# ---------------------------------------------------------------------------------------------------
# Checking


def _flag(study: str, field: str) -> str:
    return f"--{field}" if study == "features" else f"--config.{field}"


def _get(config, path: str):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def _has(config, path: str) -> bool:
    try:
        _get(config, path)
        return True
    except (KeyError, AttributeError, TypeError):
        return False


def check(study: str, config: Mapping, workdir: str | None) -> None:
    """ConfigError for the first value of `config` (and the work directory) that `study` cannot run with."""
    if study not in FIELDS:
        raise KeyError(f"no command-line checks for study {study!r}")
    # What needs the model registry (importing JAX: seconds on a loaded machine) comes last, so that a
    # mistake in any other field, or in the work directory, is reported at once.
    fields = FIELDS[study].items()
    rules = RULES.get(study, ())
    _check_fields(study, config, [(p, r) for p, r in fields if not isinstance(r, Models)])
    for rule in rules:
        if rule not in _NEED_MODELS:
            rule(study, config)
    if workdir is not None:
        check_workdir(workdir, "--workdir")
    _check_fields(study, config, [(p, r) for p, r in fields if isinstance(r, Models)])
    for rule in rules:
        if rule in _NEED_MODELS:
            rule(study, config)


def _check_fields(study: str, config, fields) -> None:
    for path, rule in fields:
        if not _has(config, path):
            continue
        value = _get(config, path)
        try:
            rule(value)
        except ValueError as e:
            raise ConfigError(_flag(study, path), value, str(e)) from None


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
    """The directory exists and is writable, or can be created: its nearest existing ancestor is a
    writable directory. Nothing is created here."""
    if not workdir:
        raise ConfigError(flag, workdir, "must name a directory")
    path = os.path.abspath(workdir)
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        what = "is a file" if os.path.isfile(probe) else "is not a directory"
        where = "" if probe == path else f" ({probe} {what})"
        raise ConfigError(flag, workdir, f"cannot be created{where}" if where else f"{what}, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(flag, workdir, f"{probe} is not writable" if probe != path else "is not writable")


# Rules that relate fields: each raises ConfigError.


def _dataset_classes(config) -> int | None:
    return DATASET_CLASSES.get(str(config["dataset"]).split(":")[0]) if "dataset" in config else None


def _classes_in_range(study, config, path: str, values, limit: int | None, what: str) -> None:
    if limit is None:
        return
    bad = [c for c in values if c >= limit]
    if bad:
        raise ConfigError(_flag(study, path), _get(config, path),
                          f"class {bad[0]} does not exist: {what} has classes 0-{limit - 1}")


def _open_set_classes(study, config) -> None:
    specs = {}
    for path in ("fit_classes", "eval_classes", "zoo_classes"):
        if not config[path]:
            continue
        kind, ranges = parse_class_spec(config[path])
        specs[path] = (kind, ranges)
        n = _dataset_classes(config)
        _classes_in_range(study, config, path, [hi for _, hi in ranges], n, str(config["dataset"]))
    fit, ev = specs["fit_classes"], specs["eval_classes"]
    overlap = (fit[0] == ev[0] != "ranges") or (
        fit[0] == ev[0] == "ranges" and any(a <= d and c <= b for a, b in fit[1] for c, d in ev[1]))
    if overlap:
        raise ConfigError("--config.eval_classes", config["eval_classes"],
                          f"overlaps --config.fit_classes={config['fit_classes']}; the study is open-set: "
                          "fit and evaluation classes must be disjoint")


def _bct_classes(study, config) -> None:
    n = min(int(config["num_classes"]), _dataset_classes(config) or int(config["num_classes"]))
    what = f"--config.num_classes={config['num_classes']}" if n == config["num_classes"] else str(config["dataset"])
    for path in ("old_classes", "held_out_classes"):
        values = [int(c) for c in config[path]]
        _classes_in_range(study, config, path, values, n, what)
        if len(set(values)) != len(values):
            raise ConfigError(_flag(study, path), config[path], "names a class twice")
    if config["old_data"] == "classes":
        if not config["old_classes"]:
            raise ConfigError("--config.old_classes", config["old_classes"],
                              "must name the old model's classes when --config.old_data=classes")
        both = set(config["old_classes"]) & set(config["held_out_classes"])
        if both:
            raise ConfigError("--config.held_out_classes", config["held_out_classes"],
                              f"overlaps --config.old_classes (class {min(both)}); held-out classes are unseen by both")
        if len(set(config["held_out_classes"])) >= n:
            raise ConfigError("--config.held_out_classes", config["held_out_classes"], "leaves no class to train on")


def _fne_thresholds(study, config) -> None:
    if not config["low"] < config["high"]:
        raise ConfigError("--config.low", config["low"], f"must be below --config.high={config['high']}")


def _zoo_models(study, config) -> None:
    if config.get("weights") != "zoo":
        return
    for name in model_names(config["models"]):
        if not name.startswith("zoo_"):
            raise ConfigError("--config.weights", "zoo", f"trains only zoo_* models and {name} is not one; use "
                              "pretrained, files (with --config.weight_files.MODEL=PATH) or random")


def _weight_files(study, config) -> None:
    files = config.get("weight_files") or {}
    names = set(model_names(config["models"])) if "models" in config else set()
    for name, path in dict(files).items():
        flag = f"--config.weight_files.{name}"
        if names and name not in names:
            raise ConfigError(flag, path, f"{name} is not in --config.models={config['models']}")
        if not isinstance(path, str) or not path:
            raise ConfigError(flag, path, "must be the path of a weight file or directory")
        if not os.path.exists(path):
            raise ConfigError(flag, path, "no such file or directory")
    if config.get("weights") == "files":
        missing = [n for n in model_names(config["models"]) if n not in files]
        if missing:
            raise ConfigError(f"--config.weight_files.{missing[0]}", None,
                              "missing: --config.weights=files needs a weight file for every model")


def _extract_outputs(study, config) -> None:
    outputs = [o.strip() for o in config["outputs"].split(",") if o.strip()]
    if set(outputs) <= {"pre_logits"}:
        return  # every registry model has its pre-logit features
    for name in model_names(config["models"]):
        have = model_outputs(name)
        missing = [o for o in outputs if o not in have]
        if missing:
            raise ConfigError("--config.outputs", config["outputs"],
                              f"{name} has no output {missing[0]!r}; it has {', '.join(sorted(have))}")


def model_outputs(name: str) -> set[str]:
    """The named outputs of a registry model, from its abstract evaluation (shapes only: no weights, no
    arithmetic)."""
    import jax
    import jax.numpy as jnp

    from embjax.models import registry

    spec = registry.get(name)
    module = spec.build()
    x = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
    out, _ = jax.eval_shape(lambda v: module.init_with_output(jax.random.key(0), v), x)
    return set(out) if isinstance(out, Mapping) else {"pre_logits"}


_NEED_MODELS = (_zoo_models, _extract_outputs)  # rules about the models: after the models are known

RULES: dict[str, tuple] = {
    "affine_equivalence": (_zoo_models, _weight_files),
    "canonical_space": (_zoo_models, _weight_files),
    "open_set": (_zoo_models, _weight_files, _open_set_classes),
    "full_network_embedding": (_zoo_models, _weight_files, _fne_thresholds),
    "backward_compatible": (_bct_classes,),
    "extract": (_zoo_models, _weight_files, _extract_outputs),
}


# ---------------------------------------------------------------------------------------------------
# Presets and fields named on the command line, before absl parses them


def config_fields(config, prefix: str = "") -> list[str]:
    """Every field of a ConfigDict (or dict), dotted, nested ones included."""
    out = []
    for key in sorted(config.keys()):
        value = config[key]
        if hasattr(value, "keys") and not isinstance(value, str):
            out.append(prefix + key)
            out += config_fields(value, prefix + key + ".")
        else:
            out.append(prefix + key)
    return out


def _load_preset(config_arg: str):
    """The ConfigDict of FILE:PRESET (as config_flags loads it); ConfigError for a bad file or preset."""
    import importlib.util

    path, _, preset = config_arg.partition(":")
    if not os.path.isfile(path):
        raise ConfigError("--config", config_arg, "no such config file")
    spec = importlib.util.spec_from_file_location("_embjax_config_check", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config(preset or None)
    except ValueError as e:  # the config file's own message lists its presets
        raise ConfigError("--config", config_arg, str(e)) from None


def check_argv(study: str, argv: list[str], default_config: str) -> None:
    """ConfigError for an unknown preset or an unknown --config.FIELD of `argv`."""
    config_arg = default_config
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config=") or arg.startswith("-config="):
            config_arg = arg.split("=", 1)[1]
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            config_arg = argv[i + 1]
    config = _load_preset(config_arg)
    known = set(config_fields(config))
    for arg in argv[1:]:
        if arg == "--":
            break
        m = re.match(r"--?(no)?config\.([^=]+)", arg)
        if not m:
            continue
        field = m.group(2)
        if field in known:
            continue
        parent = field.rpartition(".")[0]
        if parent and parent in known and _is_free_dict(config, parent):
            continue  # a map of names (weight_files.MODEL, thesis_names.MODEL): any key
        listed = ", ".join(f for f in sorted(known) if "." not in f or not _is_free_dict(config, f.rpartition(".")[0]))
        raise ConfigError(f"--config.{field}", None, f"unknown field of the {study} config; its fields are {listed}")


_FREE_DICTS = ("weight_files", "thesis_names")


def pop_map_entries(argv: list[str]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(argv without them, {map: {key: value}}) of the --config.weight_files.NAME=PATH (and thesis_names)
    arguments. config_flags can only override fields a preset already has, and these maps start empty,
    so their entries are taken out before absl sees them and put into the config after (`apply_map_entries`)."""
    rest, entries = [], {}
    for arg in argv:
        m = re.fullmatch(r"--?config\.(" + "|".join(_FREE_DICTS) + r")\.([^=.]+)=(.*)", arg, re.S)
        if m:
            entries.setdefault(m.group(1), {})[m.group(2)] = m.group(3)
        else:
            rest.append(arg)
    return rest, entries


def apply_map_entries(config, entries: dict[str, dict[str, str]]) -> None:
    for field, values in entries.items():
        target = config[field]
        unlock = getattr(target, "unlocked", None)
        if unlock is not None:
            with unlock():
                target.update(values)
        else:
            target.update(values)


def _is_free_dict(config, path: str) -> bool:
    return path in _FREE_DICTS


# ---------------------------------------------------------------------------------------------------
# Reporting


def exit_usage(error: BaseException) -> None:
    """Print `error` as one line on stderr and exit 2; re-raise it when EMBJAX_TRACEBACK is set."""
    if os.environ.get("EMBJAX_TRACEBACK"):
        raise error
    print(f"embjax: error: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def check_or_exit(study: str, config: Mapping, workdir: str | None) -> None:
    try:
        check(study, config, workdir)
    except ConfigError as e:
        exit_usage(e)


def check_argv_or_exit(study: str, argv: list[str], default_config: str) -> None:
    """check_argv, a problem printed as one line (exit 2). Call it before the config flag is defined."""
    try:
        check_argv(study, argv, default_config)
    except ConfigError as e:
        exit_usage(e)


def flags_parser(study: str):
    """An absl flags parser for app.run: absl's parse (a bad type or an unknown flag as one line), then
    stray arguments; every problem one line and exit 2."""
    from absl import flags

    def parse(argv):
        try:
            try:
                rest = flags.FLAGS(argv)
            except flags.Error as e:
                raise ConfigError("", None, _one_line(str(e))) from None
            except (AttributeError, KeyError, TypeError, ValueError) as e:  # config_flags' own failures
                raise ConfigError("", None, _one_line(f"{type(e).__name__}: {e}")) from None
            if len(rest) > 1:
                raise ConfigError(rest[1], None, "unexpected argument (flags are --NAME=VALUE; "
                                  f"{len(rest) - 1} stray argument(s))")
            return rest
        except ConfigError as e:
            exit_usage(e)

    return parse


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text[:600] + (" ..." if len(text) > 600 else "")
