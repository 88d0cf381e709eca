"""Synthetic cartoon faces, written in the layout real face data uses.

The first run of the project trains and verifies on these, so no download is
needed and the real loaders read real JPEG files:

  <root>/train/<identity>/<identity>_0001.jpg   training identities
  <root>/verify/<identity>/<identity>_0001.jpg  held-out identities
  <root>/pairs.txt                              LFW-format pairs (verify)
  <root>/SYNTHETIC.txt                          provenance and parameters

Each identity is a set of random drawing parameters (face shape, skin, hair,
eyes, brows, nose, mouth, glasses, beard, background band). Each image of it
adds nuisance: pose (rotation, shift, scale), expression, gaze, lighting,
colour cast, blur and sensor noise. Faces are drawn already aligned: at
rest, the eyes, nose tip and mouth corners sit near the ArcFace 112x112
five-point template.

Everything follows from one seed: identity k draws from the stream
(seed, 0, k), image i of it from (seed, 1, k, i) and the pairs from
(seed, 2), so the same arguments give byte-identical files.
"""

import argparse
from collections.abc import Sequence
import inspect
import logging
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFilter

IMAGE_SIZE = 112
JPEG_QUALITY = 95
MARKER_NAME = "SYNTHETIC.txt"
PAIRS_NAME = "pairs.txt"
TRAIN_DIR = "train"
VERIFY_DIR = "verify"

# Bump when the drawing changes, so sets made by an older version are redone.
GENERATOR_VERSION = 1

# The ArcFace 112x112 template, (x, y) in pixels: left eye, right eye, nose
# tip, left and right mouth corners.
TEMPLATE_LANDMARKS = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)

# Drawing happens at twice the output size and is box-downsampled, which
# anti-aliases every edge without a dependency beyond PIL.
_SUPERSAMPLE = 2
_CANVAS = IMAGE_SIZE * _SUPERSAMPLE
# Pixel-centre coordinates of the canvas, in output pixels.
_GRID_Y, _GRID_X = (np.mgrid[0:_CANVAS, 0:_CANVAS] + 0.5) / _SUPERSAMPLE

_MIDLINE_X = float(TEMPLATE_LANDMARKS[:, 0].mean())
_EYE_Y = float(TEMPLATE_LANDMARKS[:2, 1].mean())
_EYE_HALF_SPACING = float(
    TEMPLATE_LANDMARKS[1, 0] - TEMPLATE_LANDMARKS[0, 0]) / 2
_NOSE_Y = float(TEMPLATE_LANDMARKS[2, 1])
_MOUTH_Y = float(TEMPLATE_LANDMARKS[3:, 1].mean())
_MOUTH_HALF_WIDTH = float(
    TEMPLATE_LANDMARKS[4, 0] - TEMPLATE_LANDMARKS[3, 0]) / 2
# Pose is applied about this point, near the centre of the five landmarks.
_POSE_CENTRE = (_MIDLINE_X, 66.0)

_SKIN_LIGHT = (240, 206, 180)
_SKIN_DARK = (86, 56, 40)
_HAIR_COLOURS = (
    (28, 24, 22),     # Black.
    (66, 42, 28),     # Dark brown.
    (110, 72, 42),    # Brown.
    (146, 72, 38),    # Auburn.
    (206, 170, 108),  # Blond.
    (150, 148, 144),  # Grey.
)
_IRIS_COLOURS = (
    (96, 58, 30), (46, 30, 20), (68, 116, 176), (86, 128, 78),
    (118, 128, 140), (136, 106, 58),
)
# Few bands shared by many identities, with wide per-image jitter: the
# background hints at identity only as much as a usual photo setting would.
_BACKGROUND_BANDS = (
    (196, 180, 152), (120, 148, 190), (118, 158, 118), (150, 150, 150),
    (64, 62, 72), (198, 160, 170),
)
_HAIR_STYLES = ("bald", "short", "fringe", "side_part", "long", "curly")
_HAIR_STYLE_PROBS = (0.08, 0.28, 0.18, 0.2, 0.16, 0.1)
_BEARD_STYLES = ("none", "moustache", "goatee", "full")
_BEARD_STYLE_PROBS = (0.64, 0.12, 0.1, 0.14)
_SCLERA = (240, 238, 232)
_PUPIL = (18, 14, 12)


def _colour(values: Sequence[float]) -> tuple[int, int, int]:
  clipped = np.clip(np.rint(np.asarray(values, np.float64)), 0, 255)
  return tuple(int(v) for v in clipped)


def _jitter(rng: np.random.Generator, base: Sequence[float],
            spread: float) -> tuple[int, int, int]:
  return _colour(np.asarray(base) + rng.normal(0.0, spread, 3))


def _shade(colour: Sequence[int], factor: float) -> tuple[int, int, int]:
  return _colour(np.asarray(colour, np.float64) * factor)


def _mix(a: Sequence[int], b: Sequence[int],
         weight: float) -> tuple[int, int, int]:
  """(1 - weight) * a + weight * b."""
  return _colour((1 - weight) * np.asarray(a, np.float64)
                 + weight * np.asarray(b, np.float64))


