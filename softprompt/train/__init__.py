"""Training: the run config (`config.py`), the Trainer subclass and checkpoints (`trainer.py`), several adapters at once (`multitask.py`)."""
