"""The losses: one module per loss, each holding its recipe section, its tensor function and its entry.

`registry` finds them (every module here that defines `ENTRY`) and answers what the rest of the project asks
of a loss; `entry` says what an entry holds; `pair` holds what every pairwise loss shares (its section's
base, `PairInputs`, `PairLoss`, the NLL term). How to add a loss: docs/architecture.md.
"""
