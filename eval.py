"""Evaluates a run: `python eval.py --config configs/X.py --workdir DIR`.

Embeds both images of every pair of the config's verification set (with
flip fusion), reports the k-fold verification accuracy, and writes the
figures to <workdir>/eval_results.json. `--step` picks a checkpoint other
than the newest.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from adaface_jax import eval_lib
from adaface_jax import reporting

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The config the run was trained with.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The training run's folder.")
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step to evaluate; the newest by default.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  reporting.quiet_library_logs()
  eval_lib.evaluate(_CONFIG.value, _WORKDIR.value, _STEP.value)


if __name__ == "__main__":
  app.run(main)
