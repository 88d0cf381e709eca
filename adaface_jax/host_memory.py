"""Keeps freed host memory in the process, for steps XLA runs on the CPU.

XLA:CPU allocates one temporary buffer per execution of a compiled step (the
activations kept for the backward pass: 4.5 GiB for an IR-50 train step at
batch 32) and frees it when the step ends. glibc serves a request that large
with a fresh `mmap` and returns it with `munmap`, so every step page-faults
the whole buffer in again: about 1.1 million faults and a fifth of the step's
CPU time for that IR-50 step on two cores. Told to serve large requests from
its heap and never to give the heap back, glibc hands the same pages to the
next step instead.

The settings are process-wide and only reach threads that have not yet
allocated, so `keep_freed_memory` runs before JAX starts its backend (the
XLA thread pools). They cost little where the steps run on an accelerator:
the host then keeps at most its own peak.
"""

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Set to 1 to leave the C allocator as the system configured it.
OPT_OUT_ENV = "ADAFACE_SYSTEM_MALLOC"


def keep_freed_memory() -> bool:
  """Configures glibc's allocator to reuse freed memory; True if applied.

  One arena for all threads (so no thread falls back to `mmap` when its own
  arena cannot grow), no `mmap` for large requests, and no trimming of the
  heap's top (-1 is the largest threshold). Does nothing, and returns False,
  off Linux, without glibc, or with `ADAFACE_SYSTEM_MALLOC=1`.
  """
  if os.environ.get(OPT_OUT_ENV) == "1" or not sys.platform.startswith(
      "linux"):
    return False
  name = ctypes.util.find_library("c")
  if name is None:
    return False
  libc = ctypes.CDLL(name)
  if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
    return False  # musl and others: no glibc tunables.

  applied = [libc.mallopt(_M_ARENA_MAX, 1),
             libc.mallopt(_M_MMAP_MAX, 0),
             libc.mallopt(_M_TRIM_THRESHOLD, -1)]
  return all(result == 1 for result in applied)
