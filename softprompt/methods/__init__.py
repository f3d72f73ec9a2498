"""The prompt-learning methods: the interface (`adapter.py`), the shared config (`config.py`) and one file per method.

Pure torch. Importing this package registers the three methods (`peft_type -> config class`).
"""

from softprompt.methods import p_tuning, prefix_tuning, prompt_tuning  # noqa: F401  (registers the methods)
