#!/usr/bin/env python
r"""YOLACT demo in detectron2's demo style: draw instance masks on images, a video or a webcam.

    python demo/demo.py --input photos/*.jpg --output out/ \
        --opts MODEL.WEIGHTS yolact_resnet50_54_800000.pth MODEL.DEVICE cpu

Bad input (missing, empty or corrupt image, unreadable video, unknown config key, missing config
or weights file, a checkpoint of another model) ends with one line "error: ..." on stderr and exit
status 2, before any image is processed. Logs and library warnings go to stdout.

Checks that need only PIL and OpenCV (files, images, video) run before torch, detectron2 and the
model are imported (~5 s), so such mistakes are reported at once.
"""
import argparse
import glob
import logging
import os
import sys
import time

# torch's and the dependencies' own import-time noise is filtered by yolact_d2.console, which the
# package imports first (the demo imports nothing of detectron2 before it).
# Before torch / detectron2 are imported: send their import-time warnings to stdout, so that stderr
# carries nothing but this demo's own error line; and keep OpenCV / FFmpeg from printing there.
logging.captureWarnings(True)
_warnings_logger = logging.getLogger("py.warnings")
_warnings_logger.addHandler(logging.StreamHandler(sys.stdout))
_warnings_logger.propagate = False
os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET

import cv2  # noqa: E402
from PIL import Image  # noqa: E402

WINDOW_NAME = "YOLACT detections"
DEFAULT_CONFIG = "configs/yolact_R_50_FPN_550.yaml"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_BAD_INPUT = 2


class DemoError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE",
                        help="path to config file (default: %(default)s, found from any directory)")
    parser.add_argument("--webcam", action="store_true", help="take frames from webcam 0")
    parser.add_argument("--video-input", help="path to a video file")
    parser.add_argument(
        "--input", nargs="+",
        help="image files or glob patterns, e.g. 'dir/*.jpg'; all are checked before any is processed",
    )
    parser.add_argument(
        "--output",
        help="file or directory to save drawn images or video to (a directory with several inputs); "
        "without it, results are shown in a window",
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.3,
        help="minimum score in [0, 1] for an instance to be drawn",
    )
    parser.add_argument(
        "--device", help="run on this device (sets MODEL.DEVICE), e.g. cpu or cuda; an error when it is absent. "
        "Without it a CUDA MODEL.DEVICE falls back to the CPU with a warning on a machine without a GPU",
    )
    parser.add_argument(
        "--exported", "--onnx", metavar="FILE",
        help="run an exported end-to-end graph (tools/export_model.py: .onnx via onnxruntime, "
        "FILE.onnx@openvino via OpenVINO in float32, FILE.onnx@openvino:bf16 in bfloat16, .ts via TorchScript) instead of building the config's model; "
        "class names come from the file",
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth MODEL.DEVICE cpu",
    )
    return parser


def _line(text) -> str:
    """``text`` folded onto one line (error messages must be exactly one line)."""
    return " ".join(str(text).split())


def config_path(args) -> str:
    """``--config-file``, the default one found from any directory. Raises DemoError when missing."""
    path = args.config_file
    if not os.path.isfile(path) and path == DEFAULT_CONFIG:
        path = os.path.join(REPO_ROOT, DEFAULT_CONFIG)
    if not os.path.isfile(path):
        raise DemoError(f"config file {args.config_file} not found; pass --config-file configs/<name>.yaml")
    return path


def setup_cfg(path, opts, device=None):
    """Config from :func:`yolact_d2.config.load_config` (``path`` and ``opts``) and ``device``
    (``--device``); the device resolved by :func:`yolact_d2.device.resolve_device`.

    Raises:
        DemoError: invalid config file, unknown key, bad --opts value, ``--device cuda`` without a
            GPU, missing weights.
    """
    from yolact_d2.config import load_config
    from yolact_d2.errors import YolactUserError

    try:
        cfg = load_config(path, opts)
    except YolactUserError as e:  # unknown key, bad value, invalid YAML, odd --opts
        raise DemoError(_line(e)) from None
    # A config saved by train_net.py for a COCO-JSON dataset: register it again for its class names;
    # a bad MODEL.YOLACT.CLASS_NAMES count stops here, before the model loads.
    from yolact_d2.data.custom import apply_coco_json_datasets
    from yolact_d2.device import resolve_device
    from yolact_d2.predictor import check_class_names

    try:
        apply_coco_json_datasets(cfg)
        check_class_names(cfg)  # the names themselves are resolved once, after the weights are read
        cfg.MODEL.DEVICE = resolve_device(device or cfg.MODEL.DEVICE, explicit=device is not None)
    except YolactUserError as e:
        raise DemoError(_line(e)) from None
    from yolact_d2.checkpointer import trained_weights

    # Empty MODEL.WEIGHTS (a train_net.py run's config.yaml): that run's model_best.pth or model_final.pth.
    weights = cfg.MODEL.WEIGHTS = trained_weights(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR)
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise DemoError(
            f"MODEL.WEIGHTS file {weights} not found; pass --opts MODEL.WEIGHTS /path/to/yolact_checkpoint.pth"
        )
    cfg.freeze()
    return cfg


