"""Configs of the canonical-space study: `--config=experiments/configs/canonical_space.py:NAME`.

NAME is one of the affine study's presets (experiments/configs/affine_equivalence.py), with the same
models, data and heads: zoo (default), effnet_lite, imagenet. The zoo preset trains (or reuses, from the
same cache) the affine study's zoo models. Extra fields:
  methods      comma-separated hubs: gcca (generalized CCA, MAXVAR) and/or procrustes (generalized
               Procrustes)
  ranks        comma-separated hub widths k; "" = powers of two below the widest model, its width, then
               two and four times it and the joint width D (embjax.canonical.rank_curve)
  hub_ridge    relative ridge of each block's whitening / regression (0: pseudo-inverses beyond the
               float32 condition limit)
  eigensolver  the hubs' eigendecomposition (embjax.canonical: GCCA's, and Procrustes' starting
               directions): "divide_and_conquer" (LAPACK ?syevd, fast; about C + 3.5 D x D resident),
               "qr" (?syev in one workspace: about C + 1.2 D x D, 6-11x slower) or "subset" (?syevr in
               one workspace, only the top max(ranks) eigenpairs: lean only when max(ranks) << D, and
               the default ranks reach D); see embjax/canonical.py's docstring
  tolerance    the intrinsic dimension is the smallest k whose mean relative change over all ordered
               pairs is within this of the direct affine maps' (0.01 = 1 point)
"""

import ml_collections

from experiments.configs import affine_equivalence


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = affine_equivalence.get_config(arg)
    c.name = f"canonical_{c.name}"
    del c.learned  # the hub study scores closed-form maps only
    c.methods = "gcca,procrustes"
    c.ranks = ""
    c.hub_ridge = 0.0
    c.eigensolver = "divide_and_conquer"
    c.tolerance = 0.01
    c.procrustes_iters = 500
    return c
