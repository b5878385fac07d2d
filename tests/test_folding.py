"""BatchNorm folding (embjax.models.folding): folded against unfolded outputs for every family.

Every registered family runs through the transform (`fold` below: `folding.fold_module` and
`folding.fold_variables` on the spec's module) with random weights and random BatchNorm statistics
(means far from 0, variances far from 1, so no BatchNorm is close to an identity), and every named
output (stem, stages / mixed blocks, head, pre_logits, logits) is compared. The transform's arithmetic
and its epsilon are checked against float64 NumPy on a layer pair small enough to write out by hand.
"""
import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embjax.models import folding, inception, inception_slim, iresnet, layers, nasnet, registry, resnet
from embjax.models.convert.framework import WeightMismatchError

# Folded and unfolded programs differ only in float32 rounding: the folded kernel K·s is rounded once
# per weight (2^-24 ≈ 6e-8 relative), the unfolded BatchNorm rounds (y − μ), the rsqrt and two products
# (≈ 4 × 6e-8 of the operands, magnified by |y| / |y − μ| where the mean cancels most of y; the random
# means here are O(0.5) against O(1) activations, so a few-fold at most), and convolution sums of up to
# 4608 products change order with the changed values (≤ sqrt(4608) × 6e-8 ≈ 4e-6 relative, ~1e-7
# typically). About 1e-6 of a layer's scale per layer; over the ≤ ~100 layers of these networks that
# is ≤ 1e-4 if every layer's error added up in the same direction, ~1e-5 as a random walk. Measured:
# ≤ 3e-6 for every output of every model here. 1e-4 bounds the worst case while staying below what a
# wrong fold gives (an epsilon of 1e-3 instead of 1.001e-5 moves each ResNet layer by ~5e-4 at these
# variances, a dropped mean or shift by O(1)).
RTOL = 1e-4


def fold(name, variables, **build_overrides):
    """(folded module, folded variables) of registry model `name`: the transform on the spec's module."""
    spec = registry.get(name)
    module = spec.build(**build_overrides)
    sample = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
    return folding.fold_module(module), folding.fold_variables(module, variables, sample)


def random_variables(module, x, seed):
    """Variables of the module's shapes drawn with NumPy (no per-shape XLA programs): He-normal kernels
    (fan-in = all but the output axis, depthwise included), BatchNorm γ ~ U(0.5, 1.5), β ~ N(0, 0.2),
    running mean ~ N(0, 0.5), running variance ~ U(0.5, 2), other biases ~ N(0, 0.2)."""
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        collection, name, shape = path[0].key, path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
        if collection == "batch_stats":
            value = rng.uniform(0.5, 2.0, shape) if name == "var" else rng.normal(0.0, 0.5, shape)
            return value.astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0.0, 0.2, shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def rel_err(got, want):
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def assert_same_outputs(module, variables, folded_module, folded, x, heads=("pre_logits", "logits")):
    want = jax.jit(module.apply)(variables, x)
    got = jax.jit(folded_module.apply)(folded, x)
    assert set(got) == set(want)
    assert set(heads) <= set(want)
    for key, ref in want.items():
        ref = np.asarray(ref)
        assert np.all(np.isfinite(ref)) and np.std(ref) > 0, f"{key}: degenerate reference output"
        assert got[key].shape == ref.shape and got[key].dtype == ref.dtype, key
        err = rel_err(got[key], ref)
        assert err < RTOL, f"{key}: folded differs from unfolded by {err:.2e} of its largest value"


