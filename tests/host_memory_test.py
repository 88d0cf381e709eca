"""The allocator setting makes a freed large buffer reusable without page
faults. Process-wide and set before threads allocate, so each case runs in a
fresh interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest

from adaface_jax import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUFFER_BYTES = 64 * 2**20

_SCRIPT = textwrap.dedent(f"""
    import resource
    import numpy as np
    from adaface_jax import host_memory

    print(host_memory.keep_freed_memory())
    buffer = np.ones({BUFFER_BYTES} // 8)
    del buffer
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = np.ones({BUFFER_BYTES} // 8)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _run(opt_out: bool) -> tuple[str, int]:
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  env.pop(host_memory.OPT_OUT_ENV, None)
  if opt_out:
    env[host_memory.OPT_OUT_ENV] = "1"
  result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env,
                          capture_output=True, text=True, check=True,
                          cwd=REPO_ROOT)
  applied, faults = result.stdout.split()
  return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="the setting is glibc's")
def test_freed_buffer_is_reused_without_page_faults():
  applied, faults = _run(opt_out=False)
  if applied != "True":
    pytest.skip("the C library is not glibc")

  # 64 MiB is 16,384 pages: reusing the freed heap touches none afresh.
  assert faults < 64, faults


def test_opt_out_leaves_the_allocator_alone():
  applied, _ = _run(opt_out=True)
  assert applied == "False"
