"""Evaluate a segmentation model: confusion matrix over a data set, per-class IoU and mIoU.

    python -m fastst.evaluate --checkpoint PATH --dataset NAME --root DIR [--split val]
        [--protocol fastst|iast_source_only|iast_warmup|iast_round|iast_ms|crst]
        [--save-predictions DIR]
        [--domain target] [--scales 0.5 0.75 1.0] [--flip] [--resize H W] [--batch-size N]
        [--device cpu|cuda] [--autocast bfloat16|float16] [--workers N] [--json OUT.json]
        [--class-set cityscapes19|synthia16]

    python -m fastst.evaluate --predictions DIR --dataset cityscapes --root DIR [--split val]

Predictions are scored at the label's full resolution. `--protocol` names how the model sees the
images (`PROTOCOLS`: fastst's own, where `--scales` and `--flip` apply to the image's size or
`--resize H W` and the softmax maps are summed, or one of the released evaluations of IAST and
CRST). A prediction outside the class range counts as a miss (`ConfusionMatrix.missed`), as in
the official Cityscapes evaluation. `--save-predictions DIR` also writes the Cityscapes benchmark
files (`fastst.predictions`); `--predictions DIR` scores such files instead of a model.
mIoU values are fractions in [0, 1]
(the printed table shows percent); classes absent from both prediction and ground truth are NaN
(null in the JSON) and left out of the means. Labels are mapped to the class set of the model
(`--class-set`; by default "synthia16" for a 16-class checkpoint, "cityscapes19" otherwise),
which also names the mIoU variants reported (mIoU-19/16/13, or mIoU-16/13 for synthia16).

Under ``torchrun`` (``torchrun --standalone --nproc_per_node N -m fastst.evaluate ...``) each rank
scores its share of the batches and the confusion matrices are summed over the ranks: the same
matrix, hence the same mIoU, as one process; rank 0 prints and writes the JSON.
"""
import argparse
import concurrent.futures
import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from . import distributed
from .atomic import write_json_atomic
from .checkpoint import ClassCountMismatch
from .cli import OutputDirError, add_debug_option, check_output_dir, run_cli
from .data.ids import CLASS_SETS, NUM_CLASSES, class_set_for
from .data.synth import require_synthetic
from .inference import predict_scores
from .metrics import ConfusionMatrix
from .predictions import dataset_classes, image_cities, save_prediction, score_predictions
from .protocols import DEFAULT_PROTOCOL, PROTOCOLS, Protocol, protocol_spec
from .run_dir import open_run

__all__ = ["Protocol", "PROTOCOLS", "DEFAULT_PROTOCOL", "evaluate", "main"]


