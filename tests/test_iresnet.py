"""iResNet (insightface ArcFace backbones): Flax port and backbone.pth converter against an independent
PyTorch definition with random weights, layer by layer; registry entries without a head."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from embjax.models.convert.framework import WeightMismatchError  # noqa: E402
from embjax.models import iresnet, registry
from embjax.weights import torch_pth
from embjax.models.convert import insightface

torch = pytest.importorskip("torch")

# Parity with independent references: the tolerances assume exact float32 matmuls (see conftest.py).
pytestmark = pytest.mark.highest_precision

nn = torch.nn


# ---- an independent PyTorch definition of insightface's iResNet (arcface_torch layout and key names)

class TorchBlock(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class TorchIResNet(nn.Module):
    def __init__(self, layers, widths, stem=64, features=512, grid=7):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem, eps=1e-5)
        self.prelu = nn.PReLU(stem)
        cin = stem
        for s, (n, w) in enumerate(zip(layers, widths), start=1):
            blocks = []
            for b in range(n):
                blocks.append(TorchBlock(cin, w, 2 if b == 0 else 1))
                cin = w
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.n_stages = len(layers)
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(cin * grid * grid, features)
        self.features = nn.BatchNorm1d(features, eps=1e-5)

    def forward(self, x):
        acts = {}
        x = self.prelu(self.bn1(self.conv1(x)))
        acts["stem"] = x
        for s in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{s}")(x)
            acts[f"stage{s}"] = x
        x = torch.flatten(self.bn2(x), 1)
        x = self.features(self.fc(self.dropout(x)))
        acts["pre_logits"] = x
        return acts


def _randomize(model, seed):
    """Random weights and BatchNorm statistics far from the identity, so a swapped or untransposed
    tensor cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "prelu" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            elif p.ndim == 1:  # BN scale/bias, fc bias
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


SMALL = dict(layers=(1, 2, 1, 1), widths=(8, 16, 16, 24), stem=8, features=32)


def test_parity_with_pytorch_layer_by_layer(tmp_path):
    model = _randomize(TorchIResNet(**SMALL), 0)
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    # Through embjax's own .pth reader (what registry.load_weights uses), not torch.load.
    state = torch_pth.load_state_dict(str(path))
    variables = insightface.convert_iresnet(state)
    arch = insightface.architecture(state)
    assert arch == dict(stage_sizes=(1, 2, 1, 1), stage_widths=(8, 16, 16, 24), stem_width=8, num_features=32,
                        fc_grid=7)
    module = iresnet.IResNet(**arch)
    x = np.random.default_rng(0).standard_normal((3, 112, 112, 3)).astype(np.float32)
    out = jax.jit(module.apply)(variables, x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    for name in ("stem", "stage1", "stage2", "stage3", "stage4", "pre_logits"):
        want = ref[name].numpy()
        if want.ndim == 4:
            want = want.transpose(0, 2, 3, 1)
        got = np.asarray(out[name])
        assert got.shape == want.shape, name
        # Both sides float32 with unit-scale weights; the error grows by about one rounding per layer
        # (~1e-6 relative each, a dozen layers and sums of ≤ 1176 terms): 1e-4 of the activations'
        # scale, where a transposed kernel or a wrong flatten order gives O(1).
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0, err_msg=name)


def test_converter_reports_every_problem():
    model = _randomize(TorchIResNet(**SMALL), 1)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state["layer2.1.conv1.weight"]
    state["extra.weight"] = np.zeros(3)
    with pytest.raises(WeightMismatchError) as info:
        insightface.convert_iresnet(state)
    text = str(info.value)
    assert "missing layer2.1.conv1.weight" in text and "unexpected extra.weight" in text
    with pytest.raises(WeightMismatchError, match="stage_sizes"):
        insightface.convert_iresnet({k: v.numpy() for k, v in model.state_dict().items()},
                                    stage_sizes=(3, 4, 14, 3))
    with pytest.raises(WeightMismatchError, match="architecture"):
        insightface.convert_iresnet({"conv1.weight": np.zeros((8, 3, 3, 3))})


@pytest.mark.parametrize("name,depth", [("iresnet50", 50), ("iresnet100", 100)])
def test_registry_specs_have_no_head(name, depth):
    spec = registry.get(name)
    assert spec.num_classes is None and spec.feature_dim == 512 and spec.input_size == 112
    shapes = spec.init_shapes()
    out = jax.eval_shape(spec.build().apply, shapes, jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32))
    assert out["pre_logits"].shape == (2, 512) and "logits" not in out
    blocks = {k for k in shapes["params"] if k.startswith("layer")}
    assert len(blocks) == sum(iresnet.STAGE_SIZES[depth])
    # insightface's preprocessing: (x − 127.5) / 127.5 on aligned 112×112 RGB crops.
    pixels = np.array([[[[0, 127, 255]]]], np.uint8).repeat(112, 1).repeat(112, 2)
    np.testing.assert_allclose(np.asarray(spec.preprocess(pixels))[0, 0, 0], [-1.0, -0.5 / 127.5, 1.0], atol=1e-6)


def test_registry_converter_checks_depth(tmp_path):
    model = _randomize(TorchIResNet(**SMALL), 2)
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(WeightMismatchError, match="stage_sizes"):
        registry.load_weights("iresnet50", path)


def test_member_without_head_runs_on_uint8_images():
    from embjax import members

    (member,) = members.load(["iresnet18"], weights="random")
    assert member.head is None and member.feature_dim == 512
    images = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    out = jax.jit(member.apply)(member.variables, images)
    assert out["pre_logits"].shape == (2, 512) and np.all(np.isfinite(np.asarray(out["pre_logits"])))
