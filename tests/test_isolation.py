"""The suite writes nothing into the user's cache or home (conftest.py redirects every write location)."""
import json
import os
import subprocess
import sys

from embjax import zoo
from embjax.models.convert import efficientnet_lite


def _inside(path, root):
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) == os.path.realpath(root)


def test_write_locations_are_private(private_write_locations):
    root = private_write_locations
    for var in ("EMBJAX_CACHE", "HOME", "XDG_CACHE_HOME", "KERAS_HOME", "TFDS_DATA_DIR", "MPLCONFIGDIR"):
        assert _inside(os.environ[var], root), var
    assert _inside(os.path.expanduser("~"), root)
    # What the library itself would write to, asked the way it asks.
    assert _inside(zoo.default_cache_dir(), root)
    assert _inside(efficientnet_lite.default_cache_dir(), root)


def test_subprocesses_inherit_the_redirection(private_write_locations):
    code = ("import os, json; print(json.dumps({v: os.environ.get(v) for v in "
            "('EMBJAX_CACHE', 'HOME', 'KERAS_HOME', 'TFDS_DATA_DIR')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for var, value in json.loads(out).items():
        assert value is not None and _inside(value, private_write_locations), var
