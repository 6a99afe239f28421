"""Runs the multi-device checks (``tests/*sharding_check.py``) on 8 CPU devices.

JAX fixes the number of CPU devices when its backend starts, which has already happened in this
process, so the checks run in child pytest processes that are given their devices from the start:
one process with all 8, and two processes with 4 each that join one JAX cluster
(``jax.distributed``, through ``tests/_multihost.py``), so that every mesh spans both processes as
a multi-host run's does and each process holds only its own shards. Across processes CI runs a
selection of the checks that compare results with one device (the optimizers, the noise, the
smoothing, Lanczos, the trace, the extreme eigenvalues and the dense classification on the 2-D
Explicit mesh, data parallelism and a sharded flax model); ``JAXSADDLE_FULL=1`` runs them all.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys

import _multihost
import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
NUM_DEVICES = 8
CHECKS = ("sharding_check.py", "curvature_sharding_check.py")
FULL = os.environ.get("JAXSADDLE_FULL") == "1"
# One case of each kind of check, to keep CI's time: compilation, twice per case (sharded and
# single-device), is most of it.
MULTIPROCESS_SELECTION = (
  None
  if FULL
  else " or ".join(
    [
      "results_equal",
      "raw_noise",
      "smoothing",
      "(lanczos and explicit_2d and True)",
      "(explicitly_sharded and (classify_dense or hutch or extreme))",
      "(data_parallel and Auto)",
      "nnx",
    ]
  )
)
# A guard against a hung child; the checks take about a minute on an idle 2-core CPU.
TIMEOUT_S = 900


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def _child_environment(devices_per_process: int, extra: dict) -> dict:
  env = dict(os.environ)
  other_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{other_flags} --xla_force_host_platform_device_count={devices_per_process}"
  env["XLA_FLAGS"] = env["XLA_FLAGS"].strip()
  env["JAX_PLATFORMS"] = "cpu"
  # Options meant for the parent run (say, xdist's -n) must not leak into the children.
  env.pop("PYTEST_ADDOPTS", None)
  return env | extra


@pytest.mark.parametrize("num_processes", [1, 2])
def test_sharding_checks_pass_on_8_cpu_devices(num_processes):
  command = [sys.executable, "-m", "pytest", *CHECKS, "-q", "-rfE", "-p", "no:cacheprovider"]
  environments = [_child_environment(NUM_DEVICES, {})]
  if num_processes > 1:
    if MULTIPROCESS_SELECTION is not None:
      command += ["-k", MULTIPROCESS_SELECTION]
    command += ["-p", "_multihost"]
    coordinator = f"localhost:{_free_port()}"
    environments = [
      _child_environment(
        NUM_DEVICES // num_processes,
        {
          _multihost.COORDINATOR: coordinator,
          _multihost.NUM_PROCESSES: str(num_processes),
          _multihost.PROCESS_ID: str(process_id),
        },
      )
      for process_id in range(num_processes)
    ]
  children = [
    subprocess.Popen(
      command, cwd=TESTS_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for env in environments
  ]
  try:
    outputs = [child.communicate(timeout=TIMEOUT_S)[0] for child in children]
  finally:
    for child in children:
      child.kill()
  for process_id, (child, output) in enumerate(zip(children, outputs, strict=True)):
    where = f"process {process_id} of {num_processes}: {' '.join(command)}"
    if child.returncode != 0:
      pytest.fail(f"{where} exited with {child.returncode}:\n{output}", pytrace=False)
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary), f"{where}\n{output}"
    assert "skipped" not in summary, f"{where}\n{output}"
