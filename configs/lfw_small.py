"""A narrow IR network trained on the real LFW subset in minutes on a CPU.

Trains on the 253 `train` identities (3,245 images, aligned with their
five-point landmarks) and verifies on the View 2 pairs of folds 1 and 2,
whose people are disjoint from the training ones. The data folder is the
project's shared data set beside the repository; point data.root elsewhere
with --config.data.root=... (and eval.image_root likewise).
"""

import os

from configs import common

LFW_ROOT = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
    "lfw"))


def get_config():
  config = common.get_base_config()
  config.seed = 0

  config.data.kind = "manifest"
  config.data.root = LFW_ROOT
  config.data.manifest = os.path.join(LFW_ROOT, "manifest.csv")
  config.data.manifest_filters = "roles=train"
  config.data.landmarks = os.path.join(
      LFW_ROOT, "landmarks", "landmarks_5pt_150px.csv")
  config.data.alignment = "landmarks"
  config.data.batch_size = 64
  config.data.worker_count = 1

  # An eighth-width, 8-unit IR network with a 128-d embedding: about 1.2 s
  # per batch of 64 on two CPU cores.
  config.model.name = "custom"
  config.model.stage_units = (2, 2, 2, 2)
  config.model.stage_widths = (8, 16, 32, 64)
  config.model.embedding_size = 128

  config.head.num_classes = 253

  config.schedule.total_epochs = 10.0
  config.schedule.lr_boundaries_epochs = (6, 9)
  config.schedule.warmup_epochs = 1.0

  config.logging.log_every_steps = 25
  config.checkpoint.every_steps = 200

  config.eval.name = "lfw_folds01-02"
  config.eval.pairs = os.path.join(LFW_ROOT, "pairs_view2_folds01-02.txt")
  config.eval.image_root = os.path.join(LFW_ROOT, "images")
  config.eval.landmarks = config.data.landmarks
  config.eval.landmarks_root = LFW_ROOT
  config.eval.alignment = "landmarks"
  return config
