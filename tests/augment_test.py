"""AdaFace augmentations: boxes, in-place crop, low resolution, jitter maths."""

import math

import cv2
import numpy as np
from PIL import Image
from PIL import ImageEnhance
import pytest

from configs import common
from data_pipeline import augment
from data_pipeline import pipeline


def _face(seed=0, size=112):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3),
                                              np.uint8)


def _pil_grey(image):
  """PIL's "L" conversion of an array taken as RGB (ITU-R 601-2, 16-bit
  fixed point with rounding)."""
  x = image.astype(np.int64)
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471
          + 0x8000) >> 16


def _blend(degenerate, image, factor):
  """PIL's blend: float32 maths, truncated to uint8 after clipping."""
  out = degenerate.astype(np.float32) + np.float32(factor) * (
      image.astype(np.float32) - degenerate.astype(np.float32))
  return np.clip(out, 0, 255).astype(np.uint8)


def _jitter_reference(image, order, factors):
  """Brightness, contrast and saturation as torchvision applies them to a
  PIL image, written out with numpy."""
  for i in order:
    if i == 0:
      image = _blend(np.zeros_like(image), image, factors[0])
    elif i == 1:
      mean = int(_pil_grey(image).mean() + 0.5)
      image = _blend(np.full_like(image, mean), image, factors[1])
    else:
      grey = _pil_grey(image)[..., None].repeat(3, -1)
      image = _blend(grey, image, factors[2])
  return image


def test_crop_boxes_follow_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(500):
    top, left, h, w = augment.crop_box(rng, 112, 112)
    assert 0 <= top and top + h <= 112 and 0 <= left and left + w <= 112
    # Rounding to whole pixels moves area and ratio slightly off the range.
    assert 0.2 * 0.9 <= h * w / 112**2 <= 1.0
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
  # Boxes that can never fit: ten tries, then the whole (square) image.
  assert augment.crop_box(rng, 112, 112, scale=(2.0, 3.0)) == (0, 0, 112, 112)
  # Wider than 4:3: the full height, width 50 * 4/3 rounded, centred.
  assert augment.crop_box(rng, 50, 100, scale=(2.0, 3.0)) == (0, 16, 50, 67)


def test_crop_keeps_pixels_in_place_on_black():
  image = _face()
  box = augment.crop_box(np.random.default_rng(3), 112, 112)
  out = augment.crop_in_place(image, np.random.default_rng(3))
  top, left, h, w = box
  assert h * w < 112 * 112  # This seed draws a real crop.
  np.testing.assert_array_equal(out[top:top + h, left:left + w],
                                image[top:top + h, left:left + w])
  outside = np.ones((112, 112), bool)
  outside[top:top + h, left:left + w] = False
  assert not out[outside].any()


def test_low_resolution_blurs_and_keeps_size():
  checker = (np.indices((112, 112)).sum(0) % 2 * 255).astype(np.uint8)
  image = np.repeat(checker[..., None], 3, -1)
  rng = np.random.default_rng(0)
  for _ in range(10):
    out = augment.low_resolution(image, rng, (0.2, 0.5))
    assert out.shape == image.shape and out.dtype == np.uint8
    # A one-pixel checkerboard cannot survive a 22-56 pixel bottleneck.
    assert np.abs(out.astype(int) - image).mean() > 40
  # Side ratio 1: both resizes keep 112x112, whatever the interpolation.
  np.testing.assert_array_equal(
      augment.low_resolution(image, rng, (1.0, 1.0)), image)


def test_low_resolution_draws_size_then_two_interpolations():
  image = _face(1)
  rng = np.random.default_rng(5)
  side = int(rng.uniform(0.2, 1.0) * 112)
  down, up = (augment.INTERPOLATIONS[rng.integers(5)] for _ in range(2))
  expected = cv2.resize(cv2.resize(image, (side, side), interpolation=down),
                        (112, 112), interpolation=up)
  np.testing.assert_array_equal(
      augment.low_resolution(image, np.random.default_rng(5)), expected)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_photometric_matches_pil_maths(seed):
  image = _face(seed)
  rng = np.random.default_rng(seed)
  order = rng.permutation(3)
  factors = rng.uniform(0.5, 1.5, 3)
  expected = _jitter_reference(image, order, factors)
  np.testing.assert_array_equal(
      augment.photometric(image, np.random.default_rng(seed)), expected)


