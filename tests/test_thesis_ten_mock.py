"""The imagenet preset as the thesis ran it: all ten CNNs, 331-px crops (MobileNet-v2 at 224), on tfds
mock imagenet2012 with random weights and a few images, end to end through the engine and the report.

The accuracies of random networks on random images mean nothing; what this checks is that the protocol
runs: every model at its thesis size, 1001-class TF-Slim heads scored on 1000 classes, logit maps
reproducing each source's predictions through every target head, Table 5.1 with parameter counts and the
thesis' cells printed beside ours. One answer is planted: the maps are evaluated on the very images they
were fit on, and with 4 images and ≥ 1024 dimensions an affine map interpolates them, so every mapped
source reproduces the target's features (R² ≈ 1) and hence the target head's own predictions.

Memory: the run peaks at about 12 GB resident (the D² statistics of D = 21,408 features, the N² maps as
one (d_s, D) block row per source, ten backbones compiled at 331 px); see docs/thesis_models.md.
"""

import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from embjax import affine_report, report  # noqa: E402
from experiments import affine_equivalence as study  # noqa: E402
from experiments.configs import affine_equivalence as configs  # noqa: E402

pytestmark = pytest.mark.slow  # ImageNet CNNs at 331 px compiled on the CPU: minutes



def test_all_ten_thesis_cnns_at_331_px_on_mock_imagenet(tmp_path):
    names = list(configs.THESIS_NAMES)
    config = configs.get_config("imagenet")
    config.weights = "random"
    config.batch_size = 4
    config.checkpoint_every = 1
    config.models = ",".join(names)
    config.eval_split = config.fit_split  # the planted answer: evaluate on the images the maps were fit on
    with tfds.testing.mock_data(num_examples=4):
        results, engine = study.run(config, str(tmp_path / "state"))
    assert results["models"] == names
    widths = dict(zip(configs.THESIS_NAMES, [1024, 1024, 1792, 2048, 2048, 2048, 1536, 1536, 4032, 4320]))
    assert results["feature_dims"] == [widths[n] for n in names]
    assert results["num_fit"] == 4 and results["num_eval"] == 4
    # Parameter counts of the ports (TF-Slim's 1001-class heads included), in the thesis' Table 5.1 units;
    # the thesis lists 5M for Inception-v1, the GoogLeNet paper's count without TF-Slim's BatchNorm and
    # 1001-class head. NASNet / PNASNet: the 1000-class ports' 88,753,150 / 86,057,668 plus one class
    # (4032 + 1 / 4320 + 1 parameters).
    params = dict(zip(names, results["params"]))
    assert 6.5e6 < params["inception_v1"] < 6.7e6
    assert params["nasnet_large_slim"] == 88_753_150 + 4033
    assert params["pnasnet_large_slim"] == 86_057_668 + 4321
    # Every model ran at the thesis' crop: 331 px, MobileNet-v2 at its own 224.
    sizes = {m.name: m.spec.input_size for m in engine.members}
    assert sizes == {n: (224 if n.startswith("mobilenet") else 331) for n in names}
    # Every head is scored on the 1000 ImageNet classes (TF-Slim's background logit dropped).
    assert all(m.head[0].shape[1] == 1000 for m in engine.members)
    logit = np.asarray(results["logit"]["accuracy"])
    np.testing.assert_array_equal(logit, np.repeat(np.diag(logit)[:, None], len(names), axis=1))
    agreement = np.asarray(results["logit"]["agreement"])
    # Logit maps make each target head predict what the source head predicts: the agreement of a
    # mapped source with a target equals that of the two unmapped models, symmetric in the pair.
    np.testing.assert_array_equal(agreement, agreement.T)
    # The planted answer. The unmapped random networks disagree with one another (their pairwise
    # agreement, which the logit maps reproduce, is far from 1), yet every affine map, fit on these 4
    # images in ≥ 1024 dimensions, interpolates them: the mapped source reproduces the target's features
    # (R² = 1 up to the ridge the solver adds to the rank-3 covariances: 0.5–3.4% of their mean diagonal,
    # against nonzero eigenvalues of about d/3 ≥ 340 times it, shrinking the fit by ≤ 1e-4) and so the
    # target head's own predictions. A map from the wrong block of the statistics, or cut from the wrong
    # columns of the stacked maps, fails both.
    off = ~np.eye(len(names), dtype=bool)
    assert agreement[off].mean() < 0.5
    np.testing.assert_array_equal(np.asarray(results["affine"]["agreement"]), 1.0)
    assert np.asarray(results["affine"]["r2"])[off].min() > 0.999

    run_dir = report.new_run_dir(str(tmp_path), name="imagenet")
    affine_report.write(run_dir, results)
    with open(os.path.join(run_dir, "results.json")) as f:
        saved = json.load(f)
    assert saved["reference"]["thesis_names"] == [configs.THESIS_NAMES[n] for n in names]
    table = open(os.path.join(run_dir, "table_5_1.md")).read()
    assert "NASNet-Large" in table and "| 82.66 |" in table  # the thesis Table 5.2 diagonal (its own NASNet top-1)
    assert "| 88.8 |" in table  # our NASNet-Large parameter count, in millions
