"""Run `spo train ARGS...` and send it a real signal during optimizer step N (a test helper, run as a script).

    SIGNAL_AT=N    the process signals itself when the Trainer begins step N (1-based), so the signal arrives
                   in the middle of a step, as a spot instance's notice or a Ctrl-C would
    SIGNAL_AT=N,N  twice at step N (a second SIGTERM must end the process at once)
    SIGNAL=TERM    which signal (TERM, the default, or INT for Ctrl-C)

Only the moment is chosen, so that a fast machine cannot finish the run before the signal; the signal, its
handler and everything after are the real ones.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    from transformers import Trainer

    steps = [int(s) for s in os.environ["SIGNAL_AT"].split(",")]
    sent = getattr(signal, "SIG" + os.environ.get("SIGNAL", "TERM"))
    # A test runner started in the background (no job control) passes SIGINT on as ignored; a terminal's
    # Ctrl-C reaches a process with Python's own handler, which this restores.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    training_step = Trainer.training_step

    def signalling_step(self: Trainer, *args, **kwargs):
        step = self.state.global_step + 1
        for _ in range(steps.count(step)):
            os.kill(os.getpid(), sent)
        if step in steps:
            steps[:] = [s for s in steps if s != step]
        return training_step(self, *args, **kwargs)

    Trainer.training_step = signalling_step  # type: ignore[method-assign]
    from spo_align.cli import main as spo

    sys.argv = ["spo", *sys.argv[1:]]
    spo()


if __name__ == "__main__":
    main()
