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
import tempfile
import time

import _multihost
import pytest

from experiments import _runner

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
# Compiling, twice per case, is most of the checks' time, and what they check (shardings,
# collectives, agreement with one device) is decided before XLA's backend optimisations, which
# these flags turn off: about half the time. JAXSADDLE_FULL=1 compiles as a user's run does.
COMPILE_FLAGS = () if FULL else _runner.FAST_COMPILE_XLA_FLAGS
# A guard against a hung child; the checks take under a minute on an idle 2-core CPU.
TIMEOUT_S = 900


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def _child_environment(devices_per_process: int, extra: dict) -> dict:
  env = dict(os.environ)
  other_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = " ".join(
    [other_flags, *COMPILE_FLAGS, f"--xla_force_host_platform_device_count={devices_per_process}"]
  ).strip()
  env["XLA_FLAGS"] = env["XLA_FLAGS"].strip()
  env["JAX_PLATFORMS"] = "cpu"
  # Unbuffered, so that a child killed at the deadline has written what it got through.
  env["PYTHONUNBUFFERED"] = "1"
  # Options meant for the parent run (say, xdist's -n) must not leak into the children.
  env.pop("PYTEST_ADDOPTS", None)
  # The children start in tests/, where conftest.py imports the experiments package.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR.parent), env.get("PYTHONPATH")]))
  return env | extra


@pytest.mark.parametrize("num_processes", [1, 2])
def test_sharding_checks_pass_on_8_cpu_devices(num_processes):
  command = [sys.executable, "-m", "pytest", *CHECKS, "-q", "-rfE", "-p", "no:cacheprovider"]
  # Processes must take their collectives in the same order: no test shuffling.
  command += ["-p", "no:randomly"]
  environments = [_child_environment(NUM_DEVICES, {})]
  if num_processes > 1:
    if MULTIPROCESS_SELECTION is not None:
      command += ["-k", MULTIPROCESS_SELECTION]
    # A check that fails in one process only would leave the others waiting in its collectives:
    # the failing process stops, and JAX's heartbeat then stops the others within a minute.
    command += ["-p", "_multihost", "-x"]
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
  # Output goes to files, not pipes: a child blocked on a full pipe would stall the other in a
  # collective. One deadline for all; on any failure every child's output is shown.
  with tempfile.TemporaryDirectory() as logs:
    log_paths = [pathlib.Path(logs, f"process_{i}.log") for i in range(len(environments))]
    children = []
    for env, log_path in zip(environments, log_paths, strict=True):
      with open(log_path, "w") as log:
        children.append(
          subprocess.Popen(command, cwd=TESTS_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    deadline = time.monotonic() + TIMEOUT_S
    try:
      for child in children:
        child.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
      pass
    finally:
      for child in children:
        child.kill()
        child.wait()
    outputs = [log_path.read_text() for log_path in log_paths]
  report = "\n".join(
    f"--- process {i} of {num_processes} (exit {child.returncode}): {' '.join(command)}\n{output}"
    for i, (child, output) in enumerate(zip(children, outputs, strict=True))
  )
  for output, child in zip(outputs, children, strict=True):
    if child.returncode != 0:
      pytest.fail(report, pytrace=False)
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary), report
    assert "skipped" not in summary, report