def expand_inputs(patterns):
    """Image paths from file names and glob patterns, each checked to decode as an image.

    Raises:
        DemoError: a pattern matching nothing, or a missing, empty or undecodable file (named).
    """
    paths = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DemoError(f"--input pattern {pattern} matches no file")
            paths.extend(m for m in matches if not os.path.isdir(m))
        else:
            paths.append(pattern)
    for path in paths:
        if not os.path.exists(path):
            raise DemoError(f"input image {path} not found")
        if os.path.isdir(path):
            raise DemoError(f"input {path} is a directory; pass a glob such as '{os.path.join(path, '*.jpg')}'")
        if os.path.getsize(path) == 0:
            raise DemoError(f"input image {path} is empty (0 bytes); remove it from --input")
        try:
            with Image.open(path) as image:
                image.load()  # a full decode: truncated files fail only here
        except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
            raise DemoError(
                f"input image {path} cannot be decoded ({type(e).__name__}: {_line(e)[:120]}); "
                "replace it or remove it from --input"
            ) from None
    return paths


def _is_dir_like(output: str) -> bool:
    return os.path.isdir(output) or output.endswith(("/", os.sep)) or not os.path.splitext(output)[1]


def output_paths(inputs, output):
    """Where each drawn input image goes (None: shown in a window).

    ``output`` is a directory when it exists as one, ends with a separator, has no extension, or
    several inputs are given; each file keeps its input's name (``.png`` when OpenCV cannot write
    that type).

    Raises:
        DemoError: a file name OpenCV cannot write, or two inputs that would share an output.
    """
    if output is None:
        return [None] * len(inputs)
    as_dir = _is_dir_like(output) or len(inputs) > 1
    if not as_dir:
        if not cv2.haveImageWriter(output):
            raise DemoError(f"--output {output}: cannot write that image type; use a .png or .jpg name or a directory")
        return [output]
    if os.path.exists(output) and not os.path.isdir(output):
        raise DemoError(f"--output {output} is a file; pass a directory when giving several inputs")
    outs, seen = [], {}
    for path in inputs:
        name = os.path.basename(path)
        if not cv2.haveImageWriter(name):
            name = os.path.splitext(name)[0] + ".png"
        out = os.path.join(output, name)
        if out in seen:
            raise DemoError(f"inputs {seen[out]} and {path} would both be written to {out}; rename one")
        seen[out] = path
        outs.append(out)
    return outs


def open_video(source, label):
    """An opened ``cv2.VideoCapture`` and its first frame. Raises DemoError when unreadable."""
    if isinstance(source, str):
        if not os.path.isfile(source):
            raise DemoError(f"video {source} not found")
        if os.path.getsize(source) == 0:
            raise DemoError(f"video {source} is empty (0 bytes)")
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        why = "not a video OpenCV can decode" if isinstance(source, str) else "no such camera, or it is busy"
        raise DemoError(f"cannot open {label} ({why})")
    ok, frame = cap.read()
    if not ok or frame is None:
        cap.release()
        raise DemoError(f"cannot read a frame from {label} (corrupt or empty video)")
    return cap, frame


def video_writer_path(output, video_input):
    if _is_dir_like(output):
        stem = os.path.splitext(os.path.basename(video_input))[0] if video_input else "webcam"
        return os.path.join(output, stem + ".mp4")
    return output


def open_window():
    try:
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
    except cv2.error:
        raise DemoError("cannot open a window (no display, or headless OpenCV); pass --output") from None


