"""Priors: counts, order and sizes against the original make_priors definition."""
import math

import torch

from yolact_d2.priors import build_box_coder, make_priors, priors_to_boxes

SIZES_550 = [(69, 69), (35, 35), (18, 18), (9, 9), (5, 5)]


def loop_priors(sizes, scales, ratios, input_size, square):
    out = []
    for (h, w), level in zip(sizes, scales):
        for y in range(h):
            for x in range(w):
                for s in level:
                    for a in ratios:
                        pw = s * math.sqrt(a) / input_size
                        out.append([(x + 0.5) / w, (y + 0.5) / h, pw, pw if square else s / math.sqrt(a) / input_size])
    return torch.tensor(out)


def test_v1_and_plus_prior_counts_and_order():
    v1 = make_priors(SIZES_550, [[24], [48], [96], [192], [384]], [1, 0.5, 2], 550, square=True)
    assert v1.shape == (19248, 4)
    assert torch.allclose(v1, loop_priors(SIZES_550, [[24], [48], [96], [192], [384]], [1, 0.5, 2], 550, True))
    assert torch.equal(v1[:, 2], v1[:, 3])  # v1's square anchors
    plus_scales = [[s * 2 ** (j / 3) for j in range(3)] for s in (24, 48, 96, 192, 384)]
    plus = make_priors(SIZES_550, plus_scales, [1, 0.5, 2], 550, square=False)
    assert plus.shape == (57744, 4)
    assert torch.allclose(plus, loop_priors(SIZES_550, plus_scales, [1, 0.5, 2], 550, False))
    # ratio 2 (w/h) is a wide prior: w = s * sqrt(2), h = s / sqrt(2)
    assert torch.allclose(plus[2, 2] / plus[2, 3], torch.tensor(2.0))


def test_box_coding_round_trip_and_original_formula():
    coder = build_box_coder()
    priors = make_priors([(3, 4)], [[100]], [1, 0.5, 2], 550, square=False)
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(len(priors), 4, generator=g) * 3
    boxes = coder.apply_deltas(deltas, priors_to_boxes(priors))
    # Original decode: centre + d * 0.1 * prior size, size * exp(d * 0.2), no clamp.
    cxcy = priors[:, :2] + deltas[:, :2] * 0.1 * priors[:, 2:]
    wh = priors[:, 2:] * torch.exp(deltas[:, 2:] * 0.2)
    assert torch.allclose(boxes, torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1), atol=1e-6)
    assert torch.allclose(coder.get_deltas(priors_to_boxes(priors), boxes), deltas, atol=1e-4)
