"""The suite writes nothing into the user's cache or home (conftest.py redirects every write location)."""
import os

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