def _pick(rng: np.random.Generator, options: Sequence[Any],
          probs: Sequence[float] | None = None) -> Any:
  return options[int(rng.choice(len(options), p=probs))]


# ---------------------------------------------------------------------------
# Identity parameters.


def _sample_geometry(rng: np.random.Generator) -> dict[str, float]:
  """Face outline and feature placement, in output pixels."""
  return {
      "face_cy": rng.uniform(58.0, 65.0),
      "face_half_width": rng.uniform(33.0, 41.0),
      "face_half_height": rng.uniform(47.0, 56.0),
      # Superellipse exponent of the lower half: 1.6 tapers to the chin,
      # 3 gives a square jaw.
      "jaw_exponent": rng.uniform(1.6, 3.2),
      "ear_size": rng.uniform(5.0, 9.0),
      "eye_half_spacing": _EYE_HALF_SPACING + rng.uniform(-2.5, 2.5),
      "eye_y": _EYE_Y + rng.uniform(-2.0, 2.0),
      "eye_radius": rng.uniform(4.2, 6.8),
      "eye_aspect": rng.uniform(0.42, 0.72),
      "iris_ratio": rng.uniform(0.5, 0.7),
      "brow_angle": rng.uniform(-14.0, 14.0),  # Degrees, + is inner end up.
      "brow_gap": rng.uniform(5.0, 9.0),
      "brow_thickness": rng.uniform(1.4, 3.4),
      "brow_arch": rng.uniform(0.0, 2.5),
      "nose_y": _NOSE_Y + rng.uniform(-3.0, 3.0),
      "nose_width": rng.uniform(7.0, 14.0),
      "mouth_y": _MOUTH_Y + rng.uniform(-3.0, 2.5),
      "mouth_half_width": _MOUTH_HALF_WIDTH + rng.uniform(-4.0, 3.0),
      "upper_lip": rng.uniform(1.2, 3.2),
      "lower_lip": rng.uniform(1.6, 4.0),
  }


def _sample_colours(rng: np.random.Generator) -> dict[str, Any]:
  skin = _mix(_SKIN_LIGHT, _SKIN_DARK, rng.uniform())
  skin = _jitter(rng, skin, 6.0)
  return {
      "skin_colour": skin,
      "hair_colour": _jitter(rng, _pick(rng, _HAIR_COLOURS), 12.0),
      "iris_colour": _jitter(rng, _pick(rng, _IRIS_COLOURS), 10.0),
      "lip_colour": _jitter(rng, _mix(skin, (160, 58, 62), 0.35), 8.0),
      "background_band": int(rng.integers(len(_BACKGROUND_BANDS))),
  }


def _sample_hair(rng: np.random.Generator) -> dict[str, Any]:
  """Hair style and shape; a style ignores the fields it does not use."""
  style = _pick(rng, _HAIR_STYLES, _HAIR_STYLE_PROBS)
  hair = {
      "hair_style": style,
      "hair_volume": rng.uniform(1.5, 5.0),
      "hairline_y": rng.uniform(14.0, 24.0),
      "hairline_depth": rng.uniform(2.0, 10.0),
      "hairline_slope": 0.0,
      "hair_length": rng.uniform(60.0, 80.0),
      "curl_count": int(rng.integers(7, 12)),
  }
  if style == "fringe":
    hair["hairline_y"] = _EYE_Y - rng.uniform(13.0, 19.0)
    hair["hairline_depth"] = rng.uniform(0.0, 3.0)
    hair["hair_volume"] = rng.uniform(3.0, 7.0)
  elif style in ("side_part", "long"):
    hair["hairline_slope"] = rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.35)
    hair["hair_volume"] = rng.uniform(3.0, 7.0)
  elif style == "curly":
    hair["hair_volume"] = rng.uniform(7.0, 12.0)
  return hair


def _sample_traits(rng: np.random.Generator) -> dict[str, Any]:
  """Binary or categorical traits: beard, glasses, a mole."""
  side = rng.choice([-1.0, 1.0])
  return {
      "beard_style": _pick(rng, _BEARD_STYLES, _BEARD_STYLE_PROBS),
      "beard_density": rng.uniform(0.55, 1.0),
      "glasses": bool(rng.uniform() < 0.22),
      "glasses_round": bool(rng.uniform() < 0.5),
      "glasses_colour": _jitter(rng, _pick(
          rng, ((20, 20, 22), (90, 60, 40), (170, 170, 175))), 8.0),
      "glasses_tint": float(rng.uniform(0.2, 0.45) * (rng.uniform() < 0.3)),
      "mole": bool(rng.uniform() < 0.3),
      "mole_x": _MIDLINE_X + side * rng.uniform(12.0, 24.0),
      "mole_y": rng.uniform(58.0, 84.0),
      "mole_radius": rng.uniform(0.9, 1.6),
  }


