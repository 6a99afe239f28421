"""Run directories shared by the experiments: config and metrics files, resume, progress.

A run directory holds::

  config.json      {"experiment": name, "config": {...}, "environment": {...}}
  metrics.jsonl    one JSON object per line, each with the "unit" it belongs to
  figures/*.png
  summary.md

An experiment splits its work into *units* (e.g. one method on one problem, all
seeds at once). :func:`run_units` computes the units that are not finished yet
and appends each one's records to ``metrics.jsonl`` as soon as it is done, in a
single write followed by ``fsync``, ending with the unit's closing record
``{"kind": "unit", "unit": name, ...}``. A unit counts as finished only when
that closing record is on disk, so a run killed at any moment loses at most the
unit it was computing: resuming drops the partial lines of unfinished units and
computes those units again, and never recomputes a finished one. Every closing
record carries the ``session`` that computed it (a fresh id per process), so a
resumed run shows which units it computed.

Every config has a ``fast_compile`` field. When it is set, :meth:`RunDirectory.create`
and :meth:`RunDirectory.resume` add :data:`FAST_COMPILE_XLA_FLAGS` to ``XLA_FLAGS``
before JAX starts its backend, so a resumed run compiles as the original did.
"""

import dataclasses
import datetime
import functools
import json
import os
import platform
import typing
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tqdm
from jax._src import xla_bridge  # the only way to tell whether XLA_FLAGS can still take effect

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.md"
FIGURES_DIR = "figures"
UNIT_KIND = "unit"
# XLA's backend optimisations off, and the classic CPU emitters, which compile faster than the
# fusion emitters. A quick run spends most of its time compiling programs it then runs for
# milliseconds; these settings cut that about threefold and change results only by rounding.
# As ``jax.jit(..., compiler_options=...)`` they also suit any program that runs only once.
FAST_COMPILE_OPTIONS = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
  "xla_cpu_use_fusion_emitters": False,
}
FAST_COMPILE_XLA_FLAGS = tuple(
  f"--{name}={str(value).lower()}" for name, value in FAST_COMPILE_OPTIONS.items()
)


