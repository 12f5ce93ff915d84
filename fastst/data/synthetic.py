"""Procedural street scenes in two domains: the data set of the CPU demo.

A scene is a perspective street: sky, a far skyline on the horizon, a road between sidewalks,
terrain beyond them, building / vegetation / wall / fence facades along both sides (with a second
row further out, seen through gaps), poles carrying traffic lights and signs, trees, and road users
(cars, trucks, buses, persons, riders on bicycles and motorcycles, now and then a tram) whose pixel
sizes follow from their distance. Labels are the 19 Cityscapes train ids (`fastst.data.ids`).

Geometry: with the horizon at row `y_h` and the vanishing point at column `v`, a ground point at
lateral offset `u` (in camera heights) seen `r` pixels below the horizon lies at column `v + u * r`,
and an object of height `h` camera heights standing there spans rows `y_h + r - h * r .. y_h + r`.
`r / H` is the inverse depth; every layer is painted far to near.

The two domains share this layout model and differ in statistics and appearance:

* "source": flat rendered colours per class (small per-instance jitter, small per-image brightness
  change), sharp edges; more cars and buildings, taller buildings, higher horizon.
* "target": another palette (colder, desaturated, each class moved differently), darker lighting
  with a vertical gradient and a colour cast per image, depth fog, low-frequency texture, blur and
  sensor noise; more persons, riders and vegetation, larger road users, lower horizon.

Class colours stay distinct in both palettes (at least 37 RGB levels apart), so the target is
learnable and the gap can be bridged by self-training.

`ensure_synthetic(root, domain)` writes a Cityscapes-layout tree (labels as Cityscapes label ids,
so the Cityscapes loader reads it); `generate_sample(domain, index)` makes one image in memory.
Everything is deterministic in (seed, domain, split, index).
"""
import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_write, write_json_atomic
from .ids import CITYSCAPES_ID_TO_TRAIN_ID, IGNORE_INDEX, NUM_CLASSES

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first calls must be avoided there.
    fcntl = None

__all__ = ["DOMAINS", "SPLITS", "CITY_NAMES", "DEFAULT_HEIGHT", "DEFAULT_WIDTH",
           "DEFAULT_NUM_TRAIN", "DEFAULT_NUM_VAL", "GENERATOR_VERSION", "generate_sample",
           "ensure_synthetic", "image_stem", "train_ids_to_label_ids"]

# Bump when the generator's output changes, so cached trees are regenerated.
GENERATOR_VERSION = 1
DOMAINS = ("source", "target")
SPLITS = ("train", "val")
CITY_NAMES = {"source": "synsource", "target": "syntarget"}
# Sized for a 2-core CPU demo: a DeepLab-v2 ResNet-18 trains at a few images per second on
# 96x192 (the size the design prototype used), so source-only, warm-up and three self-training
# rounds fit in about 15 minutes; 500 train images per domain let every class appear in many
# images, 100 val images keep an evaluation under half a minute.
DEFAULT_HEIGHT = 96
DEFAULT_WIDTH = 192
DEFAULT_NUM_TRAIN = 500
DEFAULT_NUM_VAL = 100
# Val frames are numbered from here so that stems are unique across splits, as in Cityscapes.
VAL_FRAME_OFFSET = 100000
MANIFEST_NAME = "synthetic.json"

_DOMAIN_KEYS = {"source": 1, "target": 2}
_SPLIT_KEYS = {"train": 1, "val": 2}

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN,
 SKY, PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(NUM_CLASSES)

# RGB rendering colours per train id (not the label palette of ids.PALETTE).
_SOURCE_PALETTE = np.array([
    (88, 88, 96), (186, 160, 172), (150, 108, 78), (196, 186, 128), (100, 72, 24),
    (126, 136, 150), (44, 44, 34), (236, 204, 28), (56, 140, 48), (164, 196, 88),
    (112, 172, 240), (214, 58, 70), (252, 140, 28), (38, 58, 172), (112, 48, 132),
    (28, 152, 150), (226, 112, 176), (150, 28, 206), (208, 36, 124)], dtype=np.float32)
# The source palette desaturated (0.7), cast to blue (x 0.82, 0.95, 1.12), darkened (x 0.9) and
# moved by a fixed offset per class (|offset| <= 22), chosen so that no two classes come closer
# than 37 RGB levels.
_TARGET_PALETTE = np.array([
    (75, 89, 113), (138, 159, 172), (108, 98, 97), (156, 134, 144), (59, 72, 33),
    (93, 135, 141), (49, 30, 16), (206, 150, 40), (45, 103, 57), (136, 171, 123),
    (85, 169, 235), (149, 58, 64), (143, 102, 78), (23, 52, 140), (82, 44, 104),
    (42, 122, 142), (171, 107, 172), (118, 49, 203), (128, 49, 103)], dtype=np.float32)

# Colours of parts that carry their object's label (windows, tyres, lamps, road markings).
_SOURCE_DETAILS = {"window": (62, 76, 104), "glass": (48, 60, 84), "tyre": (24, 24, 24),
                   "marking": (236, 236, 236), "red": (250, 30, 30), "green": (40, 240, 90),
                   "trunk": (92, 66, 40), "skin": (232, 188, 150)}
