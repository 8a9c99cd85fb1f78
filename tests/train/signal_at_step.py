"""Run `spo train ARGS...` and send it a real signal during optimizer step N (a test helper, run as a script).

    SIGNAL_AT=N    the process signals itself when the Trainer begins step N (1-based), so the signal arrives
                   in the middle of a step, as a spot instance's notice or a Ctrl-C would
    SIGNAL_AT=N,N  twice at step N, a second apart (a second SIGTERM must end the process at once)
    SIGNAL_AT=load      while the model loads, before training (after the data is read and tokenized)
    SIGNAL_AT=save:N    while checkpoint-N is written: its weights are on disk, its optimizer state not yet
    SIGNAL=TERM    which signal (TERM, the default, or INT for Ctrl-C)
    SIGNAL_PID=1   whom to signal instead of this process: 1 in a PID namespace is the container's first process,
                   which `docker stop` signals (this process itself, or the image's init)

Only the moment is chosen, so that a fast machine cannot finish the run before the signal; the signal, its
handler and everything after are the real ones.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main() -> None:
    from transformers import Trainer

    sent = getattr(signal, "SIG" + os.environ.get("SIGNAL", "TERM"))
    # A test runner started in the background (no job control) passes SIGINT on as ignored; a terminal's
    # Ctrl-C reaches a process with Python's own handler, which this restores.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    at = os.environ["SIGNAL_AT"]
    if at == "load":
        _signal_while_the_model_loads(sent)
        steps: list[int] = []
    elif at.startswith("save:"):
        _signal_while_a_checkpoint_is_written(sent, int(at.removeprefix("save:")))
        steps = []
    else:
        steps = [int(s) for s in at.split(",")]
    training_step = Trainer.training_step

    def signalling_step(self: Trainer, *args, **kwargs):
        step = self.state.global_step + 1
        for i in range(steps.count(step)):
            if i:
                time.sleep(1.0)  # a second notice comes later: an init that is sent two at once passes on one
            os.kill(_target(), sent)
        if step in steps:
            steps[:] = [s for s in steps if s != step]
        return training_step(self, *args, **kwargs)

    Trainer.training_step = signalling_step  # type: ignore[method-assign]
    from spo_align.cli import main as spo

    sys.argv = ["spo", *sys.argv[1:]]
    spo()


def _target() -> int:
    return int(os.environ.get("SIGNAL_PID") or os.getpid())


def _signal_while_the_model_loads(sent: int) -> None:
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained.__func__  # type: ignore[attr-defined]

    def signalling_load(cls, *args, **kwargs):
        os.kill(_target(), sent)
        return load(cls, *args, **kwargs)

    AutoModelForCausalLM.from_pretrained = classmethod(signalling_load)  # type: ignore[method-assign]


def _signal_while_a_checkpoint_is_written(sent: int, step: int) -> None:
    from transformers import Trainer

    save = Trainer._save_optimizer_and_scheduler

    def signalling_save(self: Trainer, output_dir: str) -> None:
        if self.state.global_step == step:
            os.kill(_target(), sent)
        save(self, output_dir)

    Trainer._save_optimizer_and_scheduler = signalling_save  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
