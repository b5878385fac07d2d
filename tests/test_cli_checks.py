"""Every study's command line is checked before any work (experiments/config_check.py).

In-process: the checks themselves on every study's presets, with bad values for the fields a user sets.
End to end: the bad command lines of issue 26 run as real commands (`python -m experiments.<study> ...`)
in one subprocess that imports the studies once and forks a child per command line (a fresh
interpreter per case costs seconds each); each must exit with status 2 within 10 CPU seconds, print at
most three lines on stderr, the last naming the flag or value, and write nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import study_runner as runner
from experiments import config_check
from experiments.config_check import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")


def preset(study: str, name: str | None = None):
    config_file = "extract" if study == "extract" else study
    return config_check._load_preset(os.path.join(CONFIGS, f"{config_file}.py") + (f":{name}" if name else ""))


def bad(study, overrides: dict, workdir=None, preset_name=None) -> str:
    config = preset(study, preset_name)
    for path, value in overrides.items():
        node = config
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        with node.unlocked() if hasattr(node, "unlocked") else _nothing():
            node[last] = value
    with pytest.raises(ConfigError) as info:
        config_check.check(study, config, workdir)
    return str(info.value)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


STUDIES = ("affine_equivalence", "open_set", "full_network_embedding", "backward_compatible", "extract")


@pytest.mark.parametrize("study", STUDIES)
def test_every_preset_of_every_study_passes(study, tmp_path):
    presets = {"affine_equivalence": ["zoo", "effnet_lite", "imagenet"],
               "open_set": ["effnet_lite", "zoo", "zoo_hubs", "zoo_learned", "lfw", "smoke"],
               "full_network_embedding": ["effnet_lite0", "effnet_lite", "tiny", "vgg16"],
               "backward_compatible": ["fashion_mnist", "imagenet"],
               "extract": ["effnet_lite", "zoo"]}[study]
    for name in presets:
        config = preset(study, name)
        if config.get("weights") == "files":  # the presets that need a user's files: give them some
            with config.weight_files.unlocked():
                for model in config_check.model_names(config.models):
                    config.weight_files[model] = str(tmp_path)
        config_check.check(study, config, str(tmp_path / "new" / "dir"))


@pytest.mark.parametrize("study", STUDIES)
@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "--config.batch_size=0: must be a whole number >= 1"),
    ("batch_size", -3, "--config.batch_size=-3"),
    ("checkpoint_every", 0, "--config.checkpoint_every=0"),
    ("progress_seconds", -1.0, "--config.progress_seconds=-1.0: must be >= 0"),
    ("image_size", 0, "--config.image_size=0"),
])
def test_shared_fields(study, field, value, message):
    assert bad(study, {field: value}).startswith(message)


@pytest.mark.parametrize("study, overrides, message", [
    ("affine_equivalence", {"zoo.batch_size": 0}, "--config.zoo.batch_size=0"),
    ("affine_equivalence", {"zoo.learning_rate": 0.0}, "--config.zoo.learning_rate=0.0: must be > 0"),
    ("affine_equivalence", {"models": "zoo_resnet_v1"}, "must name at least 2 model(s)"),
    ("affine_equivalence", {"models": "zoo_resnet_v1,nope_net"}, "unknown model 'nope_net'"),
    ("affine_equivalence", {"models": "zoo_resnet_v1,zoo_resnet_v1"}, "names a model twice"),
    ("affine_equivalence", {"dtype": "float16"}, "--config.dtype=float16: must be one of float32, bfloat16"),
    ("affine_equivalence", {"heads": "deep"}, "--config.heads=deep"),
    ("affine_equivalence", {"ridge": -0.1}, "--config.ridge=-0.1"),
    ("affine_equivalence", {"ridge": float("nan")}, "must be a finite number"),
    ("affine_equivalence", {"weights": "pretrained!"}, "--config.weights=pretrained!"),
    ("affine_equivalence", {"linear_head.epochs": 0}, "--config.linear_head.epochs=0"),
    ("affine_equivalence", {"fit_split": "train[:10%"}, "--config.fit_split=train[:10%"),
    ("affine_equivalence", {"models": "efficientnet_lite0,efficientnet_lite1"},
     "--config.weights=zoo: trains only zoo_* models"),
    ("affine_equivalence", {"name": "../x"}, "--config.name=../x"),
    ("open_set", {"fit_classes": "0-4,x"}, "--config.fit_classes=0-4,x: must be ranges"),
    ("open_set", {"eval_classes": "4-9"}, "--config.eval_classes=4-9: overlaps --config.fit_classes=0-5"),
    ("open_set", {"eval_classes": "5-12"}, "class 12 does not exist: fashion_mnist has classes 0-9"),
    ("open_set", {"eval_classes": "even", "fit_classes": "even"}, "overlaps"),
    ("open_set", {"fars": (0.1, 2.0)}, "--config.fars=0.1,2.0: each value must be <= 1"),
    ("open_set", {"rank": 0}, "--config.rank=0"),
    ("open_set", {"curve_families": ("affine", "svd")}, "--config.curve_families=affine,svd"),
    ("open_set", {"recall_ks": (0,)}, "--config.recall_ks=0"),
    ("open_set", {"hub_ranks": (16, 0)}, "--config.hub_ranks=16,0: each value must be a whole number >= 1"),
    ("open_set", {"hub_methods": ("gcca", "cca")}, "--config.hub_methods=gcca,cca: each value must be one of gcca"),
    ("open_set", {"learned.families": ("learned", "mlp")}, "--config.learned.families=learned,mlp"),
    ("open_set", {"learned.loss": "hinge"}, "--config.learned.loss=hinge: must be one of task, regression"),
    ("full_network_embedding", {"train_sizes": "100,x"}, "--config.train_sizes=100,x"),
    ("full_network_embedding", {"train_sizes": "0"}, "--config.train_sizes=0"),
    ("full_network_embedding", {"svm.C": 0.0}, "--config.svm.C=0.0"),
    ("full_network_embedding", {"svm.solver": "sgd"}, "--config.svm.solver=sgd"),
    ("full_network_embedding", {"low": 0.5}, "--config.low=0.5: must be below --config.high=0.15"),
    ("full_network_embedding", {"activation": "both"}, "--config.activation=both"),
    ("backward_compatible", {"old_classes": (0, 1, 42)},
     "--config.old_classes=0,1,42: class 42 does not exist: --config.num_classes=10 has classes 0-9"),
    ("backward_compatible", {"old_classes": (0, 0, 1)}, "names a class twice"),
    ("backward_compatible", {"old_classes": (0, 8), "held_out_classes": (8, 9)},
     "--config.held_out_classes=8,9: overlaps --config.old_classes"),
    ("backward_compatible", {"held_out_classes": (12,)}, "--config.held_out_classes=12: class 12 does not exist"),
    ("backward_compatible", {"old_classes": ()}, "--config.old_classes=: must name the old model's classes"),
    ("backward_compatible", {"old_fraction": 0.0}, "--config.old_fraction=0.0: must be > 0"),
    ("backward_compatible", {"old_train.batch_size": 0}, "--config.old_train.batch_size=0"),
    ("backward_compatible", {"new_train.epochs": 0}, "--config.new_train.epochs=0"),
    ("backward_compatible", {"bct.normalize": "l2"}, "--config.bct.normalize=l2"),
    ("backward_compatible", {"old_model": "resnet_9000"}, "--config.old_model=resnet_9000: unknown model"),
    ("backward_compatible", {"retrieval_metric": "dot"}, "--config.retrieval_metric=dot"),
    ("extract", {"store_dtype": "int4"}, "--config.store_dtype=int4: must be one of float32, float16, int8"),
    ("extract", {"outputs": ""}, "--config.outputs=: must not be empty"),
    ("extract", {"outputs": "pre_logits,nope", "models": "zoo_resnet_v1", "weights": "random"},
     "--config.outputs=pre_logits,nope: zoo_resnet_v1 has no output 'nope'; it has "),
])
def test_study_fields(study, overrides, message):
    got = bad(study, overrides)
    assert message in got, got


def test_weight_files(tmp_path):
    message = bad("affine_equivalence", {"weights": "files", "weight_files": {"zoo_resnet_v1": str(tmp_path)}})
    assert message == ("--config.weight_files.zoo_resnet_v2: missing: --config.weights=files needs a weight file "
                       "for every model")
    message = bad("affine_equivalence", {"weight_files": {"zoo_resnet_v1": str(tmp_path / "nope.h5")}})
    assert message.endswith("nope.h5: no such file or directory")
    message = bad("affine_equivalence", {"weight_files": {"vgg16": str(tmp_path)}})
    assert "vgg16 is not in --config.models" in message


def test_outputs_are_checked_against_the_models_outputs():
    have = config_check.model_outputs("zoo_resnet_v1")
    assert {"pre_logits", "logits"} <= have
    config = preset("extract")
    config.models, config.weights, config.outputs = "zoo_resnet_v1", "random", ",".join(sorted(have))
    config_check.check("extract", config, None)


def test_workdir(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    config = preset("open_set")
    for workdir, message in ((afile / "sub", f"cannot be created ({afile} is a file)"),
                             (afile, "is a file, not a directory"), ("", "must name a directory")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config_check.check("open_set", config, str(workdir))
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anywhere
            with pytest.raises(ConfigError, match="not writable"):
                config_check.check("open_set", config, str(locked / "run"))
    finally:
        os.chmod(locked, 0o700)
    config_check.check("open_set", config, str(tmp_path / "a" / "b" / "c"))
    assert not (tmp_path / "a").exists()  # checked, not created


def test_argv_presets_and_fields():
    default = os.path.join(CONFIGS, "open_set.py") + ":effnet_lite"
    config_check.check_argv("open_set", ["x", "--config.batch_size=3", "--config.zoo.epochs=2",
                                         "--config.weight_files.any_model=/w"], default)
    with pytest.raises(ConfigError) as info:
        config_check.check_argv("open_set", ["x", "--config.nope=1"], default)
    assert str(info.value).startswith("--config.nope: unknown field of the open_set config; its fields are ")
    assert "batch_size" in str(info.value) and "zoo.epochs" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config_check.check_argv("open_set", ["x", "--config=" + default.replace("effnet_lite", "nope")], default)
    assert "unknown config 'nope'; choose one of" in str(info.value) and "smoke" in str(info.value)
    with pytest.raises(ConfigError, match="no such config file"):
        config_check.check_argv("open_set", ["x", "--config=/nowhere.py:zoo"], default)


def test_map_entries_are_taken_out_and_applied():
    argv, entries = config_check.pop_map_entries(
        ["prog", "--config.weight_files.inception_v1=/w/a.ckpt", "--config.batch_size=4",
         "--config.thesis_names.x=X"])
    assert argv == ["prog", "--config.batch_size=4"]
    assert entries == {"weight_files": {"inception_v1": "/w/a.ckpt"}, "thesis_names": {"x": "X"}}
    config = preset("affine_equivalence", "imagenet")
    config.lock()
    config_check.apply_map_entries(config, entries)
    assert config.weight_files.inception_v1 == "/w/a.ckpt" and config.thesis_names.x == "X"


def test_features_flags(tmp_path):
    config = {"batch_size": 0, "ridge": 0.0, "progress_seconds": 1.0, "cca_dims": 3, "similarity_rows": 10,
              "similarity": True, "name": "features"}
    with pytest.raises(ConfigError, match=r"^--batch_size=0: must be a whole number >= 1$"):
        config_check.check("features", config, str(tmp_path))
    config["batch_size"] = 5
    config_check.check("features", config, str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# End to end: the command lines, one subprocess forking a child per case

RUNNER = r"""
import io, json, os, resource, runpy, sys, time
cases = json.load(sys.stdin)
import numpy, absl.app, ml_collections.config_flags  # what every child needs, imported once
import jax, embjax.models.registry, experiments.common, experiments.config_check
jax.config.update("jax_platforms", "cpu")
out = []
for module, argv, env in cases:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.environ.update(env)
        os.close(read)
        os.dup2(write, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = [module] + argv
        code = 0
        try:
            runpy.run_module(module, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        sys.stderr.flush()
        os._exit(code)
    os.close(write)
    err = b""
    while chunk := os.read(read, 65536):
        err += chunk
    os.close(read)
    _, status, usage = os.wait4(pid, 0)
    out.append({"rc": os.waitstatus_to_exitcode(status), "cpu": usage.ru_utime + usage.ru_stime,
                "stderr": err.decode(errors="replace")})
print(json.dumps(out))
"""


def run_command_lines(cases):
    """Run every (module, argv, extra environment) case as `python -m module argv...` would; returns
    {"rc", "cpu", "stderr"} per case. One interpreter imports the studies once, then forks a child per case."""
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(cases), capture_output=True,
                          text=True, cwd=ROOT, env=runner.env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def command_lines(tmp_path_factory):
    """The cases of the tests below, run in one subprocess (each child costs a fork, not an interpreter):
    name -> (module, argv, what the last line must hold) and its result."""
    tmp_path = tmp_path_factory.mktemp("cli")
    afile = tmp_path / "afile"
    afile.write_text("x")
    npy = tmp_path / "a.npy"
    npy.write_bytes(b"")
    work = str(tmp_path / "work")
    bad = [  # (module, argv, what the last line must hold)
        ("experiments.affine_equivalence", ["--config.batch_size=0", f"--workdir={work}"], "--config.batch_size=0"),
        ("experiments.backward_compatible", ["--config.batch_size=0", f"--workdir={work}"], "--config.batch_size=0"),
        ("experiments.backward_compatible", ["--config.old_train.batch_size=0", f"--workdir={work}"],
         "--config.old_train.batch_size=0"),
        ("experiments.backward_compatible", ["--config.old_classes=0,1,42", f"--workdir={work}"], "class 42"),
        ("experiments.open_set", ["--config.batch_size=0", f"--workdir={work}"], "--config.batch_size=0"),
        ("experiments.full_network_embedding", ["--config.batch_size=0", f"--workdir={work}"],
         "--config.batch_size=0"),
        ("experiments.extract", ["--config.batch_size=0", f"--workdir={work}"], "--config.batch_size=0"),
        ("experiments.extract", ["--config.store_dtype=int4", f"--workdir={work}"], "--config.store_dtype=int4"),
        ("experiments.extract", ["--config.outputs=pre_logits,nope", f"--workdir={work}"], "no output 'nope'"),
        ("experiments.affine_equivalence", [f"--workdir={afile}/run"], f"--workdir={afile}/run"),
        ("experiments.open_set", [f"--workdir={afile}/run"], f"--workdir={afile}/run"),
        ("experiments.features", [f"--features=a={npy}", f"--workdir={afile}/run"], f"--workdir={afile}/run"),
        ("experiments.features", [f"--features=a={npy}", "--batch_size=0", f"--workdir={work}"], "--batch_size=0"),
        ("experiments.open_set", ["--config.nope=1", f"--workdir={work}"], "--config.nope: unknown field"),
        ("experiments.backward_compatible", ["--config.bct.nope=1"], "--config.bct.nope: unknown field"),
        ("experiments.open_set", ["--config=experiments/configs/open_set.py:nope"], "choose one of"),
        ("experiments.full_network_embedding", ["--config=experiments/configs/full_network_embedding.py:nope"],
         "choose one of"),
        ("experiments.open_set", ["stray", f"--workdir={work}"], "stray: unexpected argument"),
        ("experiments.features", [f"--features=a={npy}", "stray"], "stray: unexpected argument"),
        ("experiments.open_set", ["--config.batch_size=abc"], "--config.batch_size=abc"),
        ("experiments.open_set", ["--nope=1"], "nope"),
        ("experiments.affine_equivalence", ["--config.weight_files.zoo_resnet_v1=/nonexistent"],
         "--config.weight_files.zoo_resnet_v1=/nonexistent: no such file or directory"),
    ]
    cases = [(m, a, {}) for m, a, _ in bad]
    # Not a command-line error but the file's (status 1): an empty .npy is a FeatureFileError, one line.
    cases.append(("experiments.features", [f"--features=a={npy},b={npy}", f"--workdir={tmp_path}/w"], {}))
    cases.append(("experiments.open_set", ["--config.batch_size=0", f"--workdir={tmp_path}/tb"],
                  {"EMBJAX_TRACEBACK": "1"}))
    results = run_command_lines(cases)
    return {"bad": list(zip(bad, results[:len(bad)])), "work": work, "feature_file": results[-2],
            "traceback": results[-1]}


def test_bad_command_lines_exit_2_in_one_line(command_lines):
    for (module, argv, want), got in command_lines["bad"]:
        lines = got["stderr"].strip().splitlines()
        assert got["rc"] == 2, (module, argv, got)
        assert 1 <= len(lines) <= 3 and want in lines[-1], (module, argv, got["stderr"][-2000:])
        assert got["cpu"] < 10, (module, argv, got["cpu"])
    assert not os.path.exists(command_lines["work"])  # nothing ran far enough to create the run directory


def test_a_bad_feature_file_is_one_line_too(command_lines):
    got = command_lines["feature_file"]
    lines = got["stderr"].strip().splitlines()
    assert got["rc"] == 1 and len(lines) == 1, got
    assert "FeatureFileError" in lines[0] and "a.npy: an empty file (0 bytes)" in lines[0], got


def test_embjax_traceback_shows_the_traceback(command_lines):
    # The same refused command line as above, with EMBJAX_TRACEBACK=1 in the child's environment.
    got = command_lines["traceback"]
    assert got["rc"] == 99 and "Traceback" in got["stderr"] and "ConfigError" in got["stderr"]