def evaluate(model, dataset, *, scales=(1.0,), flip=False, batch_size=1, device="cpu",
             num_classes=NUM_CLASSES, progress=True, input_size=None, autocast_dtype=None,
             num_workers=0, distributed_context=None, protocol=DEFAULT_PROTOCOL,
             save_predictions=None):
    """Run `model` over `dataset` and return the filled `ConfusionMatrix` (on `device`).

    dataset: items {"image": float32 (3,H,W) normalised, "label": int64 (H,W) train ids with
    255 = ignore, "name": str} (fastst.data). Images in one batch must share a size.
    protocol: a name of `PROTOCOLS`, or "fastst": `scales` (factors of `input_size`, default the
    image's size) and `flip`, the softmax maps summed. Predictions are made at the label's size.
    save_predictions: a folder to write each prediction to as Cityscapes benchmark files
    (`fastst.predictions.save_prediction`; a Cityscapes-layout data set only).
    The model is moved to `device` and put in eval mode for the run; its previous train/eval
    modes are restored afterwards. `progress` shows a tqdm bar with rate and ETA on a terminal,
    else a line every 100 images and at the end (fastst.progress).
    distributed_context: a `fastst.distributed.DistributedContext` (default: the process's,
    `distributed.current()`). With world size N > 1, rank r scores the batches r, r + N, ...
    (the batches of a one-process run, so each image is predicted exactly as there) and the
    matrices are summed over the ranks: every rank returns the one-process matrix."""
    from .progress import progress_bar

    if len(dataset) == 0:
        raise ValueError("the data set to evaluate is empty")
    spec = protocol_spec(protocol, scales, flip, input_size)
    if save_predictions is not None:
        cities, classes = image_cities(dataset), dataset_classes(dataset)
        if len(classes) != num_classes:
            raise ValueError(f"the data set has {len(classes)} classes, the evaluation "
                             f"num_classes={num_classes}")
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
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="eval-png")
    writes = []
    try:
        with progress_bar(len(shard), desc="evaluate", unit="img",
                          show=progress and dctx.is_main) as bar:
            for batch in loader:
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                base_size = tuple(images.shape[-2:]) if input_size is None else input_size
                scores = predict_scores(model, images, spec.sizes(base_size), flip=spec.flip,
                                        out_size=tuple(labels.shape[-2:]), combine=spec.combine,
                                        at_input_size=spec.at_input_size,
                                        autocast_dtype=autocast_dtype)
                if scores.shape[1] != num_classes:
                    raise ValueError(f"the model predicts {scores.shape[1]} classes, the "
                                     f"evaluation expects num_classes={num_classes}")
                pred = scores.argmax(dim=1)
                confusion.update(pred, labels)
                if save_predictions is not None:
                    for name, one in zip(batch["name"], pred.to("cpu", torch.uint8)):
                        writes.append(writer.submit(save_prediction, save_predictions,
                                                    cities[name], name, one, classes))
                    while len(writes) > 16:  # bound the maps waiting to be written
                        writes.pop(0).result()
                bar.update(images.shape[0])
        for future in writes:
            future.result()  # re-raises a failed write
    finally:
        writer.shutdown(wait=True)
        for module, training in modes.items():
            module.train(training)
    confusion.all_reduce(dctx)  # a no-op in one process
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a fastst checkpoint (or a training run's stage, or saved "
                    "predictions) on a\nlabelled split: prints per-class IoU and "
                    "mIoU-19/16/13.",
        epilog="examples:\n"
               "  python -m fastst.evaluate --run runs/demo --stage round3\n"
               "  python -m fastst.evaluate --checkpoint runs/iast_gta5/round3/last.pt "
               "--dataset cityscapes \\\n"
               "      --root data/cityscapes --split val --json scores.json\n"
               "  python -m fastst.evaluate --predictions preds/labelIds --dataset cityscapes "
               "--root data/cityscapes")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="fastst checkpoint file (.pt)")
    source.add_argument("--run", default=None, metavar="DIR",
                        help="the --out directory of a python -m fastst.train run: evaluate the "
                             "checkpoint of --stage on the run's val data, with the run's "
                             "settings (its config.yaml) instead of --dataset/--root")
    source.add_argument("--predictions", default=None, metavar="DIR",
                        help="score the Cityscapes label-id PNGs below DIR (one <city>_<seq>_"
                             "<frame>*.png an image, e.g. the labelIds folder of "
                             "--save-predictions) instead of a checkpoint")
    parser.add_argument("--stage", default=None,
                        help="with --run: the stage whose last checkpoint to evaluate (default: "
                             "the last finished stage)")
    parser.add_argument("--dataset", default=None,
                        choices=("cityscapes", "gta5", "synthia", "synthetic"),
                        help="the data set's layout (required without --run)")
    parser.add_argument("--root", default=None,
                        help="the data set's directory (required without --run); synthetic "
                             "data must exist there (python -m fastst.data synth makes it)")
    parser.add_argument("--split", default=None, help="default: val (with --run: the run's)")
    parser.add_argument("--domain", default=None, choices=("source", "target"),
                        help="synthetic data only: which domain (default: target)")
    parser.add_argument("--protocol", default=DEFAULT_PROTOCOL,
                        choices=(DEFAULT_PROTOCOL, *PROTOCOLS),
                        help="how the model sees the images: fastst (--scales, --flip, "
                             "--resize), the IAST release's per-stage validation sizes "
                             "(iast_source_only 512x1024, iast_warmup 640x1280, iast_round "
                             "768x1536), its multi-scale test (iast_ms) or CRST's (crst: scales "
                             "0.9/1.0/1.2 + flip, logits averaged); default: fastst")
    parser.add_argument("--save-predictions", default=None, metavar="DIR",
                        help="also write each prediction as Cityscapes benchmark files: "
                             "DIR/labelIds/<city>/<base>_labelIds.png (label ids) and "
                             "DIR/color/<city>/<base>_color.png (cityscapes or synthetic data)")
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help="--protocol fastst: input scales whose softmax maps are summed "
                             "(default: 1.0)")
    parser.add_argument("--flip", action="store_true", help="also add horizontally flipped inputs")
    parser.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="size the model sees at scale 1.0 (default: the image size); "
                             "scores are taken at the label's full size")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per forward pass (default: 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--autocast", default=None, choices=("bfloat16", "float16"),
                        help="run the model under torch.autocast with this dtype")
    parser.add_argument("--workers", type=int, default=2,
                        help="data loader worker processes (default: 2)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (or, without a terminal, no progress lines)")
    parser.add_argument("--class-set", default=None, choices=tuple(CLASS_SETS),
                        help="the classes the labels are mapped to; must match the model "
                             "(default: synthia16 for a 16-class model, else cityscapes19)")
    add_debug_option(parser)
    return parser


