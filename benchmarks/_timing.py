"""Interleaved timing shared by the benchmarks.

Candidates are timed in one process, round-robin: every round takes one sample
of every candidate, starting from a different candidate each round, so load
from other processes and thermal or frequency drift fall on all candidates
alike instead of on whichever ran last. A sample runs a candidate's step many
times back to back (JAX dispatches asynchronously, as in a training loop) and
waits only for the last result, so each step's output must depend on the
previous step's: a training step that threads params and state through, or a
sampler that threads its key. The figure reported for a candidate is the median
over rounds of its per-step wall-clock time; ratios divide medians taken in the
same run.

Each sample also records the CPU time of the whole process (all XLA threads).
On a machine shared with other jobs, wall-clock time includes the time the
process waits for a core and CPU time does not (though it still pays for
evicted caches), so when the wall-clock ratio and the paired ratio disagree the
machine was busy and the CPU-time ratio is the better estimate.

The header also names the memory allocator's settings. On Linux, glibc's malloc maps every
buffer above its mmap threshold (32 MB at most, by default) afresh and unmaps it when freed,
and returns freed memory at the top of its heap to the kernel: XLA's output and temporary
buffers of that size then fault their pages in again at every call, which on the MLP benchmarks
costs as much as a fifth of a Lanczos run. ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` (or a preloaded allocator) change this for the whole process, so the
same setting applies to every candidate of a run, peers included.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One thing to time.

  Attributes:
    name: the row label.
    step: runs one step and returns its output; the output of a call must
      depend on the output of the call before it (see the module docstring).
    baseline: the name of the candidate this one's ratio is taken against, or
      None for the first candidate of the list given to :func:`time_interleaved`.
  """

  name: str
  step: Callable[[], Any]
  baseline: str | None = None


@dataclasses.dataclass(frozen=True)
class Timing:
  """Per-step times of one candidate, one sample per round, in seconds."""

  name: str
  baseline: str
  steps_per_sample: int
  samples: tuple[float, ...]  # wall-clock
  cpu_samples: tuple[float, ...]  # CPU time of the process

  @property
  def median(self) -> float:
    return statistics.median(self.samples)

  @property
  def cpu_median(self) -> float:
    return statistics.median(self.cpu_samples)

  @property
  def quartiles(self) -> tuple[float, float]:
    """First and third quartiles, a measure of the noise of the median."""
    q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
    return q1, q3


@dataclasses.dataclass(frozen=True)
class Settings:
  """How long to measure: rounds, the minimum length of a sample, warm-up steps."""

  rounds: int
  min_sample_seconds: float
  warmup_steps: int


DEFAULT = Settings(rounds=25, min_sample_seconds=0.05, warmup_steps=5)
QUICK = Settings(rounds=5, min_sample_seconds=0.02, warmup_steps=2)


def _run(step: Callable[[], Any], num_steps: int) -> tuple[float, float]:
  """Wall-clock and CPU seconds per step over ``num_steps`` steps, waiting for the last."""
  wall_start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(num_steps):
    output = step()
  jax.block_until_ready(output)
  wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
  return wall / num_steps, cpu / num_steps


def _steps_per_sample(step: Callable[[], Any], min_seconds: float) -> int:
  """The smallest power of two of steps that lasts at least ``min_seconds``."""
  num_steps = 1
  while _run(step, num_steps)[0] * num_steps < min_seconds:
    num_steps *= 2
  return num_steps


def time_interleaved(candidates: Sequence[Candidate], settings: Settings) -> list[Timing]:
  """Times ``candidates`` round-robin; the first one is the default baseline.

  Each candidate first runs ``settings.warmup_steps`` steps (the first one
  compiles), then its sample length is calibrated once, then the rounds run.
  """
  names = [candidate.name for candidate in candidates]
  if len(set(names)) != len(names):
    raise ValueError(f"candidate names must be distinct, got {names}.")
  for candidate in candidates:
    if candidate.baseline is not None and candidate.baseline not in names:
      raise ValueError(f"{candidate.name}: unknown baseline {candidate.baseline!r}.")
  for candidate in candidates:
    _run(candidate.step, settings.warmup_steps)
  steps = [_steps_per_sample(c.step, settings.min_sample_seconds) for c in candidates]
  samples = [[] for _ in candidates]
  for round_index in range(settings.rounds):
    for offset in range(len(candidates)):
      i = (round_index + offset) % len(candidates)
      samples[i].append(_run(candidates[i].step, steps[i]))
  return [
    Timing(
      name=candidate.name,
      baseline=candidate.baseline or names[0],
      steps_per_sample=num_steps,
      samples=tuple(wall for wall, _ in candidate_samples),
      cpu_samples=tuple(cpu for _, cpu in candidate_samples),
    )
    for candidate, num_steps, candidate_samples in zip(candidates, steps, samples, strict=True)
  ]


