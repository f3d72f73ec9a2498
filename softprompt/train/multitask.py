"""Multi-task prompt training: one run trains one adapter per task, each row updating only its task's.

Lester et al. (2021, https://arxiv.org/abs/2104.08691) train and serve mixed-task batches: every row
carries its own task's prompt through the same frozen model.

    rows {instruction, input, output, task}
      -> tokenize_tasks(rows, tokenizer)          input_ids / attention_mask / labels / adapter_names (= task)
      -> multitask_model(base, {task: config})    one PeftModel, one trainable adapter per task (any method)
      -> multitask_trainer(model, data, args)     transformers.Trainer + MultiTaskCollator

`PeftModel.forward(adapter_names=[task per row])` gives each row its own prompt, so the loss reaches an
adapter only through its own rows: an adapter whose task has no row in a batch gets no gradient, and
AdamW leaves it alone. The column is named `adapter_names` so that Trainer, which keeps only the
columns `forward` takes, passes it through to the collator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

from softprompt.core.model import PeftModel, get_peft_model
from softprompt.core.packing import PackingCollator
from softprompt.data.rows import make_collator, tokenize
from softprompt.methods.config import PromptLearningConfig
from softprompt.train.trainer import SoftPromptTrainer

TASK_FIELD = "adapter_names"


def multitask_model(
    base: nn.Module, configs: Mapping[str, PromptLearningConfig], tokenizer: PreTrainedTokenizerBase | None = None
) -> PeftModel:
    """`base` (frozen) with one new trainable adapter per task, named after the task."""
    if not configs:
        raise ValueError("configs is empty; give one adapter config per task, e.g. {'zh': PromptTuningConfig(...)}")
    names = list(configs)
    model = get_peft_model(base, configs[names[0]], adapter_name=names[0], tokenizer=tokenizer)
    for name in names[1:]:
        model.add_adapter(name, configs[name], tokenizer=tokenizer)
    return model


def tokenize_tasks(
    rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, task_column: str = "task", **tokenize_kwargs: Any
) -> datasets.Dataset:
    """`tokenize` per task, with the task kept as the `adapter_names` column (rows grouped by task;
    Trainer shuffles them)."""
    if task_column not in rows.column_names:
        raise ValueError(f"no column {task_column!r} (columns: {', '.join(rows.column_names)}); name the task column")
    tasks = rows.unique(task_column)
    bad = [t for t in tasks if not isinstance(t, str) or not t]
    if bad:
        raise ValueError(f"column {task_column!r} holds {bad[:3]!r}; every row needs its task's name (a non-empty string)")
    parts = []
    for task in sorted(tasks):
        subset = rows.filter(lambda value: value == task, input_columns=task_column)
        tokenized, _report = tokenize(subset.remove_columns(task_column), tokenizer, **tokenize_kwargs)
        parts.append(tokenized.add_column(TASK_FIELD, [task] * len(tokenized)))
    return datasets.concatenate_datasets(parts)


@dataclass
class MultiTaskCollator:
    """Pads like `inner` (e.g. `make_collator(tokenizer)`) and adds each row's adapter name."""
    inner: Callable[[list[dict]], dict[str, torch.Tensor]]
    adapters: frozenset[str]

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, Any]:
        names, rows = [], []
        for i, feature in enumerate(features):
            row = dict(feature)
            name = row.pop(TASK_FIELD, None)
            if name not in self.adapters:
                known = ", ".join(sorted(self.adapters))
                raise ValueError(f"row {i} of the batch is for task {name!r}, which has no adapter; adapters: {known}")
            names.append(name)
            rows.append(row)
        batch = self.inner(rows)
        batch[TASK_FIELD] = names
        return batch


def multitask_trainer(
    model: PeftModel,
    train_dataset: datasets.Dataset,
    args: TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    eval_dataset: datasets.Dataset | None = None,
    trainer_class: type[Trainer] | None = None,
    packing: bool = False,
    **trainer_kwargs: Any,
) -> Trainer:
    """A Trainer over mixed-task batches; `trainer.train()` trains every task's adapter at once, and
    `trainer.save_model(dir)` writes each adapter to `dir/<task>/` (peft's layout).

    `packing=True`: each batch's rows, whatever their tasks, are packed end to end (`packing.py`), each with
    its own task's prompt; the losses are those of the padded batches (evaluation stays padded)."""
    adapters = frozenset(model.peft_config)
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is None:
            continue
        if TASK_FIELD not in dataset.column_names:
            raise ValueError(f"{name} has no {TASK_FIELD!r} column; build it with tokenize_tasks()")
        missing = sorted(set(dataset.unique(TASK_FIELD)) - adapters)
        if missing:
            raise ValueError(f"{name} has tasks without an adapter: {missing}; adapters: {sorted(adapters)}")
    collator = MultiTaskCollator(make_collator(tokenizer), adapters)
    train_collator = collator
    if packing:
        train_collator = PackingCollator.for_model(model, tokenizer, max(map(len, train_dataset["input_ids"])))
    trainer = (trainer_class or SoftPromptTrainer)(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=train_collator,
        **trainer_kwargs,
    )
    if packing:
        if not isinstance(trainer, SoftPromptTrainer):
            raise TypeError("packing=True needs a SoftPromptTrainer (subclass), which runs packed batches")
        trainer.eval_collator = collator
    return trainer