def sample_identity(rng: np.random.Generator) -> dict[str, Any]:
  """Draws the parameters that define one synthetic person.

  Args:
    rng: the identity's own generator; all of its draws are consumed here.

  Returns:
    A flat dict of floats (positions and sizes in output pixels of the
    112x112 image, angles in degrees), ints, bools, strings and RGB tuples,
    to pass to `render_face`.
  """
  identity = {}
  identity.update(_sample_geometry(rng))
  identity.update(_sample_colours(rng))
  identity.update(_sample_hair(rng))
  identity.update(_sample_traits(rng))
  return {k: float(v) if isinstance(v, np.floating) else v
          for k, v in identity.items()}


def identity_landmarks(identity_params: dict[str, Any]) -> np.ndarray:
  """The five landmarks of an identity at rest (no pose, neutral face).

  Returns:
    float32 [5, 2] (x, y) in pixels of the 112x112 image, ordered as
    `TEMPLATE_LANDMARKS`.
  """
  p = identity_params
  eye_dx = p["eye_half_spacing"]
  mouth_dx = p["mouth_half_width"]
  return np.array(
      [[_MIDLINE_X - eye_dx, p["eye_y"]], [_MIDLINE_X + eye_dx, p["eye_y"]],
       [_MIDLINE_X, p["nose_y"]],
       [_MIDLINE_X - mouth_dx, p["mouth_y"]],
       [_MIDLINE_X + mouth_dx, p["mouth_y"]]], dtype=np.float32)


# ---------------------------------------------------------------------------
# Per-image nuisance.


def _sample_nuisance(rng: np.random.Generator) -> dict[str, Any]:
  blink = rng.uniform() < 0.08
  mouth_open = rng.uniform() < 0.35
  blurred = rng.uniform() < 0.25
  return {
      "rotation": rng.uniform(-8.0, 8.0),  # Degrees.
      "shift": rng.uniform(-3.0, 3.0, 2),  # Pixels.
      "scale": rng.uniform(0.95, 1.05),
      # Small yaw: the features slide sideways inside the outline.
      "yaw_shift": rng.uniform(-2.0, 2.0),
      "smile": rng.uniform(-0.6, 1.0),
      "mouth_open": rng.uniform(0.6, 4.0) if mouth_open else 0.0,
      "eye_open": rng.uniform(0.0, 0.25) if blink else rng.uniform(0.55, 1.0),
      "gaze": (rng.uniform(-1.2, 1.2), rng.uniform(-0.6, 0.6)),
      "brow_raise": rng.uniform(-1.2, 1.8),
      "background_offset": rng.normal(0.0, 20.0, 3),
      "clothing_colour": _colour(rng.uniform(20.0, 235.0, 3)),
      "brightness": rng.uniform(-22.0, 22.0),
      "contrast": rng.uniform(0.78, 1.22),
      "channel_gains": 1.0 + rng.normal(0.0, 0.035, 3),
      "light_strength": rng.uniform(0.0, 0.3),
      "light_angle": rng.uniform(0.0, 2 * math.pi),
      "blur_radius": rng.uniform(0.5, 1.6) if blurred else 0.0,
      "noise_sigma": rng.uniform(1.0, 6.0),
  }


# ---------------------------------------------------------------------------
# Drawing, on a canvas twice the output size. Coordinates are given in
# output pixels and scaled here.


def _box(cx: float, cy: float, rx: float, ry: float) -> list[float]:
  s = _SUPERSAMPLE
  return [(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s]


def _points(xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float]]:
  s = _SUPERSAMPLE
  return [(float(x) * s, float(y) * s) for x, y in zip(xs, ys)]


def _width(pixels: float) -> int:
  return max(1, int(round(pixels * _SUPERSAMPLE)))


def _paint(image: Image.Image, colour: Sequence[int], mask: np.ndarray,
           opacity: float = 1.0) -> None:
  """Paints `colour` where the boolean canvas `mask` is set."""
  alpha = (mask * round(255 * opacity)).astype(np.uint8)
  image.paste(tuple(colour), mask=Image.fromarray(alpha))


def _face_mask(p: dict[str, Any]) -> np.ndarray:
  dx = np.abs(_GRID_X - _MIDLINE_X) / p["face_half_width"]
  dy = (_GRID_Y - p["face_cy"]) / p["face_half_height"]
  exponent = np.where(dy > 0, p["jaw_exponent"], 2.0)
  return dx ** exponent + dy ** 2 <= 1.0


def _hair_mask(p: dict[str, Any], face: np.ndarray) -> np.ndarray:
  """Hair over the scalp, plus the rim of hair around the face's sides."""
  volume = p["hair_volume"]
  rx = p["face_half_width"] + volume
  ry = p["face_half_height"] + volume
  dx = _GRID_X - _MIDLINE_X
  dy = _GRID_Y - p["face_cy"]
  outer = (dx / rx) ** 2 + (dy / ry) ** 2 <= 1.0
  if p["hair_style"] == "curly":
    outer |= _curl_mask(p, rx, ry)

  if p["hair_style"] == "bald":
    band = np.abs(_GRID_Y - (p["eye_y"] - 5.0)) < 9.0
    return outer & ~face & band

  hairline = (p["hairline_y"] + p["hairline_slope"] * dx
              + p["hairline_depth"] * (dx / p["face_half_width"]) ** 2)
  side_limit = 200.0 if p["hair_style"] == "long" else p["eye_y"] + 6.0
  scalp = outer & (_GRID_Y < hairline)
  rim = outer & ~face & (_GRID_Y < side_limit)
  return scalp | rim


