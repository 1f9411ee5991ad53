"""One data root: $YOLACT_D2_SHARED holds data/ and reference/; the old $YOLACT_D2_DATA still works
with one deprecation warning (yolact_d2/paths.py)."""
import warnings
from pathlib import Path

import pytest

from yolact_d2 import paths


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("YOLACT_D2_SHARED", raising=False)
    monkeypatch.delenv("YOLACT_D2_DATA", raising=False)
    paths._warn_old_data_env.cache_clear()


def test_default_is_shared_beside_the_checkout():
    repo = Path(paths.__file__).resolve().parents[1]
    assert paths.shared_root() == repo.parent / "shared"
    assert paths.data_root() == repo.parent / "shared" / "data"
    assert paths.reference_root() == repo.parent / "shared" / "reference"


def test_one_variable_moves_data_and_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("YOLACT_D2_SHARED", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        assert paths.data_root() == tmp_path / "data"
        assert paths.reference_root() == tmp_path / "reference"
    from yolact_d2.data.datasets import default_data_root

    assert default_data_root() == tmp_path / "data"


def test_old_data_variable_still_works_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("YOLACT_D2_SHARED", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("YOLACT_D2_DATA", str(tmp_path / "d"))
    with pytest.warns(FutureWarning, match=r"YOLACT_D2_DATA is deprecated.*YOLACT_D2_SHARED") as record:
        assert paths.data_root() == tmp_path / "d"
        assert paths.data_root() == tmp_path / "d"
    assert len([w for w in record if issubclass(w.category, FutureWarning)]) == 1
    assert len(str(record[0].message).splitlines()) == 1
