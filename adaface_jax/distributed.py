"""Starting JAX's multi-process runtime (several hosts, or processes).

Every process runs the same `train.py` command. On TPU pods and clusters
that JAX recognises (SLURM, Kubernetes, ...), `--multihost` lets JAX find
the coordinator itself; elsewhere the coordinator address, the process
count and each process's id are given explicitly.
"""

from absl import logging
import jax


def initialize(coordinator_address: str = "", num_processes: int = 1,
               process_id: int = 0, auto_detect: bool = False) -> None:
  """Connects this process to the others; a no-op for a single process.

  Args:
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: how many processes take part.
    process_id: this process's rank in [0, num_processes).
    auto_detect: let JAX read the cluster environment (TPU pods, SLURM).
  """
  if auto_detect:
    jax.distributed.initialize()
  elif num_processes > 1:
    if not coordinator_address:
      raise ValueError("--num_processes > 1 needs --coordinator_address")
    if not 0 <= process_id < num_processes:
      raise ValueError(
          f"--process_id={process_id} is outside [0, {num_processes})")
    if jax.config.jax_platforms in (None, "", "cpu"):
      # CPU devices of different processes talk through gloo.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes, process_id=process_id)
  else:
    return
  logging.info("Process %d of %d; %d local of %d devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
  """Process 0 writes logs, metrics and reports; every process checkpoints."""
  return jax.process_index() == 0
