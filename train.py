"""Trains AdaFace: `python train.py --config configs/X.py --workdir DIR`.

Fields of the config are overridden on the command line, e.g.
`--config.head.m=0.5 --config.data.batch_size=256`; a misspelt field is an
error. Rerunning the same command resumes from the newest checkpoint in
--workdir. Training ends with the config's verification set, if any.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from adaface_jax import distributed
from adaface_jax import host_memory
from adaface_jax import reporting
from adaface_jax import train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a get_config() module).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, logs and results.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "",
    "host:port of process 0, when several processes train together.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1, "Processes training together (one per host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's rank.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False,
    "Let JAX detect the cluster (TPU pod slices, SLURM) and connect.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  host_memory.keep_freed_memory()  # Before JAX starts its backend.
  reporting.quiet_library_logs()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, _MULTIHOST.value)
  reporting.exit_on_user_error(
      train_lib.train_and_evaluate, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=reporting.parse_flags)