def main(argv=None):
    """Run the command; errors end in one line and the exit status (``fastst.cli.run_cli``)."""
    return run_cli(_main, argv, prog="python -m fastst.evaluate")


def _main(argv):
    parser = _parser()
    args = parser.parse_args(argv)
    run_options = _from_run(parser, args) if args.run is not None else {}
    device = _check_args(parser, args)
    model, num_classes, class_set = _model_and_classes(parser, args)
    options = {"class_set": class_set, **run_options}
    if args.dataset == "synthetic":
        domain = args.domain or "target"
        options["domain"] = domain
        options.setdefault("synthetic", _synthetic_options(args.root, domain))
        # Evaluation reads data, never generates it (fastst.data.synth).
        require_synthetic(args.root, domain, **options["synthetic"])
    dataset = _dataset(parser, args, options)
    if model is not None:
        _check_class_count(args, dataset, num_classes)
    _check_outputs(args)
    if args.predictions is not None:
        return _report(args, dataset, class_set, _score_files(parser, dataset, args.predictions),
                       domain=options.get("domain"), predictions=args.predictions)
    autocast_dtype = getattr(torch, args.autocast) if args.autocast else None
    dctx = distributed.init_from_env(device)  # under torchrun: one shard of the batches a rank
    try:
        confusion = evaluate(model, dataset, scales=tuple(args.scales), flip=args.flip,
                             batch_size=args.batch_size,
                             device=dctx.device if dctx.is_distributed else device,
                             num_classes=num_classes, progress=not args.no_progress,
                             input_size=args.resize, autocast_dtype=autocast_dtype,
                             num_workers=args.workers, distributed_context=dctx,
                             protocol=args.protocol, save_predictions=args.save_predictions)
    finally:
        distributed.shutdown()
    if not dctx.is_main:
        return 0
    spec = protocol_spec(args.protocol, args.scales, args.flip, args.resize)
    if args.save_predictions:
        print(f"wrote the predictions below {args.save_predictions}")
    return _report(args, dataset, class_set, confusion, domain=options.get("domain"),
                   checkpoint=str(args.checkpoint), protocol=args.protocol,
                   scales=list(spec.scales), flip=spec.flip, resize=args.resize,
                   save_predictions=args.save_predictions)


def _from_run(parser, args):
    """Fill ``args`` from ``--run DIR`` (``fastst.run_dir``): the checkpoint of ``--stage``
    (default: the last finished stage), the run's val data set and, unless the command line
    sets them, its evaluation views (the stage's ``eval_protocol``, else ``eval.scales``,
    ``eval.flip``, ``data.val.input_size``). Returns extra ``build_dataset`` options."""
    given = [option for option, value in (("--dataset", args.dataset), ("--root", args.root),
                                          ("--domain", args.domain),
                                          ("--class-set", args.class_set)) if value is not None]
    if given:
        parser.error(f"--run reads the data set from RUN/config.yaml (data.val); drop "
                     f"{', '.join(given)}")
    run = open_run(args.run)
    config = run.config
    args.checkpoint = str(run.checkpoint(args.stage))
    stage = Path(args.checkpoint).parent.name
    val = config["data"]["val"]
    args.dataset, args.root = val["dataset"], str(val["root"])
    args.split = args.split or val["split"]
    args.class_set = config["data"]["class_set"]
    options = {"list_file": val["list_file"]}
    if val["dataset"] == "synthetic":
        args.domain = val.get("domain") or "target"
        options["synthetic"] = dict(config["data"]["synthetic"] or {})
    protocol = config["stages"][stage]["eval_protocol"]
    if args.protocol == DEFAULT_PROTOCOL and not (args.scales or args.flip or args.resize):
        if protocol is not None:
            args.protocol = protocol
        else:
            args.scales, args.flip = list(config["eval"]["scales"]), config["eval"]["flip"]
            args.resize = val["input_size"]
    print(f"--run {args.run}: stage {stage}, {args.checkpoint}; {args.dataset} "
          f"{args.split} at {args.root}", file=sys.stderr)
    return options


