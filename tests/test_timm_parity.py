"""Inception-v4 and PNASNet-5 against timm, with random weights, through the timm state-dict converters.

The references are timm's `inception_v4` and `pnasnet5large` (ported from TF-Slim) and a reduced PNASNet-5
assembled from timm's own cell modules, run once in float64 by tests/fixtures/make_timm_fixtures.py (timm
cannot be imported beside this project's CPU-only torch; see tests/timm_reference.py) and committed as
the spatial mean of every channel of every block / cell output, plus `pre_logits` and `logits` in full.
The weights are rebuilt here from the tensor names and shapes stored with the fixture, bit for bit, and
go through the same converter a user's timm file goes through.

Inputs are non-square with odd and even sizes along the way (Inception-v4 75×91, the smallest it takes;
PNASNet 64×78 and 36×50), so TF's asymmetric "SAME" padding of every stride-2 layer is exercised on both
axes. timm's Inception-v4 BatchNorms have a scale γ, drawn in [0.5, 1.5], which the converter folds into
the variance of TF-Slim's scale-free BatchNorm: a wrong fold moves every output.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import timm_reference
from embjax.models import inception_slim, nasnet, registry
from embjax.weights import safetensors_io
from embjax.models.convert import timm_models
from embjax.models.convert.framework import WeightMismatchError

# Parity with independent references: the tolerances assume exact float32 matmuls (see conftest.py).
pytestmark = pytest.mark.highest_precision

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "timm")
# Tolerance: max |flax - timm| <= RTOL * max |timm| per output. The reference is float64, so the error is
# embjax's float32 rounding alone: u = 6e-8 per operation; the longest sums are 3·3·448 = 4032 products
# (Inception-v4's C blocks) and 4320-wide 1x1 convolutions (PNASNet's last cells), sqrt(n)·u ≈ 4e-6, and
# ~60 stacked layers (Inception-v4: 3 stem convs, 17 blocks of up to 5 convs; PNASNet: 14 cells of 2-4
# convs) add in quadrature: sqrt(60)·4e-6 ≈ 3e-5 < 1e-4. Measured: 6e-7 (v4), 1e-6 (PNASNet, both sizes).
# An output mean over channels shifts by the border pixels' share when a padding is placed wrong (a
# 1-pixel border of a 16-pixel map is ~6%), far outside the tolerance.
RTOL = 1e-4
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *args):
    lowered = jax.jit(fn).lower(*args)
    return lowered.compile(_FAST_COMPILE if jax.default_backend() == "cpu" else None)


def _fixture(name):
    meta, ref = timm_reference.load_fixture(os.path.join(FIXTURES, name))
    state_dict = timm_reference.state_dict(meta["state_dict"], meta["weight_seed"])
    x = timm_reference.images(*meta["input"], meta["input_seed"])
    return meta, ref, state_dict, x


def _assert_matches(module, variables, x, ref):
    out = _compile(module.apply, variables, x)(variables, x)
    assert ref.keys() - {"pre_logits", "logits"}, "fixture without intermediate outputs"
    worst = (0.0, None)
    for key, want in ref.items():
        name = key.split("/", 1)[-1]
        got = np.asarray(out[name], np.float64)
        if key.startswith("mean/"):
            got = got.mean(axis=(1, 2))
        assert got.shape == want.shape, key
        scale = np.abs(want).max()
        assert scale > 0.1, f"{key}: reference output is degenerate (max {scale})"
        err = np.abs(got - want).max()
        assert err <= RTOL * scale, f"{key}: max error {err:.3g} > {RTOL} x {scale:.3g}"
        worst = max(worst, (err / scale, key))
    print(f"{type(module).__name__}: worst relative error {worst[0]:.2e} ({worst[1]})")  # pytest -s shows it
    return out


@pytest.fixture(scope="module")
def inception_v4_case():
    return _fixture("inception_v4")  # 42.7M random weights: drawn once for the module


@pytest.mark.slow  # full-size parity: the whole tier (the reduced PNASNet below is everyday)
def test_inception_v4_matches_timm(inception_v4_case, tmp_path):
    meta, ref, state_dict, x = inception_v4_case
    variables = timm_models.convert_timm_inception_v4(state_dict)
    module = inception_slim.inception_v4(num_classes=1000)
    out = _assert_matches(module, variables, x, ref)
    # 75x91: Conv2d_2b 35x43, Mixed_5a 7x9, Mixed_6a 3x4, Mixed_7a 1x1.
    assert out["pre_logits"].shape == (2, 1536) and out["Mixed_7d"].shape == (2, 1, 1, 1536)
    # timm's count (stored by the fixture script) holds a γ per BatchNorm channel that TF-Slim lacks.
    bn_channels = sum(int(np.size(v)) for v in jax.tree.leaves(variables["batch_stats"])) // 2
    ours = sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))
    assert ours + bn_channels == meta["params"] == 42_679_816

    # The same weights as a user's .safetensors file, through the registry.
    path = tmp_path / "inception_v4.safetensors"
    safetensors_io.save_state_dict(path, state_dict)
    loaded = registry.load_weights("inception_v4", path)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_reduced_pnasnet_matches_timm_cells():
    meta, ref, state_dict, x = _fixture("pnasnet_tiny")
    module = nasnet.PNASNet(num_classes=meta["num_classes"], num_cells=meta["num_cells"],
                            num_conv_filters=meta["num_conv_filters"], stem_filters=meta["stem_filters"])
    variables = timm_models.convert_timm(state_dict, module)
    out = _assert_matches(module, variables, x, ref)
    assert out["pre_logits"].shape == (2, 20 * meta["num_conv_filters"])
    assert nasnet.reduction_indices(meta["num_cells"]) == [2, 4]
    assert sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"])) == meta["params"]


@pytest.mark.slow
def test_pnasnet5large_matches_timm():
    meta, ref, state_dict, x = _fixture("pnasnet5large")
    variables = timm_models.convert_timm_pnasnet(state_dict)
    out = _assert_matches(nasnet.pnasnet_large(), variables, x, ref)
    assert out["pre_logits"].shape == (2, 4320)


def test_pnasnet_large_sizes_match_timm():
    """Parameter count equal to timm's pnasnet5large (stored by the fixture script); 4320-d at 331 px."""
    meta, _ = timm_reference.load_fixture(os.path.join(FIXTURES, "pnasnet5large"))
    module = nasnet.pnasnet_large()
    out, variables = jax.eval_shape(module.init_with_output, jax.random.key(0),
                                    jax.ShapeDtypeStruct((1, 331, 331, 3), jnp.float32))
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"])) == meta["params"] == 86_057_668
    assert out["pre_logits"].shape == (1, 4320) and out["cell_11"].shape == (1, 11, 11, 4320)
    # Timm's tensor list for the converter: every name has a place and every place a name.
    shapes = {name: tuple(shape) for name, shape in meta["state_dict"]}
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    torch_names = set()
    for path, leaf in flat:
        keys = tuple(k.key for k in path)
        leaf_name = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                     "var": "running_var"}[keys[-1]]
        torch_names.add(f"{timm_models.pnasnet_torch_name(keys[1:-1])}.{leaf_name}")
    assert torch_names == {n for n in shapes if not n.endswith("num_batches_tracked")}


