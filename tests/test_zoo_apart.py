"""Zoo models trained apart (thesis §6.1; embjax.zoo.VARIANTS): CosFace's margin loss against float64
NumPy, the data halves disjoint and covering, variant cache keys apart from the standard ones (which stay
pinned), the cosine model's own head scored by evaluate as its cosine classifier, the zoo_apart preset
and the grouping of its pairs. Everything here costs a few CPU seconds but the one real training (slow)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from embjax import apart_report, evaluate, members, zoo
from embjax.models import registry
from embjax.models.specs import ZOO_VARIANTS


def _numpy_cosface(features, kernel, labels, scale, margin):
    f = features.astype(np.float64)
    w = kernel.astype(np.float64)
    fn = np.linalg.norm(f, axis=1, keepdims=True)
    wn = np.linalg.norm(w, axis=0, keepdims=True)
    cos = (f / np.where(fn > 0, fn, 1.0)) @ (w / np.where(wn > 0, wn, 1.0))
    logits = scale * (cos - margin * np.eye(w.shape[1])[labels])
    top = logits.max(axis=1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(labels)), labels].mean(), cos


def test_cosine_margin_loss_against_numpy_float64():
    rng = np.random.default_rng(0)
    features = np.abs(rng.normal(3.0, 2.0, (64, 24))).astype(np.float32)  # post-ReLU-like: mean >> 0
    features[5] = 0.0  # a dead row: cos 0 with every class, no NaN
    kernel = rng.normal(0, 0.1, (24, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    for scale, margin in ((16.0, 0.2), (30.0, 0.35), (1.0, 0.0)):
        want, cos = _numpy_cosface(features, kernel, labels, scale, margin)
        got = float(zoo.cosine_margin_loss(features, kernel, labels, scale, margin))
        # float32 cosines carry ~1e-7 relative error, times s <= 30 in the logits: 1e-5 absolute is ample.
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (scale, margin, got, want)
        np.testing.assert_allclose(np.asarray(zoo.cosine_logits(features, kernel)), cos, atol=2e-6)


def test_cosine_margin_loss_planted_answer():
    """Features on their class' own column, orthogonal to the others: cos = 1 for the label, 0 elsewhere,
    so the loss is log(1 + (C − 1) e^{−s(1 − m)}) exactly."""
    c, s, m = 6, 4.0, 0.2
    kernel = np.eye(c, dtype=np.float32) * 3.0
    labels = np.arange(c)
    features = np.eye(c, dtype=np.float32) * 7.0
    want = np.log1p((c - 1) * np.exp(-s * (1 - m)))  # 0.1855
    # The loss is a logsumexp minus a logit of 3.2: float32 spacing there is 2.4e-7.
    assert abs(float(zoo.cosine_margin_loss(features, kernel, labels, s, m)) - want) < 2e-6
    # The margin makes a correct but tight classification cost more than the plain cosine softmax.
    assert float(zoo.cosine_margin_loss(features, kernel, labels, s, m)) > float(
        zoo.cosine_margin_loss(features, kernel, labels, s, 0.0))


@pytest.mark.parametrize("n", [60000, 11, 1])
def test_halves_are_disjoint_cover_every_row_and_are_fixed(n):
    a, b = zoo.half_rows(n, 0), zoo.half_rows(n, 1)
    assert len(a) == n // 2 and len(b) == n - n // 2
    assert not np.intersect1d(a, b).size
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(n))
    assert np.all(np.diff(a) > 0) and np.all(np.diff(b) > 0)
    np.testing.assert_array_equal(a, zoo.half_rows(n, 0))  # the split is a constant of the zoo
    if n == 60000:  # a random split, not the first and second half of the file
        assert 0.45 < np.mean(a < 30000) < 0.55
    with pytest.raises(ValueError, match="half must be 0"):
        zoo.half_rows(n, 2)


def test_training_rows_take_the_half_then_the_limit():
    images = np.arange(100).reshape(100, 1, 1, 1).astype(np.uint8)
    labels = np.arange(100)
    for variant, half in (("half_a", 0), ("half_b", 1)):
        x, y = zoo.training_rows(images, labels, variant, limit=20)
        np.testing.assert_array_equal(y, zoo.half_rows(100, half)[:20])
        np.testing.assert_array_equal(x[:, 0, 0, 0], y)
    a, _ = zoo.training_rows(images, labels, "half_a", 0)
    b, _ = zoo.training_rows(images, labels, "half_b", 0)
    assert len(a) == len(b) == 50 and not np.intersect1d(a, b).size
    x, y = zoo.training_rows(images, labels, "", 30)  # standard and cosine: the first `limit` rows
    np.testing.assert_array_equal(y, np.arange(30))
    np.testing.assert_array_equal(zoo.training_rows(images, labels, "cosine", 30)[1], np.arange(30))


# The cache keys of the affine default's five zoo models (base config: 1 epoch on the first 20,000 training
# images), as the trained caches of every earlier run name them: a variant must change none of them.
STANDARD_KEYS = {"zoo_resnet_v1": "b92bc44f5d2e", "zoo_resnet_v2": "2587304b2d65", "zoo_inception": "55e52df41ae3",
                 "zoo_mobilenet_v2": "ef65cbce04f0", "zoo_efficientnet_lite": "f0b77bfcce5f"}
# The keys the zoo_apart preset's variants are cached under: the first six from before seed offsets
# existed (a variant that keeps the seed keeps its key, so those trainings are reused), then the seeded four.
VARIANT_KEYS = {"zoo_resnet_v1_cosine": "76c3117f6faa", "zoo_resnet_v1_half_a": "6781ed637aba",
                "zoo_resnet_v1_half_b": "c67fa8e4ea86", "zoo_mobilenet_v2_cosine": "b35b82fbbee0",
                "zoo_mobilenet_v2_half_a": "c571b9875563", "zoo_mobilenet_v2_half_b": "522a25cd5ef3",
                "zoo_resnet_v1_seed1": "a45c35f77261", "zoo_resnet_v1_half_b_seed1": "9d42552d4356",
                "zoo_mobilenet_v2_seed1": "2866dd05878b", "zoo_mobilenet_v2_half_b_seed1": "8ec751310031"}


def test_standard_cache_keys_are_unchanged_and_variants_have_their_own():
    cfg = zoo.train_config(epochs=1, batch_size=128, learning_rate=3e-3, weight_decay=1e-4, seed=0, limit=20000)
    keys = set()
    for name, digest in STANDARD_KEYS.items():
        assert registry.get(name).zoo_variant == ""
        assert zoo.cache_key(name, cfg, "fashion_mnist:train", 20000) == f"{name}-{digest}"
        assert zoo.cache_key(name, cfg, "fashion_mnist:train", 20000, "") == f"{name}-{digest}"
        keys.add(f"{name}-{digest}")
        for variant in ZOO_VARIANTS:
            spec = registry.get(f"{name}_{variant}")
            assert spec.zoo_variant == variant and spec.name == f"{name}_{variant}"
            assert spec.build == registry.get(name).build and spec.feature_dim == registry.get(name).feature_dim
            keys.add(zoo.cache_key(spec.name, cfg, "fashion_mnist:train", 20000, variant))
            # The variant alone (not only the name) keys the weights.
            assert zoo.cache_key(name, cfg, "fashion_mnist:train", 20000, variant) != f"{name}-{digest}"
    assert len(keys) == len(STANDARD_KEYS) * (1 + len(ZOO_VARIANTS))
    for name, digest in VARIANT_KEYS.items():
        spec = registry.get(name)
        assert zoo.cache_key(name, cfg, "fashion_mnist:train", 20000, spec.zoo_variant) == f"{name}-{digest}"
    for name in ("zoo_resnet_v1_seed1", "zoo_resnet_v1_half_b_seed1"):  # parsed by the longest suffix
        assert registry.get(name).zoo_variant == name[len("zoo_resnet_v1_"):]
    assert set(zoo.VARIANTS) == {""} | set(ZOO_VARIANTS)  # the registry's names and the zoo's recipes agree
    assert not set(registry.variant_names()) & set(registry.names())
    for bad in ("resnet50_v1_cosine", "zoo_resnet_v1_half_c", "zoo_nothing_cosine"):
        with pytest.raises(registry.UnknownModelError, match="trained apart"):
            registry.get(bad)
    with pytest.raises(ValueError, match="unknown zoo variant"):
        zoo.cache_key("zoo_resnet_v1", cfg, "fashion_mnist:train", 20000, "cosface")


def test_a_seed_variant_trains_with_the_seed_plus_its_offset(monkeypatch):
    """seed1 and half_b_seed1 draw their initial weights and batch order from the config's seed + 1; the
    other variants from the config's seed (the training itself is stubbed: only the seeds are checked)."""
    seen = []
    monkeypatch.setattr(zoo, "numpy_init", lambda module, sample, seed: seen.append(("init", seed)) or {})
    monkeypatch.setattr(zoo.train_lib, "fit", lambda loss, v, get, n, cfg, **k: seen.append(("fit", cfg.seed)) or v)
    images, labels = np.zeros((4, 28, 28, 1), np.uint8), np.zeros(4, np.int32)
    for name, seed in (("zoo_resnet_v1", 5), ("zoo_resnet_v1_half_b", 5), ("zoo_resnet_v1_seed1", 6),
                       ("zoo_resnet_v1_half_b_seed1", 6)):
        seen.clear()
        zoo.train(registry.get(name), images, labels, zoo.train_config(seed=5), log=lambda line: None)
        assert seen == [("init", seed), ("fit", seed)], name


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1)))
        return {"pre_logits": h, "logits": nn.Dense(3, name="head")(h)}


