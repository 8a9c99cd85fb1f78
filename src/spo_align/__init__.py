"""spo-align: declarative recipes for preference fine-tuning, built around Stable Preference Optimization."""

__version__ = "0.1.0"