def _curl_mask(p: dict[str, Any], rx: float, ry: float) -> np.ndarray:
  """Round tufts along the upper half of the hair outline."""
  mask = np.zeros(_GRID_X.shape, bool)
  radius = 0.55 * p["hair_volume"]
  for angle in np.linspace(math.pi * 0.9, math.pi * 2.1, p["curl_count"]):
    cx = _MIDLINE_X + rx * math.cos(angle)
    cy = p["face_cy"] + ry * math.sin(angle)
    mask |= (_GRID_X - cx) ** 2 + (_GRID_Y - cy) ** 2 <= radius ** 2
  return mask


def _beard_mask(p: dict[str, Any], face: np.ndarray) -> np.ndarray:
  """Lower face below a line that rises towards the sideburns."""
  side = np.abs(_GRID_X - _MIDLINE_X) / p["face_half_width"]
  top = p["nose_y"] + 4.0 - 16.0 * side ** 1.5
  return face & (_GRID_Y > top)


def _draw_body(draw: ImageDraw.ImageDraw, p: dict[str, Any],
               n: dict[str, Any]) -> None:
  neck_colour = _shade(p["skin_colour"], 0.85)
  draw.ellipse(_box(_MIDLINE_X, 126.0, 90.0, 26.0),
               fill=n["clothing_colour"])
  half = 0.55 * p["face_half_width"]
  draw.rectangle(_box(_MIDLINE_X, p["face_cy"] + 40.0, half, 40.0),
                 fill=neck_colour)
  if p["hair_style"] == "long":
    rx = p["face_half_width"] + p["hair_volume"] + 1.0
    top = p["face_cy"]
    draw.ellipse(_box(_MIDLINE_X, top, rx, p["face_half_height"] + 4.0),
                 fill=p["hair_colour"])
    draw.rectangle(_box(_MIDLINE_X, top + p["hair_length"] / 2, rx,
                        p["hair_length"] / 2), fill=p["hair_colour"])


def _draw_ears(draw: ImageDraw.ImageDraw, p: dict[str, Any]) -> None:
  colour = _shade(p["skin_colour"], 0.92)
  y = (p["eye_y"] + p["nose_y"]) / 2
  size = p["ear_size"]
  for side in (-1.0, 1.0):
    x = _MIDLINE_X + side * (p["face_half_width"] - 1.0)
    draw.ellipse(_box(x, y, 0.6 * size, size), fill=colour)


def _draw_nose(draw: ImageDraw.ImageDraw, p: dict[str, Any],
               x: float) -> None:
  shadow = _shade(p["skin_colour"], 0.78)
  nostril = _shade(p["skin_colour"], 0.5)
  tip_y = p["nose_y"]
  half = p["nose_width"] / 2
  draw.line(_points(np.array([x - 1.0, x - 1.5, x - half * 0.6]),
                    np.array([p["eye_y"] + 5.0, tip_y - 3.0, tip_y])),
            fill=shadow, width=_width(1.2), joint="curve")
  draw.arc(_box(x, tip_y - 1.0, half, 2.5), 20, 160, fill=shadow,
           width=_width(1.0))
  for side in (-1.0, 1.0):
    draw.ellipse(_box(x + side * half * 0.45, tip_y + 0.2, 0.16 * half + 0.5,
                      1.0), fill=nostril)


def _draw_eye(draw: ImageDraw.ImageDraw, p: dict[str, Any],
              n: dict[str, Any], x: float) -> None:
  """One eye; the upper lid comes down over it as the eye closes."""
  y = p["eye_y"]
  rx = p["eye_radius"]
  ry = rx * p["eye_aspect"]
  draw.ellipse(_box(x, y, rx, ry), fill=_SCLERA)
  iris = min(p["iris_ratio"] * rx, ry)
  gx, gy = n["gaze"]
  draw.ellipse(_box(x + gx, y + gy, iris, iris), fill=p["iris_colour"])
  draw.ellipse(_box(x + gx, y + gy, 0.45 * iris, 0.45 * iris), fill=_PUPIL)

  lid_y = y - ry + 2 * ry * (1.0 - n["eye_open"])
  if n["eye_open"] < 1.0:
    draw.rectangle(_box(x, (y - ry - 1.0 + lid_y) / 2, rx + 0.6,
                        (lid_y - (y - ry - 1.0)) / 2), fill=p["skin_colour"])
  xs = np.linspace(x - rx, x + rx, 13)
  top = y - ry * np.sqrt(np.clip(1 - ((xs - x) / rx) ** 2, 0, 1))
  lash = np.maximum(top, min(lid_y, y + ry))
  draw.line(_points(xs, lash), fill=_shade(p["hair_colour"], 0.5),
            width=_width(1.0), joint="curve")


