"""Fields shared by every config, with the reference's MS1MV2 recipe values.

Each experiment config starts from `get_base_config()` and changes what
differs. Durations carry their unit in the name (`*_epochs`, `*_steps`);
the training loop converts them to steps.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """The AdaFace recipe of the reference's released MS1MV2 scripts."""
  config = ml_collections.ConfigDict()
  config.seed = 42

  # Data. `kind` is "image_folder" (<root>/<identity>/<image>), "manifest"
  # (a CSV of path, identity[, label][, landmark columns]) or "synthetic"
  # (generated cartoon identities, written under <workdir> when root is "").
  config.data = ml_collections.ConfigDict()
  config.data.kind = "image_folder"
  config.data.root = ""
  config.data.manifest = ""
  # Comma-separated column=value conditions on manifest rows, such as
  # "roles=train".
  config.data.manifest_filters = ""
  # CSV of five-point landmarks (path + 10 columns, paths relative to
  # data.root, else to the CSV's folder) for data.alignment.
  config.data.landmarks = ""
  # "landmarks" (similarity warp onto the 112x112 template), "none" (files
  # are aligned crops already) or "resize".
  config.data.alignment = "none"
  config.data.image_size = 112
  config.data.batch_size = 512  # Global: split over all processes.
  config.data.random_flip = True
  config.data.worker_count = -1  # Decoding processes; -1: one per spare core.
  config.data.synthetic = ml_collections.ConfigDict(dict(
      num_train_identities=64, images_per_identity=16,
      num_verify_identities=40, verify_images_per_identity=4,
      num_pair_sets=2, pairs_per_set=100, seed=0))

  # Backbone: a named IR-ResNet, optionally narrowed or shortened.
  config.model = ml_collections.ConfigDict()
  config.model.name = "ir_101"
  config.model.stage_units = ()   # Empty: the named table.
  config.model.stage_widths = ()  # Empty: (64, 128, 256, 512).
  config.model.embedding_size = 512
  config.model.dropout_rate = 0.4
  config.model.dtype = "float32"
  # PyTorch updates BN running variances with the unbiased batch variance.
  config.model.unbiased_bn_running_var = True

  # Head. AdaFace paper values; the released scripts pass m=0.4, h=0.333
  # and keep t_alpha=0.01 (EMA weight of the new batch's norm statistics).
  config.head = ml_collections.ConfigDict()
  config.head.name = "adaface"  # "adaface", "cosface" or "arcface".
  config.head.num_classes = 85742  # MS1MV2. 0: take it from the data.
  config.head.m = 0.4
  config.head.h = 0.333
  config.head.s = 64.0
  config.head.t_alpha = 0.01
  config.head.batch_mean_init = 20.0
  config.head.batch_std_init = 100.0

  # Optimiser: SGD with coupled L2 weight decay on every non-BatchNorm
  # parameter, head kernel included (the reference hard-codes 5e-4).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 5e-4

  # Learning rate: piecewise constant in epochs, x decay_factor at each
  # boundary, with an optional linear warmup from zero.
  config.schedule = ml_collections.ConfigDict()
  config.schedule.total_epochs = 26.0
  config.schedule.total_steps = -1  # > 0 overrides total_epochs.
  config.schedule.lr_boundaries_epochs = (12, 20, 24)
  config.schedule.lr_decay_factor = 0.1
  config.schedule.warmup_epochs = 0.0

  config.logging = ml_collections.ConfigDict()
  config.logging.log_every_steps = 100
  config.logging.progress_bar = True

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 2000
  config.checkpoint.max_to_keep = 3

  # Verification on an LFW-format pairs file after training and in eval.py.
  config.eval = ml_collections.ConfigDict()
  config.eval.name = "lfw"
  config.eval.pairs = ""  # Empty: no verification set.
  config.eval.image_root = ""
  config.eval.image_ext = "jpg"
  config.eval.landmarks = ""
  config.eval.landmarks_root = ""  # Landmark paths' root; "": image_root.
  config.eval.alignment = "none"
  config.eval.batch_size = 64
  config.eval.flip_fusion = "norm_add"  # "norm_add", "add" or "none".
  config.eval.num_folds = 0  # 0: the number of sets in the pairs file.
  config.eval.after_training = True
  return config
