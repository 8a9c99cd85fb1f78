"""`spo experiment`: one declarative file for the paper's whole experiment, above `train` and `eval`.

`spec` reads and checks the experiment file and plans its stages (torch-free; a stage's sweep is `sweep`); `state` says where each stage
stands (done, changed, stale, resume, to run); `runner` trains each stage through `train.launch`, then generates
and judges through `eval`; `report` writes the tables. The command
itself is `cli/experiment.py`.
"""
