"""The first-run default: synthetic cartoon identities, no download needed.

The set is generated under <workdir>/synthetic_faces on the first run (real
JPEG files in the image-folder layout, with an LFW-format pairs file over
held-out identities), so training and evaluation exercise the same loaders
real data uses. The faces are synthetic: accuracies say the code works, not
how a face model performs.
"""

from configs import common


def get_config():
  config = common.get_base_config()
  config.seed = 0

  config.data.kind = "synthetic"
  config.data.alignment = "none"
  config.data.batch_size = 32
  config.data.worker_count = 1

  config.model.name = "custom"
  config.model.stage_units = (1, 1, 1, 1)
  config.model.stage_widths = (16, 32, 64, 128)
  config.model.embedding_size = 128

  config.head.num_classes = 0  # The generated identity count.

  config.schedule.total_epochs = 8.0
  config.schedule.lr_boundaries_epochs = (5, 7)
  config.schedule.warmup_epochs = 0.5

  config.logging.log_every_steps = 16
  config.checkpoint.every_steps = 128

  config.eval.name = "synthetic_pairs"
  config.eval.alignment = "none"
  return config
