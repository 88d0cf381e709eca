"""AdaFace's training augmentations, in the reference's order and maths.

Each of three augmentations runs on its own coin flip, in this order:

1. Crop kept in place: a RandomResizedCrop box (scale 0.2-1, aspect ratio
   3/4-4/3, ten tries, then the whole image) is cut out and put back where
   it was on an all-zero canvas; nothing is resized.
2. Low resolution: the image is resized to a square of side
   int(r * height), r ~ U(0.2, 1), and back, each way with an OpenCV
   interpolation drawn uniformly from five.
3. Photometric: brightness, contrast and saturation factors ~ U(0.5, 1.5),
   applied in a random order with the arithmetic of PIL's enhancers, which
   the reference calls (written here in numpy, byte for byte the same and
   about twice as fast). The reference applies them to a BGR image held as
   if it were RGB, so the grey weights of contrast and saturation fall on
   swapped channels; this is reproduced by passing the BGR array unchanged.

The horizontal flip that follows is the caller's (see pipeline.py).
Randomness comes from the numpy generator passed in; grain derives it from
the seed and the record's position in the stream, so an epoch is the same
bytes whatever the number of worker processes.
"""

import dataclasses
import math

import cv2
import numpy as np

# Down- and up-sampling choices of the low-resolution augmentation.
INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA,
                  cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)
_CROP_TRIES = 10


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Probabilities and ranges of the augmentations.

  The reference's released training scripts set each probability to 0.2.
  A probability of 0 draws no random number, so disabled augmentations
  leave the rest of the random stream unchanged.
  """

  crop_prob: float = 0.0
  low_res_prob: float = 0.0
  photometric_prob: float = 0.0
  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  low_res_ratio: tuple[float, float] = (0.2, 1.0)
  brightness: float = 0.5
  contrast: float = 0.5
  saturation: float = 0.5

  def __post_init__(self):
    for name in ("crop_prob", "low_res_prob", "photometric_prob"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"augmentation {name}={value} is not in [0, 1]")

  @property
  def enabled(self) -> bool:
    return max(self.crop_prob, self.low_res_prob, self.photometric_prob) > 0


def _coin(rng: np.random.Generator, probability: float) -> bool:
  return probability > 0 and rng.random() < probability


def crop_box(rng: np.random.Generator, height: int, width: int,
             scale: tuple[float, float] = (0.2, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)
             ) -> tuple[int, int, int, int]:
  """Draws a RandomResizedCrop box as torchvision does.

  Returns:
    (top, left, box_height, box_width) in pixels.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(_CROP_TRIES):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    box_width = int(round(math.sqrt(target_area * aspect)))
    box_height = int(round(math.sqrt(target_area / aspect)))
    if 0 < box_width <= width and 0 < box_height <= height:
      top = int(rng.integers(0, height - box_height + 1))
      left = int(rng.integers(0, width - box_width + 1))
      return top, left, box_height, box_width

  # All tries failed: the largest centred box within the ratio range.
  image_ratio = width / height
  if image_ratio < min(ratio):
    box_width, box_height = width, int(round(width / min(ratio)))
  elif image_ratio > max(ratio):
    box_width, box_height = int(round(height * max(ratio))), height
  else:
    box_width, box_height = width, height
  return ((height - box_height) // 2, (width - box_width) // 2, box_height,
          box_width)


