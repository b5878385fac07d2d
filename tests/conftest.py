"""Shared pytest set-up: exact float32 matmuls on every backend, so tolerances mean what they say."""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
