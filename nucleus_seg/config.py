"""nucleus_seg's own config keys, added to a detectron2 config like other detectron2 projects do."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# a checkout's configs/, or the copy a wheel installs as nucleus_seg/configs
CONFIGS_DIR = next((d for d in (PROJECT_ROOT / "configs", Path(__file__).resolve().parent / "configs")
                    if d.is_dir()), PROJECT_ROOT / "configs")
GPU_PREDICT_BATCH, CPU_PREDICT_BATCH = 16, 8  # NUCLEUS.PREDICT.BATCH_SIZE 0
GPU_PREDICT_STREAMS = 2  # NUCLEUS.PREDICT.STREAMS 0 on a GPU (1 on the CPU, where the model has every core)


def add_nucleus_config(cfg: CN) -> None:
    """Add the keys nucleus_seg reads; values here are defaults, YAMLs override them."""
    cfg.INPUT.NORMALIZE = CN()
    # Microscopy comes as 8/16/32-bit, 1-4 channels: images are mapped to uint8 gray-as-RGB by
    # percentile stretching, so a 12-bit camera and an 8-bit PNG look alike to the model.
    cfg.INPUT.NORMALIZE.METHOD = "percentile"  # "percentile" | "minmax" | "none" (uint8 passthrough)
    cfg.INPUT.NORMALIZE.LOW = 1.0
    cfg.INPUT.NORMALIZE.HIGH = 99.8
    # Fluorescence nuclei are bright on dark; brightfield/H&E are dark on bright. "auto" inverts when
    # the background (median) is brighter than the objects would be, so one model serves both.
    cfg.INPUT.NORMALIZE.INVERT = "auto"  # "auto" | "never" | "always"
    cfg.INPUT.NORMALIZE.GRAY = True  # collapse colour to one channel (replicated to 3)
    # Which channel of a multi-channel image holds the nuclei (0-based; nucleus-predict --channel): -1 takes
    # the brightest of the colour channels at each pixel, right for one stain or RGB, wrong for a composite of
    # a nuclear stain with a cytoplasm or membrane marker, whose signal would then be read as nuclei.
    cfg.INPUT.NORMALIZE.CHANNEL = -1

    cfg.INPUT.NUCLEUS = CN()
    cfg.INPUT.NUCLEUS.CROP_SIZE = 512  # square training crop (padded when the image is smaller)
    cfg.INPUT.NUCLEUS.CROP_NUCLEUS_PROB = 0.9  # chance a crop is centred near a nucleus
    cfg.INPUT.NUCLEUS.MIN_INSTANCE_AREA = 4  # px; smaller remnants after crop/scale are dropped
    # COCO "iscrowd" annotations: dropped (False, detectron2's behaviour) or kept as ignore regions that
    # count neither as nucleus nor as background in the losses (True; nucleus-adapt's uncertain pseudo-labels)
    cfg.INPUT.NUCLEUS.CROWD_AS_IGNORE = False
    cfg.INPUT.NUCLEUS.SCALE_RANGE = (0.5, 2.0)  # log-uniform rescale: nuclei come at many magnifications
    # True: each training image is first rescaled so its median nucleus diameter is
    # NUCLEUS.PREDICT.TRAIN_DIAMETER, and SCALE_RANGE jitters around that (Cellpose's training); the
    # model learns one size band and the predictor's DIAMETER (-1: estimated) rescales inputs to it.
    # False: SCALE_RANGE is relative to the image as it is (every size is learnt).
    cfg.INPUT.NUCLEUS.SCALE_TO_DIAMETER = False
    cfg.INPUT.NUCLEUS.FLIP = True
    cfg.INPUT.NUCLEUS.ROT90 = True
    cfg.INPUT.NUCLEUS.BRIGHTNESS = 0.2  # +- fraction
    cfg.INPUT.NUCLEUS.CONTRAST = 0.3  # +- fraction
    cfg.INPUT.NUCLEUS.GAMMA = (0.7, 1.5)
    cfg.INPUT.NUCLEUS.BLUR_PROB = 0.2
    cfg.INPUT.NUCLEUS.BLUR_SIGMA = (0.5, 2.0)
    cfg.INPUT.NUCLEUS.NOISE_PROB = 0.3
    cfg.INPUT.NUCLEUS.NOISE_STD = (2.0, 10.0)  # in uint8 grey levels
    # Photon + read noise of a short exposure (transforms.RandomShotNoise), SNR at the bright level drawn from
    # SHOT_NOISE_SNR. The GPU recipe uses 0.5 with the two switches below (its model without them scored 0.29 on
    # the real sample at SNR 5, 0.63 clean); off here, where the CPU demo's short training gained nothing from it.
    cfg.INPUT.NUCLEUS.SHOT_NOISE_PROB = 0.0
    cfg.INPUT.NUCLEUS.SHOT_NOISE_SNR = (3.0, 20.0)
    # Stretch the noisy crop again by INPUT.NORMALIZE's percentiles, as inference normalises a noisy image
    # (background lifted to mid-grey noise, nuclei with less contrast), instead of clipping noise at black.
    cfg.INPUT.NUCLEUS.SHOT_NOISE_STRETCH = False
    # Where both noises are added: False, on the training crop after the rescale; True, in the image's own
    # pixel grid before it, as a camera makes noise and as inference then resizes it with the image (the
    # recipe upscales real nuclei ~2x, turning pixel noise into grains the model never saw in training).
    cfg.INPUT.NUCLEUS.NOISE_BEFORE_RESCALE = False

    cfg.NUCLEUS = CN()
    cfg.NUCLEUS.SYNTH = CN()
    cfg.NUCLEUS.SYNTH.NUM_TRAIN = 200
    cfg.NUCLEUS.SYNTH.NUM_VAL = 20
    cfg.NUCLEUS.SYNTH.SIZE = 512
    cfg.NUCLEUS.SYNTH.STYLE = "fluorescence"
    cfg.NUCLEUS.SYNTH.SEED = 0
    # The generator's version-2 features (nucleus_seg.data.synth.FEATURES); [] gives version 1's images.
    cfg.NUCLEUS.SYNTH.FEATURES = ["contact", "daughters", "bright_tail"]

    cfg.NUCLEUS.TRAIN = CN()
    # Evaluation metric (as NucleusEvaluator names it) whose maximum is kept as model_best.pth; with
    # several DATASETS.TEST the first one's value counts.
    cfg.NUCLEUS.TRAIN.BEST_METRIC = "nucleus/dsb_score"
    # Wall-clock budget for the training loop (0 = none): after ~70 iterations MAX_ITER shrinks to what
    # fits and the LR schedule is rescaled to it, so a recipe keeps its promise on a slower machine.
    cfg.NUCLEUS.TRAIN.TIME_BUDGET_MINUTES = 0.0
    # When that budget starts (a Unix time; 0 = at the first step). nucleus-train sets its own launch
    # time (not saved in config.yaml), so the budget covers data generation and model set-up as well.
    cfg.NUCLEUS.TRAIN.TIME_BUDGET_START = 0.0
    # Mixed precision (SOLVER.AMP.ENABLED) in bfloat16: float16's GradScaler costs a host wait per step.
    # "float16" is detectron2's behaviour; GPUs without bfloat16 fall back to it.
    cfg.NUCLEUS.TRAIN.AMP_DTYPE = "bfloat16"
    # GroupNorm in the autocast precision (fp32 statistics) instead of autocast's fp32 cast round trip.
    cfg.NUCLEUS.TRAIN.HALF_GROUP_NORM = True
    # Iterations between progress lines (losses, speed, ETA) and metrics.json records; detectron2 uses 20.
    cfg.NUCLEUS.TRAIN.LOG_PERIOD = 20
    # Periodic checkpoints (SOLVER.CHECKPOINT_PERIOD) kept: the last N (0 = all, detectron2's behaviour).
    # None is written at the last iteration, where model_final.pth holds the same weights.
    cfg.NUCLEUS.TRAIN.CHECKPOINT_KEEP = 2
    # True: at the end only model_final.pth is left, and it holds the weights alone (no optimizer state:
    # a third of the size; --resume from it cannot continue the schedule, only use the weights).
    cfg.NUCLEUS.TRAIN.FINAL_ONLY = False
    # torch.compile the backbone (ResNet + FPN; nucleus_seg.modeling.compile): faster steps after a compilation
    # of about a minute per process, so only for long GPU runs.
    cfg.NUCLEUS.TRAIN.COMPILE = False
    # The RPN's proposals of all images at once, their NMS in parallel on a GPU (the same proposals as
    # detectron2's per-image loop: nucleus_seg.modeling.fast_inference). False: detectron2's loop.
    cfg.NUCLEUS.TRAIN.BATCHED_PROPOSALS = True
    # The RPN's anchor labels of all images at once (nucleus_seg.modeling.training_targets): detectron2's labels, its
    # sample sizes, subsets drawn from the same distribution without a host sync. False: detectron2's loop.
    cfg.NUCLEUS.TRAIN.BATCHED_ANCHOR_LABELS = True
    # The ROI heads' proposal labels and samples of all images at once (the same module): detectron2's labels,
    # its sample sizes, subsets drawn from the same distribution, one host sync per step. False: its loop.
    cfg.NUCLEUS.TRAIN.BATCHED_ROI_SAMPLING = True
    # The backbone's forward and backward replayed as CUDA graphs (nucleus_seg.modeling.cuda_graphs): one launch
    # each instead of ~1,500 kernels from Python, for the one batch shape training crops have (+19-27% img/s on
    # an H200, the same losses). Ignored on the CPU and when NUCLEUS.TRAIN.COMPILE compiles the backbone.
    cfg.NUCLEUS.TRAIN.CUDA_GRAPHS = True
    # Exponential moving average of the weights (0 = off), put into the model at the last step, so
    # model_final.pth and the final evaluation use it (engine.hooks.WeightAverage). Off: on the CPU demo, whose
    # LR drops for its last 15%, 0.99-0.998 scored below the raw weights (benchmarks/README.md).
    cfg.NUCLEUS.TRAIN.EMA_DECAY = 0.0
    # Weight of the mask (outline) loss. 0: outlines are not taught; the mask head keeps its weights and nothing
    # reaches the backbone through it (nucleus-adapt on images whose outlines only a teacher guessed).
    cfg.NUCLEUS.TRAIN.MASK_LOSS_WEIGHT = 1.0
    # A loss that explodes but stays finite (too high a learning rate) stops training like NaN does: when it
    # exceeds CEILING, or FACTOR x its running median, PATIENCE logged steps in a row (PATIENCE 0: off).
    cfg.NUCLEUS.TRAIN.DIVERGENCE = CN()
    cfg.NUCLEUS.TRAIN.DIVERGENCE.FACTOR = 100.0
    cfg.NUCLEUS.TRAIN.DIVERGENCE.CEILING = 1e4
    cfg.NUCLEUS.TRAIN.DIVERGENCE.PATIENCE = 3

    cfg.NUCLEUS.PREDICT = CN()
    # Images (or tiles) per forward pass; 0: 16 on a GPU (a forward has a fixed host cost there, so larger
    # batches were 1.5x faster end to end on an H200), 8 on the CPU (memory).
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = 0
    # Mixed-precision inference: float16 on GPU; bfloat16 on CPUs with AMX/AVX512-BF16 (about 2x faster
    # there, masks differ slightly from fp32); plain fp32 on other CPUs.
    cfg.NUCLEUS.PREDICT.AMP = True
    cfg.NUCLEUS.PREDICT.TILE_SIZE = 512
    cfg.NUCLEUS.PREDICT.TILE_OVERLAP = 64
    # Median nucleus diameter (px) at the scale the model was trained on; inputs with a different
    # DIAMETER are rescaled to it. 0 disables rescaling; -1 estimates it from a first pass.
    cfg.NUCLEUS.PREDICT.TRAIN_DIAMETER = 17.0
    cfg.NUCLEUS.PREDICT.DIAMETER = 0.0
    # Instances scoring below this are left out of label images, CSVs and the DSB metric
    # (COCO AP still ranks every detection).
    cfg.NUCLEUS.PREDICT.SCORE_THRESH = 0.5
    # Instances must stand out from the image's own pixel noise: (mean - the background around them) / pixel
    # noise x sqrt(area) at least this (inference.significance). 8 (the recipe and demo configs) drops camera noise
    # that an "auto" upscale made the model read as tiny nuclei; 0 keeps every detection, as DefaultPredictor does.
    # The exported runner applies it too; the bioimage.io package does not.
    cfg.NUCLEUS.PREDICT.MIN_SIGNIFICANCE = 0.0
    # Instances must also step up at their edge: the mean of their pixels within 2 px of the background minus
    # that background's, as a z-score over the pixel noise, at least this (inference.significance). Out-of-focus
    # haze stands out as a whole but has no edge; 0 keeps every detection. Applied after MIN_SIGNIFICANCE.
    cfg.NUCLEUS.PREDICT.MIN_EDGE_SIGNIFICANCE = 0.0
    # Move each instance's boundary to this fraction of the way from the background around it to its interior
    # (nucleus_seg.inference.boundaries: 0.5 is the half-maximum the synthetic labels are drawn at; the demo config
    # uses 0.4); only pixels within ~1/16 of a nucleus diameter of the predicted boundary change. 0 leaves the
    # masks as the model made them (DefaultPredictor's). Applied after MIN_SIGNIFICANCE, by every path that
    # MIN_SIGNIFICANCE is.
    cfg.NUCLEUS.PREDICT.BOUNDARY_LEVEL = 0.0
    # Score an instance needs to count in the estimated diameter (DIAMETER -1). Separate from SCORE_THRESH
    # so an output threshold does not move the scale: nucleus-eval --tune scores every threshold on one
    # pass per scale and gets exactly what the tuned config then does.
    cfg.NUCLEUS.PREDICT.DIAMETER_SCORE_THRESH = 0.5
    # Test-time augmentation: the four flips, detections fused and soft masks averaged (4x the compute;
    # the pre-mask-head score floor is off, so label outputs cost more too).
    cfg.NUCLEUS.PREDICT.TTA = False
    # torch.compile the backbone for inference (see NUCLEUS.TRAIN.COMPILE): the first batch of each new input
    # size waits for the compilation; worth it over hundreds of same-sized images on a GPU.
    cfg.NUCLEUS.PREDICT.COMPILE = False
    # The backbone replayed as CUDA graphs at inference (nucleus_seg.modeling.cuda_graphs), captured the second time
    # an input shape is seen: the same detections from one launch instead of ~700. GPU only; no gain where the
    # GPU is the limit (whole 512 px images at batch 32-64 on an H200), so off until measured on tiled runs.
    cfg.NUCLEUS.PREDICT.CUDA_GRAPHS = False
    # Tiled nucleus-predict: batches of tiles in flight at once, each forward on its own thread and CUDA stream,
    # so one batch's host work (detectron2's Python and syncs) overlaps another's kernels; outputs are the same
    # (byte-identical files on an H200). 0: 2 on a GPU (8.85 vs 7.86 img/s with 1 on 256 TIFFs of 1024 px, one
    # H200), 1 on the CPU.
    cfg.NUCLEUS.PREDICT.STREAMS = 0
    # nucleus-predict: processes stitching tiles and writing each image's files (label TIFF, overlay,
    # measurements: ~0.17 s of one core per 1024 px image of 300 nuclei on an H100 host) while the next images are
    # predicted. -1: on a GPU, one per spare core (at most 12); on the CPU none (the model has the cores). 0: all of
    # it in the predicting process.
    cfg.NUCLEUS.PREDICT.WRITERS = -1

    cfg.NUCLEUS.EVAL = CN()
    cfg.NUCLEUS.EVAL.MAX_DETS = (100, 1000)  # COCO AP reported at both caps
    cfg.NUCLEUS.EVAL.NUM_WORST_OVERLAYS = 4
    cfg.NUCLEUS.EVAL.COCO = True


def resolve_config_path(config_file: str | Path) -> Path:
    """The file as given, else the bundled config of that name (``--config-file NAME`` anywhere)."""
    path = Path(config_file)
    if not path.exists() and (CONFIGS_DIR / path.name).exists():
        path = CONFIGS_DIR / path.name
    if not path.exists():
        raise FileNotFoundError(f"config file {config_file} not found (bundled configs in {CONFIGS_DIR}: "
                                f"{sorted(p.name for p in CONFIGS_DIR.glob('*.yaml'))})")
    return path


def get_nucleus_cfg(config_file: str | Path | None = None, opts: Sequence[str] = ()) -> CN:
    """A detectron2 config with nucleus keys, merged from a YAML and KEY VALUE overrides."""
    cfg = get_cfg()
    add_nucleus_config(cfg)
    if config_file:
        cfg.merge_from_file(str(resolve_config_path(config_file)))
    cfg.merge_from_list(list(opts))
    return cfg


def predict_batch_size(cfg, device: str | None = None) -> int:
    """``NUCLEUS.PREDICT.BATCH_SIZE`` with 0 resolved for ``device`` (default ``MODEL.DEVICE``)."""
    size = int(cfg.NUCLEUS.PREDICT.BATCH_SIZE)
    if size > 0:
        return size
    return GPU_PREDICT_BATCH if _on_gpu(cfg, device) else CPU_PREDICT_BATCH


def predict_streams(cfg, device: str | None = None) -> int:
    """``NUCLEUS.PREDICT.STREAMS`` with 0 resolved for ``device`` (default ``MODEL.DEVICE``)."""
    streams = int(cfg.NUCLEUS.PREDICT.STREAMS)
    if streams > 0:
        return streams
    return GPU_PREDICT_STREAMS if _on_gpu(cfg, device) else 1


def _on_gpu(cfg, device: str | None) -> bool:
    return str(device or cfg.MODEL.DEVICE).startswith("cuda")


def check_predict_settings(cfg: CN) -> None:
    """Refuse out-of-range ``NUCLEUS.PREDICT`` values before any compute, naming the key (``ValueError``)."""
    p = cfg.NUCLEUS.PREDICT
    checks = [
        ("BATCH_SIZE", p.BATCH_SIZE >= 0, "must be at least 1 (0: 16 on a GPU, 8 on the CPU)"),
        ("TILE_SIZE", p.TILE_SIZE >= 32, "must be at least 32 px"),
        ("TILE_OVERLAP", 0 <= p.TILE_OVERLAP < p.TILE_SIZE, f"must be >= 0 and below TILE_SIZE ({p.TILE_SIZE})"),
        ("TRAIN_DIAMETER", p.TRAIN_DIAMETER >= 0, "must be >= 0 (0: never rescale)"),
        ("DIAMETER", p.DIAMETER == -1 or p.DIAMETER >= 0, "must be a diameter in px, 0 (no rescale) or -1 (auto)"),
        ("SCORE_THRESH", 0 <= p.SCORE_THRESH <= 1, "must be in [0, 1]"),
        ("MIN_SIGNIFICANCE", p.MIN_SIGNIFICANCE >= 0, "must be >= 0 (0: keep every detection)"),
        ("MIN_EDGE_SIGNIFICANCE", p.MIN_EDGE_SIGNIFICANCE >= 0, "must be >= 0 (0: keep every detection)"),
        ("BOUNDARY_LEVEL", 0 <= p.BOUNDARY_LEVEL < 1, "must be in [0, 1) (0: masks as the model made them)"),
        ("WRITERS", p.WRITERS >= -1, "must be a process count, 0 (none) or -1 (auto)"),
        ("STREAMS", p.STREAMS >= 0, "must be at least 1 (0: 2 on a GPU, 1 on the CPU)"),
        ("DIAMETER_SCORE_THRESH", 0 <= p.DIAMETER_SCORE_THRESH <= 1, "must be in [0, 1]"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise ValueError(f"NUCLEUS.PREDICT.{key} {rule}, got {p[key]}")