def crop_in_place(image: np.ndarray, rng: np.random.Generator,
                  scale: tuple[float, float] = (0.2, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Keeps a random box of `image` [h, w, c] where it is; zeros elsewhere."""
  top, left, box_height, box_width = crop_box(
      rng, image.shape[0], image.shape[1], scale, ratio)
  out = np.zeros_like(image)
  rows = slice(top, top + box_height)
  columns = slice(left, left + box_width)
  out[rows, columns] = image[rows, columns]
  return out


def low_resolution(image: np.ndarray, rng: np.random.Generator,
                   ratio_range: tuple[float, float] = (0.2, 1.0)
                   ) -> np.ndarray:
  """Resizes `image` [h, w, c] uint8 down to a random square and back."""
  height, width = image.shape[:2]
  side = int(rng.uniform(ratio_range[0], ratio_range[1]) * height)
  down = INTERPOLATIONS[rng.integers(len(INTERPOLATIONS))]
  up = INTERPOLATIONS[rng.integers(len(INTERPOLATIONS))]
  small = cv2.resize(image, (side, side), interpolation=down)
  return cv2.resize(small, (width, height), interpolation=up)


# PIL's "L" conversion: (19595 R + 38470 G + 7471 B + 2**15) >> 16. The
# fourth column is the rounding offset (cv2.transform adds it as a constant).
_GREY_WEIGHTS = np.array([[19595, 38470, 7471, 1 << 15]], np.float32)


def pil_grey(image: np.ndarray) -> np.ndarray:
  """[h, w, 3] uint8 -> [h, w] uint8, as PIL's `convert("L")` gives it.

  Every partial sum is an integer below 2**24, so float32 holds it exactly
  and the product with 2**-16 is the shift.
  """
  weighted = cv2.transform(image.astype(np.float32), _GREY_WEIGHTS)
  return (weighted * np.float32(2**-16)).astype(np.uint8)


def pil_blend(degenerate, image: np.ndarray, factor: float) -> np.ndarray:
  """PIL's `Image.blend(degenerate, image, factor)` for uint8 images.

  PIL computes degenerate + factor * (image - degenerate) in C floats
  (float32), clips to [0, 255] and truncates; so does this.
  """
  degenerate = np.asarray(degenerate, np.float32)
  blended = image.astype(np.float32)
  blended -= degenerate
  blended *= np.float32(factor)
  blended += degenerate  # Float addition commutes: the same rounding.
  np.clip(blended, 0, 255, out=blended)
  return blended.astype(np.uint8)


def _brightness(image: np.ndarray, factor: float) -> np.ndarray:
  return pil_blend(0, image, factor)  # ImageEnhance.Brightness: from black.


def _contrast(image: np.ndarray, factor: float) -> np.ndarray:
  # ImageEnhance.Contrast: from the grey image's mean, rounded half up.
  grey = pil_grey(image)
  mean = int(grey.sum(dtype=np.int64) / grey.size + 0.5)
  return pil_blend(mean, image, factor)


def _saturation(image: np.ndarray, factor: float) -> np.ndarray:
  # ImageEnhance.Color: from the image's own grey version, in three
  # channels (numpy broadcasts a size-1 last axis slowly).
  grey = cv2.cvtColor(pil_grey(image), cv2.COLOR_GRAY2BGR)
  return pil_blend(grey, image, factor)


def photometric(image: np.ndarray, rng: np.random.Generator,
                brightness: float = 0.5, contrast: float = 0.5,
                saturation: float = 0.5) -> np.ndarray:
  """Brightness, contrast and saturation jitter in a random order.

  Args:
    image: [h, w, 3] uint8, taken as if it were RGB, as the reference's PIL
      image is (see the module docstring).
    rng: the record's generator.
    brightness, contrast, saturation: each factor is drawn from
      U(1 - x, 1 + x).

  Returns:
    The jittered [h, w, 3] uint8 image.
  """
  order = rng.permutation(3)
  factors = (rng.uniform(1 - brightness, 1 + brightness),
             rng.uniform(1 - contrast, 1 + contrast),
             rng.uniform(1 - saturation, 1 + saturation))
  enhancers = (_brightness, _contrast, _saturation)
  for i in order:
    image = enhancers[i](image, factors[i])
  return image


def augment(image: np.ndarray, rng: np.random.Generator,
            params: AugmentParams) -> np.ndarray:
  """Applies crop, low resolution and photometric jitter, each on its coin.

  Args:
    image: [h, w, 3] uint8 BGR face.
    rng: the record's generator.
    params: probabilities and ranges.

  Returns:
    [h, w, 3] uint8 BGR, the input itself when no augmentation fired.
  """
  if _coin(rng, params.crop_prob):
    image = crop_in_place(image, rng, params.crop_scale, params.crop_ratio)
  if _coin(rng, params.low_res_prob):
    image = low_resolution(image, rng, params.low_res_ratio)
  if _coin(rng, params.photometric_prob):
    image = photometric(image, rng, params.brightness, params.contrast,
                        params.saturation)
  return image


def from_config(data) -> AugmentParams:
  """The probabilities of a config's `data` section."""
  return AugmentParams(
      crop_prob=data.crop_augmentation_prob,
      low_res_prob=data.low_res_augmentation_prob,
      photometric_prob=data.photometric_augmentation_prob)
