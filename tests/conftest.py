"""Shared test set-up: absl flags, the shared data folder, small fixtures."""

import os
import pathlib

# Grain's worker processes read absl flags; under pytest nobody parses them.
from absl import flags
import pytest

flags.FLAGS.mark_as_parsed()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = pathlib.Path(
    os.environ.get("ADAFACE_SHARED_DIR", REPO_ROOT.parent / "shared"))


def _require(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    pytest.skip(
        f"needs {path} (the shared data and reference folder beside the "
        "repository, or ADAFACE_SHARED_DIR); it is absent here")
  return path


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  """Golden vectors computed with the PyTorch reference."""
  return _require(SHARED_DIR / "reference" / "golden")


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
  """State-dict layouts of the PyTorch reference backbones."""
  return _require(SHARED_DIR / "reference")


@pytest.fixture(scope="session")
def lfw_dir() -> pathlib.Path:
  """The LFW subset: images, manifest, landmarks and the folds 1-2 pairs."""
  return _require(SHARED_DIR / "data" / "lfw")


@pytest.fixture(scope="session")
def orl_dir() -> pathlib.Path:
  """The ORL faces: 40 identities of 10 grayscale PGM images each."""
  return _require(SHARED_DIR / "data" / "orl_faces")