_TARGET_DETAILS = {"window": (64, 72, 92), "glass": (70, 84, 96), "tyre": (30, 32, 38),
                   "marking": (200, 204, 190), "red": (230, 60, 50), "green": (60, 210, 160),
                   "trunk": (70, 58, 52), "skin": (200, 170, 150)}


@dataclass(frozen=True)
class _Style:
    """Layout statistics and appearance of one domain. Ranges are (low, high) of uniform draws;
    counts are Poisson means per image; sizes are in camera heights."""
    palette: np.ndarray
    details: dict
    instance_jitter: float          # std of the per-instance colour offset, RGB levels
    horizon: tuple                  # horizon row / image height
    building_height: tuple          # facade height above the camera, camera heights
    front_classes: tuple            # (class, probability) of front facade segments; -1 = gap
    back_vegetation: float          # probability that a back-row segment is vegetation
    skyline_vegetation: float
    verge: float                    # probability of a grass strip inside a sidewalk
    pole_spacing: tuple             # inverse-depth units between poles
    pole_kinds: tuple               # probabilities of (lamp, traffic light, sign)
    trees: float                    # Poisson mean of sidewalk trees per side
    counts: dict                    # Poisson mean per road user kind
    object_scale: float             # size factor of road users
    train_probability: float        # probability that a scene has a tram


_SOURCE_STYLE = _Style(
    palette=_SOURCE_PALETTE, details=_SOURCE_DETAILS, instance_jitter=8.0,
    horizon=(0.36, 0.46), building_height=(2.0, 9.0),
    front_classes=((BUILDING, 0.5), (VEGETATION, 0.15), (WALL, 0.12), (FENCE, 0.1), (-1, 0.13)),
    back_vegetation=0.25, skyline_vegetation=0.3, verge=0.3,
    pole_spacing=(2.0, 6.0), pole_kinds=(0.4, 0.3, 0.3), trees=0.8,
    counts={"car": 5.0, "truck": 0.6, "bus": 0.5, "person": 2.5, "rider": 0.7,
            "parked_bicycle": 0.5},
    object_scale=1.0, train_probability=0.08)

_TARGET_STYLE = _Style(
    palette=_TARGET_PALETTE, details=_TARGET_DETAILS, instance_jitter=14.0,
    horizon=(0.4, 0.5), building_height=(1.5, 6.0),
    front_classes=((BUILDING, 0.35), (VEGETATION, 0.28), (WALL, 0.12), (FENCE, 0.13), (-1, 0.12)),
    back_vegetation=0.45, skyline_vegetation=0.5, verge=0.5,
    pole_spacing=(2.5, 7.0), pole_kinds=(0.35, 0.35, 0.3), trees=1.4,
    counts={"car": 3.5, "truck": 0.8, "bus": 0.35, "person": 4.0, "rider": 1.2,
            "parked_bicycle": 0.8},
    object_scale=1.12, train_probability=0.1)

_STYLES = {"source": _SOURCE_STYLE, "target": _TARGET_STYLE}


class _Canvas:
    """Label map (uint8 train ids), colour (float32 RGB) and inverse depth (float32, r / H) of one
    scene, painted far to near."""

    def __init__(self, height, width):
        self.height, self.width = height, width
        self.label = np.full((height, width), SKY, dtype=np.uint8)
        self.colour = np.zeros((height, width, 3), dtype=np.float32)
        self.inv_depth = np.zeros((height, width), dtype=np.float32)
        self.rows = np.arange(height, dtype=np.float32)[:, None] + 0.5
        self.cols = np.arange(width, dtype=np.float32)[None, :] + 0.5

    def fill(self, mask, cls, colour, inv_depth):
        """Paint the full-size boolean `mask`; `colour` is (3,) or per-pixel (H, W, 3)."""
        self.label[mask] = cls
        self.colour[mask] = colour[mask] if np.ndim(colour) == 3 else colour
        self.inv_depth[mask] = inv_depth[mask] if np.ndim(inv_depth) == 2 else inv_depth

    def shape(self, y0, y1, x0, x1, cls, colour, inv_depth, inside=None):
        """Paint the pixels whose centres lie in the box [y0, y1) x [x0, x1) and, if given, satisfy
        `inside(rows (h, 1), cols (1, w)) -> bool mask`. Boxes thinner than a pixel are widened to
        one pixel so that thin far objects stay visible."""
        y0, y1 = _at_least_one_pixel(y0, y1)
        x0, x1 = _at_least_one_pixel(x0, x1)
        i0, i1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.height)
        j0, j1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.width)
        if i0 >= i1 or j0 >= j1:
            return
        rows, cols = self.rows[i0:i1], self.cols[:, j0:j1]
        mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        if inside is not None:
            mask &= inside(rows, cols)
        self.label[i0:i1, j0:j1][mask] = cls
        self.colour[i0:i1, j0:j1][mask] = colour
        self.inv_depth[i0:i1, j0:j1][mask] = inv_depth

    def ellipse(self, cy, cx, ry, rx, cls, colour, inv_depth):
        ry, rx = max(ry, 0.5), max(rx, 0.5)
        self.shape(cy - ry, cy + ry, cx - rx, cx + rx, cls, colour, inv_depth,
                   lambda rows, cols: ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0)