def _baseline(timing: Timing, timings: Sequence[Timing]) -> Timing:
  return next(t for t in timings if t.name == timing.baseline)


def ratio(timing: Timing, timings: Sequence[Timing]) -> float:
  """Median wall-clock time of ``timing`` over the median of its baseline."""
  return timing.median / _baseline(timing, timings).median


def cpu_ratio(timing: Timing, timings: Sequence[Timing]) -> float:
  """Median CPU time of ``timing`` over the median of its baseline."""
  return timing.cpu_median / _baseline(timing, timings).cpu_median


def paired_ratio(timing: Timing, timings: Sequence[Timing]) -> float:
  """Median over rounds of the ratio to the baseline's sample of the same round.

  Samples of one round are close in time, so this ratio is less sensitive than
  :func:`ratio` to load that changes between rounds; the two disagreeing is a
  sign that the machine was busy.
  """
  baseline = _baseline(timing, timings)
  return statistics.median(a / b for a, b in zip(timing.samples, baseline.samples, strict=True))


def markdown_table(timings: Sequence[Timing]) -> str:
  """Median ms per step with quartiles, and the three ratios to each row's baseline."""
  lines = [
    "| name | median ms | q1 - q3 ms | ratio | paired ratio | CPU-time ratio | to |",
    "|---|---:|---:|---:|---:|---:|---|",
  ]
  for timing in timings:
    q1, q3 = timing.quartiles
    lines.append(
      f"| {timing.name} | {timing.median * 1e3:.3f} | {q1 * 1e3:.3f} - {q3 * 1e3:.3f} "
      f"| {ratio(timing, timings):.3f} | {paired_ratio(timing, timings):.3f} "
      f"| {cpu_ratio(timing, timings):.3f} | {timing.baseline} |"
    )
  return "\n".join(lines)


def as_json(timings: Sequence[Timing]) -> list[dict]:
  """The table's rows with every sample, for ``--json``."""
  return [
    {
      "name": timing.name,
      "baseline": timing.baseline,
      "median_ms": timing.median * 1e3,
      "quartiles_ms": [q * 1e3 for q in timing.quartiles],
      "ratio": ratio(timing, timings),
      "paired_ratio": paired_ratio(timing, timings),
      "cpu_ratio": cpu_ratio(timing, timings),
      "steps_per_sample": timing.steps_per_sample,
      "samples_ms": [s * 1e3 for s in timing.samples],
      "cpu_samples_ms": [s * 1e3 for s in timing.cpu_samples],
    }
    for timing in timings
  ]


ALLOCATOR_VARIABLES = (
  "MALLOC_MMAP_THRESHOLD_",
  "MALLOC_TRIM_THRESHOLD_",
  "GLIBC_TUNABLES",
  "LD_PRELOAD",
)


def allocator() -> str:
  """The allocator settings this process started with, ``"glibc defaults"`` when none is set."""
  settings = [f"{name}={os.environ[name]}" for name in ALLOCATOR_VARIABLES if name in os.environ]
  return ", ".join(settings) or "glibc defaults"


def environment() -> dict:
  """What the numbers depend on, recorded next to them."""
  return {
    "allocator": allocator(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
    "load_average_1_5_15_min": os.getloadavg(),
    "python": platform.python_version(),
    "machine": platform.machine(),
    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


def argument_parser(description: str) -> argparse.ArgumentParser:
  """The options every benchmark takes: ``--quick`` and ``--json PATH``."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true", help="fewer and shorter samples")
  parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
  return parser


def settings_from(args: argparse.Namespace) -> Settings:
  return QUICK if args.quick else DEFAULT


def write_json(path: str, payload: dict) -> None:
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
    f.write("\n")


def print_report(
  what: str,
  settings: Settings,
  load_at_start: float,
  timings: Sequence[Timing],
  derived_ratios: Callable[[dict[str, float]], dict[str, float]],
) -> tuple[dict[str, float], dict[str, float]]:
  """Prints the run's header, the table and the derived ratios; returns the ratios.

  ``derived_ratios`` maps per-candidate medians (by name) to named ratios; it is
  applied to the wall-clock and to the CPU-time medians.
  """
  from_wall = derived_ratios({timing.name: timing.median for timing in timings})
  from_cpu = derived_ratios({timing.name: timing.cpu_median for timing in timings})
  print(
    f"{what}; {settings.rounds} interleaved rounds, medians over rounds; "
    f"{jax.default_backend()}, {jax.device_count()} device(s), 1-minute load average "
    f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; allocator: "
    f"{allocator()}.\n"
  )
  print(markdown_table(timings))
  print("\nDerived ratios, from wall-clock medians (from CPU-time medians):\n")
  for name, value in from_wall.items():
    print(f"- {name}: {value:.3f} ({from_cpu[name]:.3f})")
  return from_wall, from_cpu