def test_saturation_grey_weights_fall_on_swapped_channels():
  # The reference jitters a BGR array as if it were RGB: the grey it blends
  # towards takes 0.299 of blue (channel 0), not the true luma's 0.114.
  bgr = np.zeros((4, 4, 3), np.uint8)
  bgr[..., 0] = 200
  out = augment.photometric(bgr, np.random.default_rng(0), brightness=0.0,
                            contrast=0.0, saturation=0.5)
  mirror = np.random.default_rng(0)
  mirror.permutation(3)
  factor = [mirror.uniform(low, high)
            for low, high in ((1, 1), (1, 1), (0.5, 1.5))][2]
  as_reference = _blend(np.full_like(bgr, 60), bgr, factor)
  true_luma = _blend(np.full_like(bgr, 23), bgr, factor)
  np.testing.assert_array_equal(out, as_reference)
  assert not np.array_equal(out, true_luma)


def test_augment_order_and_disabled_draws():
  image = _face(2)
  rng = np.random.default_rng(7)
  state = rng.bit_generator.state
  assert augment.augment(image, rng, augment.AugmentParams()) is image
  assert rng.bit_generator.state == state  # Nothing drawn.

  params = augment.AugmentParams(crop_prob=1.0, low_res_prob=1.0,
                                 photometric_prob=1.0)
  mirror = np.random.default_rng(7)
  mirror.random()
  expected = augment.crop_in_place(image, mirror)
  mirror.random()
  expected = augment.low_resolution(expected, mirror)
  mirror.random()
  expected = augment.photometric(expected, mirror)
  np.testing.assert_array_equal(augment.augment(image, rng, params), expected)


def test_each_augmentation_fires_with_its_probability():
  image = _face(3, size=16)
  params = augment.AugmentParams(photometric_prob=0.2)
  rng = np.random.default_rng(0)
  fired = sum(not np.array_equal(augment.augment(image, rng, params), image)
              for _ in range(2000))
  assert abs(fired / 2000 - 0.2) < 0.03


def test_flip_comes_after_the_augmentations():
  image = _face(4)
  params = augment.AugmentParams(crop_prob=1.0)
  out = pipeline._augment_and_flip(image, 3, np.random.default_rng(11),
                                   params, random_flip=True)
  mirror = np.random.default_rng(11)
  mirror.random()
  cropped = augment.crop_in_place(image, mirror)
  flipped = mirror.random() < 0.5
  expected = cropped[:, ::-1] if flipped else cropped
  assert flipped  # This seed flips, so the order is visible.
  np.testing.assert_array_equal(out["image"], expected)
  assert out["label"] == 3 and out["label"].dtype == np.int32


def test_params_from_config_and_validation():
  data = common.get_base_config().data
  assert not augment.from_config(data).enabled  # Off unless asked for.
  data.crop_augmentation_prob = 0.2
  data.low_res_augmentation_prob = 0.2
  data.photometric_augmentation_prob = 0.2
  params = augment.from_config(data)
  assert params.enabled and params.crop_prob == params.low_res_prob == 0.2
  assert math.isclose(params.crop_ratio[1], 4 / 3)
  with pytest.raises(ValueError, match="photometric_prob=1.5"):
    augment.AugmentParams(photometric_prob=1.5)


def test_jitter_equals_pil_enhancers_byte_for_byte():
  """The numpy enhancers against PIL's own, which the reference calls: real
  and random images, factors inside and outside [0, 1] (PIL interpolates
  in one branch and extrapolates with clipping in the other)."""
  # pylint: disable=protected-access
  pairs = ((augment._brightness, ImageEnhance.Brightness),
           (augment._contrast, ImageEnhance.Contrast),
           (augment._saturation, ImageEnhance.Color))
  # pylint: enable=protected-access
  rng = np.random.default_rng(0)
  images = [_face(seed) for seed in range(4)]
  # Low-contrast images put many values near the clipping bounds.
  images += [(image // 4 + 150).astype(np.uint8) for image in images[:2]]
  factors = [0.0, 0.5, 1.0, 1.5, 2.0] + list(rng.uniform(0.5, 1.5, 20))
  for image in images:
    for factor in factors:
      for ours, theirs in pairs:
        expected = np.array(theirs(Image.fromarray(image)).enhance(factor))
        np.testing.assert_array_equal(ours(image, factor), expected,
                                      err_msg=f"{theirs.__name__} {factor}")
