"""Test-only start-up hook for the ranks of a launched `spo train` (tests/train/test_train_stop_launchers.py).

Every rank writes its pid to SPO_TEST_RANK_PIDS/<RANK>, so that a test can tell whether a rank outlived `spo`.
With SPO_TEST_SIGNAL_PARENT_AT=N, rank 0 sends a real SIGTERM to the `spo` process (SPO_TEST_PARENT_PID) as the
Trainer begins step N: the moment is chosen, so that a fast machine cannot finish first; the signal and everything
after it are the real ones. The ranks also use plain gloo collectives, as tests/data/gloo_only sets up.
"""

import os
import runpy
from pathlib import Path

if "LOCAL_RANK" in os.environ:
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "gloo_only" / "sitecustomize.py"))
    if os.environ.get("SPO_TEST_RANK_PIDS"):
        (Path(os.environ["SPO_TEST_RANK_PIDS"]) / os.environ["RANK"]).write_text(str(os.getpid()))
    if os.environ.get("SPO_TEST_SIGNAL_PARENT_AT") == "load" and os.environ.get("RANK") == "0":
        import signal

        from transformers import AutoModelForCausalLM

        load = AutoModelForCausalLM.from_pretrained.__func__

        def signalling_load(cls, *args, **kwargs):
            os.kill(int(os.environ["SPO_TEST_PARENT_PID"]), signal.SIGTERM)
            return load(cls, *args, **kwargs)

        AutoModelForCausalLM.from_pretrained = classmethod(signalling_load)
    elif os.environ.get("SPO_TEST_SIGNAL_PARENT_AT") and os.environ.get("RANK") == "0":
        import signal

        from transformers import Trainer

        step_to_signal = int(os.environ["SPO_TEST_SIGNAL_PARENT_AT"])
        parent = int(os.environ["SPO_TEST_PARENT_PID"])
        training_step = Trainer.training_step
        sent: list[int] = []

        def signalling_step(self, *args, **kwargs):
            if self.state.global_step + 1 == step_to_signal and not sent:
                sent.append(step_to_signal)
                os.kill(parent, getattr(signal, "SIG" + os.environ.get("SPO_TEST_SIGNAL", "TERM")))
            return training_step(self, *args, **kwargs)

        Trainer.training_step = signalling_step
