"""Does the model wait on input? Step time with real data against the same batches already on the device.

Two cases, each timed in alternating rounds (medians reported):

1. The zoo study on Fashion-MNIST: the fit step of the affine study (`embjax.extract.make_step`) over the five zoo
   backbones (random weights: throughput does not depend on them), fed
     * `staged`:     batches read, padded and placed on the device before timing; the loop only steps;
     * `prefetch=P`: `embjax.data.batches(source, prefetch=P)` -> `extract.shard_batch` -> step, the
                     engine's loop (here reading the non-finite flags after every step, so the host
                     cannot run ahead of the device by more than the prefetch);
     * `prefetch=0`: the same, reading each batch in the loop thread (what prefetching saves).
   The host cost of one batch (reading + padding, and the host->device copy) is timed on its own.

2. An ImageNet-like host path: JPEGs of 224-331 px made from skimage's photos, decoded with PIL and
   resized (shorter side) + centre-cropped to 224 by `embjax.data.tfds_source.resize_shorter_and_center_crop`,
   as `TfdsSource` does for imagenet2012. Decode throughput per host thread is measured with 1..T threads
   and set against the fit step of an ImageNet model (EfficientNet-Lite0 at 224, staged vs. fed by
   `data.batches` over the JPEG source), which says how many decode threads a run needs.

    ./launch.sh bench input_pipeline
    ./launch.sh bench input_pipeline --steps 10 --rounds 2 --skip-imagenet
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import itertools
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import common  # noqa: E402

ZOO_MODELS = ("zoo_resnet_v1", "zoo_resnet_v2", "zoo_inception", "zoo_mobilenet_v2", "zoo_efficientnet_lite")
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png",
          "retina.jpg", "motorcycle_left.png")


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# The fit step, as the study builds it.


def fit_step(model_names, batch_size: int):
    """(step(state, batch_on_device), initial state, mesh, members) for the named registry models: the
    jitted step of the affine study's fit pass (`extract.make_step`), random weights."""
    import numpy as np

    from embjax import extract, members as members_lib, stats

    members = members_lib.load(list(model_names), "random")
    names = [m.name for m in members]
    dims = [m.feature_dim for m in members]
    p = extract.Pass("fit", None, "bench", {n: ("pre_logits",) for n in names}, init=stats.init(dims),
                     fold=lambda s, out, b, aux: stats.update(s, [out[n]["pre_logits"] for n in names], b["mask"]))
    mesh = extract.make_mesh()
    extract.check_batch_size(batch_size, mesh)
    variables = extract.replicate([m.variables for m in members], mesh)
    step = extract.make_step(members, p, mesh)
    state = extract.replicate(stats.init(dims), mesh)
    flags = extract.replicate(np.zeros((len(members),), bool), mesh)

    def run(state, batch):
        state, bad, _ = step(state, flags, variables, None, batch)
        # One host read of the flags per step: stricter than the engine, which reads them only at
        # progress lines and checkpoints; the prefetch thread still overlaps reading with the step.
        if np.asarray(bad).any():
            raise extract.NonFiniteFeatures("non-finite features in the benchmark step")
        return state

    return run, state, mesh, members


def time_loops(run, state, mesh, source, batch_size: int, steps: int, prefetch: int, rounds: int):
    """Median seconds per step for staged batches and for data.batches with `prefetch` and with 0."""
    import jax

    from embjax import data, extract

    with data.batches(source, batch_size, prefetch=0) as it:
        staged = [extract.shard_batch(b, mesh) for b in itertools.islice(it, steps)]
    if len(staged) < steps:
        raise ValueError(f"the source has only {len(staged)} batches of {batch_size}; lower --steps")
    holder = {"state": run(state, staged[0])}  # compile
    jax.block_until_ready(holder["state"])

    def staged_loop():
        s = holder["state"]
        for b in staged:
            s = run(s, b)
        jax.block_until_ready(s)
        holder["state"] = s

    def fed_loop(p):
        def loop():
            s = holder["state"]
            with data.batches(source, batch_size, prefetch=p) as it:
                for i, b in enumerate(it):
                    if i == steps:
                        break
                    s = run(s, extract.shard_batch(b, mesh))
            jax.block_until_ready(s)
            holder["state"] = s
        return loop

    contestants = [("staged", staged_loop), (f"prefetch={prefetch}", fed_loop(prefetch)), ("prefetch=0", fed_loop(0))]
    times = common.alternate(contestants, rounds)
    per_step = {name: common.median(t) / steps for name, t in times.items()}
    ranges = {name: (min(t) / steps, max(t) / steps) for name, t in times.items()}

    # Host cost of one batch on its own: reading + padding (make_batch), then the host->device copy.
    it = data.batches(source, batch_size, prefetch=0)
    t0 = time.perf_counter()
    host = [next(it) for _ in range(min(steps, 10))]
    read_s = (time.perf_counter() - t0) / len(host)
    it.close()
    t0 = time.perf_counter()
    for b in host:
        jax.block_until_ready(extract.shard_batch(b, mesh))
    put_s = (time.perf_counter() - t0) / len(host)
    return per_step, ranges, read_s, put_s


