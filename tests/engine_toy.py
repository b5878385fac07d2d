"""A tiny study on the engine, shared by the fault tests and the child processes they start.

Two toy members (a scaled slice of the pixels), a joint-statistics pass over 53 random images in
batches of 8 (7 batches; checkpoints after batches 2, 4 and 6).
"""
import numpy as np

from embjax import data, extract, stats

N, BATCH, EVERY = 53, 8, 2
TOTAL = -(-N // BATCH)


def member(name, scale, d=4):
    import jax.numpy as jnp

    def apply(v, images):
        x = images.reshape(images.shape[0], -1).astype(jnp.float32)[:, :d] * v["s"]
        return {"pre_logits": x}

    return extract.Member(name=name, apply=apply, variables={"s": np.float32(scale)}, feature_dim=d)


def members(scale_b=np.float32(0.5)):
    return [member("a", np.float32(1.0)), member("b", scale_b)]


def source(seed=3):
    rng = np.random.default_rng(seed)
    return data.ArraySource(rng.integers(0, 255, (N, 2, 2, 1), dtype=np.uint8), rng.integers(0, 10, N))


def fit_pass(src=None):
    return extract.Pass("fit", src if src is not None else source(), "toy",
                        {"a": ("pre_logits",), "b": ("pre_logits",)},
                        accumulator=stats.accumulator([4, 4], lambda out, b, aux: [out["a"]["pre_logits"],
                                                                                   out["b"]["pre_logits"]]))


def engine(workdir, ms=None, log=None):
    return extract.Engine(ms if ms is not None else members(), str(workdir), batch_size=BATCH,
                          fingerprint={"toy": "faults"}, checkpoint_every=EVERY, progress_seconds=1e9, log=log)


def result_arrays(state):
    return {"count": np.asarray(state.count), "mean": np.asarray(state.mean), "cross": np.asarray(state.cross)}