def _at_least_one_pixel(low, high):
    if high - low < 1.0:
        centre = 0.5 * (low + high)
        return centre - 0.5, centre + 0.5
    return low, high


class _Painter:
    """Draws one scene of a domain onto a canvas with a seeded generator."""

    def __init__(self, canvas, rng, style):
        self.canvas, self.rng, self.style = canvas, rng, style
        self.H, self.W = canvas.height, canvas.width

    def colour(self, cls):
        """The class colour plus this instance's jitter."""
        jitter = self.rng.normal(0.0, self.style.instance_jitter, 3)
        return self.style.palette[cls] + jitter.astype(np.float32)

    def detail(self, name):
        return np.asarray(self.style.details[name], dtype=np.float32)

    # Layout -------------------------------------------------------------------------------------
    def scene(self):
        rng, style, H, W = self.rng, self.style, self.H, self.W
        self.horizon = rng.uniform(*style.horizon) * H
        self.vx = W * rng.uniform(0.38, 0.62)
        road_width = rng.uniform(3.0, 5.5)
        road_left = -road_width * rng.uniform(0.3, 0.7)
        self.road = (road_left, road_left + road_width)
        self.sidewalks = (rng.uniform(0.6, 1.6), rng.uniform(0.6, 1.6))
        gardens = [rng.uniform(0.3, 2.0) if rng.random() < 0.4 else 0.0 for _ in range(2)]
        self.faces = (self.road[0] - self.sidewalks[0] - gardens[0],
                      self.road[1] + self.sidewalks[1] + gardens[1])

        self.sky()
        self.skyline()
        self.ground()
        for side, face in ((-1, self.faces[0]), (1, self.faces[1])):
            back = face * rng.uniform(1.6, 2.6)
            back_classes = ((VEGETATION, style.back_vegetation),
                            (BUILDING, 1.0 - style.back_vegetation))
            self.facade(side, back, back_classes, (3.0, 9.0), tall=True)
            self.facade(side, face, style.front_classes, (1.5, 6.0), tall=False)
        self.street_furniture_and_users()

    def sky(self):
        self.canvas.colour[:] = self.colour(SKY)

    def skyline(self):
        """A band of far buildings and trees on the horizon, filling the end of the street."""
        rng, H, W = self.rng, self.H, self.W
        widths = rng.uniform(0.03, 0.12, 48) * W
        edges = np.concatenate([[0.0], np.cumsum(widths)])
        count = len(widths)
        segment = np.clip(np.searchsorted(edges, self.canvas.cols[0], side="right") - 1,
                          0, count - 1)
        is_vegetation = rng.random(count) < self.style.skyline_vegetation
        heights = rng.uniform(0.01, 0.1, count) * H
        colours = np.stack([self.colour(VEGETATION if v else BUILDING) for v in is_vegetation])
        phase = rng.uniform(0, 2 * np.pi)
        bumps = 0.015 * H * np.sin(self.canvas.cols[0] * 0.9 + phase) * is_vegetation[segment]
        top = self.horizon - heights[segment] - bumps
        mask = (self.canvas.rows >= top[None, :]) & (self.canvas.rows < self.horizon + 1.0)
        per_pixel = np.broadcast_to(colours[segment][None], (H, W, 3))
        labels = np.where(is_vegetation[segment], VEGETATION, BUILDING)[None, :]
        for cls in (BUILDING, VEGETATION):
            self.canvas.fill(mask & (labels == cls), cls, per_pixel, 0.005)

    def ground(self):
        """Road, sidewalks, terrain beyond them, grass verges and lane markings."""
        rng, canvas = self.rng, self.canvas
        r = canvas.rows - self.horizon
        below = np.broadcast_to(r > 0.25, (self.H, self.W))
        r_safe = np.maximum(r, 0.25)
        u = (canvas.cols - self.vx) / r_safe
        inv_depth = np.broadcast_to(r_safe / self.H, (self.H, self.W))
        left, right = self.road
        canvas.fill(below, TERRAIN, self.colour(TERRAIN), inv_depth)
        walk = below & (u >= left - self.sidewalks[0]) & (u <= right + self.sidewalks[1])
        canvas.fill(walk, SIDEWALK, self.colour(SIDEWALK), inv_depth)
        for side in (0, 1):
            if rng.random() < self.style.verge:
                width = self.sidewalks[side]
                lo, hi = sorted((width * rng.uniform(0.1, 0.3), width * rng.uniform(0.45, 0.7)))
                band = (u <= left - lo) & (u >= left - hi) if side == 0 else \
                    (u >= right + lo) & (u <= right + hi)
                canvas.fill(below & band, TERRAIN, self.colour(TERRAIN), inv_depth)
        road = below & (u >= left) & (u <= right)
        canvas.fill(road, ROAD, self.colour(ROAD), inv_depth)
        depth = self.H / r_safe
        lanes = max(1, int(round((right - left) / 2.2)))
        marking = self.detail("marking")
        period = rng.uniform(1.2, 2.5)
        for lane in range(1, lanes):
            centre = left + (right - left) * lane / lanes
            dashes = (np.abs(u - centre) < 0.07) & (np.mod(depth / period, 1.0) < 0.5)
            canvas.fill(road & dashes, ROAD, marking, inv_depth)
        for edge in (left + 0.12, right - 0.12):
            canvas.fill(road & (np.abs(u - edge) < 0.04), ROAD, marking * 0.9, inv_depth)

    def facade(self, side, lateral, class_probabilities, length_range, *, tall):
        """A row of facade segments at lateral offset `lateral` (camera heights, negative on the
        left) along the street, each spanning a random depth range."""
        rng, canvas, style, H = self.rng, self.canvas, self.style, self.H
        distance = (canvas.cols[0] - self.vx) * side
        visible = distance > 0.5
        r = np.where(visible, distance, 1.0) / abs(lateral)      # pixels below the horizon
        depth = H / r
        lengths = rng.uniform(*length_range, 64)
        edges = np.concatenate([[0.0], np.cumsum(lengths)])
        count = len(lengths)
        segment = np.clip(np.searchsorted(edges, depth, side="right") - 1, 0, count - 1)
        classes = np.array([c for c, _ in class_probabilities])
        weights = np.array([p for _, p in class_probabilities], dtype=np.float64)
        kinds = rng.choice(classes, size=count, p=weights / weights.sum())
        low, high = style.building_height
        heights = np.where(kinds == BUILDING, rng.uniform(low, high, count),
                           rng.uniform(0.3, 1.8, count))
        heights = np.where(kinds == WALL, rng.uniform(-0.1, 0.6, count), heights)
        heights = np.where(kinds == FENCE, rng.uniform(-0.35, 0.1, count), heights)
        if tall:
            heights = np.where(kinds == BUILDING, heights * 1.5, heights + 1.5)
        # Gaps (-1) draw a colour too, so that every segment consumes the generator alike.
        colours = np.stack([self.colour(max(int(k), 0)) for k in kinds])
        kind_col, height_col = kinds[segment], heights[segment]
        phase = rng.uniform(0, 2 * np.pi, 2)
        bumps = 0.25 * np.sin(depth * 2.3 + phase[0]) + 0.15 * np.sin(depth * 5.1 + phase[1])
        height_col = np.where(kind_col == VEGETATION, height_col + bumps, height_col)
        top = self.horizon - height_col * r
        bottom = self.horizon + r
        rows = canvas.rows
        inside = visible[None, :] & (rows >= top[None, :]) & (rows < bottom[None, :])
        inv_depth = np.broadcast_to((r / H)[None, :], (self.H, self.W))
        per_pixel = np.broadcast_to(colours[segment][None], (self.H, self.W, 3))
        for cls in (BUILDING, VEGETATION, WALL, FENCE):
            mask = inside & (kind_col == cls)[None, :]
            if not mask.any():
                continue
            canvas.fill(mask, cls, per_pixel, inv_depth)
            if cls == BUILDING:
                height_above = (self.horizon - rows) / r[None, :]
                offset = rng.uniform(0, 1, 2)
                windows = ((np.mod(height_above / 0.9 + offset[0], 1.0) > 0.4)
                           & (np.mod(depth / 1.1 + offset[1], 1.0)[None, :] > 0.35)
                           & (height_above < height_col[None, :] - 0.3) & (height_above > -0.3))
                canvas.fill(mask & windows, BUILDING, self.detail("window"), inv_depth)
            elif cls == FENCE:
                slats = np.mod(depth * 3.0, 1.0)[None, :] < 0.3
                canvas.fill(mask & slats, FENCE, per_pixel * 0.75, inv_depth)

    # Objects ------------------------------------------------------------------------------------
    def street_furniture_and_users(self):
        """Poles, trees and road users, painted far to near."""
        rng, style = self.rng, self.style
        left, right = self.road
        items = []
        bottom_r = (self.H - self.horizon) / self.H
        for side in (-1, 1):
            curb = left if side < 0 else right
            sidewalk = self.sidewalks[0 if side < 0 else 1]
            depth = rng.uniform(1.0, 4.0)
            while depth < 40.0:
                kind = rng.choice(3, p=np.asarray(style.pole_kinds))
                items.append((1.0 / depth, self.pole, curb + side * 0.25, (kind, side)))
                depth += rng.uniform(*style.pole_spacing)
            for _ in range(rng.poisson(style.trees)):
                inv_depth = np.exp(rng.uniform(np.log(0.03), np.log(0.5)))
                u = curb + side * sidewalk * rng.uniform(0.4, 0.8)
                items.append((inv_depth, self.tree, u, ()))
        for kind, mean in style.counts.items():
            for _ in range(rng.poisson(mean)):
                inv_depth = np.exp(rng.uniform(np.log(0.025), np.log(min(0.62, bottom_r + 0.05))))
                if kind in ("person", "parked_bicycle"):
                    side = rng.choice((-1, 1))
                    curb = left if side < 0 else right
                    sidewalk = self.sidewalks[0 if side < 0 else 1]
                    u = curb + side * sidewalk * rng.uniform(0.2, 0.9)
                    if kind == "person" and rng.random() < 0.15:
                        u = rng.uniform(left + 0.3, right - 0.3)   # crossing the road
                elif kind == "rider":
                    u = rng.uniform(left + 0.4, right - 0.4)
                else:
                    u = rng.uniform(left + 0.9, right - 0.9) if right - left > 1.8 else 0.5 * (
                        left + right)
                items.append((inv_depth, getattr(self, kind), u, ()))
        if rng.random() < style.train_probability:
            inv_depth = np.exp(rng.uniform(np.log(0.05), np.log(0.35)))
            items.append((inv_depth, self.train, 0.5 * (left + right), ()))
        items.sort(key=lambda item: item[0])      # stable: equal depths keep their order
        for inv_depth, draw, u, extra in items:
            r = inv_depth * self.H
            draw(self.vx + u * r, self.horizon + r, r, *extra)

    def pole(self, cx, bottom, r, kind, side):
        rng, canvas = self.rng, self.canvas
        d = r / self.H
        height = rng.uniform(2.4, 4.2) * r
        width = 0.12 * r
        top = bottom - height
        canvas.shape(top, bottom, cx - width / 2, cx + width / 2, POLE, self.colour(POLE), d)
        if kind == 1:
            light_w, light_h = 0.26 * r, 0.65 * r
            lx = cx
            if rng.random() < 0.5:       # an arm reaching over the road, the light at its end
                arm = rng.uniform(0.8, 2.0) * r
                x0, x1 = sorted((cx, cx - side * arm))
                canvas.shape(top, top + width, x0, x1, POLE, self.colour(POLE), d)
                lx = cx - side * arm
            self.traffic_light(lx, top + 0.05 * r, light_w, light_h, d)
        elif kind == 2:
            sy = bottom - rng.uniform(1.6, 2.2) * r
            size = rng.uniform(0.22, 0.32) * r
            colour = self.colour(TRAFFIC_SIGN)
            if rng.random() < 0.5:
                canvas.ellipse(sy, cx, size, size, TRAFFIC_SIGN, colour, d)
                canvas.ellipse(sy, cx, 0.6 * size, 0.6 * size, TRAFFIC_SIGN,
                               0.5 * colour + 0.5 * self.detail("marking"), d)
            else:
                canvas.shape(sy - size, sy + 0.6 * size, cx - 1.2 * size, cx + 1.2 * size,
                             TRAFFIC_SIGN, colour, d)
        else:
            canvas.shape(top, top + 0.12 * r, cx - 0.35 * r * side, cx + 0.05 * r, POLE,
                         self.colour(POLE), d)

    def traffic_light(self, cx, top, width, height, d):
        canvas = self.canvas
        canvas.shape(top, top + height, cx - width / 2, cx + width / 2, TRAFFIC_LIGHT,
                     self.colour(TRAFFIC_LIGHT), d)
        lit = 0 if self.rng.random() < 0.5 else 2          # red on top or green at the bottom
        for lamp in range(3):
            if lamp == lit:
                colour = self.detail("red" if lit == 0 else "green")
            else:
                colour = self.style.palette[TRAFFIC_LIGHT] * 1.6
            cy = top + height * (lamp + 0.5) / 3
            canvas.ellipse(cy, cx, 0.12 * height, 0.3 * width, TRAFFIC_LIGHT, colour, d)

    def tree(self, cx, bottom, r):
        rng, canvas, d = self.rng, self.canvas, r / self.H
        trunk = rng.uniform(1.2, 2.2) * r
        canvas.shape(bottom - trunk, bottom, cx - 0.07 * r, cx + 0.07 * r, VEGETATION,
                     self.detail("trunk"), d)
        crown = rng.uniform(0.6, 1.2) * r
        canvas.ellipse(bottom - trunk - 0.6 * crown, cx, crown, crown * rng.uniform(0.8, 1.1),
                       VEGETATION, self.colour(VEGETATION), d)

    def _wheels(self, x0, x1, bottom, r, cls, d, height=0.22):
        tyre = self.detail("tyre")
        w = x1 - x0
        for wx in (x0 + 0.06 * w, x1 - 0.28 * w):
            self.canvas.shape(bottom - height * r, bottom, wx, wx + 0.22 * w, cls, tyre, d)

    def car(self, cx, bottom, r):
        rng, canvas, d = self.rng, self.canvas, r / self.H
        scale = self.style.object_scale
        w, h = rng.uniform(1.1, 1.5) * scale * r, rng.uniform(0.85, 1.05) * scale * r
        x0, x1 = cx - w / 2, cx + w / 2
        colour = self.colour(CAR)
        self._wheels(x0, x1, bottom, r, CAR, d)
        canvas.shape(bottom - 0.6 * h, bottom - 0.12 * h, x0, x1, CAR, colour, d)
        canvas.shape(bottom - h, bottom - 0.6 * h, x0 + 0.15 * w, x1 - 0.15 * w, CAR, colour, d)
        canvas.shape(bottom - 0.93 * h, bottom - 0.62 * h, x0 + 0.2 * w, x1 - 0.2 * w, CAR,
                     self.detail("glass"), d)
        for lx in (x0 + 0.04 * w, x1 - 0.16 * w):
            canvas.shape(bottom - 0.5 * h, bottom - 0.4 * h, lx, lx + 0.12 * w, CAR,
                         self.detail("red"), d)

    def truck(self, cx, bottom, r):
        rng, canvas, d = self.rng, self.canvas, r / self.H
        scale = self.style.object_scale
        w, h = rng.uniform(1.4, 1.7) * scale * r, rng.uniform(2.0, 2.6) * scale * r
        x0, x1 = cx - w / 2, cx + w / 2
        colour = self.colour(TRUCK)
        self._wheels(x0, x1, bottom, r, TRUCK, d, height=0.3)
        canvas.shape(bottom - h, bottom - 0.15 * h, x0, x1, TRUCK, colour, d)
        canvas.shape(bottom - 0.3 * h, bottom - 0.22 * h, x0, x1, TRUCK, colour * 0.7, d)

    def bus(self, cx, bottom, r):
        rng, canvas, d = self.rng, self.canvas, r / self.H
        scale = self.style.object_scale
        w, h = rng.uniform(1.6, 1.8) * scale * r, rng.uniform(2.0, 2.3) * scale * r
        x0, x1 = cx - w / 2, cx + w / 2
        self._wheels(x0, x1, bottom, r, BUS, d, height=0.3)
        canvas.shape(bottom - h, bottom - 0.1 * h, x0, x1, BUS, self.colour(BUS), d)
        canvas.shape(bottom - 0.88 * h, bottom - 0.55 * h, x0 + 0.08 * w, x1 - 0.08 * w, BUS,
                     self.detail("glass"), d)

    def train(self, cx, bottom, r):
        rng, canvas, d = self.rng, self.canvas, r / self.H
        w, h = rng.uniform(1.9, 2.3) * r, rng.uniform(2.3, 2.7) * r
        x0, x1 = cx - w / 2, cx + w / 2
        colour = self.colour(TRAIN)
        canvas.shape(bottom - h, bottom - 0.04 * h, x0, x1, TRAIN, colour, d)
        canvas.shape(bottom - 0.85 * h, bottom - 0.5 * h, x0 + 0.1 * w, x1 - 0.1 * w, TRAIN,
                     self.detail("glass"), d)
        canvas.shape(bottom - 0.42 * h, bottom - 0.36 * h, x0, x1, TRAIN, colour * 0.6, d)

    def _figure(self, cx, bottom, height, width, cls, d, *, legs=True):
        """Head, torso and (optionally) legs of a standing or riding figure."""
        canvas, colour = self.canvas, self.colour(cls)
        top = bottom - height
        canvas.shape(top + 0.14 * height, top + 0.56 * height, cx - width / 2, cx + width / 2,
                     cls, colour, d)
        canvas.ellipse(top + 0.075 * height, cx, 0.075 * height, 0.3 * width, cls,
                       self.detail("skin"), d)
        if legs:
            stride = self.rng.uniform(0.0, 0.15) * width
            canvas.shape(top + 0.56 * height, bottom, cx - 0.42 * width - stride, cx - 0.04 * width,
                         cls, colour * 0.75, d)
            canvas.shape(top + 0.56 * height, bottom, cx + 0.04 * width, cx + 0.42 * width + stride,
                         cls, colour * 0.75, d)

    def person(self, cx, bottom, r):
        scale = self.style.object_scale
        height = self.rng.uniform(1.0, 1.25) * scale * r
        self._figure(cx, bottom, height, 0.3 * height, PERSON, r / self.H)

    def _cycle(self, cx, bottom, r, cls):
        """A bicycle or motorcycle seen from the side: two wheels and a frame or body."""
        canvas, d, scale = self.canvas, r / self.H, self.style.object_scale
        motor = cls == MOTORCYCLE
        length = (1.35 if motor else 1.1) * scale * r
        wheel = (0.24 if motor else 0.22) * scale * r
        colour = self.colour(cls)
        for wx in (cx - length / 2 + wheel, cx + length / 2 - wheel):
            canvas.ellipse(bottom - wheel, wx, wheel, wheel, cls, self.detail("tyre"), d)
            canvas.ellipse(bottom - wheel, wx, 0.5 * wheel, 0.5 * wheel, cls, colour, d)
        if motor:
            canvas.shape(bottom - 2.6 * wheel, bottom - 0.9 * wheel, cx - 0.3 * length,
                         cx + 0.3 * length, cls, colour, d)
        else:
            canvas.shape(bottom - 1.6 * wheel, bottom - 1.2 * wheel, cx - length / 2 + wheel,
                         cx + length / 2 - wheel, cls, colour, d)
            seat_post = cx + 0.2 * length
            canvas.shape(bottom - 2.6 * wheel, bottom - 1.2 * wheel, seat_post - 0.1 * wheel,
                         seat_post + 0.2 * wheel, cls, colour, d)
        return wheel

    def rider(self, cx, bottom, r):
        cls = MOTORCYCLE if self.rng.random() < 0.4 else BICYCLE
        wheel = self._cycle(cx, bottom, r, cls)
        height = self.rng.uniform(1.0, 1.2) * self.style.object_scale * r
        seat = bottom - 2.0 * wheel
        self._figure(cx - 0.05 * r, seat + 0.3 * height, 0.85 * height, 0.3 * height, RIDER,
                     r / self.H, legs=False)
        self.canvas.shape(seat - 0.05 * height, bottom - 0.6 * wheel, cx - 0.08 * height,
                          cx + 0.06 * height, RIDER, self.colour(RIDER) * 0.75, r / self.H)

    def parked_bicycle(self, cx, bottom, r):
        self._cycle(cx, bottom, r, BICYCLE)


