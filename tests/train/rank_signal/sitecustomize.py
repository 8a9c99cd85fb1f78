"""Test helper for launched runs (put this folder on PYTHONPATH): every rank of a torchrun launch (RANK set) sends
itself SIGTERM when the Trainer begins step SIGNAL_AT (1-based), as a scheduler that signals every process would.
The parent `spo` and the launcher are left alone. Only the moment is chosen; the handler and everything after are
the real ones."""

import os

if os.environ.get("RANK_SIGNAL_AT") and os.environ.get("RANK") is not None:
    import signal

    from transformers import Trainer

    _at = int(os.environ["RANK_SIGNAL_AT"])
    _step = Trainer.training_step

    def _signalling_step(self, *args, **kwargs):
        if self.state.global_step + 1 == _at:
            os.kill(os.getpid(), signal.SIGTERM)
        return _step(self, *args, **kwargs)

    Trainer.training_step = _signalling_step