def count_batchnorms(module, variables, x):
    """(BatchNorm calls, rsqrt ops) when `module` runs on x: a folded module must have neither."""
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            calls.append(context.module.scope.path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jaxpr = jax.make_jaxpr(module.apply)(variables, x)
    return len(calls), str(jaxpr).count("rsqrt")


# --------------------------------------------------------------------------------------------------
# The transform's arithmetic against float64 NumPy.


class PreactDenseBN(nn.Module):
    """BatchNorm → ReLU → Dense → BatchNorm: one BatchNorm with no layer before it, one after a layer."""

    epsilon: float
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        layers.check_inference("PreactDenseBN", self.fold_bn, train)
        bn = dict(use_running_average=not train, epsilon=self.epsilon)
        pre = layers.ScaleShift(name="pre_bn") if self.fold_bn else nn.BatchNorm(name="pre_bn", **bn)
        y = nn.Dense(5, name="dense")(nn.relu(pre(x)))
        return {"out": y if self.fold_bn else nn.BatchNorm(name="bn", **bn)(y)}


def test_fold_matches_float64_numpy_and_uses_the_modules_epsilon():
    # Variances of 1e-4..1e-2 against epsilon 1e-3: the epsilon changes every output by tens of percent,
    # so folding with any other epsilon than the module's fails by far.
    eps = 1e-3
    module = PreactDenseBN(epsilon=eps)
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (16, 4)).astype(np.float32)
    variables = random_variables(module, x, seed=1)
    for key in ("pre_bn", "bn"):
        variables["batch_stats"][key]["var"] = rng.uniform(1e-4, 1e-2, 5 if key == "bn" else 4).astype(np.float32)
    folded_module, folded = folding.fold_module(module), folding.fold_variables(module, variables, x)
    got = np.asarray(folded_module.apply(folded, x)["out"], np.float64)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    par, st = p["params"], p["batch_stats"]

    def reference(epsilon):
        h = (x - st["pre_bn"]["mean"]) / np.sqrt(st["pre_bn"]["var"] + epsilon) * par["pre_bn"]["scale"]
        h = np.maximum(h + par["pre_bn"]["bias"], 0.0)
        y = h @ par["dense"]["kernel"] + par["dense"]["bias"]
        y = (y - st["bn"]["mean"]) / np.sqrt(st["bn"]["var"] + epsilon) * par["bn"]["scale"]
        return y + par["bn"]["bias"]

    # float32 folded weights (≤ 6e-8 relative each) and a 4-term float32 dot: ~1e-6 of the output scale.
    assert rel_err(got, reference(eps)) < 1e-5
    assert rel_err(got, reference(1e-5)) > 0.1
    assert set(folded) == {"params"}
    assert set(folded["params"]["pre_bn"]) == {"scale", "bias"}
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(folded))


def test_each_family_folds_with_its_own_epsilon():
    x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    want = {"zoo_resnet_v1": 1.001e-5, "zoo_resnet_v2": 1.001e-5, "zoo_inception": 1e-3,
            "zoo_mobilenet_v2": 1e-3, "zoo_efficientnet_lite": 1e-3}
    for name, eps in want.items():
        module = registry.get(name).build()
        sites, _ = folding.batchnorm_sites(module, x)
        assert sites and {s.epsilon for s in sites} == {eps}, name


# --------------------------------------------------------------------------------------------------
# Every family: folded against unfolded, all named outputs.

ZOO = ("zoo_resnet_v1", "zoo_resnet_v2", "zoo_inception", "zoo_mobilenet_v2", "zoo_efficientnet_lite")


# Everyday: one model per layer mix (plain ResNet, Inception branches, depthwise + squeeze-excitation);
# ResNet-v2's pre-activation BatchNorms and MobileNet-v2's depthwise blocks fold in the whole tier, and
# test_resnet_v2_preactivation_batchnorm_stays_a_scale_and_shift keeps v2's rule everyday.
_FOLD_WHOLE_TIER = {"zoo_resnet_v2", "zoo_mobilenet_v2"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _FOLD_WHOLE_TIER else n
                                  for n in ZOO])
def test_zoo_models_fold(name):
    module = registry.get(name).build()
    x = jnp.asarray(np.random.default_rng(2).normal(0.0, 1.0, (4, 28, 28, 1)), jnp.float32)
    variables = random_variables(module, x, seed=3)
    folded_module, folded = fold(name, variables)
    assert folded_module.fold_bn and set(folded) == {"params"}
    assert count_batchnorms(module, variables, x)[0] > 0
    assert count_batchnorms(folded_module, folded, x) == (0, 0)
    assert_same_outputs(module, variables, folded_module, folded, x)


