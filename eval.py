"""Evaluates a run: `python eval.py --config configs/X.py --workdir DIR`.

Runs every evaluation set the config enables (an LFW-format pairs file,
verification `.bin`s, IJB-B/C, TinyFace; see `config.eval`), prints their
tables, records every figure in <workdir>/eval_results.json and draws ROC
curves into <workdir>/eval_plots. `--step` picks a checkpoint other than the
newest, `--sets` a subset of the sets; `--workdir DIR/best` evaluates the
best step kept during training. Example:

  python eval.py --config configs/adaface_ir101.py --workdir runs/ir101 \
      --config.eval.sets.cfp_fp.path=/data/faces_emore/cfp_fp.bin \
      --config.eval.sets.ijbc.path=/data/IJB_release
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from adaface_jax import eval_lib
from adaface_jax import host_memory
from adaface_jax import reporting

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The config the run was trained with.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The training run's folder.")
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step to evaluate; the newest by default.")
_SETS = flags.DEFINE_list(
    "sets", None, "Names of the evaluation sets to run; all enabled ones by "
    "default.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  host_memory.keep_freed_memory()  # Before JAX starts its backend.
  reporting.quiet_library_logs()
  reporting.exit_on_user_error(
      eval_lib.evaluate, _CONFIG.value, _WORKDIR.value, _STEP.value,
      _SETS.value)


if __name__ == "__main__":
  app.run(main, flags_parser=reporting.parse_flags)
