r"""Many models' features of a dataset on disk in one pass: the engine's feature store as a product.

  ./launch.sh extract                                         # EfficientNet-Lite0/1/2 on Fashion-MNIST test[:1000]
  ./launch.sh extract --config=experiments/configs/extract.py:zoo --config.outputs=pre_logits,stage3
  ./launch.sh extract --config.models=efficientnet_lite0 --config.split=train --config.dtype=bfloat16

One pass streams the split through every model (one jitted step per batch, all devices, resumable after
kill -9) and keeps the chosen outputs. The run directory then holds `features/` (an
embjax.feature_store: one `.npy` per model output and process, `index`/`label` files, `manifest.json`
with models, preprocessing, split, sample order, dtype and config), plus report.md and results.json.
Read it with plain NumPy (`np.load(".../features/efficientnet_lite0__pre_logits.p0.npy")`) or with
`embjax.feature_store.open(".../features").array("efficientnet_lite0/pre_logits")` (all processes' rows in
dataset order).
"""

from __future__ import annotations

import functools
import os

from experiments import common


def run(config, workdir: str):
    from embjax import data, extract

    kw = dict(data_dir=config.data_dir, manual_dir=config.manual_dir, image_size=config.image_size)
    source = data.get_source(config.dataset, config.split, **kw)
    outputs = [o.strip() for o in config.outputs.split(",") if o.strip()]
    if not outputs:
        raise ValueError("config.outputs must name at least one model output (e.g. pre_logits)")

    def zoo_rows():
        return data.all_rows(data.get_source(config.dataset, config.zoo_split, **kw))

    engine = common.engine(config, workdir, zoo_data=functools.cache(zoo_rows),
                           dataset_tag=f"{config.dataset}:{config.zoo_split}")
    ms = engine.members
    store = {f"{m.name}/{o}": config.store_dtype for m in ms for o in outputs}
    engine.run(extract.Pass("features", source, config.split, {m.name: tuple(outputs) for m in ms},
                            store=store, dataset=config.dataset))
    features = engine.store("features")
    shapes = {name: [len(features), *entry["shape"]] for name, entry in features.manifest["entries"].items()}
    results = {"models": [m.name for m in ms], "outputs": outputs, "dataset": config.dataset,
               "split": config.split, "num_rows": len(features), "entries": shapes,
               "store_dir": engine.store_dir("features"), "config": common.to_dict(config),
               "meta": {"seconds": dict(engine.seconds)}}
    return results, engine


def write_report(run_dir: str, results: dict):
    """report.md and results.json, then the store moved into the run directory as `features/`."""
    from embjax import feature_store, report

    rows = [[name, " × ".join(str(s) for s in shape), results["config"]["store_dtype"]]
            for name, shape in results["entries"].items()]
    table = report.Table("Stored features", ["entry (model/output)", "shape", "dtype"], rows)
    src = results.pop("store_dir")
    results["store"] = "features"
    intro = [f"- command: `{results['meta'].get('command', '')}`\n- rows: {results['num_rows']}\n"
             "- read with `embjax.feature_store.open('<this directory>/features')` or `numpy.load`"]
    written = report.write_run(run_dir, results, tables={"features": table}, intro=intro,
                               title=f"Features: {results['dataset']} {results['split']}")
    feature_store.move(src, os.path.join(run_dir, "features"))
    return written


if __name__ == "__main__":
    common.main(run, write_report, "extract.py", "effnet_lite", "experiments.extract")
