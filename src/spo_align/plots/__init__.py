"""Training curves: read runs' metrics.jsonl, label each run from its resolved recipe, draw runs side by side.

`metrics` reads a metrics.jsonl file that may be damaged (torn lines, nulls, bytes that are not UTF-8)
into per-metric series; `runs` finds the runs behind the paths given to `spo plot` (run folders, or an
experiment folder and a seed) and labels them; `compare` builds the figure's content and draws it with
matplotlib (Agg backend, imported only when drawing). No torch anywhere here.
"""
