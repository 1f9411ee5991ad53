"""An independent, functional forward pass of the ORIGINAL network, read straight off an
original-layout state dict (dbolya/yolact key names), written from the facts in
../shared/reference/README.md. It shares no code with yolact_d2: the tests first prove it against
the original's stored outputs (v1), then use it as the reference for layouts that have no stored
outputs (YOLACT++: deformable blocks, 9 priors per location, mask re-scoring net).
"""
import math

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d


_CALIBRATING = []


def _bn(sd, x, p):
    if _CALIBRATING:  # store this input's statistics as the running ones (see calibrate_batchnorm)
        sd[p + ".running_mean"] = x.mean(dim=(0, 2, 3)).detach()
        sd[p + ".running_var"] = x.var(dim=(0, 2, 3)).detach()
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5)


def _conv(sd, x, p, stride=1, padding=0):
    return F.conv2d(x, sd[p + ".weight"], sd.get(p + ".bias"), stride, padding)


def _conv2(sd, x, p, stride):
    if p + ".conv_offset_mask.weight" not in sd:
        return _conv(sd, x, p, stride, 1)
    o1, o2, m = torch.chunk(_conv(sd, x, p + ".conv_offset_mask", stride, 1), 3, dim=1)
    return deform_conv2d(x, torch.cat([o1, o2], 1), sd[p + ".weight"], sd[p + ".bias"], (stride, stride), (1, 1), mask=torch.sigmoid(m))


