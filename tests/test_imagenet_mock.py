"""The imagenet config (the thesis setting) end to end on tfds mock data: imagenet2012 through the tfds
data_source path, registry ImageNet models (random weights: no weight files offline), thesis cells
printed beside ours."""

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from embjax import report
from experiments import affine_equivalence as study
from experiments.configs import affine_equivalence as configs


def test_imagenet_config_on_mock_data(tmp_path):
    config = configs.get_config("imagenet")
    config.models = "mobilenet_v2_140,efficientnet_lite0"
    config.weights = "random"
    config.image_size = 48  # host-side square; each model resizes to its own input size on device
    config.batch_size = 8
    config.checkpoint_every = 1
    config.thesis_names = {"mobilenet_v2_140": "MobileNet-v2-1.4-224"}
    with tfds.testing.mock_data(num_examples=20):
        results, _ = study.run(config, str(tmp_path / "state"))
    assert results["models"] == ["mobilenet_v2_140", "efficientnet_lite0"]
    assert results["feature_dims"] == [1792, 1280]
    assert results["num_fit"] == 20 and results["num_eval"] == 20
    logit = np.asarray(results["logit"]["accuracy"])
    # Logit maps reproduce source logits exactly: each row equals its source's unmapped accuracy.
    np.testing.assert_array_equal(logit, np.repeat(np.diag(logit)[:, None], 2, axis=1))
    run_dir = report.new_run_dir(str(tmp_path), name="imagenet")
    report.write(run_dir, results)
    with open(os.path.join(run_dir, "results.json")) as f:
        saved = json.load(f)
    assert saved["config"]["dataset"] == "imagenet2012"
    assert saved["reference"]["thesis_names"] == ["MobileNet-v2-1.4-224", None]
    text = open(os.path.join(run_dir, "report.md")).read()
    assert "74.6" in text  # the thesis' unmapped MobileNet-v2-1.4 top-1, printed beside ours
