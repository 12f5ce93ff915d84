"""Label spaces (SPEC section 3): Cityscapes train ids, the id -> train id maps of GTA5/Cityscapes
and SYNTHIA, the class subsets for SYNTHIA's 16/13-class mIoU and the Cityscapes colour palette.

Train ids are 0..18 in the order of `CLASS_NAMES`; 255 means "ignore"."""
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


def lookup_table(id_to_train_id, size=65536):
    """uint8 table of `size` entries: table[label_id] = train id, 255 for ids not in the map.
    `size` = 256 for 8-bit label images, 65536 for SYNTHIA's 16-bit ones."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in id_to_train_id.items():
        table[label_id] = train_id
    return table


def palette_bytes():
    """The 768-byte PIL palette: train id i -> PALETTE[i], 255 (ignore) -> black."""
    flat = [value for colour in PALETTE for value in colour]
    return bytes(flat + [0] * (768 - len(flat)))
