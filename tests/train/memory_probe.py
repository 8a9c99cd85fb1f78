"""Run `spo train RECIPE` in this process under torch's profiler and report its tensor-memory peaks.

`measure(["RECIPE", "--set", "k=v"])` (or `python tests/train/memory_probe.py RECIPE [--set k=v ...]`, which
prints it as one JSON line) gives:
- `peak`: the most bytes of live tensors at once over the whole run (model loading included);
- `step_rises`: for each training step after the first, how far live tensor bytes rose above their lowest
  point between the end of one optimizer step and the start of the next (the forward/backward window: the
  weights and optimizer states are live throughout it, so the rise is what the step itself allocates).

What is counted: every allocation and free of torch's CPU allocator, as the profiler's memory events report
them (`profile_memory=True`), summed in time order. That is the CPU counterpart of CUDA's
`max_memory_allocated` (tensor bytes, no allocator caching), which is what the estimate's terms add up;
process RSS would add the interpreter, libraries, datasets and the C allocator's retained pages.
"""

from __future__ import annotations

import json
import sys


def measure(argv: list[str]) -> dict[str, object]:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from typer.testing import CliRunner

    from spo_align.cli import app

    torch.set_num_threads(1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = CliRunner().invoke(app, ["train", *argv])
    if result.exit_code != 0:
        raise RuntimeError(f"spo train failed ({result.exit_code}):\n{result.output}\n{result.exception!r}")
    events = prof.profiler.kineto_results.events()
    memory = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"), key=lambda x: x[0])
    steps = sorted((e.start_ns(), e.end_ns()) for e in events if e.name().startswith("Optimizer.step#"))
    live, peak, timeline = 0, 0, []
    for when, nbytes in memory:
        live += nbytes
        peak = max(peak, live)
        timeline.append((when, live))
    rises = []
    for (_, end), (start, _) in zip(steps, steps[1:]):
        window = [value for when, value in timeline if end <= when <= start]
        if window:
            low = min(range(len(window)), key=window.__getitem__)
            rises.append(max(window[low:]) - window[low])
    return {"peak": peak, "step_rises": rises, "optimizer_steps": len(steps)}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1:])))