@pytest.mark.slow  # the full ResNet-50 layout; test_zoo_models_fold covers the module at the zoo's size
def test_resnet50_v1_full_size_folds():
    module = registry.get("resnet50_v1").build()
    x = jnp.asarray(np.random.default_rng(4).normal(0.0, 1.0, (2, 64, 64, 3)), jnp.float32)
    variables = random_variables(module, x, seed=5)
    folded_module, folded = fold("resnet50_v1", variables)
    # 53 conv + BatchNorm pairs, every one folded: the 53 kernels and 53 biases, plus the classifier.
    assert len(jax.tree.leaves(folded)) == 2 * 53 + 2
    assert_same_outputs(module, variables, folded_module, folded, x)


@pytest.mark.parametrize("conv_bias,stride_in_1x1", [(False, False), pytest.param(True, True, marks=pytest.mark.slow)])
def test_resnet_v1_without_conv_biases_folds(conv_bias, stride_in_1x1):
    # torchvision's layout (no conv biases, stride on the 3x3): folding gives each conv a bias.
    module = resnet.resnet(50, 1, num_classes=5, stage_sizes=(1, 2, 1, 1), conv_bias=conv_bias,
                           stride_in_1x1=stride_in_1x1)
    x = jnp.asarray(np.random.default_rng(6).normal(0.0, 1.0, (2, 64, 64, 3)), jnp.float32)
    variables = random_variables(module, x, seed=7)
    folded = folding.fold_variables(module, variables, x)
    assert_same_outputs(module, variables, folding.fold_module(module), folded, x)


@pytest.mark.parametrize("stem_pool", [pytest.param(True, marks=pytest.mark.slow), False])
def test_resnet_v2_preactivation_batchnorm_stays_a_scale_and_shift(stem_pool):
    # v2's preact_bn reads the residual stream: after a max-pool (ImageNet stem), or straight from the
    # stem conv whose raw output is also the named `stem` output (zoo stem). Neither can be folded into
    # a conv; each becomes a precomputed ScaleShift under the BatchNorm's name, as does post_bn. Every
    # other BatchNorm (1_bn, 2_bn of each block) folds into its conv.
    module = resnet.resnet(50, 2, num_classes=5, stage_sizes=(2, 1, 1, 2), stem_pool=stem_pool)
    x = jnp.asarray(np.random.default_rng(8).normal(0.0, 1.0, (2, 64, 64, 3)), jnp.float32)
    variables = random_variables(module, x, seed=9)
    folded_module = folding.fold_module(module)
    folded = folding.fold_variables(module, variables, x)
    kept, _ = folding.scale_shift_paths(folded_module, x)
    blocks = [f"conv{i + 2}_block{j + 1}" for i, n in enumerate((2, 1, 1, 2)) for j in range(n)]
    assert kept == {(b, "preact_bn") for b in blocks} | {("post_bn",)}
    params = folded["params"]
    for b in blocks:
        projection = {"0_conv"} if "0_conv" in variables["params"][b] else set()
        assert set(params[b]) == {"preact_bn", "1_conv", "2_conv", "3_conv"} | projection
        assert set(params[b]["1_conv"]) == {"kernel", "bias"}
    # The ScaleShift holds exactly BatchNorm's affine map, s = γ / sqrt(var + ε), t = β − μ·s.
    bn = jax.tree.map(lambda a: np.asarray(a, np.float64), {
        "p": variables["params"]["conv3_block1"]["preact_bn"],
        "s": variables["batch_stats"]["conv3_block1"]["preact_bn"]})
    s = bn["p"]["scale"] / np.sqrt(bn["s"]["var"] + module.epsilon)
    np.testing.assert_allclose(params["conv3_block1"]["preact_bn"]["scale"], s, rtol=1e-7)
    np.testing.assert_allclose(params["conv3_block1"]["preact_bn"]["bias"], bn["p"]["bias"] - bn["s"]["mean"] * s,
                               rtol=1e-6, atol=1e-7)
    assert count_batchnorms(folded_module, folded, x) == (0, 0)
    assert_same_outputs(module, variables, folded_module, folded, x)


