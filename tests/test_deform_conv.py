"""The CPU path of YOLACT++'s modulated deformable conv (yolact_d2/deform_conv.py) against torchvision.

torchvision's ``deform_conv2d`` is the reference throughout: values (offsets large enough to sample
outside the map, stride 1 and 2, channels-last and contiguous inputs, batch 2, the chunked no-grad
path), float64 gradients of every argument, the weight cache after an in-place update, the choice
of torchvision's op on other devices and under tracing / ONNX export, and one YOLACT++ training
step's gradients with either implementation.
"""
import pytest
import torch
import torchvision

from conftest import yolact_cfg
from yolact_d2 import deform_conv as dc
from yolact_d2.backbone import ModulatedDeformConv
from yolact_d2.deform_conv import ColumnWeightCache, deform_conv2d, uses_cpu_path

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _args(stride, channels_last=False, dtype=torch.float32, n=2, c=6, h=11, w=9, cout=5, offset_std=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1  # 3x3, padding 1
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    offset = offset_std * torch.randn(n, 18, ho, wo, generator=g, dtype=dtype)
    mask = torch.rand(n, 9, ho, wo, generator=g, dtype=dtype)
    weight = torch.randn(cout, c, 3, 3, generator=g, dtype=dtype)
    bias = torch.randn(cout, generator=g, dtype=dtype)
    if channels_last:
        x, offset, mask = (t.contiguous(memory_format=torch.channels_last) for t in (x, offset, mask))
    return x, offset, weight, bias, mask


def _outside_share(offset, h, w, stride):
    """Share of sampling points whose bilinear footprint leaves the map (some corner outside)."""
    n, _, ho, wo = offset.shape
    ys = (torch.arange(ho) * stride - 1).view(ho, 1, 1) + torch.arange(3).repeat_interleave(3)
    xs = (torch.arange(wo) * stride - 1).view(1, wo, 1) + torch.arange(3).repeat(3)
    py = ys.permute(2, 0, 1) + offset[:, 0::2]
    px = xs.permute(2, 0, 1) + offset[:, 1::2]
    return ((py < 0) | (py > h - 1) | (px < 0) | (px > w - 1)).float().mean().item()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "chunked"])
def test_values_equal_torchvision(stride, channels_last, mode, monkeypatch):
    """Random offsets of ~3 px (about half the samples leave the 11x9 map), integer offsets (corners
    exactly on the grid) and the sigmoid-free mask: torchvision's numbers to float rounding, in
    the input's memory format. "chunked": the no-grad path in chunks of 2 positions."""
    x, offset, weight, bias, mask = _args(stride, channels_last)
    assert 0.3 < _outside_share(offset, 11, 9, stride) < 0.9
    integer = offset.round()
    if mode == "chunked":
        monkeypatch.setattr(dc, "_GRAIN_SIZE", 4 * 9 * 2)
    for off in (offset, integer):
        ref = torchvision.ops.deform_conv2d(x, off, weight, bias, stride=stride, padding=1, mask=mask)
        with torch.set_grad_enabled(mode == "grad"):
            ours = deform_conv2d(x, off, weight, bias, stride=stride, padding=1, mask=mask,
                                 weight_cache=None if mode == "grad" else ColumnWeightCache())
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()
        assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # No mask (DCNv1) too.
    ref = torchvision.ops.deform_conv2d(x, offset, weight, bias, stride=stride, padding=1)
    assert torch.allclose(deform_conv2d(x, offset, weight, bias, stride=stride, padding=1), ref, atol=1e-5, rtol=1e-5)


def test_far_away_and_zero_offsets():
    """Points far outside the map sample zeros (only the bias is left); zero offsets with a unit
    mask are the plain 3x3 conv."""
    x, offset, weight, bias, mask = _args(2)
    far = torch.full_like(offset, 1e6)
    far[:, ::2] = -1e6
    out = deform_conv2d(x, far, weight, bias, stride=2, padding=1, mask=mask)
    assert torch.allclose(out, bias.view(1, -1, 1, 1).expand_as(out))
    plain = torch.nn.functional.conv2d(x, weight, bias, stride=2, padding=1)
    out = deform_conv2d(x, torch.zeros_like(offset), weight, bias, stride=2, padding=1, mask=torch.ones_like(mask))
    assert torch.allclose(out, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), 1, 2, 2), ((1, 1), 1, 0, 1), ((3, 2), (2, 1), (1, 0), 1), ((5, 5), 2, 2, 1)])
