"""Convolutions as matmuls (embjax.models.conv_matmul): the same outputs as XLA's convolutions, every family.

The three dot_general forms are checked against a float64 NumPy convolution written out tap by tap
(strides, SAME / VALID / asymmetric explicit padding, 1x1 to 7x7). Then every family's inference module
(BatchNorm folded, as the engine runs it) is applied with the rewrite forced onto every plain convolution
and compared, every named output, with the unchanged module; the rewritten programs are checked to have
no plain convolution left. float32 layers must run their dots at precision HIGHEST.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embjax import members
from embjax.models import conv_matmul, folding, inception_slim, iresnet, nasnet, registry, vgg
from test_folding import random_variables, rel_err  # noqa: E402  (the folding tests' random weights)

# Every method on every kind of layer it applies to (the two k x k forms in turn).
PATCHES = conv_matmul.Rule(pointwise="dot", pointwise_strided="dot", spatial="patches", spatial_strided="patches")
SHIFTS = conv_matmul.Rule(pointwise="dot", pointwise_strided="dot", spatial="shifts", spatial_strided="shifts")

# The rewrite computes the same sums as XLA's convolution in another order: per layer a float32 sum of
# K <= 4608 products moves by <= sqrt(K) * 2^-24 ~ 4e-6 relative (~1e-7 typically). Over the <= ~100
# layers of these networks that is <= 4e-4 if every layer's change added in the same direction, ~4e-5 as
# a random walk; 1e-4 (as for folding, whose rounding is of the same size) separates that from a real
# error: a wrong tap order, padding side or stride moves outputs by O(1) of their scale.
RTOL = 1e-4


def numpy_conv(x, w, strides, pads):
    """float64 reference: out[n, i, j, o] = sum over taps (a, b) and c of xpad[n, i*s + a, j*s + b, c] w[a, b, c, o]."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (pt, pb), (pl, pr) = pads
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw, _, cout = w.shape
    sh, sw = strides
    oh, ow = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    out = np.zeros((x.shape[0], oh, ow, cout))
    for a in range(kh):
        for b in range(kw):
            out += np.einsum("nijc,co->nijo", xp[:, a:a + (oh - 1) * sh + 1:sh, b:b + (ow - 1) * sw + 1:sw], w[a, b])
    return out


@pytest.mark.parametrize("k,strides,pads", [
    (1, (1, 1), ((0, 0), (0, 0))), (1, (2, 2), ((0, 0), (0, 0))), (3, (1, 1), ((1, 1), (1, 1))),
    (3, (2, 2), ((0, 1), (0, 1))), (3, (2, 1), ((1, 0), (2, 1))), (5, (1, 1), ((0, 0), (0, 0))),
    (7, (2, 2), ((3, 3), (3, 3)))])
def test_each_form_matches_a_float64_convolution(k, strides, pads):
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (2, 11, 13, 6)).astype(np.float32)
    w = rng.normal(0.0, 1.0, (k, k, 6, 5)).astype(np.float32)
    want = numpy_conv(x, w, strides, pads)
    xla = conv_matmul.conv(x, w, strides, pads, "xla", jax.lax.Precision.HIGHEST)
    # float32 products summed over k*k*6 <= 294 terms of O(1) magnitude: ~sqrt(294) * 6e-8 ~ 1e-6 of the scale.
    assert rel_err(xla, want) < 1e-5
    for method in (("dot",) if k == 1 else ("patches", "shifts")):
        got = conv_matmul.conv(x, w, strides, pads, method, jax.lax.Precision.HIGHEST)
        assert got.shape == want.shape and got.dtype == jnp.float32, method
        assert rel_err(got, want) < 1e-5, method
    if k > 1:
        with pytest.raises(ValueError, match="1x1"):
            conv_matmul.conv(x, w, strides, pads, "dot")
    with pytest.raises(ValueError, match="method must be one of"):
        conv_matmul.conv(x, w, strides, pads, "winograd")


