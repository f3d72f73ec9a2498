"""Multi-task training: one run, one adapter per task, each row updating only its task's adapter."""

from __future__ import annotations

import datasets
import pytest
import torch
from _serve_fixtures import tiny_base, tiny_tokenizer
from transformers import TrainingArguments

from softprompt import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from softprompt.data.rows import make_collator
from softprompt.train.multitask import TASK_FIELD, MultiTaskCollator, multitask_model, multitask_trainer, tokenize_tasks

CONFIGS = {
    "shout": PromptTuningConfig(num_virtual_tokens=4),
    "whisper": PromptEncoderConfig(num_virtual_tokens=6, encoder_hidden_size=16),
    "count": PrefixTuningConfig(num_virtual_tokens=3),
    "idle": PromptTuningConfig(num_virtual_tokens=5),  # no rows: must not move
}
ANSWERS = {"shout": "AAAA BBBB!", "whisper": "quiet words.", "count": "one two three"}


def rows(per_task: int = 6) -> datasets.Dataset:
    data = {"instruction": [], "input": [], "output": [], "task": []}
    for task, answer in ANSWERS.items():
        for i in range(per_task):
            data["instruction"].append(f"question {i}")
            data["input"].append("")
            data["output"].append(answer)
            data["task"].append(task)
    return datasets.Dataset.from_dict(data)


def snapshot(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.prompt_encoder.state_dict().items()}


def task_loss(model: PeftModel, data: datasets.Dataset, task: str, collator) -> float:
    subset = data.filter(lambda t: t == task, input_columns=TASK_FIELD)
    batch = collator([subset[i] for i in range(len(subset))])
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.fixture()
def setup():
    tokenizer = tiny_tokenizer()
    model = multitask_model(tiny_base("llama"), CONFIGS)
    data = tokenize_tasks(rows(), tokenizer, max_length=64)
    return tokenizer, model, data, MultiTaskCollator(make_collator(tokenizer), frozenset(CONFIGS))


def test_a_row_moves_only_its_tasks_adapter(setup):
    tokenizer, model, data, collator = setup
    model.train()
    by_task = {t: [r for r in data if r[TASK_FIELD] == t] for t in ANSWERS}
    mixed = collator(by_task["shout"][:2] + by_task["count"][:2])
    assert mixed[TASK_FIELD] == ["shout", "shout", "count", "count"]
    model(**mixed).loss.backward()
    grads = {n: p.grad for n, p in model.prompt_encoder.named_parameters()}
    for name, grad in grads.items():
        task = name.split(".")[0]
        if task in ("shout", "count"):
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None, name  # no row of theirs: no gradient at all, so the optimizer skips them
    # The mixed batch's gradient for `shout` is exactly that of `shout`'s rows alone, up to the loss's
    # normalisation by the number of label tokens.
    mixed_grad = {n: g.clone() for n, g in grads.items() if n.startswith("shout.")}
    model.zero_grad()
    alone = collator(by_task["shout"][:2])
    model(**alone).loss.backward()
    n_mixed = int((mixed["labels"] != -100).sum())
    n_alone = int((alone["labels"] != -100).sum())
    for name, grad in mixed_grad.items():
        p = dict(model.prompt_encoder.named_parameters())[name]
        torch.testing.assert_close(grad * n_mixed, p.grad * n_alone, rtol=1e-4, atol=1e-6)


def test_one_run_trains_every_task_and_saves_each_adapter(setup, tmp_path):
    tokenizer, model, data, collator = setup
    before_state = snapshot(model)
    before = {t: task_loss(model, data, t, collator) for t in ANSWERS}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=6, max_steps=40, learning_rate=0.3,
        weight_decay=0.1, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        seed=0,
    )
    trainer = multitask_trainer(model, data, args, tokenizer)
    trainer.train()
    model.eval()
    after_state = snapshot(model)
    for key in before_state:
        moved = not torch.equal(before_state[key], after_state[key])
        assert moved == (not key.startswith("idle.")), key  # weight decay too leaves the idle adapter alone
    for task in ANSWERS:
        assert task_loss(model, data, task, collator) < 0.8 * before[task], task

    trainer.save_model(str(tmp_path / "out"))
    for task in CONFIGS:
        reloaded = PeftModel.from_pretrained(tiny_base("llama"), str(tmp_path / "out" / task), adapter_name=task)
        torch.testing.assert_close(reloaded.prompt_encoder[task].exported(), model.prompt_encoder[task].exported())


def test_bad_task_data_is_refused(setup):
    tokenizer, model, data, collator = setup
    with pytest.raises(ValueError, match="no column 'task'"):
        tokenize_tasks(rows().remove_columns("task"), tokenizer)
    with pytest.raises(ValueError, match="every row needs"):
        tokenize_tasks(rows().map(lambda r, i: {"task": "" if i == 0 else r["task"]}, with_indices=True), tokenizer)
    stray = data.add_column("dummy", [0] * len(data)).remove_columns(TASK_FIELD)
    stray = stray.add_column(TASK_FIELD, ["other"] + data[TASK_FIELD][1:])
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="tasks without an adapter: \\['other'\\]"):
        multitask_trainer(model, stray, args, tokenizer)
    with pytest.raises(ValueError, match="task 'other'"):
        collator([{**data[0], TASK_FIELD: "other"}])
    with pytest.raises(ValueError, match="configs is empty"):
        multitask_model(tiny_base("llama"), {})


def test_packed_mixed_task_run_logs_the_padded_runs_losses(tmp_path):
    """Rows of several tasks (prompt tuning, P-tuning, prefix tuning adapters) share packed rows."""
    tokenizer = tiny_tokenizer()
    data = tokenize_tasks(rows(), tokenizer, max_length=64)
    logs = {}
    for packing in (True, False):
        model = multitask_model(tiny_base("llama"), CONFIGS)
        args = TrainingArguments(output_dir=str(tmp_path / str(packing)), per_device_train_batch_size=6, max_steps=4,
                                 learning_rate=0.3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                                 disable_tqdm=True, seed=0)
        trainer = multitask_trainer(model, data, args, tokenizer, packing=packing)
        trainer.train()
        logs[packing] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(logs[True]) == 4
    assert logs[True] == pytest.approx(logs[False], rel=1e-5)