def test_other_conv_arithmetic_equals_torchvision(kernel, stride, padding, dilation):
    """Dilation, 1x1 and rectangular kernels, per-axis stride and padding, no bias: torchvision's
    numbers, with and without autograd."""
    kh, kw = kernel
    (sh, sw), (ph, pw) = ((s, s) if isinstance(s, int) else s for s in (stride, padding))
    ho, wo = (10 + 2 * ph - dilation * (kh - 1) - 1) // sh + 1, (9 + 2 * pw - dilation * (kw - 1) - 1) // sw + 1
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 10, 9, generator=g)
    offset = 2 * torch.randn(2, 2 * kh * kw, ho, wo, generator=g)
    mask = torch.rand(2, kh * kw, ho, wo, generator=g)
    weight = torch.randn(3, 4, kh, kw, generator=g)
    ref = torchvision.ops.deform_conv2d(x, offset, weight, None, stride=stride, padding=padding, dilation=dilation,
                                        mask=mask)
    with torch.no_grad():
        ours = deform_conv2d(x, offset, weight, None, stride, padding, dilation, mask, weight_cache=ColumnWeightCache())
    ours_grad = deform_conv2d(x, offset.requires_grad_(), weight, None, stride, padding, dilation, mask)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5) and torch.allclose(ours_grad, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float64_gradients_equal_torchvision(stride, channels_last):
    """Gradients with respect to input, offset, mask, weight and bias equal torchvision's backward."""
    args = _args(stride, channels_last, torch.float64)
    ref_args = [t.clone().requires_grad_() for t in args]
    our_args = [t.clone().requires_grad_() for t in args]
    ref = torchvision.ops.deform_conv2d(*ref_args[:4], stride=stride, padding=1, mask=ref_args[4])
    ours = deform_conv2d(*our_args[:4], stride=stride, padding=1, mask=our_args[4])
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, ref_args, grad_out)
    our_grads = torch.autograd.grad(ours, our_args, grad_out)
    for name, a, b in zip(("input", "offset", "weight", "bias", "mask"), our_grads, ref_grads):
        assert b.abs().max() > 0, name
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-12), (name, (a - b).abs().max())


def test_gradcheck_float64():
    """Finite differences agree with the autograd gradients (offsets away from integer points)."""
    x, offset, weight, bias, mask = _args(2, n=1, c=2, h=5, w=4, cout=2, offset_std=1.5)
    args = tuple(t.requires_grad_() for t in (x.double(), offset.double(), weight.double(), bias.double(),
                                              mask.double()))
    assert torch.autograd.gradcheck(
        lambda a, o, w, b, m: deform_conv2d(a, o, w, b, stride=2, padding=1, mask=m), args, eps=1e-6, atol=1e-6)


def test_weight_cache_follows_in_place_updates():
    """The cached re-laid-out weight is rebuilt after an optimizer step (in place, same tensor) and
    after load_state_dict, so inference after training uses the new weight."""
    torch.manual_seed(0)
    conv = ModulatedDeformConv(6, 5, stride=1)
    torch.nn.init.normal_(conv.conv_offset_mask.weight, std=0.3)
    x = torch.randn(2, 6, 9, 9)

    def reference():
        with torch.no_grad():
            o1, o2, m = torch.chunk(conv.conv_offset_mask(x), 3, dim=1)
            return torchvision.ops.deform_conv2d(x, torch.cat((o1, o2), 1), conv.weight, conv.bias, padding=1,
                                                 mask=torch.sigmoid(m))

    with torch.inference_mode():
        before = conv(x)
    assert torch.allclose(before, reference(), atol=1e-5)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv(x).square().sum().backward()  # training call: no cache, gradients through the new path
    optimizer.step()
    with torch.inference_mode():
        after = conv(x)
    assert not torch.allclose(before, after, atol=1e-3)  # the step changed the output ...
    assert torch.allclose(after, reference(), atol=1e-4)  # ... and the cache followed
    conv.load_state_dict({k: v * 0.5 if k == "weight" else v for k, v in conv.state_dict().items()})
    with torch.no_grad():
        assert torch.allclose(conv(x), reference(), atol=1e-4)


def test_implementation_choice(monkeypatch):
    """CPU tensors take the new path under "auto"; "torchvision", another device (a meta tensor
    stands in for CUDA here), tracing and ONNX export take torchvision's op, which the exporters
    know (ONNX DeformConv through yolact_d2.export's symbolic)."""
    x, offset, weight, bias, mask = _args(1, n=1)
    assert uses_cpu_path(x, offset, weight, "auto") and not uses_cpu_path(x, offset, weight, "torchvision")
    meta = [t.to("meta") for t in (x, offset, weight)]
    assert not uses_cpu_path(*meta, "auto")
    calls = []
    real = torchvision.ops.deform_conv2d
    monkeypatch.setattr(torchvision.ops, "deform_conv2d", lambda *a, **k: calls.append(a[0].device) or real(*a, **k))
    deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    assert calls == []
    deform_conv2d(x, offset, weight, bias, padding=1, mask=mask, impl="torchvision")
    deform_conv2d(*meta, bias.to("meta"), padding=1, mask=mask.to("meta"))
    assert [d.type for d in calls] == ["cpu", "meta"]
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert not uses_cpu_path(x, offset, weight, "auto")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="one of"):
        uses_cpu_path(x, offset, weight, "fast")

    class Layer(torch.nn.Module):
        def forward(self, a, o, m):
            return deform_conv2d(a, o, weight, bias, padding=1, mask=m)

    graph = str(torch.jit.trace(Layer(), (x, offset, mask)).graph)
    assert "torchvision::deform_conv2d" in graph and "embedding_bag" not in graph