def run_images(demo, inputs, outputs, logger):
    from detectron2.data.detection_utils import read_image

    for path, out in zip(inputs, outputs):
        image = read_image(path, format="BGR")
        start = time.time()
        instances, drawn = demo.run_on_image(image)
        logger.info(f"{path}: {len(instances)} instances in {time.time() - start:.2f} s")
        if out is None:
            cv2.imshow(WINDOW_NAME, drawn.get_image()[:, :, ::-1])
            if cv2.waitKey(0) == 27:
                break  # esc to quit
        elif not cv2.imwrite(out, drawn.get_image()[:, :, ::-1]):
            raise DemoError(f"cannot write {out}; check that its directory is writable")


def run_video(demo, cap, first_frame, out_path, logger):
    def frames():
        yield first_frame
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield frame

    writer = None
    if out_path is not None:
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = fps if fps and fps > 0 else 30.0  # webcams often report 0
        fourcc = cv2.VideoWriter_fourcc(*("MJPG" if out_path.lower().endswith(".avi") else "mp4v"))
        height, width = first_frame.shape[:2]
        writer = cv2.VideoWriter(out_path, fourcc, fps, (width, height), True)
        if not writer.isOpened():
            cap.release()
            raise DemoError(f"cannot write video {out_path}; use a .mp4 or .avi file name")
    count = 0
    try:
        for _, drawn in demo.run_on_video(frames()):
            count += 1
            if writer is not None:
                writer.write(drawn)
            else:
                cv2.imshow(WINDOW_NAME, drawn)
                if cv2.waitKey(1) == 27:
                    break  # esc to quit
    except KeyboardInterrupt:
        pass  # stop early but still close the file, so that what was written stays playable
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    logger.info(f"{count} frames processed" + (f", written to {out_path}" if out_path else ""))


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    sources = sum([bool(args.input), bool(args.video_input), args.webcam])
    if sources != 1:
        raise DemoError("give exactly one of --input, --video-input or --webcam")
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise DemoError(f"--confidence-threshold {args.confidence_threshold} is outside [0, 1]")
    cfg_path = config_path(args) if not args.exported else None

    # Every input is checked before the slow imports and model build, so a bad file fails fast.
    cap = first_frame = None
    if args.input:
        inputs = expand_inputs(args.input)
        outputs = output_paths(inputs, args.output)
    elif args.video_input:
        cap, first_frame = open_video(args.video_input, f"video {args.video_input}")
    else:
        cap, first_frame = open_video(0, "webcam 0")
    if args.output is None:
        open_window()

    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger(name="yolact_d2")
    logger = setup_logger()
    logger.info("Arguments: " + str(args))
    cfg = setup_cfg(cfg_path, args.opts, args.device) if not args.exported else None

    from predictor import VisualizationDemo  # demo/predictor.py, next to this file
    from yolact_d2.checkpoint import CheckpointLayoutError
    from yolact_d2.errors import ConfigError, YolactUserError

    # The user's mistakes are one line; any other error is a bug and keeps its traceback.
    try:
        if args.exported:
            demo = VisualizationDemo.from_exported(args.exported, confidence_threshold=args.confidence_threshold)
            logger.info(f"exported graph {demo.predictor.path} in {demo.predictor.runtime} ({demo.predictor.precision})")
        else:
            demo = VisualizationDemo(cfg, confidence_threshold=args.confidence_threshold)
    except CheckpointLayoutError as e:
        raise DemoError(f"MODEL.WEIGHTS {_line(e)}") from None
    except ConfigError as e:  # a config value the model rejects (e.g. NMS_TYPE)
        raise DemoError(f"invalid config: {_line(e)}") from None
    except YolactUserError as e:
        raise DemoError(_line(e)) from None

    if args.input:
        for out in outputs:
            if out is not None and os.path.dirname(out):
                os.makedirs(os.path.dirname(out), exist_ok=True)
        run_images(demo, inputs, outputs, logger)
    else:
        out_path = None
        if args.output is not None:
            out_path = video_writer_path(args.output, args.video_input)
            if os.path.dirname(out_path):
                os.makedirs(os.path.dirname(out_path), exist_ok=True)
        run_video(demo, cap, first_frame, out_path, logger)
    if args.output is None:
        cv2.destroyAllWindows()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DemoError as e:
        print(f"error: {_line(e)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