class _TinySpec:
    name, zoo_variant = "zoo_tiny_cosine", "cosine"

    def build(self):
        return _Tiny()

    def preprocess(self, x):
        return x.astype(np.float32) / 255.0


def test_cosine_variant_caches_its_classifier_in_inference_form(tmp_path):
    """A few steps of the cosine loss through load_or_train: the cached head has unit class columns and
    zero bias, so the model's own logits are ‖x‖ cos θ and rank classes as its cosine classifier."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 96).astype(np.int32)
    images = np.clip(rng.normal(80, 30, (96, 4, 4, 1)) + 60 * labels[:, None, None, None], 0, 255).astype(np.uint8)
    cfg = zoo.train_config(epochs=2, batch_size=32)
    variables = zoo.load_or_train(_TinySpec(), images, labels, cfg, dataset="toy", cache_dir=str(tmp_path),
                                  log=lambda line: None)
    kernel, bias = members.find_head(variables, 8, 3)
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(bias, 0.0)
    out = _Tiny().apply(variables, _TinySpec().preprocess(images))
    x = np.asarray(out["pre_logits"], np.float64)
    cos = np.asarray(zoo.cosine_logits(x, kernel))
    np.testing.assert_allclose(np.asarray(out["logits"]), np.linalg.norm(x, axis=1, keepdims=True) * cos,
                               rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.joinpath("zoo").iterdir()][0].startswith("zoo_tiny_cosine-")


def test_evaluate_scores_a_cosine_target_through_its_cosine_classifier():
    """evaluate's "through the target's own head", with the cosine model's head as find_head reads it from
    the cached variables (cosine_head), is float64 NumPy's cosine classifier: labelled by that classifier's
    own predictions, the target scores 100% unmapped (the Dense as trained, kernel and bias, would not),
    and a mapped source scores what NumPy's cosine classifier gives on the mapped features."""
    rng = np.random.default_rng(1)
    n, d_a, d_b, c = 200, 5, 7, 4
    fa = rng.normal(0.0, 1.0, (n, d_a))
    fb = rng.normal(0.0, 1.0, (n, d_b))
    raw_b = rng.normal(0, 1.0, (d_b, c)) * np.array([0.1, 1.0, 10.0, 3.0])  # class columns of unequal length
    bias_b = rng.normal(0, 5, c)
    params = {"params": {"head": {"kernel": raw_b.astype(np.float32), "bias": bias_b.astype(np.float32)}}}
    head_b = members.find_head(zoo.cosine_head(params, ("head",)), d_b, c)

    def cosine_pred(x):
        return np.argmax((x / np.linalg.norm(x, axis=1, keepdims=True)) @ (raw_b / np.linalg.norm(raw_b, axis=0)), 1)

    labels = cosine_pred(fb)
    assert np.mean(np.argmax(fb @ raw_b + bias_b, 1) == labels) < 0.9  # the trained Dense ranks otherwise
    head_a = (rng.normal(0, 1, (d_a, c)), rng.normal(0, 1, c))
    w_ab, b_ab = rng.normal(0, 1, (d_a, d_b)), np.abs(rng.normal(0, 1, d_b))
    w_ba, b_ba = rng.normal(0, 1, (d_b, d_a)), rng.normal(0, 1, d_a)
    state = evaluate.update(evaluate.init((d_a, d_b)), [fa, fb], [head_a, head_b],
                            {(0, 1): (w_ab, b_ab), (1, 0): (w_ba, b_ba)}, labels)
    acc = np.asarray(evaluate.accuracy(state))
    assert acc[1, 1] == 1.0
    mapped = np.mean(cosine_pred(fa @ w_ab + b_ab) == labels)
    assert 0.0 < mapped < 1.0 and acc[0, 1] == pytest.approx(mapped, abs=1e-6)  # a float32 ratio of counts