def report_case(title: str, per_step: dict, ranges: dict, read_s: float, put_s: float, batch_size: int,
                prefetch: int) -> list[str]:
    staged = per_step["staged"]
    lines = [f"### {title}", "",
             "| feed | ms / step (median) | min..max over rounds | img/s | vs. staged |", "|---|---|---|---|---|"]
    for name, s in per_step.items():
        lo, hi = ranges[name]
        lines.append(f"| {name} | {1000 * s:.1f} | {1000 * lo:.0f}..{1000 * hi:.0f} | {batch_size / s:.0f} | "
                     f"{s / staged:.3f}x |")
    lines += ["", f"host cost of one batch alone: read + pad {1000 * read_s:.1f} ms, host->device {1000 * put_s:.1f} ms "
              f"({100 * (read_s + put_s) / staged:.1f}% of a staged step)",
              f"input wait with prefetch={prefetch}: {1000 * (per_step[f'prefetch={prefetch}'] - staged):+.1f} ms/step "
              f"({100 * (per_step[f'prefetch={prefetch}'] / staged - 1):+.1f}%); without prefetch: "
              f"{1000 * (per_step['prefetch=0'] - staged):+.1f} ms/step"]
    return lines


# --------------------------------------------------------------------------------------------------
# ImageNet-like host path: JPEG decode + resize.


def make_jpegs(count: int, seed: int = 0, quality: int = 90, shorter: tuple[int, int] = (224, 331)) -> list[bytes]:
    """JPEG files of random 224..331 px crops of skimage's bundled photos (no download)."""
    from PIL import Image

    import skimage

    data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    photos = [np.asarray(Image.open(os.path.join(data_dir, p)).convert("RGB")) for p in PHOTOS
              if os.path.isfile(os.path.join(data_dir, p))]
    if not photos:
        raise FileNotFoundError(f"none of skimage's bundled photos {PHOTOS} under {data_dir}; "
                                "reinstall scikit-image (pip install -e .[test])")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        # ImageNet-like: not square, shorter side in `shorter` (inclusive), aspect up to 4:3.
        short = int(rng.integers(shorter[0], shorter[1] + 1))
        long_ = int(short * rng.uniform(1.0, 4 / 3))
        side_h, side_w = (short, long_) if rng.random() < 0.5 else (long_, short)
        scale = min(h / side_h, w / side_w)
        ch, cw = int(side_h * scale), int(side_w * scale)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(img[top:top + ch, left:left + cw]).resize((side_w, side_h), Image.BILINEAR)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


class JpegSource:
    """Encoded JPEGs decoded on demand, like `TfdsSource` over imagenet2012 with image_size=224."""

    def __init__(self, jpegs: list[bytes], image_size: int, num_threads: int, repeat: int = 1):
        from embjax.data.tfds_source import resize_shorter_and_center_crop

        self._resize = resize_shorter_and_center_crop
        self.jpegs, self.image_size, self.repeat = jpegs, image_size, repeat
        self.num_threads = num_threads
        self._pool = concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 1 else None

    def __len__(self):
        return len(self.jpegs) * self.repeat

    @property
    def image_shape(self):
        return (self.image_size, self.image_size, 3)

    def __getitem__(self, index):
        from PIL import Image

        image = np.asarray(Image.open(io.BytesIO(self.jpegs[int(index) % len(self.jpegs)])).convert("RGB"))
        return self._resize(image, self.image_size), int(index) % 1000

    def get_batch(self, indices):
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        samples = list(self._pool.map(self.__getitem__, indices)) if self._pool else [self[i] for i in indices]
        return np.stack([s[0] for s in samples]), np.asarray([s[1] for s in samples], np.int32)

    def close(self):
        if self._pool:
            self._pool.shutdown()