def test_rule_chooses_by_kind_and_rejects_unknown_methods():
    rule = conv_matmul.Rule(pointwise="dot", pointwise_strided="xla", spatial="patches", spatial_strided="shifts")
    assert [rule.method(k, s) for k, s in [((1, 1), (1, 1)), ((1, 1), (2, 2)), ((3, 3), (1, 1)), ((3, 3), (2, 1))]] \
        == ["dot", "xla", "patches", "shifts"]
    with pytest.raises(ValueError, match="pointwise"):
        conv_matmul.Rule(pointwise="patches")
    with pytest.raises(ValueError, match="spatial"):
        conv_matmul.Rule(spatial="dot")


# --------------------------------------------------------------------------------------------------
# Every family: the inference module with the rewrite forced on, against the unchanged module.


def count_convs(fn, *args):
    """(plain, grouped) conv_general_dilated ops in fn's jaxpr, sub-jaxprs (pjit, custom calls) included."""
    counts = [0, 0]

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                counts[eqn.params["feature_group_count"] > 1] += 1
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                    if hasattr(sub, "eqns"):
                        visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return tuple(counts)


def inference_module(module, x, seed):
    """The folded module and variables when the family folds (what the engine runs), else the module."""
    variables = random_variables(module, x, seed)
    if "fold_bn" in {f.name for f in dataclasses.fields(module)}:
        return folding.fold_module(module), folding.fold_variables(module, variables, x)
    return module, variables


def assert_rewrite_matches(module, variables, x, rules=(PATCHES, SHIFTS)):
    want = jax.jit(module.apply)(variables, x)
    plain, grouped = count_convs(module.apply, variables, x)
    assert plain > 0
    for rule in rules:
        def rewritten(v, x, rule=rule):
            with nn.intercept_methods(conv_matmul.interceptor(rule)):
                return module.apply(v, x)

        # Every plain convolution the rule sends to a matmul became dots, the others stayed; grouped
        # (depthwise) ones are left to the family.
        kept = sum(rule.method(layer.kernel_shape[:2], layer.strides) == "xla"
                   for layer in conv_matmul.conv_layers(module, variables, x))
        assert count_convs(rewritten, variables, x) == (kept, grouped), rule
        got = jax.jit(rewritten)(variables, x)
        assert set(got) == set(want) and {"pre_logits"} <= set(want)
        for key, ref in want.items():
            ref = np.asarray(ref)
            assert np.all(np.isfinite(ref)) and np.std(ref) > 0, f"{key}: degenerate reference output"
            assert got[key].shape == ref.shape and got[key].dtype == ref.dtype, key
            err = rel_err(got[key], ref)
            assert err < RTOL, f"{rule} {key}: differs from XLA's convolutions by {err:.2e} of its largest value"


ZOO = ("zoo_resnet_v1", "zoo_resnet_v2", "zoo_inception", "zoo_mobilenet_v2", "zoo_efficientnet_lite")
# The rewrite works layer by layer (every kernel size, stride and padding form is checked against float64
# above); the everyday tier runs it through one model of each layer mix, the whole tier through every
# family: ResNet-v2 (v1's convolutions around pre-activation BatchNorms, 9 CPU s), TF-Slim's
# Inception-v1/v4 (the zoo Inception's kinds of convolution, 12 and 22 CPU s), VGG (plain 3x3 stride-1
# convolutions and fully connected layers, as in the zoo ResNet; ~10 s) and the reduced NASNet and PNASNet
# (40-50 s each to trace) join there.
_WHOLE_TIER = {"zoo_resnet_v2", "inception_v1", "inception_v4", "nasnet", "pnasnet", "vgg"}


def _tier(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in _WHOLE_TIER else n for n in names]


