"""Named layers (embjax.models.layers) of every family: one per convolution and fully connected layer, in
network order, each a distinct array, each returned by the module.

The reference count is independent of the taps: the module is traced (shapes only) with an interceptor
that records every linear layer call (nn.Conv, nn.Dense and the families' depthwise layers), a separable
convolution (depthwise then pointwise with nothing between, one layer in TF-Slim and Keras) counted once,
the classifier left out. The named conv/fc layers must match that list one for one, in order, by output
width; a family that forgets a convolution, names one twice or names two layers' outputs as one array
(the tap merges those into one name) fails here.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from embjax import fne
from embjax.models import layers, registry

CLASSIFIERS = {"predictions", "logits", "classifier"}

# One model of every family and block kind (ImageNet layouts; traced, nothing computed). Everyday: the
# smallest model of each module; the whole tier adds the larger layouts of the same modules (same layer
# code, more repeats) and NASNet-A-Large / PNASNet-5-Large (40-50 s each to trace on a loaded 2-core CPU).
_LARGER = ("resnet50_v2", "inception_v4", "mobilenet_v2_100", "efficientnet_lite0", "iresnet50", "nasnet_large",
           "pnasnet_large")
MODELS = ["vgg16", "resnet50_v1", "resnet18_v1", "zoo_resnet_v2", "inception_v3", "inception_resnet_v2",
          "zoo_inception", "inception_v1", "inception_v2", "zoo_mobilenet_v2", "zoo_efficientnet_lite", "iresnet18",
          "resnet_v1_152_slim", *(pytest.param(n, marks=pytest.mark.slow) for n in _LARGER)]


def _linear_layers_and_outputs(module, sample):
    """[(path, output width)] of every convolution / dense call, in call order (separable convs once), and
    the shapes of the module's outputs: one trace of `init_with_output` with an interceptor."""
    calls, inside = [], []

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        separable = type(m).__name__ == "SeparableConv"
        linear = isinstance(m, (nn.Conv, nn.Dense)) or getattr(type(m), "bn_foldable", False)
        if separable:
            inside.append(m)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            if separable:
                inside.pop()
        path = tuple(m.scope.path)
        if (separable and not inside) or (linear and not inside and path[-1] not in CLASSIFIERS):
            calls.append(("/".join(path), out.shape[-1]))
        return out

    with nn.intercept_methods(interceptor):
        out = jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x)[0], sample)
    return calls, out


@pytest.mark.parametrize("name", MODELS)
def test_every_convolution_is_one_named_layer_in_network_order(name):
    spec = registry.get(name)
    module = spec.build()
    x = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
    named = layers.named_layers(module, x)
    convs = [layer for layer in named if {"conv", "fc"} & set(layer.kinds)]
    reference, out = _linear_layers_and_outputs(module, x)
    assert len(convs) == len(reference), (name, len(convs), len(reference))
    assert [layer.shape[-1] for layer in convs] == [width for _, width in reference]
    assert len({layer.name for layer in named}) == len(named)
    assert all(tuple(out[layer.name].shape) == layer.shape for layer in named)
    # The embedding's default set is exactly these layers; pooling layers and the classifier are not in it.
    assert fne.embedding_layers(named) == tuple(layer.name for layer in convs)
    assert not {"logits", "pre_logits", "pre_fc"} & set(fne.embedding_layers(named))


# The paper's feature counts where the issue states them; the others are documented in
# docs/full_network_embedding.md (the command that counted them is given there).
@pytest.mark.parametrize("name,layers_,features", [("vgg16", 15, 12_416), ("efficientnet_lite0", 49, 21_008)])
def test_feature_counts(name, layers_, features):
    spec = registry.get(name)
    x = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
    chosen = [layer for layer in layers.named_layers(spec.build(), x) if {"conv", "fc"} & set(layer.kinds)]
    assert (len(chosen), sum(layer.shape[-1] for layer in chosen)) == (layers_, features)


def test_slim_inception_stem_alias_and_pools_are_not_embedded():
    spec = registry.get("inception_v1")
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    named = {layer.name: layer for layer in layers.named_layers(spec.build(), x)}
    assert "stem" not in named and named["MaxPool_3a_3x3"].kinds == ("pool",)
    for layer_set in ("conv", "block"):
        chosen = fne.embedding_layers(named.values(), layer_set)
        assert not any(n.startswith("MaxPool") for n in chosen) and "stem" not in chosen


def test_a_second_name_for_one_array_is_merged_not_duplicated():
    class Two(nn.Module):
        @nn.compact
        @layers.exposes_layers
        def __call__(self, x):
            y = layers.tap(None, "conv", nn.Conv(4, (1, 1), name="conv")(x), "conv")
            return {"block": layers.tap(None, "block", y, "block")}

    named = layers.named_layers(Two(), jnp.zeros((1, 4, 4, 3)))
    assert named == (layers.Layer("conv", ("conv", "block"), (1, 4, 4, 4)),)
