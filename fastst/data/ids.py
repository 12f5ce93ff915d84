"""Label spaces (README "Data"): Cityscapes train ids, the id -> train id maps of GTA5/Cityscapes
and SYNTHIA, the class subsets for SYNTHIA's 16/13-class mIoU, the Cityscapes colour palette and
the class sets a run trains on.

Train ids are 0..18 in the order of `CLASS_NAMES`; 255 means "ignore". A class set (`ClassSet`,
by name in `CLASS_SETS`) keeps some of these 19 classes, renumbered 0..C-1 in the same order:

* "cityscapes19": all 19 (GTA5 and IAST's SYNTHIA recipe train them);
* "synthia16": the 16 that SYNTHIA and Cityscapes share (no terrain, truck, train), with
  SYNTHIA's lane marking counted as road, as CRST/TPLD train SYNTHIA -> Cityscapes.

Every data set of a run maps its label ids through the class set's maps, so labels, model
outputs, pseudo labels and confusion matrices all hold the class set's train ids."""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

IGNORE_INDEX = 255
NUM_CLASSES = 19

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# Cityscapes label id (also GTA5's) -> train id.
CITYSCAPES_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                             23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# SYNTHIA RAND_CITYSCAPES label id (first channel of the 16-bit GT) -> train id.
SYNTHIA_ID_TO_TRAIN_ID = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
                          10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
# SYNTHIA's lane marking class: ignored by the 19-class map, road in the "synthia16" class set.
SYNTHIA_LANE_MARKING = 22

# SYNTHIA is scored on 16 classes (no terrain, truck, train) and 13 (also no wall, fence, pole).
CLASSES_16 = tuple(c for c in range(NUM_CLASSES) if c not in (9, 14, 16))
CLASSES_13 = tuple(c for c in CLASSES_16 if c not in (3, 4, 5))

# Cityscapes colours of the 19 train ids (RGB), as in cityscapesScripts.
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# The mIoU variants reported besides the mean over all classes: (summary key, table label, the
# Cityscapes train ids averaged over). A class set reports those whose classes it all has.
MIOU_SUBSETS = (("miou16", "mIoU-16", CLASSES_16), ("miou13", "mIoU-13", CLASSES_13))


@dataclass(frozen=True)
class ClassSet:
    """The classes a run trains on: `classes`, the Cityscapes train ids kept (ascending), become
    train ids 0..C-1; every other class is ignored (255). `lane_marking_as_road`: SYNTHIA's lane
    marking (id 22) is labelled road instead of ignored (it needs road in `classes`)."""

    name: str
    classes: Tuple[int, ...]
    lane_marking_as_road: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> Tuple[str, ...]:
        """The class names in train-id order."""
        return tuple(CLASS_NAMES[c] for c in self.classes)

    @property
    def palette(self) -> Tuple[Tuple[int, int, int], ...]:
        """The Cityscapes colour (RGB) of each train id."""
        return tuple(PALETTE[c] for c in self.classes)

    def _renumber(self, id_to_cityscapes_train_id: Dict[int, int]) -> Dict[int, int]:
        new = {old: new for new, old in enumerate(self.classes)}
        return {label_id: new[train_id] for label_id, train_id in id_to_cityscapes_train_id.items()
                if train_id in new}

    @property
    def cityscapes_ids(self) -> Dict[int, int]:
        """Cityscapes (and GTA5) label id -> train id."""
        return self._renumber(CITYSCAPES_ID_TO_TRAIN_ID)

    @property
    def synthia_ids(self) -> Dict[int, int]:
        """SYNTHIA label id -> train id."""
        id_map = self._renumber(SYNTHIA_ID_TO_TRAIN_ID)
        if self.lane_marking_as_road:
            id_map[SYNTHIA_LANE_MARKING] = self.classes.index(0)
        return id_map

    @property
    def from_cityscapes_train_ids(self) -> Dict[int, int]:
        """Cityscapes train id (0..18, as in *_labelTrainIds.png files) -> train id."""
        return self._renumber({c: c for c in range(NUM_CLASSES)})

    def subset(self, cityscapes_train_ids: Sequence[int]) -> Optional[Tuple[int, ...]]:
        """The train ids of `cityscapes_train_ids` (Cityscapes numbering) in this class set, or
        None if it lacks one of them."""
        if not set(cityscapes_train_ids) <= set(self.classes):
            return None
        return tuple(self.classes.index(c) for c in cityscapes_train_ids)

    def miou_subsets(self) -> Tuple[Tuple[str, str, Tuple[int, ...]], ...]:
        """(summary key, table label, train ids) of the mIoU variants this class set reports
        besides the mean over all its classes (mIoU-16 and -13 for both sets here)."""
        found = ((key, label, self.subset(classes)) for key, label, classes in MIOU_SUBSETS)
        return tuple((key, label, ids) for key, label, ids in found if ids is not None)


CLASS_SETS = {
    "cityscapes19": ClassSet("cityscapes19", tuple(range(NUM_CLASSES))),
    "synthia16": ClassSet("synthia16", CLASSES_16, lane_marking_as_road=True),
}
DEFAULT_CLASS_SET = "cityscapes19"


def get_class_set(class_set: Union[str, ClassSet, None] = None) -> ClassSet:
    """The `ClassSet` named `class_set` (None: "cityscapes19"); a ClassSet is returned as is.
    ValueError naming the valid class sets otherwise."""
    if isinstance(class_set, ClassSet):
        return class_set
    if class_set is None:
        class_set = DEFAULT_CLASS_SET
    if class_set not in CLASS_SETS:
        raise ValueError(f"unknown class set {class_set!r}; valid class sets: "
                         f"{', '.join(CLASS_SETS)}")
    return CLASS_SETS[class_set]


def class_set_for(num_classes: int) -> Optional[ClassSet]:
    """The class set with `num_classes` classes (19: cityscapes19, 16: synthia16), or None: what
    code that only knows a model's number of classes names and colours its classes by."""
    return next((s for s in CLASS_SETS.values() if s.num_classes == num_classes), None)


def lookup_table(id_to_train_id, size=65536):
    """uint8 table of `size` entries: table[label_id] = train id, 255 for ids not in the map.
    `size` = 256 for 8-bit label images, 65536 for SYNTHIA's 16-bit ones."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in id_to_train_id.items():
        table[label_id] = train_id
    return table


def palette_for(num_classes: Optional[int] = None) -> Tuple[Tuple[int, int, int], ...]:
    """The RGB colours of train ids 0.. for a model of `num_classes` classes: its class set's
    (`class_set_for`), else (and for None) the 19 Cityscapes colours."""
    class_set = None if num_classes is None else class_set_for(num_classes)
    return PALETTE if class_set is None else class_set.palette


def palette_bytes(num_classes: Optional[int] = None):
    """The 768-byte PIL palette: train id i -> `palette_for(num_classes)[i]`, 255 (ignore) and
    ids beyond the palette -> black."""
    flat = [value for colour in palette_for(num_classes) for value in colour]
    return bytes(flat + [0] * (768 - len(flat)))
