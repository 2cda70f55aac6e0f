"""Where a step's time goes: graph construction, input checks, the model's own compute, the loss,
backward and the optimizer, for any line-up model, without touching the models' code.

The models are instrumented from outside, for the benchmark only (:func:`instrumented`):
fairchem's ``GraphModelMixin.generate_graph`` (the graph every fairchem model here and LEIGNN
build, periodic or not), PyG's ``RadiusInteractionGraph`` (SchNet's graph when
``use_pbc=False``: fairchem hands that case to PyG's SchNet) and ``leignn_ocp.checks``'
``check_input`` / ``check_baseline_input`` wherever a module imported them are swapped for
labelled wrappers while the context is open; the training step labels its own phases through
:func:`phase`. A label is a wall-clock interval on a stack in timed steps (each phase counts its
*own* time: a graph built inside the input checks would be the checks', not counted twice),
and a ``torch.profiler.record_function`` range in profiled steps (so the profiler's tables
name the phases: ``bench::graph``, ``bench::forward``, ...).

The breakdown's numbers are those wall-clock intervals of unprofiled steps: on 9-atom
molecules a step is a few hundred small ops, and the profiler's per-op bookkeeping would be a
large part of what it measures. The profiler runs on separate steps for the op tables
(:func:`profiler_table`), and its own phase totals are kept next to the unprofiled ones.
On CUDA every label boundary synchronises the device, so a phase owns the kernels it launched.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch

# Phases in the order of the tables and bars. "model" is the forward minus graph and checks.
TRAIN_PHASES = ("graph", "input_checks", "model", "loss", "backward", "optimizer")
INFER_PHASES = ("graph", "input_checks", "model")
LABELS = {"graph": "graph construction", "input_checks": "input checks", "model": "model compute",
          "loss": "loss", "backward": "backward", "optimizer": "optimizer step", "other": "other"}
_PREFIX = "bench::"  # record_function names: bench::graph, bench::forward, ...


class PhaseClock:
    """Exclusive wall-clock seconds per label while :attr:`active` (a stack of open labels)."""

    def __init__(self) -> None:
        self.active = False
        self.device: torch.device | None = None
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, seconds of labelled children]

    def reset(self) -> None:
        self.totals = {}
        self._stack = []

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def label(self, name: str) -> Iterator[None]:
        """A profiler range while inactive (profiled steps), a clock interval while active (timed
        steps: no record_function there, whose enter/exit would be part of what is timed)."""
        if not self.active:
            with torch.profiler.record_function(_PREFIX + name):
                yield
            return
        self._sync()
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._sync()
            self._stack.pop()
            dt = time.perf_counter() - frame[1]
            self.totals[name] = self.totals.get(name, 0.0) + dt - frame[2]
            if self._stack:
                self._stack[-1][2] += dt


CLOCK = PhaseClock()


def phase(name: str):
    """Label a phase of a step; free (a nullcontext) unless :func:`instrumented` is open."""
    return CLOCK.label(name) if _depth[0] else _null


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_null = _Null()
_depth = [0]


def _labelled(name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        with CLOCK.label(name):
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    wrapper.__name__ = getattr(fn, "__name__", name)
    wrapper.__doc__ = getattr(fn, "__doc__", None)
    return wrapper


@contextmanager
def instrumented(device: torch.device | str = "cpu") -> Iterator[PhaseClock]:
    """Labelled wrappers around graph construction and input checks while open (restored after)."""
    from fairchem.core.models.base import GraphModelMixin
    from torch_geometric.nn.models.schnet import RadiusInteractionGraph

    from leignn_ocp import checks

    originals = {checks.check_input, getattr(checks, "check_baseline_input", None)} - {None}
    with ExitStack() as stack:
        def patch(owner, attr: str, name: str) -> None:
            old = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            setattr(owner, attr, _labelled(name, old))
            stack.callback(setattr, owner, attr, old)

        patch(GraphModelMixin, "generate_graph", "graph")
        patch(RadiusInteractionGraph, "forward", "graph")
        # every module that did `from leignn_ocp.checks import check_input` holds its own name
        for mod in list(sys.modules.values()):
            for attr in ("check_input", "check_baseline_input"):
                if getattr(mod, "__name__", "").startswith("leignn_ocp") and getattr(mod, attr, None) in originals:
                    patch(mod, attr, "input_checks")
        CLOCK.device = torch.device(device)
        _depth[0] += 1
        try:
            yield CLOCK
        finally:
            _depth[0] -= 1
            CLOCK.active = False
            CLOCK.reset()


def timed_phases(fn: Callable[[], object], device: torch.device) -> tuple[float, dict[str, float]]:
    """(wall seconds of one call, exclusive seconds per phase label) inside :func:`instrumented`."""
    CLOCK.reset()
    CLOCK.active = True
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    try:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        CLOCK.active = False
    return time.perf_counter() - t0, dict(CLOCK.totals)


def split(totals: dict[str, float], step_s: float, train: bool) -> dict[str, float]:
    """Per-phase seconds of one step: the forward's own time is "model" (its graph and checks are
    their own phases); "other" is freeing the step's autograd graph and outputs ("release") and
    the step's time outside every label (Python between the labels)."""
    out = {p: totals.get(p, 0.0) for p in (TRAIN_PHASES if train else INFER_PHASES)}
    out["model"] = totals.get("forward", 0.0)
    if train:
        out["optimizer"] = totals.get("optimizer", 0.0) + totals.get("zero_grad", 0.0)
    out["other"] = step_s - sum(v for k, v in totals.items() if k != "release")
    return out


def profiler_table(fn: Callable[[], object], device: torch.device, steps: int, row_limit: int = 25
                   ) -> tuple[str, dict[str, float]]:
    """``steps`` recorded calls of ``fn`` under torch.profiler after one warm-up call (``fn`` is
    called ``steps + 1`` times): (key_averages tables: every ``bench::`` range, then the top ``row_limit`` rows by self CPU time; the
    profiler's per-step CPU ms of each ``bench::`` label, inclusive)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # one call first under the profiler but not recorded: its start-up is not the model's
    with profile(activities=activities, record_shapes=False,
                 schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
        for _ in range(steps + 1):
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            prof.step()
    averages = prof.key_averages()
    from torch.autograd.profiler_util import EventList

    # the phases first, always (on a tiny step a phase's own range can fall out of the top rows)
    phases = EventList([e for e in averages if e.key.startswith(_PREFIX)])
    table = (f"phases ({_PREFIX}* ranges, by total CPU time):\n"
             f"{phases.table(sort_by='cpu_time_total')}\n"
             f"top {row_limit} operators by self CPU time:\n"
             f"{averages.table(sort_by='self_cpu_time_total', row_limit=row_limit)}")
    labels = {e.key[len(_PREFIX):]: e.cpu_time_total / 1e3 / steps for e in averages if e.key.startswith(_PREFIX)}
    return table, labels
