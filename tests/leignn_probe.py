"""A LEIGNN that interrupts its own training process once, at a chosen step (tests/test_distributed.py).

``model.name: leignn_probe.ProbeLEIGNN`` (with tests/ on PYTHONPATH) builds exactly the LEIGNN of the
same config (same parameters, same forward). With ``LEIGNN_PROBE_SIGNAL="<SIGNAME>:<k>:<marker file>"``
the k-th training-mode forward in a process sends <SIGNAME> to that process and creates the marker,
so the signal fires once even if the job is restarted. Real signals, deterministic timing: the tiny
test runs finish 40 steps in about a second, too fast to interrupt from outside reliably.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from leignn_ocp.model import LEIGNN

ENV = "LEIGNN_PROBE_SIGNAL"


class ProbeLEIGNN(LEIGNN):
    _train_forwards = 0

    def forward(self, data):
        spec = os.environ.get(ENV)
        if spec and self.training:
            name, k, marker = spec.split(":", 2)
            ProbeLEIGNN._train_forwards += 1
            if ProbeLEIGNN._train_forwards == int(k) and not Path(marker).exists():
                Path(marker).write_text(f"{name} at training forward {k} in pid {os.getpid()}\n")
                os.kill(os.getpid(), getattr(signal, name))  # mid-step: before this batch's update
        return super().forward(data)