def test_config_key_picks_the_implementation():
    """MODEL.YOLACT.DEFORM_CONV_IMPL reaches every deformable block; an unknown value is one line."""
    from detectron2.layers import ShapeSpec

    from yolact_d2.backbone import build_yolact_resnet
    from yolact_d2.errors import ConfigError

    config = "configs/pennfudan/yolact_plus_R_50_FPN_320.yaml"
    for impl in ("auto", "torchvision"):
        resnet = build_yolact_resnet(yolact_cfg(config, ["MODEL.YOLACT.DEFORM_CONV_IMPL", impl]), ShapeSpec(channels=3))
        impls = {m.impl for m in resnet.modules() if isinstance(m, ModulatedDeformConv)}
        assert impls == {impl}
    with pytest.raises(ConfigError, match="DEFORM_CONV_IMPL must be one of auto, torchvision") as e:
        build_yolact_resnet(yolact_cfg(config, ["MODEL.YOLACT.DEFORM_CONV_IMPL", "fast"]), ShapeSpec(channels=3))
    assert "\n" not in str(e.value)


@CUDA
def test_cuda_tensors_use_torchvision_and_match_the_cpu_path():
    x, offset, weight, bias, mask = _args(2)
    assert not uses_cpu_path(x.cuda(), offset.cuda(), weight.cuda())
    gpu = deform_conv2d(*(t.cuda() for t in (x, offset, weight, bias)), stride=2, padding=1, mask=mask.cuda())
    cpu = deform_conv2d(x, offset, weight, bias, stride=2, padding=1, mask=mask)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_yolact_plus_training_step_gradients_match_torchvision():
    """One YOLACT++ R-50 training step (quarter widths, random weights, offsets of about a pixel, float64, 96 px, two
    synthetic images; mask re-scoring off, it needs 256 px): losses and every parameter's gradient
    equal those with torchvision's op."""
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances

    cfg = yolact_cfg("configs/pennfudan/yolact_plus_R_50_FPN_320.yaml",
                     ["MODEL.WEIGHTS", "", "MODEL.YOLACT.INPUT_SIZE", "96", "MODEL.YOLACT.FIT_PRIORS", "False",
                      "MODEL.YOLACT.DIAGNOSTICS.ENABLED", "False",
                      # its five unpadded stride-2 convs need a prototype grid of 63+ (256 px input)
                      "MODEL.YOLACT.MASK_RESCORING.ENABLED", "False",
                      # a quarter of R-50's widths (13 deformable blocks as R-50's): float64 in seconds
                      "MODEL.RESNETS.WIDTH_PER_GROUP", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                      "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.FPN.OUT_CHANNELS", "64"])
    torch.manual_seed(0)
    model = build_model(cfg).train().double()  # float32 rounding grows ~30x per stage in this random net
    deform = [m for m in model.modules() if isinstance(m, ModulatedDeformConv)]
    assert len(deform) == 13
    for m in deform:
        torch.nn.init.normal_(m.conv_offset_mask.weight, std=0.02)
    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(2):
        masks = torch.zeros(2, 96, 96, dtype=torch.bool)
        masks[0, 10:60, 20:50] = True
        masks[1, 40:90, 50:90] = True
        inst = Instances((96, 96), gt_boxes=Boxes(torch.tensor([[20.0, 10, 50, 60], [50, 40, 90, 90]])),
                         gt_classes=torch.tensor([0, 0]), gt_masks=BitMasks(masks))
        inputs.append({"image": torch.randint(0, 256, (3, 96, 96), generator=g, dtype=torch.uint8),
                       "instances": inst, "height": 96, "width": 96})
    results = {}
    for impl in ("torchvision", "auto"):
        for m in deform:
            m.impl = impl
        model.zero_grad()
        torch.manual_seed(1)
        losses = model(inputs)
        sum(losses.values()).backward()
        results[len(results)] = ({k: v.detach() for k, v in losses.items()},
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref_losses, ref_grads), (our_losses, our_grads) = results[0], results[1]
    assert ref_losses.keys() == our_losses.keys()
    for k in ref_losses:
        assert torch.allclose(our_losses[k], ref_losses[k], rtol=1e-10, atol=1e-12), k
    assert ref_grads.keys() == our_grads.keys()
    offset_grads = [n for n in ref_grads if "conv_offset_mask" in n]
    assert len(offset_grads) == 26 and all(ref_grads[n].abs().max() > 0 for n in offset_grads)
    for n in ref_grads:
        if n.endswith("conv2.bias") and n.replace("bias", "conv_offset_mask.bias") in ref_grads:
            # A deformable conv's own bias feeds a training-mode BatchNorm: its true gradient is 0,
            # and both implementations give rounding noise (below 1e-11 here).
            assert ref_grads[n].abs().max() < 1e-10 and our_grads[n].abs().max() < 1e-10, n
            continue
        assert torch.allclose(our_grads[n], ref_grads[n], rtol=1e-8, atol=1e-9 * ref_grads[n].abs().max()), n