def _zoo_cases():
    # Every zoo model with both k x k forms in the whole tier; the everyday tier runs each of its models
    # with one form, the two forms alternating over the models (each form is checked layer by layer
    # against float64 above, so a model with one form still checks how the family wires its layers).
    cases, everyday = [], [n for n in ZOO if n not in _WHOLE_TIER]
    for name in ZOO:
        for j, rule in enumerate((PATCHES, SHIFTS)):
            slow = name in _WHOLE_TIER or j != everyday.index(name) % 2
            cases.append(pytest.param(name, rule, id=f"{name}-{'patches' if j == 0 else 'shifts'}",
                                      marks=[pytest.mark.slow] if slow else []))
    return cases


@pytest.mark.parametrize("name,rule", _zoo_cases())
def test_zoo_models_as_matmuls(name, rule):
    module = registry.get(name).build()
    x = jnp.asarray(np.random.default_rng(2).normal(0.0, 1.0, (4, 28, 28, 1)), jnp.float32)
    assert_rewrite_matches(*inference_module(module, x, seed=3), x, rules=(rule,))


@pytest.mark.parametrize("family", _tier(["iresnet", "inception_v1", "inception_v4", "nasnet", "pnasnet", "vgg"]))
def test_other_families_as_matmuls(family):
    # Reduced widths of the thesis' and face models' families (the full layouts repeat the same layers).
    small = dict(num_classes=9, num_cells=3, num_conv_filters=8, stem_filters=12)
    module, size = {
        "iresnet": (iresnet.IResNet(stage_sizes=(1, 2, 1, 1), stage_widths=(8, 16, 16, 24), stem_width=8,
                                    num_features=32, fc_grid=2), 32),
        "inception_v1": (inception_slim.SlimInception("inception_v1", num_classes=11, depth_multiplier=0.05,
                                                      min_depth=8), 32),
        "inception_v4": (inception_slim.SlimInception("inception_v4", num_classes=11, depth_multiplier=0.05,
                                                      min_depth=8), 75),
        "nasnet": (nasnet.NASNet(**small), 40),
        "pnasnet": (nasnet.PNASNet(**small), 40),
        "vgg": (vgg.VGG(blocks=((1, 1, 8), (2, 2, 8), (3, 1, 16), (4, 1, 16), (5, 1, 16)), fc_width=24,
                        num_classes=7), 32),
    }[family]
    x = jnp.asarray(np.random.default_rng(16).normal(0.0, 1.0, (2, size, size, 3)), jnp.float32)
    assert_rewrite_matches(*inference_module(module, x, seed=17), x, rules=(PATCHES,) if family != "vgg" else
                           (PATCHES, SHIFTS))


@pytest.mark.slow
def test_resnet50_and_efficientnet_lite0_full_size_as_matmuls():
    # The two benchmarked models in their full layouts (at 64 px to keep it quick), with the rule the
    # benchmark chose and with every method forced on.
    for name in ("resnet50_v1", "efficientnet_lite0"):
        module = registry.get(name).build()
        x = jnp.asarray(np.random.default_rng(4).normal(0.0, 1.0, (2, 64, 64, 3)), jnp.float32)
        module, variables = inference_module(module, x, seed=5)
        rules = (conv_matmul.RULE, PATCHES) if conv_matmul.RULE != conv_matmul.XLA_ONLY else (PATCHES,)
        assert_rewrite_matches(module, variables, x, rules=rules)


# --------------------------------------------------------------------------------------------------
# Precision, backend, init and the engine's hook.


def dot_precisions(fn, *args):
    return [eqn.params["precision"] for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns
            if eqn.primitive.name == "dot_general"]


def test_float32_dots_run_at_highest_precision_and_bfloat16_at_the_layers_own():
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    x = jnp.ones((2, 9, 9, 4), jnp.float32)
    for dtype, want in ((jnp.float32, highest), (jnp.bfloat16, None)):
        layer = nn.Conv(6, (3, 3), strides=2, dtype=dtype)
        variables = layer.init(jax.random.key(0), x)

        def run(v, x, layer=layer):
            with conv_matmul.on_cpu(SHIFTS):
                return layer.apply(v, x)

        precisions = dot_precisions(run, variables, x)
        assert len(precisions) == 9 and all(p == want for p in precisions), (dtype, precisions)
        assert run(variables, x).dtype == dtype