# Appearance ------------------------------------------------------------------------------------
def _blur(image, sigma):
    """Separable Gaussian blur (radius 2, reflected borders) of an (H, W, 3) float32 image."""
    taps = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    padded = np.pad(image, ((2, 2), (0, 0), (0, 0)), mode="reflect")
    image = sum(taps[k] * padded[k:k + image.shape[0]] for k in range(5))
    padded = np.pad(image, ((0, 0), (2, 2), (0, 0)), mode="reflect")
    return sum(taps[k] * padded[:, k:k + image.shape[1]] for k in range(5))


def _smooth_noise(rng, height, width, cell):
    """Standard-normal noise on a grid of `cell`-pixel cells, bilinearly interpolated: (H, W)."""
    grid = rng.normal(0.0, 1.0, (height // cell + 2, width // cell + 2)).astype(np.float32)
    ys = (np.arange(height, dtype=np.float32) + 0.5) / cell
    xs = (np.arange(width, dtype=np.float32) + 0.5) / cell
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    low = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + low * fy


def _render_source(canvas, rng):
    brightness = np.float32(rng.uniform(0.92, 1.08))
    return canvas.colour * brightness


def _render_target(canvas, rng):
    H, W = canvas.height, canvas.width
    image = canvas.colour * (1.0 + 0.1 * _smooth_noise(rng, H, W, 6))[..., None]
    cast = rng.uniform(0.92, 1.08, 3).astype(np.float32) * np.float32(rng.uniform(0.8, 1.0))
    gradient = 0.85 + 0.2 * (canvas.rows / H)      # darker at the top: dusk
    image = image * cast * gradient[..., None]
    fog_colour = np.array([150, 160, 178], dtype=np.float32) * np.float32(rng.uniform(0.85, 1.0))
    fog = rng.uniform(0.2, 0.45) * np.exp(-canvas.inv_depth / 0.06)
    image = image * (1 - fog[..., None]) + fog_colour * fog[..., None]
    image = _blur(image, rng.uniform(0.5, 1.0))
    return image + rng.normal(0.0, rng.uniform(4.0, 7.0), image.shape).astype(np.float32)


def generate_sample(domain, index, *, seed=0, split="train", height=DEFAULT_HEIGHT,
                    width=DEFAULT_WIDTH):
    """One scene of `domain` ("source" or "target"): returns (image uint8 (H, W, 3) RGB,
    label uint8 (H, W) train ids). Deterministic in (seed, domain, split, index)."""
    _check_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_positive_int("seed", seed, allow_zero=True)
    _check_positive_int("index", index, allow_zero=True)
    _check_size(height, width)
    entropy = [int(seed), _DOMAIN_KEYS[domain], _SPLIT_KEYS[split], int(index)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    canvas = _Canvas(height, width)
    _Painter(canvas, rng, _STYLES[domain]).scene()
    render = _render_source if domain == "source" else _render_target
    image = np.clip(np.rint(render(canvas, rng)), 0, 255).astype(np.uint8)
    return image, canvas.label.copy()


# Files -----------------------------------------------------------------------------------------
def _label_id_table():
    table = np.zeros(256, dtype=np.uint8)     # ignore (255) -> 0 'unlabeled'
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
        table[train_id] = label_id
    return table


_TRAIN_ID_TO_LABEL_ID = _label_id_table()


def train_ids_to_label_ids(label):
    """uint8 (H, W) train ids (255 = ignore) -> uint8 (H, W) Cityscapes label ids (ignore -> 0)."""
    label = np.asarray(label)
    if label.dtype != np.uint8:
        raise TypeError(f"label must be uint8 train ids, got {label.dtype}")
    bad = (label >= NUM_CLASSES) & (label != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"label holds values {np.unique(label[bad]).tolist()} that are neither "
                         f"train ids 0..{NUM_CLASSES - 1} nor {IGNORE_INDEX}")
    return _TRAIN_ID_TO_LABEL_ID[label]


def image_stem(domain, split, index):
    """Cityscapes-style stem `<city>_000000_<frame:06d>` of image `index` of a split."""
    frame = index + (VAL_FRAME_OFFSET if split == "val" else 0)
    return f"{CITY_NAMES[domain]}_000000_{frame:06d}"


def _save_png_atomic(array, path):
    with atomic_write(path, durable=False) as handle:  # synthetic.json, written last, vouches for them
        Image.fromarray(array).save(handle, format="PNG")


def _read_manifest(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _tree_complete(domain_root, domain, manifest):
    """True if every file the manifest promises is there (cheap: names only)."""
    city = CITY_NAMES[domain]
    for split, count in (("train", manifest["num_train"]), ("val", manifest["num_val"])):
        for kind, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine",
                                                                    "_gtFine_labelIds.png")):
            folder = domain_root / kind / split / city
            if not folder.is_dir():
                return False
            names = set(os.listdir(folder))
            if any(image_stem(domain, split, i) + suffix not in names for i in range(count)):
                return False
    return True


@contextlib.contextmanager
def _locked(domain_root):
    """Hold an exclusive lock on domain_root while (re)generating, so that processes started
    together (DDP ranks) do not write the same tree at once."""
    if fcntl is None:
        yield
        return
    with open(domain_root / ".synthetic.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_synthetic(root, domain, *, seed=0, num_train=DEFAULT_NUM_TRAIN,
                     num_val=DEFAULT_NUM_VAL, height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH,
                     progress=False):
    """Write the synthetic `domain` as a Cityscapes-layout tree under root/<domain>/ unless an
    identical one is there, and return root/<domain> (pathlib.Path).

    Layout: leftImg8bit/{train,val}/<city>/<city>_000000_<frame:06d>_leftImg8bit.png (RGB) and
    gtFine/{train,val}/<city>/<city>_000000_<frame:06d>_gtFine_labelIds.png (Cityscapes label ids),
    city "synsource" or "syntarget", train frames 0.., val frames 100000... Every file is written
    atomically; the manifest root/<domain>/synthetic.json (the generation parameters) is written
    last, so a tree left half-written by an interrupted run, or one made with other parameters, is
    removed and generated again. Only this generator's city folders are ever deleted."""
    _check_domain(domain)
    _check_positive_int("seed", seed, allow_zero=True)
    _check_positive_int("num_train", num_train, allow_zero=True)
    _check_positive_int("num_val", num_val, allow_zero=True)
    _check_size(height, width)
    if max(num_train, num_val) > VAL_FRAME_OFFSET:
        raise ValueError(f"num_train and num_val must be at most {VAL_FRAME_OFFSET}, got "
                         f"{num_train} and {num_val}")
    domain_root = Path(root) / domain
    manifest = {"generator": "fastst.data.synthetic", "version": GENERATOR_VERSION,
                "domain": domain, "seed": int(seed), "num_train": int(num_train),
                "num_val": int(num_val), "height": int(height), "width": int(width)}
    manifest_path = domain_root / MANIFEST_NAME
    if _read_manifest(manifest_path) == manifest and _tree_complete(domain_root, domain, manifest):
        return domain_root
    domain_root.mkdir(parents=True, exist_ok=True)
    with _locked(domain_root):
        # Another process may have finished the tree while this one waited for the lock.
        if _read_manifest(manifest_path) == manifest and _tree_complete(domain_root, domain,
                                                                        manifest):
            return domain_root
        with contextlib.suppress(FileNotFoundError):
            manifest_path.unlink()
        city = CITY_NAMES[domain]
        jobs = []
        for split, count in (("train", num_train), ("val", num_val)):
            image_dir = domain_root / "leftImg8bit" / split / city
            label_dir = domain_root / "gtFine" / split / city
            for folder in (image_dir, label_dir):
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
            jobs += [(split, i, image_dir, label_dir) for i in range(count)]
        if progress:
            from tqdm import tqdm
            jobs = tqdm(jobs, desc=f"synthetic {domain}", unit="img")
        for split, index, image_dir, label_dir in jobs:
            image, label = generate_sample(domain, index, seed=seed, split=split, height=height,
                                           width=width)
            stem = image_stem(domain, split, index)
            _save_png_atomic(image, image_dir / f"{stem}_leftImg8bit.png")
            _save_png_atomic(train_ids_to_label_ids(label),
                             label_dir / f"{stem}_gtFine_labelIds.png")
        write_json_atomic(manifest, manifest_path, indent=2, sort_keys=True)
    return domain_root


# Argument checks -------------------------------------------------------------------------------
def _check_domain(domain):
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")


def _check_positive_int(name, value, *, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_size(height, width):
    _check_positive_int("height", height)
    _check_positive_int("width", width)
    if height < 16 or width < 16:
        raise ValueError(f"height and width must be at least 16 pixels, got {height}x{width}")