def test_inception_resnet_block_folds():
    # Inception-ResNet-v2's residual block (the ImageNet model's only block the zoo's Inception lacks):
    # three ConvBN branches, a 1x1 projection with its own bias and no BatchNorm, a scaled residual add.
    class Block(nn.Module):
        fold_bn: bool = False

        @nn.compact
        def __call__(self, x, train: bool = False):
            y = inception.InceptionResNetBlock("block35", scale=0.17, fold_bn=self.fold_bn, name="block35_1")(x)
            pooled = jnp.mean(y, axis=(1, 2))
            return {"block35": y, "pre_logits": pooled, "logits": nn.Dense(3, name="predictions")(pooled)}

    module = Block()
    x = jnp.asarray(np.random.default_rng(10).normal(0.0, 1.0, (2, 5, 5, 320)), jnp.float32)
    variables = random_variables(module, x, seed=11)
    folded = folding.fold_variables(module, variables, x)
    assert set(folded["params"]["block35_1"]["conv"]) == {"kernel", "bias"}
    assert_same_outputs(module, variables, folding.fold_module(module), folded, x)


# The families added with the thesis' ten CNNs and the face models, in reduced widths (the full layouts
# are the same modules repeated; their folded shapes are checked for every registry name below).


def fold_and_compare(module, x, seed, heads=("pre_logits", "logits")):
    """Fold `module`'s random variables, check that no BatchNorm is left, compare every output; returns
    the paths the folded module keeps as ScaleShift."""
    variables = random_variables(module, x, seed)
    folded_module = folding.fold_module(module)
    folded = folding.fold_variables(module, variables, x)
    assert set(folded) == {"params"}
    assert count_batchnorms(module, variables, x)[0] > 0
    assert count_batchnorms(folded_module, folded, x) == (0, 0)
    assert_same_outputs(module, variables, folded_module, folded, x, heads)
    return folding.scale_shift_paths(folded_module, x)[0]


def test_iresnet_folds_and_keeps_the_residual_stream_batchnorms():
    # A block's bn1 reads the residual stream (also the shortcut and the named stage outputs) and the
    # head's bn2 reads stage4: those two kinds stay as ScaleShift; conv→BN pairs and fc→features fold.
    stages = (1, 2, 1, 1)
    module = iresnet.IResNet(stage_sizes=stages, stage_widths=(8, 16, 16, 24), stem_width=8, num_features=32,
                             fc_grid=2)
    x = jnp.asarray(np.random.default_rng(14).normal(0.0, 1.0, (3, 32, 32, 3)), jnp.float32)
    kept = fold_and_compare(module, x, seed=15, heads=("pre_logits",))
    blocks = {f"layer{i + 1}_{j}" for i, n in enumerate(stages) for j in range(n)}
    assert kept == {(b, "bn1") for b in blocks} | {("bn2",)}


@pytest.mark.slow  # 12-22 s each to compile: the whole tier (test_zoo_models_fold covers folding everyday)
@pytest.mark.parametrize("architecture,size", [("inception_v1", 32), ("inception_v2", 32), ("inception_v4", 75)])
def test_slim_inception_folds(architecture, size):
    # Every BatchNorm of TF-Slim's Inception v1/v2/v4 follows its conv: all fold, none stays.
    module = inception_slim.SlimInception(architecture, num_classes=11, depth_multiplier=0.05, min_depth=8)
    x = jnp.asarray(np.random.default_rng(16).normal(0.0, 1.0, (2, size, size, 3)), jnp.float32)
    assert fold_and_compare(module, x, seed=17) == set()


@pytest.mark.slow  # about 20 s each to compile: the whole tier (test_zoo_models_fold covers folding everyday)
@pytest.mark.parametrize("family,pool_padding", [("nasnet", "tf"), ("nasnet", "keras"), ("pnasnet", "tf")])
def test_nas_cells_fold(family, pool_padding):
    # Separable stacks (depthwise → pointwise → BN), 1×1 projections and the stem fold; a factorized
    # reduction's final_path_bn normalizes a concatenation of two convs and stays as ScaleShift.
    small = dict(num_classes=9, num_cells=3, num_conv_filters=8, stem_filters=12)
    module = (nasnet.NASNet(pool_padding=pool_padding, **small) if family == "nasnet" else nasnet.PNASNet(**small))
    x = jnp.asarray(np.random.default_rng(18).normal(0.0, 1.0, (2, 40, 40, 3)), jnp.float32)
    kept = fold_and_compare(module, x, seed=19)
    assert kept and all(path[-2:] == ("prev_reduction", "final_path_bn") for path in kept), sorted(kept)


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("resnet50_v2", 64), ("inception_v3", 75), ("inception_resnet_v2", 75),
                                       ("mobilenet_v2_100", 32), ("efficientnet_lite0", 32)])
