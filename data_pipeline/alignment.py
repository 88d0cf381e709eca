"""Five-point face alignment onto the standard 112x112 template.

A similarity transform (rotation, uniform scale, translation) is fitted by
least squares (Umeyama's method) from the detected landmarks to the
template, and the image is warped with bilinear interpolation and a black
border, as the evaluation protocols of the field do with OpenCV.
"""

import cv2
import numpy as np

# Left eye, right eye, nose tip, left and right mouth corners ("left" is image
# left) in a 112x112 crop: the 96x112 template shifted by 8 pixels in x.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963],
     [73.5318, 51.5014],
     [56.0252, 71.7366],
     [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float64)


def template_for_size(image_size: int) -> np.ndarray:
  """The five template points for a square crop of `image_size` pixels."""
  if image_size % 112 == 0:
    return ARCFACE_TEMPLATE_112 * (image_size / 112)
  if image_size % 128 == 0:
    ratio = image_size / 128
    return ARCFACE_TEMPLATE_112 * ratio + np.array([8.0 * ratio, 0.0])
  raise ValueError(
      f"no alignment template for {image_size}-pixel crops; use a multiple "
      "of 112 or 128")


def estimate_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Least-squares similarity transform mapping `source` onto `target`.

  Args:
    source: [n, 2] points (x, y) in the input image, n >= 2.
    target: [n, 2] points (x, y) they should land on.

  Returns:
    [2, 3] float64 matrix M with target ~= M @ [x, y, 1].
  """
  source = np.asarray(source, np.float64)
  target = np.asarray(target, np.float64)
  source_mean, target_mean = source.mean(0), target.mean(0)
  source_centred = source - source_mean
  target_centred = target - target_mean

  covariance = target_centred.T @ source_centred / len(source)
  u, singular_values, vt = np.linalg.svd(covariance)
  # A reflection is never a valid face pose: flip the weakest axis instead.
  signs = np.ones(2)
  if np.linalg.det(covariance) < 0:
    signs[-1] = -1
  rotation = u @ np.diag(signs) @ vt

  source_variance = source_centred.var(0).sum()
  if source_variance == 0:
    raise ValueError(f"degenerate landmarks (all points equal): {source}")
  scale = (singular_values * signs).sum() / source_variance
  translation = target_mean - scale * rotation @ source_mean
  return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def align_face(image: np.ndarray, landmarks: np.ndarray,
               image_size: int = 112) -> np.ndarray:
  """Warps `image` so its five landmarks land on the template.

  Args:
    image: [height, width, channels] uint8 image.
    landmarks: [5, 2] (x, y) pixel coordinates in `image`, ordered left eye,
      right eye, nose, left mouth corner, right mouth corner.
    image_size: side of the square output crop.

  Returns:
    [image_size, image_size, channels] uint8 aligned crop.
  """
  landmarks = np.asarray(landmarks, np.float64).reshape(5, 2)
  matrix = estimate_similarity(landmarks, template_for_size(image_size))
  return cv2.warpAffine(
      image, matrix, (image_size, image_size), flags=cv2.INTER_LINEAR,
      borderMode=cv2.BORDER_CONSTANT, borderValue=0)
