"""Fast NMS, Cluster-Fast NMS and standard NMS against their brute-force definitions."""
import pytest
import torch
from torchvision.ops import box_iou, nms

from yolact_d2.fast_nms import _overlaps_above, fast_nms_static, multiclass_nms, overlaps_above_functional


def random_candidates(seed, m=300, c=5):
    g = torch.Generator().manual_seed(seed)
    # Clustered boxes so that many pairs overlap around the 0.5 threshold.
    centres = torch.rand(12, 2, generator=g)[torch.randint(12, (m,), generator=g)]
    centres = centres + 0.03 * torch.randn(m, 2, generator=g)
    wh = 0.05 + 0.2 * torch.rand(m, 2, generator=g)
    boxes = torch.cat([centres - wh / 2, centres + wh / 2], dim=1)
    scores = torch.rand(m, c, generator=g)
    return boxes, scores


def brute_force_fast_nms(boxes, scores, thresh, top_k, max_det):
    dets = []
    for c in range(scores.shape[1]):
        order = scores[:, c].argsort(descending=True)[:top_k].tolist()
        for j_pos, j in enumerate(order):
            # Fast NMS: any higher-scoring candidate of the class suppresses, kept or not.
            if all(box_iou(boxes[i][None], boxes[j][None]).item() <= thresh for i in order[:j_pos]):
                dets.append((scores[j, c].item(), j, c))
    dets.sort(key=lambda d: -d[0])
    return dets[:max_det]


def greedy_nms(boxes, scores, thresh, top_k, max_det):
    dets = []
    for c in range(scores.shape[1]):
        order = scores[:, c].argsort(descending=True)[:top_k]
        for j in order[nms(boxes[order], scores[order, c], thresh)].tolist():
            dets.append((scores[j, c].item(), j, c))
    dets.sort(key=lambda d: -d[0])
    return dets[:max_det]


def as_set(idx, cls):
    return set(zip(idx.tolist(), cls.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_nms_equals_its_definition(seed):
    boxes, scores = random_candidates(seed)
    idx, cls, sc = multiclass_nms(boxes, scores, 0.5, top_k=60, max_detections=100, method="fast")
    expected = brute_force_fast_nms(boxes, scores, 0.5, 60, 100)
    assert as_set(idx, cls) == {(j, c) for _, j, c in expected}
    assert torch.all(sc[:-1] >= sc[1:])  # sorted by score
    assert torch.allclose(sc, scores[idx, cls])


@pytest.mark.parametrize("method", ["cluster", "standard"])
@pytest.mark.parametrize("seed", [0, 1])
def test_cluster_and_standard_nms_equal_greedy_nms(method, seed):
    boxes, scores = random_candidates(seed)
    idx, cls, _ = multiclass_nms(boxes, scores, 0.5, top_k=60, max_detections=1000, method=method)
    assert as_set(idx, cls) == {(j, c) for _, j, c in greedy_nms(boxes, scores, 0.5, 60, 1000)}


def test_fast_nms_keeps_a_subset_of_greedy_nms():
    # Fast NMS lets already-suppressed boxes suppress others, so it can only drop more.
    boxes, scores = random_candidates(3)
    fast = as_set(*multiclass_nms(boxes, scores, 0.5, 200, 10_000, method="fast")[:2])
    greedy = as_set(*multiclass_nms(boxes, scores, 0.5, 200, 10_000, method="cluster")[:2])
    assert fast <= greedy and len(fast) < len(greedy)


def test_class_agnostic_nms_never_keeps_overlapping_pairs():
    boxes, scores = random_candidates(4)
    for method in ("fast", "cluster", "standard"):
        idx, cls, sc = multiclass_nms(boxes, scores, 0.5, 200, 1000, method=method, class_agnostic=True)
        assert len(set(idx.tolist())) == len(idx)  # one class per box
        assert torch.equal(cls, scores[idx].argmax(dim=1))
        iou = box_iou(boxes[idx], boxes[idx]).triu(diagonal=1)
        assert iou.max() <= 0.5


def test_overlap_test_equals_torchvision_iou_above_threshold():
    """Fast NMS's division-free overlap test (inter * (1 + t) > t * (a_i + a_j), upper triangle)
    against torchvision's box_iou, in batches."""
    boxes, _ = random_candidates(5, m=40)
    batch = torch.stack([boxes, boxes.flip(0)])
    for t in (0.3, 0.5, 0.7):
        got = _overlaps_above(batch, t)
        for b in range(2):
            expected = (box_iou(batch[b], batch[b]) > t).triu(diagonal=1)
            assert torch.equal(got[b], expected)


def test_max_detections_and_empty_input():
    boxes, scores = random_candidates(6)
    idx, cls, sc = multiclass_nms(boxes, scores, 0.5, 200, 7)
    assert len(idx) == len(cls) == len(sc) == 7
    idx, cls, sc = multiclass_nms(boxes[:0], scores[:0], 0.5, 200, 100)
    assert len(idx) == 0
    with pytest.raises(ValueError, match="unknown NMS method"):
        multiclass_nms(boxes, scores, method="soft")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_test_without_in_place_ops_is_bit_identical(seed):
    boxes, _ = random_candidates(seed, m=120)
    boxes = boxes.view(3, 40, 4)
    assert torch.equal(overlaps_above_functional(boxes, 0.5), _overlaps_above(boxes, 0.5))


@pytest.mark.parametrize("seed,candidates", [(0, 300), (1, 45), (2, 0)])
def test_static_fast_nms_over_all_rows_equals_fast_nms_over_candidates(seed, candidates):
    """The export graph's form: every row ranked, non-candidates scored -1 (fewer candidates than
    top_k too), equals the brute-force Fast NMS definition on the candidate rows alone."""
    boxes, scores = random_candidates(seed, m=400)
    is_cand = torch.zeros(400, dtype=torch.bool)
    is_cand[torch.randperm(400, generator=torch.Generator().manual_seed(seed))[:candidates]] = True
    masked = torch.where(is_cand[:, None], scores, torch.full_like(scores, -1.0))
    idx, cls, sc = fast_nms_static(boxes, masked, 0.5, top_k=60, max_detections=100)
    assert idx.shape == cls.shape == sc.shape == (100,)  # fixed by the arguments
    valid = sc >= 0
    rows = is_cand.nonzero().squeeze(1)
    expected = brute_force_fast_nms(boxes[rows], scores[rows], 0.5, 60, 100)
    assert as_set(idx[valid], cls[valid]) == {(rows[j].item(), c) for _, j, c in expected}
    assert torch.all(sc[:-1] >= sc[1:]) and bool((~valid[:-1] & valid[1:]).any()) is False
    assert torch.allclose(sc[valid], scores[idx[valid], cls[valid]])