def test_left_unchanged_off_the_cpu_during_init_and_for_layers_it_does_not_handle(monkeypatch):
    x = jnp.asarray(np.random.default_rng(0).normal(0.0, 1.0, (2, 8, 8, 4)), jnp.float32)
    kinds = [nn.Conv(4, (3, 3), feature_group_count=2), nn.Conv(4, (3, 3), kernel_dilation=2),
             nn.Conv(4, (3, 3), input_dilation=2, padding=1), nn.Conv(4, (3, 3), padding="CIRCULAR"),
             nn.ConvLocal(4, (3, 3))]
    for layer in kinds:
        variables = layer.init(jax.random.key(0), x)

        def run(v, x, layer=layer):
            with conv_matmul.on_cpu(PATCHES):
                return layer.apply(v, x)

        assert count_convs(run, variables, x) == count_convs(layer.apply, variables, x), layer
    layer = nn.Conv(4, (3, 3))
    with conv_matmul.on_cpu(PATCHES):
        variables = layer.init(jax.random.key(0), x)  # init runs flax's own code (creates the params)
    assert variables["params"]["kernel"].shape == (3, 3, 4, 4)

    def run(v, x):
        with conv_matmul.on_cpu(PATCHES):
            return layer.apply(v, x)

    assert count_convs(run, variables, x) == (0, 0)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not conv_matmul.use_matmuls()

    def run_elsewhere(v, x):  # a fresh function: traces are cached per function
        with conv_matmul.on_cpu(PATCHES):
            return layer.apply(v, x)

    assert count_convs(run_elsewhere, variables, x) == (1, 0)  # GPUs and TPUs keep XLA's convolutions


def test_members_apply_through_the_rewrite(monkeypatch):
    # The engine's single place of application (members.make_member) runs under conv_matmul.on_cpu:
    # whatever RULE says is what the engine's steps compile.
    spec = registry.get("zoo_resnet_v1")
    x = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
    variables = random_variables(spec.build(), x, seed=0)
    images = np.random.default_rng(1).integers(0, 256, (3, spec.input_size, spec.input_size, spec.in_channels),
                                               dtype=np.uint8)
    monkeypatch.setattr(conv_matmul, "RULE", conv_matmul.XLA_ONLY)
    unchanged = members.make_member("zoo_resnet_v1", spec, variables)
    assert count_convs(unchanged.apply, unchanged.variables, images)[0] > 0
    want = jax.jit(unchanged.apply)(unchanged.variables, images)
    monkeypatch.setattr(conv_matmul, "RULE", PATCHES)
    member = members.make_member("zoo_resnet_v1", spec, variables)
    assert count_convs(member.apply, member.variables, images) == (0, 0)
    got = jax.jit(member.apply)(member.variables, images)
    for key in want:
        assert rel_err(got[key], want[key]) < RTOL, key


def test_conv_layers_lists_every_plain_convolution():
    # ResNet-50 v1 has 53 convolutions (the stem, 16 blocks of three, 4 projections) doing 3.86 G
    # multiply-adds per 224-px image (the published 3.8-4.1 GMACs count the classifier and pooling too).
    spec = registry.get("resnet50_v1")
    module = folding.fold_module(spec.build())
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    layers = conv_matmul.conv_layers(module, jax.eval_shape(module.init, jax.random.key(0), x), x)
    assert len(layers) == 53
    assert layers[0].kernel_shape == (7, 7, 3, 64) and layers[0].strides == (2, 2)
    macs = 0
    for layer in layers:
        (kh, kw, cin, cout), (sh, sw) = layer.kernel_shape, layer.strides
        oh = (layer.input_shape[1] + sum(layer.pads[0]) - kh) // sh + 1
        ow = (layer.input_shape[2] + sum(layer.pads[1]) - kw) // sw + 1
        macs += oh * ow * kh * kw * cin * cout
    assert abs(macs / 1e9 - 3.86) < 0.01, macs