def _draw_brow(draw: ImageDraw.ImageDraw, p: dict[str, Any],
               n: dict[str, Any], x: float, side: float) -> None:
  """One brow; `side` is -1 for the image-left brow, +1 for the right."""
  half = 1.3 * p["eye_radius"]
  y = p["eye_y"] - p["eye_radius"] * p["eye_aspect"] - p["brow_gap"]
  y -= n["brow_raise"]
  # The inner end is the one nearer the midline.
  tilt = half * math.tan(math.radians(p["brow_angle"]))
  xs = np.array([x - half, x, x + half])
  ys = np.array([y + side * tilt, y - p["brow_arch"], y - side * tilt])
  draw.line(_points(xs, ys), fill=_shade(p["hair_colour"], 0.8),
            width=_width(p["brow_thickness"]), joint="curve")


def _curve(start: tuple[float, float], control: tuple[float, float],
           end: tuple[float, float], count: int = 12) -> np.ndarray:
  """Quadratic Bezier points, [count, 2]."""
  t = np.linspace(0.0, 1.0, count)[:, None]
  start, control, end = (np.asarray(v) for v in (start, control, end))
  return (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t ** 2 * end


def _draw_mouth(draw: ImageDraw.ImageDraw, p: dict[str, Any],
                n: dict[str, Any], x: float) -> None:
  """Lips around a seam that bends up with a smile, down with a frown."""
  y = p["mouth_y"]
  w = p["mouth_half_width"]
  bend = 3.0 * n["smile"]
  gap = n["mouth_open"]
  left, right = (x - w, y - bend), (x + w, y - bend)
  seam = _curve(left, (x, y + bend), right)
  lower_seam = _curve(left, (x, y + bend + 2 * gap), right)
  upper = _curve(left, (x, y + bend - 2 * p["upper_lip"]), right)
  lower = _curve(left, (x, y + bend + 2 * (gap + p["lower_lip"])), right)

  def polygon(a, b):
    ring = np.concatenate([a, b[::-1]])
    return _points(ring[:, 0], ring[:, 1])

  draw.polygon(polygon(upper, seam), fill=p["lip_colour"])
  draw.polygon(polygon(lower_seam, lower), fill=p["lip_colour"])
  if gap > 0:
    draw.polygon(polygon(seam, lower_seam), fill=(70, 24, 28))
  draw.line(_points(seam[:, 0], seam[:, 1]),
            fill=_shade(p["lip_colour"], 0.6), width=_width(0.8))


def _draw_beard(image: Image.Image, draw: ImageDraw.ImageDraw,
                p: dict[str, Any], face: np.ndarray, x: float) -> None:
  style = p["beard_style"]
  colour = p["hair_colour"]
  if style == "full":
    _paint(image, colour, _beard_mask(p, face), p["beard_density"])
  if style in ("moustache", "full"):
    w = p["mouth_half_width"] + 1.5
    y = p["mouth_y"] - p["upper_lip"] - 1.5
    xs = np.array([x - w, x, x + w])
    ys = np.array([y + 3.0, y - 1.0, y + 3.0])
    draw.line(_points(xs, ys), fill=colour, width=_width(3.0), joint="curve")
  if style == "goatee":
    draw.ellipse(_box(x, p["mouth_y"] + p["lower_lip"] + 7.0, 7.0, 6.0),
                 fill=colour)


def _draw_glasses(image: Image.Image, draw: ImageDraw.ImageDraw,
                  p: dict[str, Any], eye_xs: Sequence[float]) -> None:
  y = p["eye_y"]
  rx = p["eye_radius"] + 4.0
  ry = p["eye_radius"] * p["eye_aspect"] + 4.0
  colour = p["glasses_colour"]
  for x in eye_xs:
    box = _box(x, y, rx, ry)
    if p["glasses_tint"] > 0:
      tint = Image.new("L", image.size, 0)
      ImageDraw.Draw(tint).ellipse(box, fill=round(255 * p["glasses_tint"]))
      image.paste((30, 30, 36), mask=tint)
    if p["glasses_round"]:
      draw.ellipse(box, outline=colour, width=_width(1.3))
    else:
      draw.rounded_rectangle(box, radius=3 * _SUPERSAMPLE, outline=colour,
                             width=_width(1.3))
  inner = (eye_xs[0] + rx, eye_xs[1] - rx)
  draw.line(_points(np.array(inner), np.array([y - 1.0, y - 1.0])),
            fill=colour, width=_width(1.3))
  for x, edge in ((eye_xs[0] - rx, -1.0), (eye_xs[1] + rx, 1.0)):
    outer_x = _MIDLINE_X + edge * p["face_half_width"]
    draw.line(_points(np.array([x, outer_x]), np.array([y - 1.0, y - 2.0])),
              fill=colour, width=_width(1.3))


def _background(p: dict[str, Any],
                n: dict[str, Any]) -> tuple[int, int, int]:
  band = np.asarray(_BACKGROUND_BANDS[p["background_band"]], np.float64)
  return _colour(band + n["background_offset"])


def _draw_cartoon(p: dict[str, Any], n: dict[str, Any]) -> Image.Image:
  """The face at rest pose on the supersampled canvas, RGB."""
  image = Image.new("RGB", (_CANVAS, _CANVAS), _background(p, n))
  draw = ImageDraw.Draw(image)

  _draw_body(draw, p, n)
  _draw_ears(draw, p)
  face = _face_mask(p)
  _paint(image, p["skin_colour"], face)
  if p["mole"]:
    draw.ellipse(_box(p["mole_x"], p["mole_y"], p["mole_radius"],
                      p["mole_radius"]), fill=_shade(p["skin_colour"], 0.45))
  _paint(image, p["hair_colour"], _hair_mask(p, face))

  x = _MIDLINE_X + n["yaw_shift"]
  eye_xs = (x - p["eye_half_spacing"], x + p["eye_half_spacing"])
  _draw_beard(image, draw, p, face, x)
  _draw_nose(draw, p, _MIDLINE_X + 1.5 * n["yaw_shift"])
  for side, eye_x in zip((-1.0, 1.0), eye_xs):
    _draw_eye(draw, p, n, eye_x)
    _draw_brow(draw, p, n, eye_x, side)
  _draw_mouth(draw, p, n, x)
  if p["glasses"]:
    _draw_glasses(image, draw, p, eye_xs)
  return image


# ---------------------------------------------------------------------------
# Pose and photometric nuisance.


def _apply_pose(image: Image.Image, n: dict[str, Any],
                fill: tuple[int, int, int]) -> Image.Image:
  """Rotates, scales and shifts about the pose centre, then downsamples."""
  s = _SUPERSAMPLE
  angle = math.radians(n["rotation"])
  cos, sin = math.cos(angle) / n["scale"], math.sin(angle) / n["scale"]
  cx, cy = _POSE_CENTRE[0] * s, _POSE_CENTRE[1] * s
  tx, ty = n["shift"][0] * s, n["shift"][1] * s
  # PIL wants the output-to-input map: the inverse of the forward pose
  # out = centre + scale * R(angle) (in - centre) + shift.
  a, b = cos, sin
  d, e = -sin, cos
  c = cx - a * (cx + tx) - b * (cy + ty)
  f = cy - d * (cx + tx) - e * (cy + ty)
  posed = image.transform(image.size, Image.Transform.AFFINE,
                          (a, b, c, d, e, f),
                          resample=Image.Resampling.BILINEAR, fillcolor=fill)
  return posed.reduce(s)


def _apply_photometric(image: Image.Image, n: dict[str, Any],
                       rng: np.random.Generator) -> np.ndarray:
  """Lighting, colour cast, contrast, blur and noise; uint8 [H, W, 3]."""
  pixels = np.asarray(image, np.float32)
  coords = (np.arange(IMAGE_SIZE, dtype=np.float32) - IMAGE_SIZE / 2) / (
      IMAGE_SIZE / 2)
  ramp = (math.cos(n["light_angle"]) * coords[None, :]
          + math.sin(n["light_angle"]) * coords[:, None])
  pixels *= (1.0 + n["light_strength"] * ramp)[..., None]
  pixels *= np.asarray(n["channel_gains"], np.float32)
  mean = pixels.mean()
  pixels = (pixels - mean) * n["contrast"] + mean + n["brightness"]
  pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

  if n["blur_radius"] > 0:
    blurred = Image.fromarray(pixels).filter(
        ImageFilter.GaussianBlur(n["blur_radius"]))
    pixels = np.asarray(blurred)
  noise = rng.normal(0.0, n["noise_sigma"], pixels.shape)
  return np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8)


