"""The data sets of a run, built from its configuration (``data`` section).

Roles: "source" (labelled, e.g. GTA5), "target" (the unlabelled target train set: its labels are
never read, ``labels=False``) and "val" (the labelled target evaluation split). A "synthetic"
data set is generated on first use under its root, domain "source" for the source role and
"target" for the others, with the generator arguments of ``data.synthetic``. Every role maps its
labels to the train ids of ``data.class_set`` ("cityscapes19" or "synthia16", README "Data").
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from fastst.data import build_dataset, sample_source_indices, train_transform

__all__ = ["build_role", "crop_arguments", "crop_transform", "IndexedSubset", "split_indices",
           "split_names"]

_DOMAINS = {"source": "source", "target": "target", "val": "target"}


def crop_arguments(config: Mapping[str, Any], role: str) -> Dict[str, Any]:
    """The keyword arguments of ``train_transform`` for ``role`` ("source" or "target")."""
    data = config["data"]
    return {"crop_height_range": data[role]["crop_height_range"], "crop_size": data["crop_size"],
            "aspect": data["aspect"], "flip_p": data["flip_p"], "brightness": data["brightness"],
            "contrast": data["contrast"], "brightness_contrast_p": data["brightness_contrast_p"]}


def crop_transform(config: Mapping[str, Any], role: str):
    """The training augmentation of ``role`` ("source" or "target", docs/recipes.md §4): random sized crop
    with the role's height range, resized to ``data.crop_size``, flip, brightness/contrast."""
    return train_transform(**crop_arguments(config, role))


class IndexedSubset(Dataset):
    """The items ``indices`` of ``dataset``, in that order; ``set_epoch`` is passed on (so the
    seeded augmentations of fastst data sets still change per epoch, unlike torch's Subset)."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_role(config: Mapping[str, Any], role: str, *, transform=None,
               resize: Optional[Sequence[int]] = None, seed: int = 0, labels: Optional[bool] = None):
    """The data set of ``role`` ("source", "target" or "val").

    transform: the seeded augmentation (None: none). resize: a fixed (H, W) applied before it
    (default: the role's ``resize`` key; the val role has none, it is scored at full size).
    labels: default True for source/val and False for target, whose labels must not be used."""
    if role not in _DOMAINS:
        raise ValueError(f"role must be one of {', '.join(_DOMAINS)}, got {role!r}")
    spec = config["data"][role]
    if resize is None and role != "val":
        resize = spec["resize"]
    subset = spec.get("subset")
    kwargs = {"transform": transform, "resize": None if resize is None else list(resize),
              "seed": seed, "list_file": spec["list_file"],
              "labels": role != "target" if labels is None else labels,
              "class_set": config["data"]["class_set"]}
    if spec["dataset"] == "synthetic":
        kwargs["domain"] = spec.get("domain") or _DOMAINS[role]
        kwargs["synthetic"] = dict(config["data"]["synthetic"] or {})
    dataset = build_dataset(spec["dataset"], spec["root"], spec["split"], **kwargs)
    if subset is not None:
        labelled, unlabelled = split_indices(len(dataset), subset["fraction"], subset["seed"])
        keep = labelled if subset["part"] == "labelled" else unlabelled
        dataset.samples = [dataset.samples[i] for i in keep]
    return dataset


def split_indices(num_items: int, fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """The seeded labelled/unlabelled split of the semi-supervised mode: the first
    floor(fraction * num_items) of ``torch.randperm(num_items)`` (generator seeded with ``seed``)
    are labelled, the rest unlabelled; each part in ascending index order. The same draw as
    the CBST rounds' source sample (``sample_source_indices``)."""
    labelled = sample_source_indices(num_items, fraction, seed)
    chosen = set(labelled)
    return labelled, [i for i in range(num_items) if i not in chosen]


def split_names(config: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """{role: {"fraction", "seed", "part", "names": [image stems]}} for the roles that read a
    subset (what DIR/split.json records), or None when none does."""
    roles = {}
    for role in ("source", "target"):
        subset = config["data"][role].get("subset")
        if subset is not None:
            dataset = build_role(config, role, labels=False)
            roles[role] = {**subset, "names": [dataset.samples[i][0].stem
                                               for i in range(len(dataset))]}
    return roles or None
