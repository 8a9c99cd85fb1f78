"""Run `spo train ARGS...` and send it a real SIGTERM during optimizer step N (a test helper, run as a script).

    SIGTERM_AT=N   the process signals itself when the Trainer begins step N (1-based), so the signal arrives
                   in the middle of a step, as a spot instance's notice would
    SIGTERM_AT=N,N SIGTERM twice at step N: the second one must end the process at once

Only the moment is chosen; the signal, its handler and everything after are the real ones.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    from transformers import Trainer

    steps = [int(s) for s in os.environ["SIGTERM_AT"].split(",")]
    training_step = Trainer.training_step

    def signalling_step(self: Trainer, *args, **kwargs):
        step = self.state.global_step + 1
        for _ in range(steps.count(step)):
            os.kill(os.getpid(), signal.SIGTERM)
        if step in steps:
            steps[:] = [s for s in steps if s != step]
        return training_step(self, *args, **kwargs)

    Trainer.training_step = signalling_step  # type: ignore[method-assign]
    from spo_align.cli import main as spo

    sys.argv = ["spo", *sys.argv[1:]]
    spo()


if __name__ == "__main__":
    main()
