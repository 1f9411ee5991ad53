"""Config options of yolact-d2, added to a detectron2 ``CfgNode`` by :func:`add_yolact_config`.

Every option the plugin reads lives here, with the original implementation's value as default
(``yolact_resnet50_config`` of the authors' code unless a comment says otherwise).
"""
import logging

from detectron2.config import CfgNode as CN
from detectron2.utils.logger import log_first_n


def add_yolact_config(cfg):
    """Add the ``MODEL.YOLACT`` and ``INPUT.SSD`` nodes (and a few related keys, e.g. the
    ``DATASETS.*_JSON`` / ``*_IMAGES`` of a user's COCO-format data) to ``cfg`` in place.

    Call it once, before ``merge_from_file``; a YAML key that is not defined here or by detectron2
    makes ``merge_from_file`` raise ``KeyError`` ("Non-existent config key").
    """
    _C = cfg
    _C.MODEL.YOLACT = CN()
    # Number of foreground classes C. Class scores have C + 1 entries, background last.
    _C.MODEL.YOLACT.NUM_CLASSES = 80
    # Side of the square network input in pixels. Test images are resized to it inside the model
    # (bilinear, aspect not kept), so INPUT.MIN_SIZE_TEST is 0 in the configs.
    _C.MODEL.YOLACT.INPUT_SIZE = 550
    # FPN levels fed to the prediction head (P3-P7) and the one the protonet reads.
    _C.MODEL.YOLACT.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    _C.MODEL.YOLACT.PROTONET_IN_FEATURE = "p3"
    # Run convolutions in NHWC (channels-last) memory format: same numbers (to float rounding),
    # measured 14% faster for the R-50 network on this project's CPU; also what tensor cores want.
    _C.MODEL.YOLACT.CHANNELS_LAST = True
    # torch.compile mode for the network (backbone, head, protonet) at inference, e.g.
    # "reduce-overhead" (CUDA graphs: removes the kernel-launch overhead that bounds batch-1 GPU
    # latency) or "default"; "" runs eagerly. Compiles on the first call (tens of seconds).
    _C.MODEL.YOLACT.COMPILE = ""
    # Class names to draw and report, NUM_CLASSES of them, when no dataset of the config gives
    # them (demo, YolactPredictor); empty: the test dataset's names, else COCO's (with a warning
    # when NUM_CLASSES is not 80).
    _C.MODEL.YOLACT.CLASS_NAMES = []
    # k, the number of prototype masks (paper Sec. 3.1).
    _C.MODEL.YOLACT.NUM_PROTOTYPES = 32

    # Normalisation and activations of the YOLACT-specific layers. The published models have no
    # norm outside the ResNet; MODEL.FPN.NORM (detectron2's key, default "") adds one to the FPN's
    # lateral and output convs. A norm changes the parameters, so original checkpoints are refused.
    # Norm of the prediction head's shared 3x3 conv: "" or "GN". The head runs on every level, so a
    # BatchNorm there would mix the levels' statistics; only GroupNorm is allowed.
    _C.MODEL.YOLACT.HEAD_NORM = ""
    # Norm of the protonet's 3x3 convs (not its final 1x1): "" or any detectron2 get_norm name.
    _C.MODEL.YOLACT.PROTONET_NORM = ""
    # ReLU after the FPN's P3-P5 output convs (original fpn.relu_pred_layers). From scratch without
    # a norm these ReLUs die and P3-P7 become constant (docs/small_data_recipe.md).
    _C.MODEL.YOLACT.FPN_OUTPUT_RELU = True
    # Activation of the prototypes (original mask_proto_prototype_activation): "relu" or "none".
    _C.MODEL.YOLACT.PROTOTYPE_ACTIVATION = "relu"

    # Priors (anchors). One list of scales (pixels at INPUT_SIZE) per level; YOLACT++ uses three.
    _C.MODEL.YOLACT.ANCHOR_SCALES = [[24], [48], [96], [192], [384]]
    # Aspect ratios a = width / height, the same on every level: w = s*sqrt(a), h = s/sqrt(a).
    _C.MODEL.YOLACT.ANCHOR_ASPECT_RATIOS = [1.0, 0.5, 2.0]
    # YOLACT v1 kept a bug of the original code: height = width for every ratio ("square
    # anchors"). Needed to reproduce released v1 checkpoints; YOLACT++ sets it False.
    _C.MODEL.YOLACT.SQUARE_ANCHORS = True
    # Fit ANCHOR_SCALES (per level) and ANCHOR_ASPECT_RATIOS (shared) to the training boxes at the
    # start of training (yolact_d2/prior_fit.py; tools/fit_priors.py prints them instead), keeping
    # their count. The saved config.yaml holds the fitted values with FIT_PRIORS False; --resume
    # keeps them; checkpoints store the priors too (checkpoint.adopt_priors). Off: the configured
    # priors, as the paper; configs/Base-YOLACT-SmallData.yaml turns it on (issue 27).
    _C.MODEL.YOLACT.FIT_PRIORS = False
    # Steps of the fit's evolutionary search after its k-means start (0: k-means + coordinate search).
    _C.MODEL.YOLACT.FIT_PRIORS_ITERATIONS = 300
    # Centre-size box coding variances (0.1, 0.2), as detectron2 Box2BoxTransform weights.
    _C.MODEL.YOLACT.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

    # Inference (original Detect + postprocess).
    # Priors whose best foreground score is not above this are dropped before NMS.
    _C.MODEL.YOLACT.SCORE_THRESH_TEST = 0.05
    # "fast" (the paper's Fast NMS), "cluster" (Cluster-Fast NMS, YOLACT++ repo) or
    # "standard" (torchvision batched_nms).
    _C.MODEL.YOLACT.NMS_TYPE = "fast"
    # Suppress every class together (class-agnostic) instead of per class.
    _C.MODEL.YOLACT.NMS_CLASS_AGNOSTIC = False
    _C.MODEL.YOLACT.NMS_THRESH_TEST = 0.5
    # Candidates per class considered by NMS, highest scores first.
    _C.MODEL.YOLACT.NMS_TOP_K = 200
    # Detections kept per image after NMS, over all classes: detectron2's TEST.DETECTIONS_PER_IMAGE
    # (100, the original's max_num_detections). This old key is a deprecated alias: -1 = unset; a
    # value >= 0 (older saved config.yaml files) still wins, with one warning.
    _C.MODEL.YOLACT.DETECTIONS_PER_IMAGE = -1
    # Assembled masks are binarised at this probability after upsampling.
    _C.MODEL.YOLACT.MASK_THRESHOLD = 0.5

    # Training targets and losses (paper Sec. 3 and the original MultiBoxLoss).
    _C.MODEL.YOLACT.POS_IOU_THRESH = 0.5
    _C.MODEL.YOLACT.NEG_IOU_THRESH = 0.4
    # A non-positive prior covered by a crowd box over this fraction of its own area is ignored.
    _C.MODEL.YOLACT.CROWD_IOU_THRESH = 0.7
    # Class loss: "ohem" (softmax cross-entropy, positives + NEG_POS_RATIO hard negatives each; the
    # paper) or "sigmoid_focal" (original use_sigmoid_focal_loss: per-class sigmoid focal loss over
    # every non-ignored prior, background logit unused; scores become sigmoids at inference) or
    # "quality_focal" (not in the original: Li et al. 2020's quality focal loss, sigmoid scores whose
    # positive target is the IoU of the prior's predicted box with its ground truth, so that scores
    # rank by localisation too; FOCAL_LOSS_GAMMA is its beta, FOCAL_LOSS_ALPHA unused).
    _C.MODEL.YOLACT.CLASS_LOSS = "ohem"
    # Hard negatives per positive in the class loss (online hard-negative mining).
    _C.MODEL.YOLACT.NEG_POS_RATIO = 3
    # Sigmoid focal loss (Lin et al. 2017): weight of positives (alpha, negatives 1 - alpha),
    # focusing exponent gamma, and the foreground probability the class conv's biases start at.
    _C.MODEL.YOLACT.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.YOLACT.FOCAL_LOSS_GAMMA = 2.0
    _C.MODEL.YOLACT.FOCAL_LOSS_PRIOR_PROB = 0.01
    _C.MODEL.YOLACT.CLASS_LOSS_WEIGHT = 1.0
    _C.MODEL.YOLACT.BOX_LOSS_WEIGHT = 1.5
    _C.MODEL.YOLACT.MASK_LOSS_WEIGHT = 6.125
    _C.MODEL.YOLACT.SEM_SEG_LOSS_WEIGHT = 1.0
    # At most this many positives per image train masks; extra ones are sampled at random.
    _C.MODEL.YOLACT.MASKS_TO_TRAIN = 100

    # YOLACT++ fast mask re-scoring (paper v2 Sec. 3.2).
    _C.MODEL.YOLACT.MASK_RESCORING = CN()
    _C.MODEL.YOLACT.MASK_RESCORING.ENABLED = False
    _C.MODEL.YOLACT.MASK_RESCORING.LOSS_WEIGHT = 25.0
    # Ground-truth masks of at most this many pixels on the prototype grid are not trained.
    _C.MODEL.YOLACT.MASK_RESCORING.MIN_GT_AREA = 25

    # YOLACT++ deformable convs: stages come from MODEL.RESNETS.DEFORM_ON_PER_STAGE; inside a
    # deformable stage, block i is deformable when i % DEFORM_INTERVAL == 0 (3 for R-101).
    _C.MODEL.YOLACT.DEFORM_INTERVAL = 1
    # Implementation of those deformable convs: "auto" runs CPU tensors through
    # yolact_d2/deform_conv.py (im2col by embedding_bag + one GEMM: torchvision's numbers to float
    # rounding, its backward too; 3.3-3.8x faster over YOLACT++ R-50's 13 blocks,
    # docs/benchmarks.md) and CUDA tensors, tracing, ONNX export and torch.compile through
    # torchvision.ops.deform_conv2d; "torchvision" uses torchvision's op everywhere.
    _C.MODEL.YOLACT.DEFORM_CONV_IMPL = "auto"

    # Live training diagnostics (yolact_d2/diagnostics.py): dead channels of P3-P7 and of the
    # prototypes, positives per object, forced-only matches, foreground probability on positives,
    # written to the EventStorage every iteration, computed from tensors the step has anyway.
    _C.MODEL.YOLACT.DIAGNOSTICS = CN()
    _C.MODEL.YOLACT.DIAGNOSTICS.ENABLED = True
    # Iterations averaged before a warning can fire (once per run and kind).
    _C.MODEL.YOLACT.DIAGNOSTICS.WARN_WINDOW = 20
    # Warn when a level's or the prototypes' share of dead channels passes this.
    _C.MODEL.YOLACT.DIAGNOSTICS.DEAD_SHARE_WARN = 0.5
    # Warn when this share of objects has no prior at IoU >= POS_IOU_THRESH (in training batches,
    # and over the training set before the first iteration).
    _C.MODEL.YOLACT.DIAGNOSTICS.FORCED_ONLY_WARN = 0.5
    # Warn at start when the ResNet's trainable BatchNorm ("BN") sees fewer images per GPU than this
    # (the original froze BN below 6). The small-data recipe sets 4: from scratch at batch 4 its BN
    # trained better than GroupNorm at 200 iterations (docs/small_data_recipe.md, issue 27).
    _C.MODEL.YOLACT.DIAGNOSTICS.MIN_BN_IMAGES = 6

    # Your own COCO-format dataset without Python (yolact_d2/data/custom.py; train_net.py's
    # --train-json/--train-images/--val-json/--val-images set these): the JSON and its image
    # folder. When set, DATASETS.TRAIN / TEST, NUM_CLASSES, the class names and INPUT.MASK_FORMAT
    # come from the files.
    _C.DATASETS.TRAIN_JSON = ""
    _C.DATASETS.TRAIN_IMAGES = ""
    _C.DATASETS.TEST_JSON = ""
    _C.DATASETS.TEST_IMAGES = ""
    # Dataset check before the first iteration, on DATASETS.TRAIN and TEST (yolact_d2/data/
    # dataset_check.py): images open and match the JSON's size after EXIF orientation, JPEGs are
    # complete, category ids are in 'categories', segmentations are not empty. Results are cached
    # per image file in OUTPUT_DIR/dataset_check_cache.json.
    _C.DATASETS.CHECK = CN()
    _C.DATASETS.CHECK.ENABLED = True
    # Stop on the faults a TRAIN set otherwise survives (an unreadable image or an empty
    # segmentation is dropped and counted in one warning). TEST sets are always strict.
    _C.DATASETS.CHECK.STRICT = False
    # Decode every pixel of every image (finds corruption inside a file; slower first check).
    _C.DATASETS.CHECK.FULL_DECODE = False

    # Periodic checkpoints (model_XXXXXXX.pth, every SOLVER.CHECKPOINT_PERIOD) kept in OUTPUT_DIR,
    # the newest ones, counting those of an earlier run that --resume continues; 0 keeps all, as
    # detectron2 does. model_final.pth is never deleted (yolact_d2/checkpointer.py).
    _C.SOLVER.CHECKPOINTS_TO_KEEP = 0

    # Evaluation extras and a schedule that fits the data (yolact_d2/tide.py, yolact_d2/schedule.py,
    # docs/training.md). Every key defaults to detectron2's behaviour (off).
    # TIDE error breakdown (Bolya et al., ECCV 2020) after each evaluation of train_net.py (at the
    # end of training, --eval-only, periodic ones): the AP50 lost to class, localisation, both,
    # duplicate, background and missed errors, for boxes and masks, logged as a table and written
    # to <evaluation folder>/tide.json (+ tide_bbox.png / tide_segm.png). Needs the tidecv package.
    _C.TEST.TIDE = False
    # Evaluate every this many epochs of the training set (int, > 0): sets TEST.EVAL_PERIOD to
    # EPOCHS x iterations per epoch (ceil(training images / SOLVER.IMS_PER_BATCH)) at setup, logged.
    # 0: TEST.EVAL_PERIOD as given (iterations; 0 = only at the end).
    _C.TEST.EVAL_PERIOD_EPOCHS = 0
    # Your own data (DATASETS.TRAIN_JSON and TEST_JSON, train_net.py --train-json / --val-json) with
    # neither TEST.EVAL_PERIOD nor EVAL_PERIOD_EPOCHS set: evaluate about this many times in the run
    # (every ceil(epochs of MAX_ITER / this) epochs) and set SOLVER.BEST_CHECKPOINT, at setup,
    # logged. 0: off (only the final evaluation). Built-in datasets are unaffected.
    _C.TEST.AUTO_EVALUATIONS = 5
    # Train for this many epochs (int, > 0) instead of SOLVER.MAX_ITER: at setup MAX_ITER becomes
    # MAX_EPOCHS x iterations per epoch and SOLVER.STEPS are scaled by new / old MAX_ITER (logged).
    # 0: SOLVER.MAX_ITER as given.
    _C.SOLVER.MAX_EPOCHS = 0
    # Keep OUTPUT_DIR/model_best.pth: the weights of the periodic evaluation with the highest
    # SOLVER.BEST_METRIC (written without moving last_checkpoint, so --resume still continues from
    # the latest periodic checkpoint). Needs periodic evaluation (TEST.EVAL_PERIOD or _EPOCHS).
    _C.SOLVER.BEST_CHECKPOINT = False
    # The metric of BEST_CHECKPOINT and PATIENCE, a key of the evaluation results ("segm/AP",
    # "bbox/AP50", ...); "": segm/AP, or bbox/AP when MODEL.MASK_ON is False. Higher is better.
    _C.SOLVER.BEST_METRIC = ""
    # Early stop: end training after this many periodic evaluations in a row without a gain of
    # BEST_METRIC (int; 0 = off). The run ends as at MAX_ITER: model_final.pth, final evaluation.
    _C.SOLVER.PATIENCE = 0
    # Time budget of the training loop in minutes (float, e.g. 30.0; 0 = off): the first iteration
    # that ends past it is the last, then model_final.pth and the final evaluation as at MAX_ITER.
    _C.SOLVER.MAX_TIME = 0.0

    # SSD-style training augmentation (original utils/augmentations.py SSDAugmentation).
    _C.INPUT.SSD = CN()
    _C.INPUT.SSD.ENABLED = True
    # Random brightness, contrast, saturation, hue (photometric distortion).
    _C.INPUT.SSD.PHOTOMETRIC = True
    # Zoom out: place the image on a mean-filled canvas up to MAX_EXPAND times larger, with p 0.5.
    _C.INPUT.SSD.EXPAND = True
    _C.INPUT.SSD.MAX_EXPAND = 4.0
    # Min-IoU random crop (SSD Sec. 2.2).
    _C.INPUT.SSD.MIN_IOU_CROP = True
    # Boxes narrower or shorter than this many pixels after the final resize are dropped.
    _C.INPUT.SSD.MIN_BOX_SIZE = 4.0

    # Copy-paste augmentation (Ghiasi et al., CVPR 2021; not in the original): paste the objects of
    # other training images onto each training image (yolact_d2/data/copy_paste.py). YOLACT only.
    _C.INPUT.COPY_PASTE = CN()
    _C.INPUT.COPY_PASTE.ENABLED = False
    # Chance, per training image, of receiving pasted objects.
    _C.INPUT.COPY_PASTE.PROB = 1.0
    # Other images pasted from, one after the other (each: a random half of its objects, at least one).
    _C.INPUT.COPY_PASTE.SOURCES = 1
    # (min, max) scale factor of a source image before it is placed at a random offset; 0 < min <= max <= 1.
    _C.INPUT.COPY_PASTE.SCALE = (0.5, 1.0)


