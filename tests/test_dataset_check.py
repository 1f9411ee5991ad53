"""The dataset check before the first iteration (yolact_d2/data/dataset_check.py), one test per fault,
on files made here; and the mapper's safety net under detectron2's MapDataset."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.common import MapDataset
from detectron2.data.datasets import register_coco_instances
from detectron2.data.detection_utils import read_image

from conftest import yolact_cfg
from yolact_d2.data import YolactDatasetMapper
from yolact_d2.data.dataset_check import ImageCheckCache, check_dataset, check_datasets, inspect_image
from yolact_d2.errors import DatasetError, MissingFileError

SQUARE = [[10.0, 10.0, 50.0, 10.0, 50.0, 40.0, 10.0, 40.0]]


def _jpeg(path, width=120, height=80, orientation=None):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    if orientation is None:
        image.save(path, quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, quality=90, exif=exif)
    return path


def _dict(path, width=120, height=80, annotations=None):
    anno = {"bbox": [10, 10, 40, 30], "bbox_mode": 1, "segmentation": SQUARE, "category_id": 0, "iscrowd": 0}
    return {"file_name": str(path), "image_id": 1, "width": width, "height": height,
            "annotations": [anno] if annotations is None else annotations}


def _coco_json(tmp_path, name, files, category_ids=(1,), segmentation=SQUARE, cats=(1,)):
    """A registered COCO JSON dataset ``name`` of ``files`` (120 x 80 JPEGs), one annotation per
    image with the given category ids in turn; returns the JSON path."""
    images, annos = [], []
    for i, f in enumerate(files):
        images.append({"id": i + 1, "file_name": f.name, "width": 120, "height": 80})
        annos.append({"id": 100 + i, "image_id": i + 1, "category_id": category_ids[i % len(category_ids)],
                      "iscrowd": 0, "bbox": [10, 10, 40, 30], "area": 1200.0,
                      "segmentation": segmentation if i == 0 else SQUARE})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annos,
                                "categories": [{"id": c, "name": f"c{c}"} for c in cats]}))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(path), str(tmp_path))
    return path


def _cfg(tmp_path, *opts):
    return yolact_cfg(opts=["OUTPUT_DIR", str(tmp_path / "out"), *opts])


def test_truncated_jpeg_is_dropped_from_train_and_fatal_in_test_or_strict(tmp_path, caplog):
    good = _jpeg(tmp_path / "good.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert inspect_image(str(good))["error"] is None
    assert inspect_image(str(cut))["error"] == "truncated JPEG: no end-of-image marker"
    with pytest.raises(OSError):  # what training met mid-run before the check
        read_image(str(cut))
    dicts = [_dict(good), _dict(cut)]
    with caplog.at_level(logging.WARNING, logger="yolact_d2.data.dataset_check"):
        kept = check_dataset(dicts, "mine", split="TRAIN")
    assert [d["file_name"] for d in kept] == [str(good)]
    assert "dataset mine: dropped 1 image(s) that cannot be read (cut.jpg: truncated JPEG" in caplog.text
    with pytest.raises(DatasetError, match=r"^dataset mine: 1 image\(s\) cannot be used \(a TEST set .*cut\.jpg"):
        check_dataset(dicts, "mine", split="TEST")
    with pytest.raises(DatasetError, match=r"cut\.jpg \(truncated JPEG"):
        check_dataset(dicts, "mine", split="TRAIN", strict=True)


def test_size_mismatch_is_fatal_and_follows_exif_orientation(tmp_path):
    plain = _jpeg(tmp_path / "plain.jpg")  # 120 x 80
    with pytest.raises(DatasetError, match=r"plain\.jpg \(JSON 100x80, file 120x80\); correct the JSON"):
        check_dataset([_dict(plain, width=100)], "mine", split="TRAIN")
    # Stored 120 x 80 with EXIF orientation 6 (rotate 90): read_image gives 80 wide, 120 high.
    rotated = _jpeg(tmp_path / "rotated.jpg", orientation=6)
    assert read_image(str(rotated)).shape[:2] == (120, 80)
    assert (inspect_image(str(rotated))["width"], inspect_image(str(rotated))["height"]) == (80, 120)
    assert check_dataset([_dict(rotated, width=80, height=120)], "mine", split="TEST")  # as read_image sees it
    with pytest.raises(DatasetError, match=r"rotated\.jpg \(JSON 120x80, file 80x120\)"):
        check_dataset([_dict(rotated, width=120, height=80)], "mine", split="TRAIN")


@pytest.mark.parametrize("split", ["TRAIN", "TEST"])
def test_unknown_category_id_is_fatal_before_loading(tmp_path, split):
    files = [_jpeg(tmp_path / f"{i}.jpg") for i in range(3)]
    name = f"check_unknown_{split.lower()}"
    _coco_json(tmp_path, name, files, category_ids=(1, 7, 7), cats=(1,))
    with pytest.raises(KeyError):  # detectron2's loader, which training met before the check
        DatasetCatalog.get(name)
    with pytest.raises(DatasetError) as e:
        check_datasets(_cfg(tmp_path), [name], split, load=lambda n: pytest.fail("loaded before the check"))
    assert str(e.value).startswith(f"dataset {name} (")
    assert "2 annotation(s) with a category_id not in 'categories' (category ids 7; JSON annotation ids 101, 102)" in str(e.value)


def test_empty_segmentation_is_dropped_by_json_id_in_train_and_fatal_in_test(tmp_path, caplog):
    files = [_jpeg(tmp_path / f"{i}.jpg") for i in range(2)]
    _coco_json(tmp_path, "check_empty", files, segmentation=[])
    cfg = _cfg(tmp_path)
    with caplog.at_level(logging.WARNING, logger="yolact_d2.data.dataset_check"):
        dicts = check_datasets(cfg, ["check_empty"], "TRAIN", load=lambda n: DatasetCatalog.get(n[0]))
    assert [len(d["annotations"]) for d in dicts] == [0, 1]
    assert "1 annotation(s) with an empty segmentation (JSON annotation ids 100)" in caplog.text
    with pytest.raises(DatasetError, match=r"1 annotation\(s\) with an empty segmentation .*JSON annotation ids 100"):
        check_datasets(cfg, ["check_empty"], "TEST", load=None)
    cfg.DATASETS.CHECK.STRICT = True
    with pytest.raises(DatasetError, match="JSON annotation ids 100"):
        check_datasets(cfg, ["check_empty"], "TRAIN", load=lambda n: DatasetCatalog.get(n[0]))


def test_cache_is_reused_until_the_file_changes(tmp_path, monkeypatch):
    import yolact_d2.data.dataset_check as dc

    path = _jpeg(tmp_path / "a.jpg")
    calls = []
    real = dc.inspect_image
    monkeypatch.setattr(dc, "inspect_image", lambda p, full=False: calls.append(p) or real(p, full))
    cache_file = tmp_path / "cache.json"
    first = ImageCheckCache(str(cache_file))
    first.get(str(path), False)
    first.save()
    second = ImageCheckCache(str(cache_file))
    assert second.get(str(path), False)["width"] == 120 and len(calls) == 1  # read from the file
    second.get(str(path), True)  # a full decode was not done yet: checked again
    assert len(calls) == 2
    _jpeg(path, width=60)  # rewritten: new size and mtime
    assert ImageCheckCache(str(cache_file)).get(str(path), False)["width"] == 60
    other_rank = ImageCheckCache(str(tmp_path / "rank1.json"), writable=False)
    other_rank.get(str(path), False)
    other_rank.save()
    assert not (tmp_path / "rank1.json").exists()


def test_mapper_gives_none_for_an_unreadable_image_and_map_dataset_retries(tmp_path, caplog):
    good = _jpeg(tmp_path / "good.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:600])
    mapper = YolactDatasetMapper(yolact_cfg(opts=["MODEL.YOLACT.INPUT_SIZE", "64"]), is_train=True)
    with caplog.at_level(logging.WARNING, logger="yolact_d2.data.dataset_mapper"):
        assert mapper(_dict(cut)) is None
        assert mapper(_dict(cut)) is None
    assert caplog.text.count("cannot read training image") == 1 and "cut.jpg" in caplog.text
    item = MapDataset([_dict(cut), _dict(good)], mapper)[0]  # retries another index
    assert item["file_name"] == str(good)
    with pytest.raises(OSError):  # evaluation never skips an image
        YolactDatasetMapper(yolact_cfg(), is_train=False)(_dict(cut))


def test_a_test_set_whose_json_is_missing_stops_before_training(tmp_path):
    name = "check_missing_json"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(tmp_path / "absent.json"), str(tmp_path))
    with pytest.raises(MissingFileError, match=r"^dataset check_missing_json \(DATASETS.TEST\): annotation file .*absent"):
        check_datasets(_cfg(tmp_path), [name], "TEST", load=None)
