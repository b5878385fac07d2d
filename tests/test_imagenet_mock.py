"""The imagenet config (the thesis setting) end to end on tfds mock data: imagenet2012 through the tfds
data_source path, registry ImageNet models (random weights: no weight files offline), thesis cells
printed beside ours.

The planted signal: mock labels are random over 1000 classes and the weights are random, so every
accuracy is almost surely 0 and says nothing. Instead the maps are fit and evaluated on the same 20
images: with 1792 and 1280 features per image an affine map can interpolate 20 samples exactly, so each
affine map must reproduce its target's features (R² ≈ 1) and its target's own predictions (agreement
≈ 1), which a wrong fit, a swapped pair or a broken evaluation would not.
"""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from embjax import affine_report, report
from experiments import affine_equivalence as study
from experiments.configs import affine_equivalence as configs


@pytest.mark.slow  # two ImageNet CNNs compiled for two passes (about a minute of CPU): the whole tier
def test_imagenet_config_on_mock_data(tmp_path):
    config = configs.get_config("imagenet")
    config.models = "mobilenet_v2_140,efficientnet_lite0"
    config.weights = "random"
    config.image_size = 48  # host-side square; each model resizes to config.input_size on device
    # 64 px instead of the models' own 224: the same layers, compiled and run on a fraction of the
    # pixels (the models are convolutional up to a global pooling; feature widths do not change).
    config.input_size = 64
    config.batch_size = 8
    config.checkpoint_every = 1
    config.thesis_names = {"mobilenet_v2_140": "MobileNet-v2-1.4-224"}
    config.eval_split = config.fit_split  # the planted signal above
    with tfds.testing.mock_data(num_examples=20):
        results, _ = study.run(config, str(tmp_path / "state"))
    assert results["models"] == ["mobilenet_v2_140", "efficientnet_lite0"]
    assert results["feature_dims"] == [1792, 1280]
    assert results["num_fit"] == 20 and results["num_eval"] == 20
    # Interpolation: the centred Gram of 20 samples has rank 19, so the fit adds its automatic ridge (a
    # millionth of the largest eigenvalue), which leaves a residual far below 0.1% of the spread
    # (observed R² >= 0.99995 for both pairs). Agreement counts argmaxes of random heads, where a
    # near-tie could flip on a tiny residual: at most one of the 20 may differ (observed: none).
    assert np.min(results["affine"]["r2"]) > 0.999, results["affine"]["r2"]
    assert np.min(results["affine"]["agreement"]) >= 0.95, results["affine"]["agreement"]
    logit = np.asarray(results["logit"]["accuracy"])
    # Logit maps reproduce source logits exactly: each row equals its source's unmapped accuracy.
    np.testing.assert_array_equal(logit, np.repeat(np.diag(logit)[:, None], 2, axis=1))
    run_dir = report.new_run_dir(str(tmp_path), name="imagenet")
    affine_report.write(run_dir, results)
    with open(os.path.join(run_dir, "results.json")) as f:
        saved = json.load(f)
    assert saved["config"]["dataset"] == "imagenet2012"
    assert saved["reference"]["thesis_names"] == ["MobileNet-v2-1.4-224", None]
    text = open(os.path.join(run_dir, "report.md")).read()
    assert "74.6" in text  # the thesis' unmapped MobileNet-v2-1.4 top-1, printed beside ours
