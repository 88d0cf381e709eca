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
  # Persistent XLA compilation cache: reruns and resumes of the same model
  # load the compiled step from here instead of compiling it again. "" keeps
  # the cache off (JAX_COMPILATION_CACHE_DIR, if set, still applies).
  config.compilation_cache_dir = ""

  # Data. `kind` is "image_folder" (<root>/<identity>/<image>), "manifest"
  # (a CSV of path, identity[, label][, landmark columns]), "synthetic"
  # (generated cartoon identities, written under <workdir> when root is ""),
  # "recordio" (root: an MXNet train.rec with its .idx, or its folder) or
  # "array_record" (root: the output folder of
  # `python -m data_pipeline.array_record`). The last two hold aligned crops.
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
  # Batches placed on the devices ahead of the step (0: at the step).
  config.data.device_prefetch = 2
  # AdaFace augmentations, each on its own coin flip, in this order before
  # the flip: crop kept in place on a black canvas, low resolution, and
  # brightness/contrast/saturation jitter. The reference's released scripts
  # use 0.2 for all three.
  config.data.crop_augmentation_prob = 0.0
  config.data.low_res_augmentation_prob = 0.0
  config.data.photometric_augmentation_prob = 0.0
  # Records whose image does not decode (truncated, empty): "skip" leaves
  # them out and counts them (logged and in metrics.jsonl), "raise" stops.
  config.data.corrupt_records = "skip"
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
  # Backbone compute dtype: "float32" or "bfloat16". Parameters, optimizer
  # state, BatchNorm statistics and the head (cosine onward) stay float32;
  # bfloat16 needs no loss scaling.
  config.model.dtype = "float32"
  # Stages (0-based) whose units recompute their activations in the
  # backward pass instead of storing them: less memory for large per-device
  # batches, about one more forward pass of those stages in compute.
  config.model.remat = ()
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
  # The reference standardises norms per GPU; False uses the global batch.
  config.head.per_device_norm_stats = False
  # Partial-FC sampling: class columns kept per shard and step (0: all).
  config.head.num_sampled_classes = 0

  # Devices as a (data, model) mesh. Batches are split over all devices;
  # the classifier's classes over `model`. -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.model = 1

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

  # Evaluation: in eval.py, after training (after_training) and during it
  # for each set with every_steps > 0. Of the steps where every verification
  # set evaluated in training ran, the best mean accuracy's backbone is kept
  # in <workdir>/best.
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 64
  config.eval.flip_fusion = "norm_add"  # "norm_add", "add" or "none".
  config.eval.after_training = True
  config.eval.roc_plots = True  # ROC PNGs in <workdir>/eval_plots.
  # Where IJB and TinyFace features stream to; "": <workdir>/eval_features.
  config.eval.feature_dir = ""
  # A verification set from an LFW-format pairs file over an image folder.
  config.eval.name = "lfw"
  config.eval.pairs = ""  # Empty: no pairs set.
  config.eval.image_root = ""
  config.eval.image_ext = "jpg"
  config.eval.landmarks = ""
  config.eval.landmarks_root = ""  # Landmark paths' root; "": image_root.
  config.eval.alignment = "none"
  config.eval.num_folds = 0  # 0: the number of sets in the pairs file.
  config.eval.every_steps = 0  # > 0: also evaluate it during training.
  # Further sets by name, each enabled by a path, e.g.
  # --config.eval.sets.cfp_fp.path=/data/faces_emore/cfp_fp.bin.
  config.eval.sets = ml_collections.ConfigDict(
      {name: eval_set("bin") for name in VERIFICATION_BINS})
  config.eval.sets.ijbb = eval_set("ijb", subset="IJBB")
  config.eval.sets.ijbc = eval_set("ijb", subset="IJBC")
  config.eval.sets.tinyface = eval_set("tinyface")
  return config


# The five verification sets the field reports, as insightface `.bin`s.
VERIFICATION_BINS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")


def eval_set(kind: str, **fields) -> ml_collections.ConfigDict:
  """One `config.eval.sets` entry, with every field declared for overrides.

  Args:
    kind: "bin" (path: an insightface verification .bin), "ijb" (path: the
      IJB release root holding IJBB/ and IJBC/) or "tinyface" (path: the
      root holding tinyface/Testing_Set and the aligned crops).
    **fields: values replacing the defaults below.
  """
  settings = ml_collections.ConfigDict(dict(
      kind=kind,
      path="",  # Empty: the set is disabled.
      every_steps=0,  # > 0: also evaluate every that many training steps.
      num_folds=10,  # bin: contiguous folds of the k-fold accuracy.
      subset="IJBC",  # ijb: "IJBB" or "IJBC".
      protocols="adaface,insightface",  # ijb: comma-separated.
      alignment_dir="aligned_pad_0.1_pad_high",  # tinyface: aligned crops.
  ))
  for key, value in fields.items():
    if key not in settings:
      raise KeyError(
          f"eval set field {key!r} does not exist; fields: {sorted(settings)}")
    settings[key] = value
  return settings
