"""Configs of the affine-equivalence study: `--config=experiments/configs/affine_equivalence.py:NAME`.

NAME is one of
  zoo          (default) five small models of different families trained by embjax on Fashion-MNIST
  zoo_apart    the five, plus ResNet-v1 and MobileNet-v2 trained apart (thesis §6.1): with a cosine-softmax
               margin loss (`_cosine`), on disjoint halves of the training images (`_half_a`, `_half_b`),
               and, the control, with another seed (`_seed1`: all rows; `_half_b_seed1`: half B);
               embjax.zoo says how each trains. Learned maps off (210 ordered pairs).
  effnet_lite  the three real ImageNet EfficientNet-Lite backbones on Fashion-MNIST: linear heads trained on
               fit features give labelled accuracies, the original ImageNet heads give agreement
  imagenet     the thesis setting: its ten CNNs on imagenet2012 through tfds with a manual_dir, 331-px crops
               (MobileNet-v2 224), maps fit on the training split and evaluated on validation
Fields can be overridden on the command line, e.g. `--config.batch_size=512 --config.fit_split=train[:10%]`.
"""

import ml_collections

from experiments.configs import base as base_config

ZOO_MODELS = ("zoo_resnet_v1", "zoo_resnet_v2", "zoo_inception", "zoo_mobilenet_v2",
              "zoo_efficientnet_lite")

# The zoo models trained apart in the zoo_apart preset, and how (embjax.models.specs.ZOO_VARIANTS).
APART_MODELS = ("zoo_resnet_v1", "zoo_mobilenet_v2")
APART_VARIANTS = ("cosine", "half_a", "half_b", "seed1", "half_b_seed1")

# Registry name -> the thesis' name, for printing the thesis' cells beside ours: the thesis' ten CNNs, in
# the order of its tables (TF-Slim / TF-Hub weights; docs/thesis_weights.md says where each file is).
THESIS_NAMES = {
    "inception_v1": "Inception-v1",
    "inception_v2": "Inception-v2",
    "mobilenet_v2_140_slim": "MobileNet-v2-1.4-224",
    "resnet_v1_152_slim": "ResNet-v1-152",
    "resnet_v2_152_slim": "ResNet-v2-152",
    "inception_v3_slim": "Inception-v3",
    "inception_v4_slim": "Inception-v4",
    "inception_resnet_v2_slim": "Inception-ResNet-v2",
    "nasnet_large_slim": "NASNet-Large",
    "pnasnet_large_slim": "PNASNet-Large",
}
# The same models from keras.applications .h5 files, where a user has those instead.
KERAS_THESIS_NAMES = {
    "inception_v3": "Inception-v3",
    "inception_resnet_v2": "Inception-ResNet-v2",
    "mobilenet_v2_140": "MobileNet-v2-1.4-224",
    "resnet152_v1": "ResNet-v1-152",
    "resnet152_v2": "ResNet-v2-152",
    "nasnet_large": "NASNet-Large",
}


def study_base() -> ml_collections.ConfigDict:
    c = base_config.base(weights="zoo", batch_size=256, checkpoint_every=50)
    c.fit_split = "train"
    c.eval_split = "test"
    # The square size every model runs at (0: each model's registry size), except the models named in
    # native_size_models, which keep their own (the thesis ran every CNN at 331 px but MobileNet-v2 at 224).
    c.input_size = 0
    c.native_size_models = ""
    c.num_classes = 10
    # Heads scored against labels: "native" (each model's own classifier) or "linear" (a linear head per
    # backbone trained with optax on fit features; the native heads are then scored for agreement).
    c.heads = "native"
    c.linear_head = ml_collections.ConfigDict(dict(epochs=30, batch_size=512, learning_rate=1e-2,
                                                   weight_decay=1e-4, seed=0))
    # Learned maps (embjax.learned_maps, after Lenc and Vedaldi; model stitching): per ordered pair a linear
    # map ("learned") and a one-hidden-layer MLP ("learned_mlp") trained from the closed-form affine map on
    # the fit features, by the target head's cross-entropy ("task") or feature regression; scored on the
    # evaluation split beside the closed form. Off here (at the thesis' widths they are N(N-1) dense
    # trainings); the zoo preset turns them on.
    c.learned = ml_collections.ConfigDict(dict(families=(), loss="task", hidden=256, rank=0, epochs=3,
                                               batch_size=512, learning_rate=1e-3, weight_decay=0.0, seed=0))
    c.ridge = 0.0  # relative ridge, lambda = ridge * tr(C_AA) / d_A (see embjax.maps.affine)
    # A bfloat16 run (dtype="bfloat16") also extracts this many evaluation images in float32 and reports
    # each model's top-1 agreement and feature error against float32 (0: no check).
    c.precision_check_images = 256
    c.thesis_names = ml_collections.ConfigDict()
    return c


def zoo() -> ml_collections.ConfigDict:
    c = study_base()
    c.name = "zoo"
    c.models = ",".join(ZOO_MODELS)
    c.learned.families = ("learned", "learned_mlp")
    return c


def zoo_apart() -> ml_collections.ConfigDict:
    """The zoo and its variants trained apart: does linear equivalence survive a different loss, or
    disjoint training data? The same Table 5.2 over every ordered pair, and the report's "trained apart"
    table groups the pairs by what differs (embjax.apart_report)."""
    c = zoo()
    c.name = "zoo_apart"
    c.models = ",".join(ZOO_MODELS + tuple(f"{m}_{v}" for m in APART_MODELS for v in APART_VARIANTS))
    c.learned.families = ()
    return c


def effnet_lite() -> ml_collections.ConfigDict:
    c = study_base()
    c.name = "effnet_lite"
    c.models = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
    c.weights = "pretrained"
    c.heads = "linear"
    # Three ImageNet backbones at 224-260 px on a 2-core CPU: a subset keeps a run to minutes.
    c.fit_split = "train[:3000]"
    c.eval_split = "test[:1000]"
    c.batch_size = 32
    c.checkpoint_every = 10
    return c


def imagenet() -> ml_collections.ConfigDict:
    """The thesis' protocol: its ten CNNs on 331x331 central crops (MobileNet-v2 at its own 224), each with
    its own scaling; maps fit on the 1.28M training images, evaluated on the 50,000 validation images.
    TF-Slim heads with a background logit are scored on the 1000 ImageNet classes."""
    c = study_base()
    c.name = "imagenet"
    c.models = ",".join(THESIS_NAMES)
    c.weights = "files"
    c.dataset = "imagenet2012"
    c.fit_split = "train"
    c.eval_split = "validation"
    c.image_size = 331
    c.input_size = 331
    c.native_size_models = "mobilenet_v2_140_slim,mobilenet_v2_140"
    c.num_classes = 1000
    c.batch_size = 512
    c.checkpoint_every = 200
    c.thesis_names = ml_collections.ConfigDict({**KERAS_THESIS_NAMES, **THESIS_NAMES})
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return base_config.presets(arg, "zoo", {"zoo": zoo, "zoo_apart": zoo_apart, "effnet_lite": effnet_lite,
                                           "imagenet": imagenet})