def detections_per_image(cfg) -> int:
    """Detections kept per image: ``TEST.DETECTIONS_PER_IMAGE``, unless the deprecated alias
    ``MODEL.YOLACT.DETECTIONS_PER_IMAGE`` is set (>= 0), which wins with one warning line."""
    alias = cfg.MODEL.YOLACT.DETECTIONS_PER_IMAGE
    if alias < 0:
        return cfg.TEST.DETECTIONS_PER_IMAGE
    log_first_n(
        logging.WARNING,
        f"MODEL.YOLACT.DETECTIONS_PER_IMAGE ({alias}) is deprecated; use TEST.DETECTIONS_PER_IMAGE {alias}",
        n=1, name="yolact_d2",
    )
    return alias


def _one_line(e) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())[:300]


def load_config(config_file: str, opts=()):
    """detectron2's defaults, :func:`add_yolact_config`, then ``config_file`` and ``opts`` (KEY
    VALUE pairs, as ``--opts`` / trailing arguments give them): the one config loader of every
    entry point (``train_net.py``, the demo, the tools). Returns the (unfrozen) ``CfgNode``.

    Raises:
        MissingFileError: ``config_file`` does not exist.
        ConfigError: invalid YAML, an unknown key (in the file or in ``opts``), a value of the wrong
            type, or an odd number of ``opts``; the one-line message names the file or ``opts``
            and the key.
    """
    import os

    import yaml
    from detectron2.config import get_cfg

    from .errors import ConfigError, MissingFileError

    if not os.path.isfile(config_file):
        raise MissingFileError(f"config file {config_file} not found; pass --config-file configs/<name>.yaml")
    cfg = get_cfg()
    add_yolact_config(cfg)
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:  # yacs: "Non-existent config key: ..."
        raise ConfigError(f"{config_file}: {_one_line(e)}; remove or correct that key") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{config_file} is not valid YAML: {_one_line(e)}") from None
    except (OSError, ValueError, AssertionError, TypeError) as e:
        raise ConfigError(f"cannot use config file {config_file}: {_one_line(e)}") from None
    return merge_opts(cfg, opts)


def merge_opts(cfg, opts):
    """``cfg.merge_from_list(opts)`` with :func:`load_config`'s one-line errors; returns ``cfg``.

    Raises:
        ConfigError: an odd number of items, an unknown key or a value of the wrong type.
    """
    from .errors import ConfigError

    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"options need KEY VALUE pairs, got an odd number of items: {' '.join(map(str, opts))}")
    try:
        cfg.merge_from_list(opts)
    except KeyError as e:
        raise ConfigError(
            f"options: {_one_line(e)}; see yolact_d2/config.py and detectron2's config/defaults.py"
        ) from None
    except (ValueError, AssertionError, TypeError) as e:  # yacs: a value of another type
        raise ConfigError(f"options: {_one_line(e)}") from None
    return cfg