def test_converter_reports_every_problem(inception_v4_case):
    meta, _, state_dict, _ = inception_v4_case
    bad = dict(state_dict)
    del bad["features.7.branch1.1.conv.weight"]
    bad["features.6.branch0.bn.weight"] = -bad["features.6.branch0.bn.weight"]
    bad["features.10.branch0.conv.weight"] = bad["features.10.branch0.conv.weight"][:-1]
    bad["aux.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(WeightMismatchError) as info:
        timm_models.convert_timm_inception_v4(bad)
    message = str(info.value)
    missing = "missing timm tensor 'features.7.branch1.1.conv.weight' for params/Mixed_5c/Branch_1/Conv2d_0b_3x3"
    assert missing in message
    assert "'features.6.branch0.bn.weight' has BatchNorm scales <= 0 (96 of 96)" in message
    assert "params/Mixed_6a/Branch_0/Conv2d_1a_3x3/conv/kernel: timm tensor under" in message
    assert "unexpected timm tensor 'aux.weight'" in message
    assert len(info.value.problems) == 4
    headless = {k: v for k, v in state_dict.items() if not k.startswith("last_linear")}
    with pytest.raises(WeightMismatchError, match="last_linear"):
        timm_models.convert_timm_inception_v4(headless)


def test_unit_batchnorm_scale_leaves_the_variance_untouched(inception_v4_case):
    """Real timm weights converted from TF-Slim have γ = 1: the variance must come through bit for bit."""
    meta, _, state_dict, _ = inception_v4_case
    ones = {k: (np.ones_like(v) if k.endswith("bn.weight") else v) for k, v in state_dict.items()}
    variables = timm_models.convert_timm_inception_v4(ones)
    np.testing.assert_array_equal(variables["batch_stats"]["Mixed_6b"]["Branch_2"]["Conv2d_0e_1x7"]["bn"]["var"],
                                  state_dict["features.11.branch2.4.bn.running_var"])
