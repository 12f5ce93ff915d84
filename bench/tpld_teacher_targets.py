"""How far the teacher's calibrated targets on a training crop are from the pass's.

    python bench/tpld_teacher_targets.py --checkpoint RUN/phase1_1/last.pt [--preset demo_tpld]
        [--stage phase2_1] [--epochs 2] [key=value ...]

Reads the target *train* split only. The class thresholds lambda come from the stage's pass
protocol (mean softmax of the ``pseudo_scales`` views and their flips at ``pseudo_size``,
``ClassBalancedThresholds`` at the stage's ``portion``). Then, over ``--epochs`` epochs of the
stage's training crops, the teacher's probabilities on each crop are taken four ways:

* pass: the pass's map through ``pass_map_on_crop`` (what fastst trains on);
* crop: the teacher run on the augmented crop (scale, flip, brightness/contrast);
* crop + flip: the same averaged with its mirror image;
* region at pass scale: the crop's region of the un-jittered image at the pass's scales and
  flips (the pass's protocol on less context).

Printed: per class (those with at least 0.1 % of the pixels), the share of its argmax pixels
with q = p / lambda >= 1 on the full images and under each protocol; the confident share over
all classes; each protocol's confident-set IoU with the pass's and the mean L1 distance of its
TPLD targets (one-hot where confident, q ** gamma elsewhere) from the pass's.
"""
import argparse
import sys

import torch

from fastst.methods.labelling import pass_probabilities
from fastst.models import load_model
from fastst.config import load_config
from fastst.inference import predict_probs
from fastst.methods.cbst import CropGeometry, CropRecorder, pass_map_on_crop
from fastst.methods.context import RunContext
from fastst.methods.datasets import build_role, crop_transform
from fastst.ops import ClassBalancedThresholds, cbst_pseudo_label, tpld_soft_targets

PROTOCOLS = ("pass", "crop", "crop + flip", "region at pass scale")


def _confident_counts(probs, lambdas, counts):
    """Add (argmax-k pixels, of them with q_k >= 1) per class k into counts (C, 2)."""
    top = probs.argmax(1).flatten()
    confident = (cbst_pseudo_label(probs, lambdas) != 255).flatten()
    counts[:, 0] += torch.bincount(top, minlength=counts.shape[0])
    counts[:, 1] += torch.bincount(top[confident], minlength=counts.shape[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--preset", default="demo_tpld")
    parser.add_argument("--stage", default="phase2_1")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    config = load_config(args.preset, args.overrides)
    settings = config["stages"][args.stage]
    if config["runtime"]["threads"]:
        torch.set_num_threads(config["runtime"]["threads"])
    ctx = RunContext(config=config, run_dir=None, seed=0, device=torch.device("cpu"))
    scales, flip = settings["pseudo_scales"], settings["pseudo_flip"]
    gamma = settings.get("gamma", 2.0)
    model = load_model(args.checkpoint).eval()
    classes = model.model_config["num_classes"]

    pass_set = build_role(config, "target", resize=settings["pseudo_size"])
    with torch.no_grad():
        full = torch.cat([pass_probabilities(model, torch.stack(
            [pass_set[i]["image"] for i in range(start, min(start + 8, len(pass_set)))]), ctx,
            scales=scales, flip=flip) for start in range(0, len(pass_set), 8)])
    accumulator = ClassBalancedThresholds(classes, subsample=settings["subsample"])
    accumulator.update(full)
    lambdas = accumulator.thresholds(settings["portion"])
    full_counts = torch.zeros(classes, 2, dtype=torch.int64)
    _confident_counts(full, lambdas, full_counts)

    crops = CropGeometry(build_role(config, "target", transform=CropRecorder(
        crop_transform(config, "target")), seed=1))
    counts = {name: torch.zeros(classes, 2, dtype=torch.int64) for name in PROTOCOLS}
    overlap = {name: [0, 0, 0.0] for name in PROTOCOLS}  # intersection, union, L1 sum
    pixels = 0
    with torch.no_grad():
        for epoch in range(args.epochs):
            crops.set_epoch(epoch)
            for index in range(len(crops)):
                item = crops[index]
                crop = item["image"][None]
                size = crop.shape[-2:]
                top, left, height, width = item["box"].tolist()
                flipped = bool(item["flipped"])
                # The region of the pass's image the crop shows, at the pass's resolution.
                image_h, image_w = item["image_size"].tolist()
                pass_image = pass_set[index]["image"]
                rows = slice(top * pass_image.shape[1] // image_h,
                             (top + height) * pass_image.shape[1] // image_h)
                cols = slice(left * pass_image.shape[2] // image_w,
                             (left + width) * pass_image.shape[2] // image_w)
                region = pass_image[None, :, rows, cols]
                region = region.flip(-1) if flipped else region
                views = len(scales) * (2 if flip else 1)
                probs = {
                    "pass": pass_map_on_crop(full[index], item["box"], item["image_size"],
                                             flipped, size)[None],
                    "crop": predict_probs(model, crop),
                    "crop + flip": predict_probs(model, crop, flip=True) / 2,
                    "region at pass scale": predict_probs(
                        model, region, scales=scales, flip=flip, out_size=size) / views,
                }
                reference = cbst_pseudo_label(probs["pass"], lambdas)
                targets = tpld_soft_targets(probs["pass"], lambdas, gamma=gamma)
                for name, value in probs.items():
                    _confident_counts(value, lambdas, counts[name])
                    labels = cbst_pseudo_label(value, lambdas)
                    both = (labels != 255) & (reference != 255)
                    overlap[name][0] += int((both & (labels == reference)).sum())
                    overlap[name][1] += int(((labels != 255) | (reference != 255)).sum())
                    overlap[name][2] += float((tpld_soft_targets(value, lambdas, gamma=gamma)
                                               - targets).abs().sum())
                pixels += size[0] * size[1]

    print(f"{args.preset} {args.stage}: portion {settings['portion']}, {len(pass_set)} images, "
          f"{args.epochs} epoch(s) of crops; lambda = {[round(v, 3) for v in lambdas.tolist()]}")
    print("share of each class's argmax pixels with q >= 1 (%):")
    print(" | ".join(["class", "pixels", "full images"] + list(PROTOCOLS)))
    total = int(full_counts[:, 0].sum())
    for k in range(classes):
        if full_counts[k, 0] < 1e-3 * total:
            continue
        shares = [100 * c[k, 1] / max(1, int(c[k, 0]))
                  for c in [full_counts] + list(counts.values())]
        print(" | ".join([str(k), f"{100 * full_counts[k, 0] / total:.1f}"]
                         + [f"{share:.1f}" for share in shares]))
    for name, c in [("full images", full_counts)] + list(counts.items()):
        print(f"all classes, {name}: {100 * c[:, 1].sum() / c[:, 0].sum():.1f} % confident")
    for name in PROTOCOLS[1:]:
        inter, union, l1 = overlap[name]
        print(f"{name}: confident-set IoU with the pass's {inter / max(1, union):.3f}, "
              f"mean L1 of the TPLD targets from the pass's {l1 / max(1, pixels):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
