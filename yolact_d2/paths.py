"""Where the project's shared files live: one root holding ``data/`` (the small datasets) and
``reference/`` (the authors' code's stored outputs and checkpoint).

``$YOLACT_D2_SHARED`` names that root; without it, ``../shared`` beside the repository. The older
``$YOLACT_D2_DATA`` (the ``data/`` folder itself) still works for one release, with one deprecation
warning.
"""
import os
import warnings
from functools import lru_cache
from pathlib import Path

__all__ = ["SHARED_ENV", "shared_root", "data_root", "reference_root"]

SHARED_ENV = "YOLACT_D2_SHARED"
_OLD_DATA_ENV = "YOLACT_D2_DATA"  # deprecated: the data/ folder alone


def shared_root() -> Path:
    """``$YOLACT_D2_SHARED``, else ``<repository>/../shared``."""
    env = os.environ.get(SHARED_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


@lru_cache(maxsize=None)
def _warn_old_data_env(value: str) -> None:
    warnings.warn(f"${_OLD_DATA_ENV} is deprecated and will be removed in the next release; set "
                  f"${SHARED_ENV} to the folder holding data/ and reference/ (here {Path(value).parent})",
                  FutureWarning, stacklevel=3)


def data_root() -> Path:
    """The datasets' folder: ``$YOLACT_D2_DATA`` when set (deprecated, one warning), else
    :func:`shared_root` ``/ "data"``."""
    old = os.environ.get(_OLD_DATA_ENV)
    if old:
        _warn_old_data_env(old)
        return Path(old)
    return shared_root() / "data"


def reference_root() -> Path:
    """The authors' reference files: :func:`shared_root` ``/ "reference"``."""
    return shared_root() / "reference"
