"""Scene drawing of the synthetic domains (``fastst.data.synthetic``): a ``Canvas`` (label,
colour and inverse depth of every pixel) and the ``Painter`` that draws one perspective street on
it, far to near, with the statistics of a domain's ``Style`` (fastst/data/synthetic_style.py)."""
import numpy as np

from .synthetic_style import (BICYCLE, BUILDING, BUS, CAR, FENCE, MOTORCYCLE, PERSON, POLE, RIDER,
                              ROAD, SIDEWALK, SKY, TERRAIN, TRAFFIC_LIGHT, TRAFFIC_SIGN, TRAIN,
                              TRUCK, VEGETATION, WALL)

__all__ = ["Canvas", "Painter"]


class Canvas:
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


class Painter:
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
        # Poles and traffic lights are drawn about 2.5x thicker than in life (0.3 r, not 0.12 r):
        # at the demo's 97x193 a real-proportioned pole is a pixel or two wide, an eighth of the
        # model's 8-pixel logit cell, where Cityscapes poles span one to several cells. Thinner
        # than a cell, their pseudo labels are mostly wrong and self-training erases the class
        # (docs/demo.md §4).
        width = 0.3 * r
        top = bottom - height
        canvas.shape(top, bottom, cx - width / 2, cx + width / 2, POLE, self.colour(POLE), d)
        if kind == 1:
            light_w, light_h = 0.5 * r, 1.0 * r
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
            canvas.shape(top, top + width, cx - 0.35 * r * side, cx + 0.05 * r, POLE,
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