def test_zoo_apart_preset_and_pair_groups():
    from experiments import config_check
    from experiments.configs import affine_equivalence as cfgs

    config = cfgs.get_config("zoo_apart")
    names = config_check.model_names(config.models)
    assert names[:5] == list(cfgs.ZOO_MODELS) and len(names) == 5 + 2 * 5 and not config.learned.families
    assert {"zoo_resnet_v1_seed1", "zoo_mobilenet_v2_seed1", "zoo_resnet_v1_half_b_seed1"} <= set(names)
    config_check.check("affine_equivalence", config, None)
    group = apart_report.group
    assert group("zoo_resnet_v1", "zoo_inception") == ("different", "same", "same", "independent")
    assert group("zoo_resnet_v1", "zoo_resnet_v1_cosine") == ("same", "differs", "same", "shared")
    assert group("zoo_resnet_v1_half_a", "zoo_resnet_v1_half_b") == ("same", "same", "disjoint", "shared")
    assert group("zoo_mobilenet_v2_half_b", "zoo_resnet_v1") == ("different", "same", "overlapping", "independent")
    assert group("zoo_mobilenet_v2_half_b", "zoo_resnet_v1_half_b") == ("different", "same", "same", "independent")
    # The control: the same architecture, loss and data, another seed.
    assert group("zoo_resnet_v1", "zoo_resnet_v1_seed1") == ("same", "same", "same", "independent")
    assert group("zoo_resnet_v1_half_b_seed1", "zoo_resnet_v1_half_b") == ("same", "same", "same", "independent")
    assert group("zoo_resnet_v1_half_a", "zoo_resnet_v1_half_b_seed1") == ("same", "same", "disjoint", "independent")
    assert group("zoo_resnet_v1_seed1", "zoo_resnet_v1_half_b_seed1") == ("same", "same", "overlapping", "shared")
    assert apart_report.describe("zoo_mobilenet_v2_half_b_seed1") == ("zoo_mobilenet_v2", "softmax", "B", 1)
    assert not apart_report.has_variants(cfgs.ZOO_MODELS)