# jaxlib 0.10.2's concurrency-optimised CPU scheduler left a compiled program hanging on its
# second call: the saddles-good-enough MNIST measurement (an SLQ density, the top eigenvalues and
# classify_critical_point in one jit, 25,450 parameters) returned once, then every XLA worker
# thread waited for work and the caller for a result that never came, whatever the params. With
# the scheduler off the second call took 2.4 s; with FAST_COMPILE_OPTIONS it did not hang either.
CPU_SCHEDULER_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def _missing_xla_flags(wanted: Sequence[str]) -> tuple[list[str], list[str]]:
  """``(flags in XLA_FLAGS, those of wanted not among them)``."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  return flags, [flag for flag in wanted if flag not in flags]


def avoid_cpu_scheduler_hang() -> None:
  """Adds :data:`CPU_SCHEDULER_XLA_FLAGS` to ``XLA_FLAGS`` while JAX's backend has not started.

  The command line and the tests' conftest call it first. Once the backend has started, XLA
  has read its flags for good and this does nothing: a caller that started JAX itself sets
  the flag in its environment (see the README's set-up section).
  """
  flags, missing = _missing_xla_flags(CPU_SCHEDULER_XLA_FLAGS)
  if missing and not xla_bridge.backends_are_initialized():
    os.environ["XLA_FLAGS"] = " ".join([*flags, *missing])


def fast_compile_options() -> dict[str, Any]:
  """:data:`FAST_COMPILE_OPTIONS` on the CPU backend they are written for; none on GPU or TPU,
  whose compilers reject the ``xla_cpu_`` option."""
  return FAST_COMPILE_OPTIONS if jax.default_backend() == "cpu" else {}


def _as_tuples(value):
  return tuple(_as_tuples(item) for item in value) if isinstance(value, list) else value


def config_from_dict(config_class: type, values: dict[str, Any]):
  """Rebuilds a (possibly nested) config dataclass from its ``dataclasses.asdict`` form.

  JSON turns tuples into lists; fields annotated as tuples get tuples back, nested ones too
  (a tuple of pairs), so that a reloaded config compares equal to the one that was saved.
  """
  hints = typing.get_type_hints(config_class)
  unknown = set(values) - {field.name for field in dataclasses.fields(config_class)}
  if unknown:
    raise ValueError(f"{config_class.__name__} has no fields {sorted(unknown)}.")
  kwargs = {}
  for field in dataclasses.fields(config_class):
    if field.name not in values:
      continue
    value, hint = values[field.name], hints[field.name]
    if dataclasses.is_dataclass(hint):
      value = config_from_dict(hint, value)
    elif typing.get_origin(hint) is tuple or hint is tuple:
      value = _as_tuples(value)
    kwargs[field.name] = value
  return config_class(**kwargs)


def to_json_floats(array) -> list:
  """A float array as nested lists of the shortest decimals that round-trip its dtype.

  ``float32`` values converted to Python floats print with 17 digits; this keeps
  metrics files about half the size and still exact.
  """
  array = np.asarray(array)
  if array.ndim == 0:
    return float(str(array[()]))
  return [to_json_floats(row) for row in array]


def to_json_numbers(array) -> list | int | float:
  """Integers and booleans as they are, floats as :func:`to_json_floats` writes them."""
  array = np.asarray(array)
  if np.issubdtype(array.dtype, np.floating):
    return to_json_floats(array)
  return array.tolist()


def use_fast_compile() -> None:
  """Adds :data:`FAST_COMPILE_XLA_FLAGS` to ``XLA_FLAGS``.

  XLA reads ``XLA_FLAGS`` once, when JAX starts its backend, so this must run first.

  Raises:
    RuntimeError: a flag is missing and the backend has already started.
  """
  flags, missing = _missing_xla_flags(FAST_COMPILE_XLA_FLAGS)
  if not missing:
    return
  if xla_bridge.backends_are_initialized():
    raise RuntimeError(
      "fast_compile must be applied before JAX starts its backend (the first array or jit): "
      "create or resume a run directory, or import the tests' conftest, before either."
    )
  os.environ["XLA_FLAGS"] = " ".join([*flags, *missing])


def use_compiler_settings(config) -> None:
  """:func:`use_fast_compile` when ``config.fast_compile`` is set."""
  if config.fast_compile:
    use_fast_compile()


def environment() -> dict[str, Any]:
  """What the numbers depend on besides the config."""
  return {
    "jax": jax.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "backend": jax.default_backend(),
    "devices": [str(device) for device in jax.devices()],
    "python": platform.python_version(),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
  }


class RunDirectory:
  """The files of one run of one experiment; use :meth:`create` or :meth:`resume`."""

  def __init__(self, path: Path, experiment: str, config):
    self.path = path
    self.experiment = experiment
    self.config = config
    self.session = uuid.uuid4().hex[:12]
    self.figures = path / FIGURES_DIR
    self.figures.mkdir(parents=True, exist_ok=True)

  @property
  def metrics_path(self) -> Path:
    return self.path / METRICS_FILE

  @classmethod
  def create(cls, experiment: str, config, out: str | os.PathLike | None = None) -> "RunDirectory":
    """A new run in ``out``, or in ``runs/<experiment>/<timestamp>/`` when ``out`` is None."""
    if out is None:
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
      base = Path("runs") / experiment / stamp
      path, suffix = base, 1
      while path.exists():  # two runs started in the same second
        suffix += 1
        path = base.with_name(f"{stamp}-{suffix}")
    else:
      path = Path(out)
    if path.exists() and not path.is_dir():
      raise NotADirectoryError(f"{path} is a file; the run needs a directory there.")
    if (path / CONFIG_FILE).exists():
      raise FileExistsError(
        f"{path} already holds a run; continue it with --resume {path} or choose another --out."
      )
    use_compiler_settings(config)
    path.mkdir(parents=True, exist_ok=True)
    record = {
      "experiment": experiment,
      "config": dataclasses.asdict(config),
      "environment": environment(),
      "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    (path / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (path / METRICS_FILE).touch()
    return cls(path, experiment, config)

  @classmethod
  def resume(cls, path: str | os.PathLike, experiment: str, config_class: type) -> "RunDirectory":
    """Reopens a run with the config it was started with, dropping unfinished units' lines."""
    path = Path(path)
    if not (path / CONFIG_FILE).exists():
      raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: it is not a run directory.")
    record = json.loads((path / CONFIG_FILE).read_text())
    if record["experiment"] != experiment:
      raise ValueError(f"{path} is a run of {record['experiment']!r}, not of {experiment!r}.")
    run = cls(path, experiment, config_from_dict(config_class, record["config"]))
    use_compiler_settings(run.config)
    run._drop_unfinished()
    return run

  def records(self) -> list[dict[str, Any]]:
    """All complete records of ``metrics.jsonl``, in file order.

    A line cut short by a killed process is skipped (it can only be the last
    line, and its unit has no closing record yet).
    """
    if not self.metrics_path.exists():
      return []
    records = []
    for line in self.metrics_path.read_text().splitlines():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
    return records

  def finished_units(self) -> dict[str, dict[str, Any]]:
    """The closing record of every finished unit, by unit name."""
    return {r["unit"]: r for r in self.records() if r.get("kind") == UNIT_KIND}

  def _drop_unfinished(self) -> None:
    finished = self.finished_units()
    kept = [r for r in self.records() if r.get("unit") in finished]
    temporary = self.metrics_path.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(temporary, self.metrics_path)

  def write_unit(self, unit: str, records: Sequence[dict], closing: dict[str, Any]) -> None:
    """Appends a unit's records and its closing record in one write, then syncs to disk."""
    reserved = {"kind", "unit", "session", "finished"} & set(closing)
    if reserved:
      raise ValueError(f"the closing record of {unit} may not set {sorted(reserved)}.")
    closing = {
      "kind": UNIT_KIND,
      "unit": unit,
      **closing,
      "session": self.session,
      "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    lines = [json.dumps({"unit": unit, **r}) for r in records] + [json.dumps(closing)]
    with open(self.metrics_path, "a") as file:
      file.write("\n".join(lines) + "\n")
      file.flush()
      os.fsync(file.fileno())

  def write_summary(self, text: str) -> Path:
    path = self.path / SUMMARY_FILE
    path.write_text(text)
    return path


def check_seeds_and_steps(config) -> None:
  """Rejects a config whose ``seeds`` or ``steps`` leave nothing to run."""
  if config.seeds < 1 or config.steps < 1:
    raise ValueError(f"seeds and steps must be at least 1, got {config.seeds}, {config.steps}.")


def check_log_every(config) -> None:
  """Rejects a config whose ``steps`` is not a multiple of its ``log_every``."""
  if config.log_every < 1 or config.steps % config.log_every:
    raise ValueError(
      f"steps ({config.steps}) must be a multiple of log_every ({config.log_every}), the "
      "interval at which losses are logged."
    )


def check_known(what: str, names, known) -> None:
  """Rejects, before any unit runs, names (of methods, problems, datasets) not in ``known``."""
  unknown = sorted(set(names) - set(known))
  if unknown:
    raise ValueError(f"unknown {what} {unknown}; known: {', '.join(known)}.")


def check_positive_integers(config, *names: str) -> None:
  """Rejects fields of ``config`` that are not integers of at least 1 (a slice by a negative
  ``max_train_examples`` would drop examples from the end instead)."""
  for name in names:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an integer of at least 1, got {value!r}.")


def run_units(
  run: RunDirectory,
  units: Iterable[str],
  compute: Callable[[str], tuple[Sequence[dict], dict[str, Any]]],
) -> list[str]:
  """Computes and records every unit not finished yet, with a progress bar.

  Args:
    run: the run directory.
    units: unit names in the order to compute them.
    compute: maps a unit name to ``(records, closing)``: the unit's per-step
      records and the fields of its closing record.

  Returns:
    The names of the units computed by this call.
  """
  units = list(units)
  finished = run.finished_units()
  todo = [unit for unit in units if unit not in finished]
  if finished:
    done = [unit for unit in units if unit in finished]
    print(f"resuming {run.path}: {len(done)} finished unit(s) kept: {', '.join(done)}")
  computed = []
  progress = tqdm.tqdm(todo, desc=run.experiment, unit="unit", dynamic_ncols=True)
  # Every experiment's config has seeds and steps; each unit runs all seeds at once.
  workload = f"{run.config.seeds} seeds x {run.config.steps} steps"
  for unit in progress:
    progress.set_postfix_str(f"{unit}, {workload}")
    records, closing = compute(unit)
    run.write_unit(unit, records, closing)
    computed.append(unit)
  print(f"computed {len(computed)} unit(s): {', '.join(computed) or '(none)'}")
  return computed


def run_experiment(run_dir: RunDirectory, experiment) -> str:
  """An experiment's ``run`` when it adds nothing of its own: checks the config, computes the
  missing units, writes the figures and the summary, and returns the summary's table.

  ``experiment`` is the module, with ``check_config(config)``, ``unit_names(config)``,
  ``compute_unit(config, unit)``, ``make_figures(run_dir, config)``, ``summary(run_dir,
  config, figures)`` and ``summary_table(run_dir, config)``.
  """
  config = run_dir.config
  experiment.check_config(config)
  run_units(
    run_dir, experiment.unit_names(config), functools.partial(experiment.compute_unit, config)
  )
  figures = experiment.make_figures(run_dir, config)
  run_dir.write_summary(experiment.summary(run_dir, config, figures))
  return experiment.summary_table(run_dir, config)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)
