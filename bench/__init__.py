"""spo-align performance bench: `python -m bench run` (see bench/README section in docs/performance.md)."""
