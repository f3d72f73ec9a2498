"""The prompt-learning methods: the interface (`adapter.py`), the shared config (`config.py`) and one file per method.

Pure torch. Importing this package registers the three methods (`peft_type -> config class`).
"""

# registered in this order (the order `softprompt train` lists them in)
from softprompt.methods import prompt_tuning  # noqa: F401, I001
from softprompt.methods import p_tuning  # noqa: F401
from softprompt.methods import prefix_tuning  # noqa: F401