def test_apart_table_means_over_its_groups():
    """Six models, 30 ordered pairs, planted cells: each pair lands in its group, the groups average their
    own cells, and the identity columns (the naive family) are filled where the widths agree."""
    models = ["zoo_resnet_v1", "zoo_inception", "zoo_resnet_v1_half_a", "zoo_resnet_v1_half_b",
              "zoo_resnet_v1_seed1", "zoo_resnet_v1_half_b_seed1"]
    n = len(models)
    acc = np.full((n, n), 0.5) + np.diag([0.3] * n)  # every mapped cell 0.5 against 0.8 unmapped
    acc[2, 3], acc[3, 2] = 0.4, 0.6
    shared = np.array([[apart_report.group(s, t)[3] == "shared" for t in models] for s in models])
    naive = np.where(shared, 0.792, 0.16)  # the identity: −1% where the init is shared, −80% elsewhere
    r = {"models": models, "feature_dims": [2, 3, 2, 2, 2, 2],
         "unmapped": {"accuracy": np.diag(acc).tolist(), "top5": np.diag(acc).tolist()},
         "affine": {"r2": np.eye(n).tolist(), "relative_change": (acc / np.diag(acc)[:, None] - 1).tolist()},
         "naive": {"r2": np.where(shared, 0.9, -1.0).tolist(),
                   "relative_change": (naive / np.diag(acc)[:, None] - 1).tolist()}}
    rows = {tuple(row[:4]): row for row in apart_report.apart_table(r).rows}
    assert list(rows) == [("different", "same", "same", "independent"),
                          ("different", "same", "overlapping", "independent"),
                          ("same", "same", "same", "independent"),  # the control: another seed, nothing else
                          ("same", "same", "disjoint", "shared"), ("same", "same", "disjoint", "independent"),
                          ("same", "same", "overlapping", "shared"), ("same", "same", "overlapping", "independent")]
    assert [int(row[4]) for row in rows.values()] == [4, 6, 4, 2, 2, 6, 6]  # 30 ordered pairs in all
    disjoint = rows[("same", "same", "disjoint", "shared")]
    assert disjoint[5] == "\u221237.5%"  # (0.4 / 0.8 − 1 + 0.6 / 0.8 − 1) / 2
    assert disjoint[6].startswith("\u221250.0% (zoo_resnet_v1_half_a → zoo_resnet_v1_half_b)")
    assert disjoint[7] == "0.000" and disjoint[8:] == ["\u22121.0%", "0.900"]
    control = rows[("same", "same", "same", "independent")]
    assert control[5] == "\u221237.5%" and control[8:] == ["\u221280.0%", "-1.000"]
    assert rows[("same", "same", "disjoint", "independent")][8] == "\u221280.0%"
    assert rows[("different", "same", "same", "independent")][8:] == ["—", "—"]  # widths 2 and 3: no identity
    assert "init independent" in apart_report.summary_text(r).splitlines()[1]
    r["affine"]["relative_change"][2][3] = float("nan")  # an undefined cell is left out, not averaged
    rows = {tuple(row[:4]): row for row in apart_report.apart_table(r).rows}
    assert rows[("same", "same", "disjoint", "shared")][4:6] == ["2", "\u221225.0%"]
    del r["naive"]  # a run without the naive family: no identity columns to fill
    assert all(row[8:] == ["—", "—"] for row in apart_report.apart_table(r).rows)


@pytest.mark.slow
def test_a_real_cosine_zoo_model_learns(tmp_path):
    """zoo_resnet_v1_cosine, 3 epochs on 1024 images: its own (inference-form) head beats chance widely."""
    from embjax.data import fashion_mnist

    images, labels = fashion_mnist.load("train[:1024]")
    spec = registry.get("zoo_resnet_v1_cosine")
    cfg = zoo.train_config(epochs=3, batch_size=64, limit=1024)
    variables = zoo.load_or_train(spec, images, labels, cfg, dataset="fmnist-test", cache_dir=str(tmp_path),
                                  log=lambda line: None)
    member = members.make_member(spec.name, spec, variables)
    np.testing.assert_allclose(np.linalg.norm(member.head[0], axis=0), 1.0, rtol=1e-5)
    test_x, test_y = fashion_mnist.load("test[:500]")
    logits = np.asarray(jax.jit(member.apply)(member.variables, test_x)["logits"])
    assert np.mean(np.argmax(logits, -1) == test_y) > 0.4