def resnet_c3_c5(sd, x):
    x = F.relu(_bn(sd, _conv(sd, x, "backbone.conv1", 2, 3), "backbone.bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    stage = 0
    while f"backbone.layers.{stage}.0.conv1.weight" in sd:
        block = 0
        while f"backbone.layers.{stage}.{block}.conv1.weight" in sd:
            p = f"backbone.layers.{stage}.{block}"
            stride = 2 if block == 0 and stage > 0 else 1
            out = F.relu(_bn(sd, _conv(sd, x, p + ".conv1"), p + ".bn1"))
            out = F.relu(_bn(sd, _conv2(sd, out, p + ".conv2", stride), p + ".bn2"))
            out = _bn(sd, _conv(sd, out, p + ".conv3"), p + ".bn3")
            short = _bn(sd, _conv(sd, x, p + ".downsample.0", stride), p + ".downsample.1") if block == 0 else x
            x = F.relu(out + short)
            block += 1
        if stage >= 1:
            outs.append(x)
        stage += 1
    return outs  # C3, C4, C5


def fpn(sd, cs):
    # lat_layers / pred_layers index 0 is C5 / P5
    x = _conv(sd, cs[2], "fpn.lat_layers.0")
    tops = [x]
    for i, c in zip((1, 2), (cs[1], cs[0])):
        x = F.interpolate(x, size=c.shape[-2:], mode="bilinear", align_corners=False) + _conv(sd, c, f"fpn.lat_layers.{i}")
        tops.append(x)
    p5, p4, p3 = (F.relu(_conv(sd, t, f"fpn.pred_layers.{i}", 1, 1)) for i, t in enumerate(tops))
    p6 = _conv(sd, p5, "fpn.downsample_layers.0", 2, 1)
    p7 = _conv(sd, p6, "fpn.downsample_layers.1", 2, 1)
    return [p3, p4, p5, p6, p7]


def forward(sd, x, scales, ratios=(1, 0.5, 2), square=True, input_size=550):
    """Returns the original's raw outputs: loc (1, A, 4), conf (1, A, C+1) softmax with background
    FIRST, mask (1, A, k) tanh, priors (A, 4), proto (1, h, w, k)."""
    ps = fpn(sd, resnet_c3_c5(sd, x))
    locs, confs, masks, priors = [], [], [], []
    for level, p in enumerate(ps):
        h = F.relu(_conv(sd, p, "prediction_layers.0.upfeature.0", 1, 1))
        n, _, fh, fw = h.shape
        locs.append(_conv(sd, h, "prediction_layers.0.bbox_layer", 1, 1).permute(0, 2, 3, 1).reshape(n, -1, 4))
        c = _conv(sd, h, "prediction_layers.0.conf_layer", 1, 1)
        m = _conv(sd, h, "prediction_layers.0.mask_layer", 1, 1)
        k = sd["proto_net.10.weight"].shape[0]
        confs.append(c.permute(0, 2, 3, 1).reshape(n, -1, sd["semantic_seg_conv.bias"].shape[0] + 1))
        masks.append(torch.tanh(m.permute(0, 2, 3, 1).reshape(n, -1, k)))
        for y in range(fh):
            for xx in range(fw):
                for s in scales[level]:
                    for a in ratios:
                        w = s * math.sqrt(a) / input_size
                        priors.append([(xx + 0.5) / fw, (y + 0.5) / fh, w, w if square else s / math.sqrt(a) / input_size])
    proto = ps[0]
    for i in (0, 2, 4):
        proto = F.relu(_conv(sd, proto, f"proto_net.{i}", 1, 1))
    proto = F.relu(F.interpolate(proto, scale_factor=2, mode="bilinear", align_corners=False))
    proto = F.relu(_conv(sd, proto, "proto_net.8", 1, 1))
    proto = F.relu(_conv(sd, proto, "proto_net.10"))
    return {
        "loc": torch.cat(locs, 1),
        "conf": F.softmax(torch.cat(confs, 1), -1),
        "mask": torch.cat(masks, 1),
        "priors": torch.tensor(priors),
        "proto": proto.permute(0, 2, 3, 1),
    }


def maskiou(sd, masks):
    """Original maskiou_net: (P, 1, h, w) -> (P, C), ReLU after every conv, global max pool."""
    x = masks
    for i in (0, 2, 4, 6, 8):
        x = F.relu(_conv(sd, x, f"maskiou_net.maskiou_net.{i}", 2))
    x = F.relu(_conv(sd, x, "maskiou_net.maskiou_net.10"))
    return F.max_pool2d(x, kernel_size=x.shape[2:]).flatten(1)


def calibrate_batchnorm(sd, x):
    """Set every BatchNorm's running statistics to those of its input on ``x`` (random weights then
    give well-scaled activations, as the reference checkpoint's calibration did)."""
    _CALIBRATING.append(True)
    try:
        with torch.no_grad():
            resnet_c3_c5(sd, x)
    finally:
        _CALIBRATING.clear()


def detect(sd, raw, height, width, conf_thresh=0.05, nms_thresh=0.5, top_k=200, max_num=100):
    """The original test-mode detection and postprocess, steps 1-7 of the reference README.

    Returns classes (0-based), scores, boxes (int pixels), masks (bool, height x width) and, with a
    maskiou_net in ``sd``, mask_scores."""
    from torchvision.ops import box_iou

    conf = raw["conf"][0, :, 1:]
    keep = conf.max(dim=1).values > conf_thresh
    scores, loc, coeffs = conf[keep].t(), raw["loc"][0, keep], raw["mask"][0, keep]
    pr = raw["priors"][keep]
    cxcy = pr[:, :2] + loc[:, :2] * 0.1 * pr[:, 2:]
    wh = pr[:, 2:] * torch.exp(loc[:, 2:] * 0.2)
    boxes = torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1)
    dets = []
    for c in range(scores.shape[0] if scores.shape[1] else 0):
        s, order = scores[c].sort(descending=True)
        s, order = s[:top_k], order[:top_k]
        iou = box_iou(boxes[order], boxes[order]).triu(diagonal=1)
        kept = iou.max(dim=0).values <= nms_thresh
        dets += [(float(v), int(i), c) for v, i in zip(s[kept], order[kept])]
    dets = sorted(dets, key=lambda d: -d[0])[:max_num]
    out_scores = torch.tensor([d[0] for d in dets])
    idx = torch.tensor([d[1] for d in dets], dtype=torch.long)
    classes = torch.tensor([d[2] for d in dets], dtype=torch.long)
    b = boxes[idx]
    proto = raw["proto"][0]
    masks = torch.sigmoid(proto @ coeffs[idx].t())  # (h, w, D)
    gh, gw = masks.shape[:2]
    x0 = (torch.min(b[:, 0], b[:, 2]) * gw - 1).clamp(min=0)
    x1 = (torch.max(b[:, 0], b[:, 2]) * gw + 1).clamp(max=gw)
    y0 = (torch.min(b[:, 1], b[:, 3]) * gh - 1).clamp(min=0)
    y1 = (torch.max(b[:, 1], b[:, 3]) * gh + 1).clamp(max=gh)
    cols = torch.arange(gw)[None, :, None].float()
    rows = torch.arange(gh)[:, None, None].float()
    crop = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
    masks = (masks * crop.float()).permute(2, 0, 1)
    result = {"classes": classes, "scores": out_scores}
    if "maskiou_net.maskiou_net.0.weight" in sd:
        iou = maskiou(sd, masks[:, None]).gather(1, classes[:, None]).squeeze(1)
        result["mask_scores"] = out_scores * iou
    up = F.interpolate(masks[None], (height, width), mode="bilinear", align_corners=False)[0]
    result["masks"] = up > 0.5
    bx = torch.stack([torch.min(b[:, 0], b[:, 2]) * width, torch.min(b[:, 1], b[:, 3]) * height,
                      torch.max(b[:, 0], b[:, 2]) * width, torch.max(b[:, 1], b[:, 3]) * height], 1)
    bx = torch.min(bx.clamp(min=0), torch.tensor([width, height, width, height]).float())
    result["boxes"] = bx.long()
    return result


def original_v1_layout(depth=50, num_classes=80, num_prototypes=32, aspect_ratios=3):
    """Key -> (shape, dtype) of an original YOLACT v1 ResNet checkpoint (yolact_resnet50_config /
    yolact_base_config), from the original architecture: torchvision-style bottleneck ResNet
    (``backbone.layers.{stage}.{block}``), FPN with 3 lateral, 3 prediction and 2 downsample convs,
    proto_net (4 3x3 convs, upsample, 3x3, 1x1 to k), one shared prediction layer with A priors
    per location, semantic segmentation conv. Lets a fresh clone (no ../shared, hence no
    original_checkpoint_layout.tsv) build an original-layout checkpoint; tests compare it with the
    TSV where that is present."""
    blocks = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    f32, i64 = torch.float32, torch.int64
    layout = {}

    def conv(p, out_c, in_c, k, bias=False):
        layout[p + ".weight"] = ((out_c, in_c, k, k), f32)
        if bias:
            layout[p + ".bias"] = ((out_c,), f32)

    def bn(p, c):
        for name in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{p}.{name}"] = ((c,), f32)
        layout[p + ".num_batches_tracked"] = ((), i64)

    conv("backbone.conv1", 64, 3, 7)
    bn("backbone.bn1", 64)
    in_c = 64
    for stage, n in enumerate(blocks):
        width = 64 * 2 ** stage
        for b in range(n):
            p = f"backbone.layers.{stage}.{b}"
            conv(p + ".conv1", width, in_c, 1)
            bn(p + ".bn1", width)
            conv(p + ".conv2", width, width, 3)
            bn(p + ".bn2", width)
            conv(p + ".conv3", 4 * width, width, 1)
            bn(p + ".bn3", 4 * width)
            if b == 0:
                conv(p + ".downsample.0", 4 * width, in_c, 1)
                bn(p + ".downsample.1", 4 * width)
            in_c = 4 * width
    for i in (0, 2, 4, 8):
        conv(f"proto_net.{i}", 256, 256, 3, bias=True)
    conv("proto_net.10", num_prototypes, 256, 1, bias=True)
    for i, c in enumerate((2048, 1024, 512)):
        conv(f"fpn.lat_layers.{i}", 256, c, 1, bias=True)
    for i in range(3):
        conv(f"fpn.pred_layers.{i}", 256, 256, 3, bias=True)
    for i in range(2):
        conv(f"fpn.downsample_layers.{i}", 256, 256, 3, bias=True)
    p = "prediction_layers.0"
    conv(p + ".upfeature.0", 256, 256, 3, bias=True)
    conv(p + ".bbox_layer", 4 * aspect_ratios, 256, 3, bias=True)
    conv(p + ".conf_layer", (num_classes + 1) * aspect_ratios, 256, 3, bias=True)
    conv(p + ".mask_layer", num_prototypes * aspect_ratios, 256, 3, bias=True)
    conv("semantic_seg_conv", num_classes, 256, 1, bias=True)
    return layout