def render_face(identity_params: dict[str, Any],
                rng: np.random.Generator) -> np.ndarray:
  """Draws one image of an identity with fresh per-image variation.

  Args:
    identity_params: a dict from `sample_identity`.
    rng: the image's generator; pose, expression, lighting and noise are
      drawn from it.

  Returns:
    uint8 [112, 112, 3] RGB.
  """
  nuisance = _sample_nuisance(rng)
  cartoon = _draw_cartoon(identity_params, nuisance)
  posed = _apply_pose(cartoon, nuisance,
                      _background(identity_params, nuisance))
  return _apply_photometric(posed, nuisance, rng)


# ---------------------------------------------------------------------------
# Pairs.


def _choose(rng: np.random.Generator, population: int,
            count: int) -> np.ndarray:
  """Indices without repeats, unless `count` exceeds `population`."""
  rounds = -(-count // population)
  picks = [rng.permutation(population) for _ in range(rounds)]
  return np.concatenate(picks)[:count]


def _matched_pairs(rng: np.random.Generator, names: Sequence[str],
                   num_images: int, count: int) -> list[tuple[str, int, int]]:
  candidates = [(name, i, j) for name in names
                for i in range(1, num_images + 1)
                for j in range(i + 1, num_images + 1)]
  return sorted(candidates[k] for k in _choose(rng, len(candidates), count))


def _mismatched_pairs(rng: np.random.Generator, names: Sequence[str],
                      num_images: int,
                      count: int) -> list[tuple[str, int, str, int]]:
  """Distinct pairs of images of two different identities, name1 < name2."""
  distinct = len(names) * (len(names) - 1) // 2 * num_images ** 2
  seen = set()
  pairs = []
  while len(pairs) < count:
    a, b = sorted(rng.choice(len(names), 2, replace=False))
    i, j = (int(v) for v in rng.integers(1, num_images + 1, 2))
    pair = (names[a], i, names[b], j)
    # Repeats are allowed only once every distinct pair has been used.
    if pair in seen and len(seen) < distinct:
      continue
    seen.add(pair)
    pairs.append(pair)
  return sorted(pairs)


def _sample_pair_sets(rng: np.random.Generator, names: Sequence[str],
                      num_images: int, num_sets: int,
                      pairs_per_set: int) -> list[tuple[list, list]]:
  """Pair sets over disjoint groups of identities, as LFW's folds are."""
  groups = np.array_split(rng.permutation(len(names)), num_sets)
  sets = []
  for group in groups:
    members = [names[k] for k in sorted(group)]
    sets.append((_matched_pairs(rng, members, num_images, pairs_per_set),
                 _mismatched_pairs(rng, members, num_images, pairs_per_set)))
  return sets


def _write_pairs(path: pathlib.Path, pair_sets: Sequence[tuple[list, list]],
                 pairs_per_set: int) -> None:
  lines = [f"{len(pair_sets)}\t{pairs_per_set}"]
  for matched, mismatched in pair_sets:
    lines += ["\t".join(str(v) for v in pair) for pair in matched]
    lines += ["\t".join(str(v) for v in pair) for pair in mismatched]
  path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------
# Writing a set.


def _identity_name(index: int) -> str:
  return f"synthetic_{index + 1:04d}"


def _validate(params: dict[str, Any]) -> None:
  for key, value in params.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{key} must be an int, got {value!r}")
    if key == "seed" and value < 0:
      raise ValueError(f"seed must be non-negative, got {value}")
    if key != "seed" and value < 1:
      raise ValueError(f"{key} must be at least 1, got {value}")
  for key in ("images_per_identity", "verify_images_per_identity"):
    if params[key] > 9999:
      raise ValueError(
          f"{key}={params[key]} exceeds the four-digit file numbering")
  if params["verify_images_per_identity"] < 2:
    raise ValueError(
        "verify_images_per_identity must be at least 2 for matched pairs, "
        f"got {params['verify_images_per_identity']}")
  if params["num_verify_identities"] < 2 * params["num_pair_sets"]:
    raise ValueError(
        f"num_verify_identities={params['num_verify_identities']} is too "
        f"few for num_pair_sets={params['num_pair_sets']}: each set needs "
        "two identities of its own for mismatched pairs")


def _marker_text(params: dict[str, Any]) -> str:
  lines = [
      "SYNTHETIC DATA: every image here is a cartoon face drawn from random",
      "parameters by data_pipeline.synthetic. No real person is depicted;",
      "accuracies on this set show that code runs, not how a model performs",
      "on faces.",
      "",
      f"generator_version: {GENERATOR_VERSION}",
      f"image_size: {IMAGE_SIZE}",
      f"jpeg_quality: {JPEG_QUALITY}",
  ]
  lines += [f"{key}: {int(value)}" for key, value in sorted(params.items())]
  return "\n".join(lines) + "\n"


def _recorded_matches(root: pathlib.Path, params: dict[str, Any]) -> bool:
  marker = root / MARKER_NAME
  if not marker.is_file():
    return False
  return marker.read_text() == _marker_text(params)


def _write_identity(directory: pathlib.Path, name: str, seed: int,
                    index: int, num_images: int) -> None:
  identity = sample_identity(np.random.default_rng([seed, 0, index]))
  folder = directory / name
  folder.mkdir(parents=True)
  for image_index in range(num_images):
    rng = np.random.default_rng([seed, 1, index, image_index])
    pixels = render_face(identity, rng)
    Image.fromarray(pixels).save(folder / f"{name}_{image_index + 1:04d}.jpg",
                                 format="JPEG", quality=JPEG_QUALITY)


def _write_set(root: pathlib.Path, params: dict[str, Any]) -> None:
  """Writes every file of the set under `root`, the marker last."""
  seed = params["seed"]
  num_train = params["num_train_identities"]
  for index in range(num_train):
    _write_identity(root / TRAIN_DIR, _identity_name(index), seed, index,
                    params["images_per_identity"])

  verify_names = []
  for offset in range(params["num_verify_identities"]):
    index = num_train + offset
    verify_names.append(_identity_name(index))
    _write_identity(root / VERIFY_DIR, verify_names[-1], seed, index,
                    params["verify_images_per_identity"])

  pair_sets = _sample_pair_sets(
      np.random.default_rng([seed, 2]), verify_names,
      params["verify_images_per_identity"], params["num_pair_sets"],
      params["pairs_per_set"])
  _write_pairs(root / PAIRS_NAME, pair_sets, params["pairs_per_set"])
  (root / MARKER_NAME).write_text(_marker_text(params))


def _replace_directory(staging: pathlib.Path, root: pathlib.Path) -> None:
  """Moves a finished set into place; a previous set at root goes away."""
  if not root.exists():
    os.rename(staging, root)
    return
  old = staging.with_name(staging.name + ".old")
  os.rename(root, old)
  os.rename(staging, root)
  shutil.rmtree(old)


def _check_replaceable(root: pathlib.Path) -> None:
  if not root.exists():
    return
  if not root.is_dir():
    raise FileExistsError(f"{root} exists and is not a directory")
  if (root / MARKER_NAME).is_file() or not any(root.iterdir()):
    return
  raise FileExistsError(
      f"{root} exists, is not empty and has no {MARKER_NAME}: it is not a "
      "synthetic face set, so it is left alone")


def _summary(root: pathlib.Path, params: dict[str, Any],
             generated: bool) -> dict[str, Any]:
  return {
      "root": root,
      "train_dir": root / TRAIN_DIR,
      "verify_dir": root / VERIFY_DIR,
      "pairs_path": root / PAIRS_NAME,
      "marker_path": root / MARKER_NAME,
      "num_train_identities": params["num_train_identities"],
      "num_train_images": (params["num_train_identities"]
                           * params["images_per_identity"]),
      "num_verify_identities": params["num_verify_identities"],
      "num_verify_images": (params["num_verify_identities"]
                            * params["verify_images_per_identity"]),
      "num_pair_sets": params["num_pair_sets"],
      "num_pairs": 2 * params["num_pair_sets"] * params["pairs_per_set"],
      "seed": params["seed"],
      "generated": generated,
  }


def generate_synthetic_faces(
    root: str | os.PathLike[str], *, num_train_identities: int = 64,
    images_per_identity: int = 16, num_verify_identities: int = 40,
    verify_images_per_identity: int = 4, num_pair_sets: int = 2,
    pairs_per_set: int = 100, seed: int = 0) -> dict[str, Any]:
  """Writes a synthetic face set at `root`, replacing a previous one.

  The set is built in a temporary sibling of `root` and renamed into place
  at the end, so an interrupted run never leaves a partial set behind a
  marker file. A non-empty `root` that is not a synthetic set is refused.

  Args:
    root: the set's directory.
    num_train_identities: identities under train/, each with
      `images_per_identity` images.
    images_per_identity: images per training identity.
    num_verify_identities: identities under verify/, disjoint from the
      training ones, split into `num_pair_sets` disjoint groups.
    verify_images_per_identity: images per verify identity (at least 2).
    num_pair_sets: sets (folds) in pairs.txt.
    pairs_per_set: matched pairs, and as many mismatched, per set.
    seed: the seed every image and pair follows from (non-negative).

  Returns:
    A summary: `root`, `train_dir`, `verify_dir`, `pairs_path` and
    `marker_path` (pathlib.Path), the identity, image and pair counts,
    `seed`, and `generated` (True).

  Raises:
    TypeError, ValueError: for a bad count or seed, naming it.
    FileExistsError: when `root` holds something other than a synthetic set.
  """
  params = {
      "num_train_identities": num_train_identities,
      "images_per_identity": images_per_identity,
      "num_verify_identities": num_verify_identities,
      "verify_images_per_identity": verify_images_per_identity,
      "num_pair_sets": num_pair_sets,
      "pairs_per_set": pairs_per_set,
      "seed": seed,
  }
  _validate(params)
  # Absolute, so that "." or "x/.." still has a real parent to stage in.
  root = pathlib.Path(os.path.abspath(root))
  _check_replaceable(root)

  root.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(
      tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
  try:
    _write_set(staging, params)
    _replace_directory(staging, root)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return _summary(root, params, generated=True)


def ensure_synthetic_faces(root: str | os.PathLike[str],
                           **kwargs: int) -> dict[str, Any]:
  """Generates the set at `root` unless it is there with these parameters.

  Args:
    root: the set's directory.
    **kwargs: the keyword arguments of `generate_synthetic_faces`; omitted
      ones take its defaults.

  Returns:
    The summary of `generate_synthetic_faces`; `generated` says whether
    files were written by this call.
  """
  bound = inspect.signature(generate_synthetic_faces).bind(root, **kwargs)
  bound.apply_defaults()
  params = dict(bound.arguments)
  del params["root"]
  _validate(params)

  root = pathlib.Path(os.path.abspath(root))
  if _recorded_matches(root, params):
    return _summary(root, params, generated=False)
  return generate_synthetic_faces(root, **params)


# ---------------------------------------------------------------------------
# Command line.


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Write a synthetic face set (cartoon identities).")
  parser.add_argument("--root", required=True, help="Output directory.")
  defaults = inspect.signature(generate_synthetic_faces).parameters
  for name, parameter in defaults.items():
    if name != "root":
      parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                          default=parameter.default)
  parser.add_argument("--force", action="store_true",
                      help="Regenerate even when a matching set exists.")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry; returns the summary."""
  args = vars(_parse_args(argv))
  root = args.pop("root")
  force = args.pop("force")
  if force:
    summary = generate_synthetic_faces(root, **args)
  else:
    summary = ensure_synthetic_faces(root, **args)
  for key, value in summary.items():
    logging.info("%s: %s", key, value)
  return summary


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  main()