def decode_rates(jpegs: list[bytes], image_size: int, max_threads: int, rounds: int) -> dict[int, float]:
    """Images/s of decode + resize + crop with 1..max_threads threads (medians over alternating rounds)."""
    sources = {t: JpegSource(jpegs, image_size, t) for t in range(1, max_threads + 1)}
    idx = np.arange(len(jpegs))
    for s in sources.values():
        s.get_batch(idx[:4])
    times = common.alternate([(t, lambda s=s: s.get_batch(idx)) for t, s in sources.items()], rounds)
    for s in sources.values():
        s.close()
    return {t: len(jpegs) / common.median(v) for t, v in times.items()}


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo-models", default=",".join(ZOO_MODELS))
    parser.add_argument("--batch-size", type=int, default=256, help="zoo case (the zoo config's batch size)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed loop, zoo case")
    parser.add_argument("--prefetch", type=int, default=2, help="the study's default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-zoo", action="store_true")
    parser.add_argument("--skip-imagenet", action="store_true")
    parser.add_argument("--imagenet-model", default="efficientnet_lite0")
    parser.add_argument("--imagenet-batch-size", type=int, default=32)
    parser.add_argument("--imagenet-steps", type=int, default=3)
    parser.add_argument("--jpegs", type=int, default=128, help="distinct JPEGs made for the decode measurement")
    parser.add_argument("--decode-threads", type=int, default=max(2, os.cpu_count() or 1))
    parser.add_argument("--thesis-decode", action="store_true",
                        help="only the thesis' host path: JPEGs of shorter side 331-500 px (ImageNet's typical "
                             "sizes) decoded and centre-cropped to 331 px, images/s per core")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.rounds, args.imagenet_batch_size, args.imagenet_steps, args.jpegs) < 1:
        parser.error("sizes, steps and rounds must be positive")
    if args.prefetch < 1:
        parser.error("--prefetch must be >= 1 (prefetch=0 is always measured alongside)")

    import jax

    log(f"input_pipeline  {common.now()}")
    log(f"machine: {common.machine_line()}")
    log(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), "
        f"load average {common.load_average()}")
    lines = []
    if args.thesis_decode:
        jpegs = make_jpegs(args.jpegs, shorter=(331, 500))
        mean_kb = np.mean([len(j) for j in jpegs]) / 1024
        rates = decode_rates(jpegs, 331, args.decode_threads, args.rounds)
        block = [f"### Thesis host path: {len(jpegs)} JPEGs, 331-500 px shorter side, mean {mean_kb:.0f} KiB, "
                 "decode + resize_shorter_and_center_crop(331)", "",
                 "| decode threads | img/s | per thread |", "|---|---|---|"]
        block += [f"| {t} | {r:.0f} | {r / t:.0f} |" for t, r in rates.items()]
        per_core = rates[1]
        block += ["", f"host cores needed for the thesis' 1,500 img/s (one H200 at 40% MFU): "
                  f"{math.ceil(1500 / per_core)} at {per_core:.0f} img/s per core"]
        log("\n".join(block))
        log(f"load average at the end: {common.load_average()}")
        log(f"decoded images/s per core at 331 px: {per_core:.1f}")
        return 0
    if not args.skip_zoo:
        from embjax import data

        source = data.get_source("fashion_mnist", "train")
        names = [n for n in args.zoo_models.split(",") if n]
        run, state, mesh, members = fit_step(names, args.batch_size)
        log(f"[zoo] {len(members)} models {names}, batch {args.batch_size}, {args.steps} steps per loop, "
            f"{args.rounds} rounds")
        per_step, ranges, read_s, put_s = time_loops(run, state, mesh, source, args.batch_size, args.steps,
                                                     args.prefetch, args.rounds)
        lines += report_case(f"zoo fit step ({len(members)} models, Fashion-MNIST 28x28, batch {args.batch_size})",
                             per_step, ranges, read_s, put_s, args.batch_size, args.prefetch)
        lines.append("")
        log("\n".join(lines))

    if not args.skip_imagenet:
        size = 224
        jpegs = make_jpegs(args.jpegs)
        mean_kb = np.mean([len(j) for j in jpegs]) / 1024
        rates = decode_rates(jpegs, size, args.decode_threads, args.rounds)
        n_steps = args.imagenet_steps
        bs = args.imagenet_batch_size
        source = JpegSource(jpegs, size, num_threads=args.decode_threads,
                            repeat=math.ceil((n_steps + 1) * bs / len(jpegs)) + 1)
        run, state, mesh, members = fit_step([args.imagenet_model], bs)
        log(f"[imagenet-like] {args.imagenet_model} fit step, batch {bs}, {n_steps} steps per loop, "
            f"decode threads {args.decode_threads}")
        per_step, ranges, read_s, put_s = time_loops(run, state, mesh, source, bs, n_steps, args.prefetch,
                                                     args.rounds)
        source.close()
        model_rate = bs / per_step["staged"]
        block = [f"### ImageNet-like host path: {len(jpegs)} JPEGs, 224-331 px shorter side, mean {mean_kb:.0f} KiB, "
                 f"decode + resize_shorter_and_center_crop({size})", "",
                 "| decode threads | img/s | per thread |", "|---|---|---|"]
        for t, r in rates.items():
            block.append(f"| {t} | {r:.0f} | {r / t:.0f} |")
        per_thread = rates[1]
        block += [""]
        block += report_case(f"{args.imagenet_model} fit step at {size} px fed by that JPEG source "
                             f"(batch {bs}, {args.decode_threads} decode threads)", per_step, ranges, read_s, put_s,
                             bs, args.prefetch)
        block += ["", f"threads needed = device img/s / {per_thread:.0f} img/s per thread (measured single-thread "
                  f"rate): {model_rate:.1f} img/s here -> {max(1, math.ceil(model_rate / per_thread))}; "
                  + ", ".join(f"{r:,} img/s -> {math.ceil(r / per_thread)}" for r in (1000, 5000, 20000))]
        log("\n".join(block))
        lines += block
    log(f"load average at the end: {common.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
