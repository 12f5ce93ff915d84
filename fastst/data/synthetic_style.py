"""The two synthetic domains' statistics and appearance (``fastst.data.synthetic``): class
colours, layout statistics (``Style``, one per domain in ``STYLES``) and how a painted canvas
becomes an image (``render_source``: flat colours, a brightness change; ``render_target``:
texture, colour cast, dusk gradient, depth fog, blur and sensor noise)."""
from dataclasses import dataclass

import numpy as np

from .ids import NUM_CLASSES

__all__ = ["Style", "STYLES", "render_source", "render_target"]

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
class Style:
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


SOURCE_STYLE = Style(
    palette=_SOURCE_PALETTE, details=_SOURCE_DETAILS, instance_jitter=8.0,
    horizon=(0.36, 0.46), building_height=(2.0, 9.0),
    front_classes=((BUILDING, 0.5), (VEGETATION, 0.15), (WALL, 0.12), (FENCE, 0.1), (-1, 0.13)),
    back_vegetation=0.25, skyline_vegetation=0.3, verge=0.3,
    pole_spacing=(2.0, 6.0), pole_kinds=(0.4, 0.3, 0.3), trees=0.8,
    counts={"car": 5.0, "truck": 0.6, "bus": 0.5, "person": 2.5, "rider": 0.7,
            "parked_bicycle": 0.5},
    object_scale=1.0, train_probability=0.08)

TARGET_STYLE = Style(
    palette=_TARGET_PALETTE, details=_TARGET_DETAILS, instance_jitter=14.0,
    horizon=(0.4, 0.5), building_height=(1.5, 6.0),
    front_classes=((BUILDING, 0.35), (VEGETATION, 0.28), (WALL, 0.12), (FENCE, 0.13), (-1, 0.12)),
    back_vegetation=0.45, skyline_vegetation=0.5, verge=0.5,
    pole_spacing=(2.5, 7.0), pole_kinds=(0.35, 0.35, 0.3), trees=1.4,
    counts={"car": 3.5, "truck": 0.8, "bus": 0.35, "person": 4.0, "rider": 1.2,
            "parked_bicycle": 0.8},
    object_scale=1.12, train_probability=0.1)

STYLES = {"source": SOURCE_STYLE, "target": TARGET_STYLE}


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


def render_source(canvas, rng):
    brightness = np.float32(rng.uniform(0.92, 1.08))
    return canvas.colour * brightness


def render_target(canvas, rng):
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