def _check_class_count(args, dataset, num_classes):
    """ClassCountMismatch when the checkpoint's model predicts another number of classes than
    the data set's labels have (a table of the wrong classes would be a silent wrong result)."""
    classes = len(dataset_classes(dataset))
    if classes != num_classes:
        sets = ", ".join(f"{name}: {s.num_classes}" for name, s in CLASS_SETS.items())
        raise ClassCountMismatch(
            f"--checkpoint {args.checkpoint} holds a model for {num_classes} classes, but the "
            f"{args.dataset} labels at {args.root} are mapped to {classes} classes: evaluate a "
            f"checkpoint trained for {classes} classes, or pass the --class-set the model was "
            f"trained on ({sets})")


def _check_outputs(args):
    """The --json file's folder and the --save-predictions folder can be written (checked
    before the evaluation, not after it)."""
    if args.json is not None:
        if Path(args.json).is_dir():
            raise OutputDirError(f"--json {args.json!r} is a directory; give a file name")
        check_output_dir(Path(args.json).absolute().parent, "--json's folder")
    if args.save_predictions is not None:
        check_output_dir(args.save_predictions, "--save-predictions")


def _check_args(parser, args):
    """Exit through ``parser.error`` on options that do not fit together; fills the default
    ``args.scales`` and returns the torch.device of ``--device``."""
    if args.run is None and (args.dataset is None or args.root is None):
        parser.error("--dataset and --root are required (or --run DIR)")
    if args.stage is not None and args.run is None:
        parser.error("--stage goes with --run")
    args.split = args.split or "val"
    if args.domain is not None and args.dataset != "synthetic":
        parser.error("--domain applies to --dataset synthetic only")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    fixed = [option for option, value in (("--scales", args.scales), ("--flip", args.flip),
                                          ("--resize", args.resize)) if value]
    if args.predictions is not None:
        fixed += [option for option, value in (
            ("--protocol", args.protocol != DEFAULT_PROTOCOL), ("--autocast", args.autocast),
            ("--save-predictions", args.save_predictions)) if value]
        if fixed:
            parser.error(f"--predictions scores files; {', '.join(fixed)} apply to a "
                         f"--checkpoint only")
    elif args.protocol != DEFAULT_PROTOCOL and fixed:
        parser.error(f"--protocol {args.protocol} fixes the input sizes and flips; drop "
                     f"{', '.join(fixed)} or use --protocol {DEFAULT_PROTOCOL}")
    if (args.predictions or args.save_predictions) and args.dataset not in ("cityscapes",
                                                                            "synthetic"):
        parser.error(f"{'--predictions' if args.predictions else '--save-predictions'} needs "
                     f"Cityscapes benchmark files, hence --dataset cityscapes or synthetic (a "
                     f"Cityscapes-layout tree), got --dataset {args.dataset}")
    args.scales = args.scales or [1.0]
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
    return device


def _model_and_classes(parser, args):
    """(model or None, num_classes, class set name or None): the --checkpoint's model (exit 2
    when it cannot be loaded) and the class set its predictions (or --predictions) are in."""
    from .models import load_model

    model = None
    if args.checkpoint is not None:
        try:
            model = load_model(args.checkpoint, map_location="cpu")
        except (FileNotFoundError, RuntimeError, ValueError, TypeError) as error:
            parser.exit(2, f"{parser.prog}: error: cannot load --checkpoint: {error}\n")
    num_classes = model.model_config["num_classes"] if hasattr(model, "model_config") \
        else CLASS_SETS[args.class_set].num_classes if args.class_set else NUM_CLASSES
    class_set = args.class_set or getattr(class_set_for(num_classes), "name", None)
    if args.class_set is not None and CLASS_SETS[class_set].num_classes != num_classes:
        parser.error(f"--class-set {class_set} has {CLASS_SETS[class_set].num_classes} classes "
                     f"but the model predicts {num_classes}; pass the class set it was trained "
                     f"on ({', '.join(CLASS_SETS)})")
    return model, num_classes, class_set


def _dataset(parser, args, options):
    """The --dataset at --root (exit 2 when it cannot be read)."""
    from .data import build_dataset

    try:
        return build_dataset(args.dataset, args.root, args.split, **options)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: cannot read --dataset {args.dataset} at "
                       f"{args.root!r}: {error}\n")


def _score_files(parser, dataset, predictions_dir):
    try:
        return score_predictions(dataset, predictions_dir)
    except (FileNotFoundError, ValueError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: cannot score --predictions {predictions_dir}: "
                       f"{error}\n")


def _report(args, dataset, class_set, confusion, **extra):
    """Print the table and write the --json results of a finished evaluation; returns 0."""
    print(confusion.table(class_set=class_set))
    if args.json:
        result = results_dict(confusion, class_set=class_set, dataset=args.dataset,
                              split=args.split, num_images=len(dataset), **extra)
        write_json_atomic(result, args.json, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
