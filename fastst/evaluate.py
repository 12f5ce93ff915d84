"""Evaluate a segmentation model: confusion matrix over a data set, per-class IoU and mIoU.

    python -m fastst.evaluate --checkpoint PATH --dataset NAME --root DIR [--split val]
        [--domain target] [--scales 0.5 0.75 1.0] [--flip] [--resize H W] [--batch-size N]
        [--device cpu|cuda] [--autocast bfloat16|float16] [--workers N] [--json OUT.json]
        [--class-set cityscapes19|synthia16]

Predictions are made at the image's size (or `--resize H W`, times each scale) and scored at
the label's full resolution; multi-scale and flip evaluation sum the softmax maps before the
argmax (SPEC section 3, `fastst.inference.predict_probs`). mIoU values are fractions in [0, 1]
(the printed table shows percent); classes absent from both prediction and ground truth are NaN
(null in the JSON) and left out of the means. Labels are mapped to the class set of the model
(`--class-set`; by default "synthia16" for a 16-class checkpoint, "cityscapes19" otherwise),
which also names the mIoU variants reported (mIoU-19/16/13, or mIoU-16/13 for synthia16).

Under ``torchrun`` (``torchrun --standalone --nproc_per_node N -m fastst.evaluate ...``) each rank
scores its share of the batches and the confusion matrices are summed over the ranks: the same
matrix, hence the same mIoU, as one process; rank 0 prints and writes the JSON.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from . import distributed
from .atomic import write_json_atomic
from .data.ids import CLASS_SETS, NUM_CLASSES, class_set_for
from .inference import predict_probs
from .metrics import ConfusionMatrix

__all__ = ["evaluate", "main"]


def evaluate(model, dataset, *, scales=(1.0,), flip=False, batch_size=1, device="cpu",
             num_classes=NUM_CLASSES, progress=True, input_size=None, autocast_dtype=None,
             num_workers=0, distributed_context=None):
    """Run `model` over `dataset` and return the filled `ConfusionMatrix` (on `device`).

    dataset: items {"image": float32 (3,H,W) normalised, "label": int64 (H,W) train ids with
    255 = ignore, ...} (fastst.data). Images in one batch must share a size.
    input_size: (H, W) the model sees at scale 1.0 (default: the image's size); predictions are
    upsampled to the label's size either way.
    The model is moved to `device` and put in eval mode for the run; its previous train/eval
    modes are restored afterwards. `progress` shows a tqdm bar with rate and ETA.
    distributed_context: a `fastst.distributed.DistributedContext` (default: the process's,
    `distributed.current()`). With world size N > 1, rank r scores the batches r, r + N, ...
    (the batches of a one-process run, so each image is predicted exactly as there) and the
    matrices are summed over the ranks: every rank returns the one-process matrix."""
    from tqdm import tqdm

    if len(dataset) == 0:
        raise ValueError("the data set to evaluate is empty")
    dctx = distributed.current() if distributed_context is None else distributed_context
    device = torch.device(device)
    shard = dataset
    if dctx.is_distributed:
        batches = range(dctx.rank, -(-len(dataset) // batch_size), dctx.world_size)
        shard = Subset(dataset, [i for b in batches
                                 for i in range(b * batch_size,
                                                min((b + 1) * batch_size, len(dataset)))])
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    confusion = ConfusionMatrix(num_classes, device=device)
    modes = {module: module.training for module in model.modules()}
    model.to(device).eval()
    try:
        with tqdm(total=len(shard), desc="evaluate", unit="img",
                  disable=not (progress and dctx.is_main), dynamic_ncols=True) as bar:
            for batch in loader:
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                probs = predict_probs(model, images, scales=scales, flip=flip,
                                      out_size=tuple(labels.shape[-2:]), input_size=input_size,
                                      autocast_dtype=autocast_dtype)
                if probs.shape[1] != num_classes:
                    raise ValueError(f"the model predicts {probs.shape[1]} classes, the "
                                     f"evaluation expects num_classes={num_classes}")
                confusion.update(probs.argmax(dim=1), labels)
                bar.update(images.shape[0])
    finally:
        for module, training in modes.items():
            module.train(training)
    dctx.all_reduce_(confusion.matrix)  # a no-op in one process
    return confusion


def results_dict(confusion, class_names=None, class_set=None, **extra):
    """JSON-ready results: {"miou", "miou16", "miou13" (those of a class set, see
    `ConfusionMatrix.summary`), "iou": {name: IoU}, **extra}; NaN becomes None. The classes are
    named by `class_names` when it has one name a class, else by the class set (None: the one
    with the matrix's number of classes), else "class <c>"."""
    summary = confusion.summary(class_set)
    result = {key: _finite_or_none(value) for key, value in summary.items() if key != "iou"}
    known = confusion.class_set(class_set)
    if class_names is not None and len(class_names) == confusion.num_classes:
        names = class_names
    elif known is not None:
        names = known.names
    else:
        names = [f"class {c}" for c in range(confusion.num_classes)]
    result["iou"] = {name: _finite_or_none(value) for name, value in zip(names, summary["iou"])}
    result.update(extra)
    return result


def _finite_or_none(value):
    return None if math.isnan(value) else value


def _synthetic_options(root, domain):
    """The generation parameters of an existing synthetic tree, so that evaluating it never
    regenerates it with other (default) parameters; {} when there is none yet."""
    from .data.synthetic import MANIFEST_NAME

    try:
        with open(Path(root) / domain / MANIFEST_NAME) as handle:
            manifest = json.load(handle)
        return {key: int(manifest[key]) for key in ("seed", "num_train", "num_val", "height",
                                                     "width")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastst.evaluate",
        description="Evaluate a fastst checkpoint: per-class IoU and mIoU-19/16/13.")
    parser.add_argument("--checkpoint", required=True, help="fastst checkpoint file (.pt)")
    parser.add_argument("--dataset", required=True,
                        choices=("cityscapes", "gta5", "synthia", "synthetic"))
    parser.add_argument("--root", required=True, help="the data set's directory")
    parser.add_argument("--split", default="val")
    parser.add_argument("--domain", default=None, choices=("source", "target"),
                        help="synthetic data only: which domain (default: target)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="input scales whose softmax maps are summed (default: 1.0)")
    parser.add_argument("--flip", action="store_true", help="also add horizontally flipped inputs")
    parser.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="size the model sees at scale 1.0 (default: the image size); "
                             "scores are taken at the label's full size")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--autocast", default=None, choices=("bfloat16", "float16"),
                        help="run the model under torch.autocast with this dtype")
    parser.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--class-set", default=None, choices=tuple(CLASS_SETS),
                        help="the classes the labels are mapped to; must match the model "
                             "(default: synthia16 for a 16-class model, else cityscapes19)")
    return parser


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.domain is not None and args.dataset != "synthetic":
        parser.error("--domain applies to --dataset synthetic only")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if any(not math.isfinite(s) or s <= 0 for s in args.scales):
        parser.error(f"--scales must be positive numbers, got {args.scales}")
    if args.resize is not None and min(args.resize) < 1:
        parser.error(f"--resize needs two positive sizes, got {args.resize}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r} is not a device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available; use --device cpu")

    from .checkpoint import load_model
    from .data import build_dataset

    try:
        model = load_model(args.checkpoint, map_location="cpu")
    except (FileNotFoundError, RuntimeError, ValueError, TypeError) as error:
        parser.exit(2, f"{parser.prog}: error: cannot load --checkpoint: {error}\n")
    num_classes = model.model_config["num_classes"] if hasattr(model, "model_config") \
        else NUM_CLASSES
    class_set = args.class_set or getattr(class_set_for(num_classes), "name", None)
    if args.class_set is not None and CLASS_SETS[class_set].num_classes != num_classes:
        parser.error(f"--class-set {class_set} has {CLASS_SETS[class_set].num_classes} classes "
                     f"but the model predicts {num_classes}; pass the class set it was trained "
                     f"on ({', '.join(CLASS_SETS)})")
    options = {"class_set": class_set}
    if args.dataset == "synthetic":
        domain = args.domain or "target"
        options.update(domain=domain, synthetic=_synthetic_options(args.root, domain))
    try:
        dataset = build_dataset(args.dataset, args.root, args.split, **options)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: cannot read --dataset {args.dataset} at "
                       f"{args.root!r}: {error}\n")
    autocast_dtype = getattr(torch, args.autocast) if args.autocast else None
    dctx = distributed.init_from_env(device)  # under torchrun: one shard of the batches a rank
    try:
        confusion = evaluate(model, dataset, scales=tuple(args.scales), flip=args.flip,
                             batch_size=args.batch_size,
                             device=dctx.device if dctx.is_distributed else device,
                             num_classes=num_classes, progress=not args.no_progress,
                             input_size=args.resize, autocast_dtype=autocast_dtype,
                             num_workers=args.workers, distributed_context=dctx)
    finally:
        distributed.shutdown()
    if not dctx.is_main:
        return 0
    print(confusion.table(class_set=class_set))
    if args.json:
        result = results_dict(confusion, class_set=class_set, scales=list(args.scales),
                              flip=args.flip,
                              checkpoint=str(args.checkpoint), dataset=args.dataset,
                              split=args.split, domain=options.get("domain"),
                              resize=args.resize, num_images=len(dataset))
        write_json_atomic(result, args.json, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
