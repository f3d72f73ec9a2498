"""The prompt-learning methods: the configs and the registry (`config.py`, no torch), the interface
(`adapter.py`) and one module per method (`prompt_tuning.py`, `p_tuning.py`, `prefix_tuning.py`).

Importing this package loads no torch: a run's config is read and checked before any model code loads.
"""