def test_imagenet_models_fold(name, size):
    # The full ImageNet layouts (10-40 s each on a loaded 2-core CPU); the fast tests above cover the
    # same modules in the zoo's sizes.
    module = registry.get(name).build()
    x = jnp.asarray(np.random.default_rng(12).normal(0.0, 1.0, (2, size, size, 3)), jnp.float32)
    variables = random_variables(module, x, seed=13)
    folded_module, folded = fold(name, variables)
    assert_same_outputs(module, variables, folded_module, folded, x)


@pytest.mark.slow
def test_every_registered_model_folds_to_its_modules_shapes():
    # Traced only (no computation), but two minutes for all 19 names on a loaded 2-core CPU: every
    # registry name folds, the folded tree fits the folded module leaf for leaf (fold checks it), and
    # the folded module has no BatchNorm left.
    # VGG16 has no BatchNorm, so no fold_bn mode: the engine runs it as it is. Every other family folds;
    # the list is pinned so a family added without folding shows up here.
    unfolded = {n for n in registry.names() if "fold_bn" not in {f.name for f in dataclasses.fields(registry.get(n).build())}}
    assert {registry.get(n).family for n in unfolded} == {"vgg16"}, sorted(unfolded)
    for name in registry.names():
        if name in unfolded:
            continue
        spec = registry.get(name)
        x = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
        shapes = jax.eval_shape(spec.build().init, jax.random.key(0), x)
        variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
        folded_module, folded = fold(name, variables)
        assert "batch_stats" not in folded
        calls = []

        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.BatchNorm):
                calls.append(1)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            jax.eval_shape(folded_module.apply, folded, x)
        assert not calls, name


# --------------------------------------------------------------------------------------------------
# Errors.


def test_errors_name_the_problem():
    module = registry.get("zoo_resnet_v1").build()
    x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), jax.eval_shape(module.init, jax.random.key(0), x))
    with pytest.raises(WeightMismatchError, match="missing batch_stats/conv1_bn/mean"):
        fold("zoo_resnet_v1", {"params": variables["params"]})
    with pytest.raises(folding.FoldingError, match="'params', 'batch_stats'"):
        fold("zoo_resnet_v1", {"batch_stats": variables["batch_stats"]})
    with pytest.raises(folding.FoldingError, match="already folded"):
        fold("zoo_resnet_v1", variables, fold_bn=True)
    folded_module, folded = fold("zoo_resnet_v1", variables)
    with pytest.raises(ValueError, match="fold_bn=True.*train=True"):
        folded_module.apply(folded, jnp.zeros((1, 28, 28, 1)), train=True)
    with pytest.raises(folding.FoldingError, match="no fold_bn field"):
        folding.fold_module(nn.Dense(3))
    other = registry.get("zoo_resnet_v2").build()
    wrong = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), jax.eval_shape(other.init, jax.random.key(0), x))
    with pytest.raises(WeightMismatchError, match="variables of ResNet to fold"):
        fold("zoo_resnet_v1", wrong)


def test_fold_passes_build_overrides_and_keeps_float32_variables():
    # The engine builds bfloat16 modules with build(dtype=...); the folded weights stay float32.
    module = registry.get("zoo_efficientnet_lite").build()
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), jax.eval_shape(module.init, jax.random.key(0), x))
    folded_module, folded = fold("zoo_efficientnet_lite", variables, dtype=jnp.bfloat16)
    assert folded_module.dtype == jnp.bfloat16 and folded_module.fold_bn
    assert {leaf.dtype for leaf in jax.tree.leaves(folded)} == {np.dtype(np.float32)}
    out = jax.eval_shape(folded_module.apply, folded, x)
    assert out["stem"].dtype == jnp.bfloat16 and out["logits"].shape == (2, 10)
