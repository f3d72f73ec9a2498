"""Scoring an adapter (or the bare base model) on Alpaca rows: loss, perplexity, exact match, BLEU and ROUGE.

- loss: mean cross-entropy over the response tokens (the labels `tokenize` keeps), token-weighted over
  the whole set; perplexity is exp(loss).
- exact match: the greedy answer to each row's prompt, cut at the eos token and stripped of surrounding
  whitespace, equals the row's `output` stripped the same way.
- generation metrics (`generate=True`): BLEU-4 and ROUGE-1/2/L of the same answers (`metrics.py`).

The answers come from `generate_answers` (static batches) unless the caller passes `decode`, a function
`(prompts, max_new_tokens) -> answers`: `softprompt eval` passes the serving engine's (continuous batching).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softprompt.data.rows import make_collator, tokenize
from softprompt.data.conversations import read_conversation
from softprompt.data.templates import conversation_texts, prompt_text
from softprompt.inference.metrics import generation_metrics


def _left_padded(tokenizer):
    if tokenizer.padding_side == "left" and tokenizer.pad_token is not None:
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    **generate_kwargs,
) -> list[str]:
    """The model's answers to already-templated prompts (greedy unless `do_sample=True` is passed).

    `add_special_tokens=True` encodes as training did for the Alpaca template (the tokenizer's default
    special tokens); pass False for chat-template text, which carries its own.
    """
    tok = _left_padded(tokenizer)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    answers: list[str] = []
    generate_kwargs.setdefault("do_sample", False)
    for start in range(0, len(prompts), batch_size):
        batch = tok(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                    add_special_tokens=add_special_tokens).to(device)
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
            eos_token_id=eos, pad_token_id=tok.pad_token_id, **generate_kwargs,
        )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


@torch.no_grad()
def mean_loss(model, tokenized, collator, batch_size: int = 8) -> tuple[float, int]:
    """Token-weighted mean loss over the label tokens of a tokenized set, and the number of such tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        rows = [tokenized[i] for i in range(start, min(start + batch_size, len(tokenized)))]
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()  # (B, V + L, vocab): the first V are virtual slots
        logits = logits[:, logits.shape[1] - labels.shape[1] :]
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        n = int((shift_labels != -100).sum())
        if n:
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += n
    return (total / count if count else float("nan")), count


def is_exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


@dataclass
class EvalResult:
    rows: int
    loss: float | None = None
    perplexity: float | None = None
    tokens: int = 0
    exact_match: float | None = None
    answers: list[dict] = field(default_factory=list)  # {"prompt", "reference", "prediction", "correct"}
    metrics: dict[str, float] | None = None  # {"bleu4", "rouge1", "rouge2", "rougeL"}, 0-100

    def to_dict(self) -> dict:
        return {"rows": self.rows, "loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "exact_match": self.exact_match, **(self.metrics or {})}

    def write_predictions(self, path: str | Path) -> Path:
        """One JSON object a line: {"prompt", "reference", "prediction"}, in the rows' order."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for a in self.answers:
                f.write(json.dumps({k: a[k] for k in ("prompt", "reference", "prediction")}, ensure_ascii=False) + "\n")
        return path

    def summary(self) -> str:
        parts = [f"rows={self.rows}"]
        if self.loss is not None:
            parts += [f"loss={self.loss:.4f}", f"perplexity={self.perplexity:.3f}", f"tokens={self.tokens}"]
        if self.exact_match is not None:
            correct = sum(a["correct"] for a in self.answers)
            parts.append(f"exact_match={self.exact_match:.3f} ({correct}/{len(self.answers)})")
        if self.metrics is not None:
            parts += [f"{name}={value:.2f}" for name, value in self.metrics.items()]
        return " ".join(parts)


def prompts_and_references(tokenizer, template: str, rows) -> tuple[list[str], list[str]]:
    """What is asked and what is expected, per row: an Alpaca row's prompt and output, or a conversation up to
    its last assistant turn (rendered as in training) and that turn. Conversations that cannot train (see
    `read_conversation`) or that do not end with the assistant are left out."""
    if "messages" not in rows.column_names:
        inputs = rows["input"] if "input" in rows.column_names else [""] * len(rows)
        prompts = [prompt_text(tokenizer, template, q, i or "") for q, i in zip(rows["instruction"], inputs)]
        return prompts, [str(o) for o in rows["output"]]
    systems = rows["system"] if "system" in rows.column_names else [None] * len(rows)
    prompts, references = [], []
    for turns, system in zip(rows["messages"], systems):
        messages, problem = read_conversation(turns, system)
        if problem is not None or messages[-1]["role"] != "assistant":
            continue
        pieces = conversation_texts(tokenizer, template, messages)
        prompts.append("".join(text for text, _ in pieces[:-1]))
        references.append(messages[-1]["content"])
    return prompts, references


def evaluate(
    model,
    tokenizer,
    rows,
    template: str = "alpaca",
    max_length: int = 256,
    loss: bool = True,
    exact_match: bool = True,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    generate: bool = False,
    decode: Callable[[list[str], int], list[str]] | None = None,
) -> EvalResult:
    """Score `model` (a softprompt PeftModel, or a plain causal LM) on Alpaca rows (a `datasets.Dataset`
    or a list of dicts with instruction / input / output) or conversations (`messages`: the last assistant turn
    is the answer for exact match and BLEU/ROUGE; the loss is over every assistant turn). `generate=True` adds BLEU-4 and ROUGE-1/2/L
    of the greedy answers; `decode` replaces `generate_answers` (see the module docstring)."""
    import datasets

    if isinstance(rows, list):
        rows = datasets.Dataset.from_list(rows)
    was_training = model.training
    model.eval()
    try:
        result = EvalResult(rows=len(rows))
        if loss:
            tokenized, _ = tokenize(rows, tokenizer, max_length=max_length, template=template)
            result.loss, result.tokens = mean_loss(model, tokenized, make_collator(tokenizer), batch_size)
            result.perplexity = math.exp(result.loss) if result.tokens else None
        if exact_match or generate:
            prompts, references = prompts_and_references(tokenizer, template, rows)
            if max_new_tokens is None:  # room for the longest reference and a little more
                longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=8)
                max_new_tokens = longest + 8
            if decode is not None:
                predictions = decode(prompts, max_new_tokens)
            else:
                predictions = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                               batch_size=max(batch_size, 16), add_special_tokens=template == "alpaca")
            result.answers = [
                {"prompt": p, "reference": r, "prediction": a, "correct": is_exact_match(a, r)}
                for p, r, a in zip(prompts, references, predictions)
            ]
            result.exact_match = sum(a["correct"] for a in result.answers) / max(len(result.answers), 1)
            if generate:
                result.metrics = generation_metrics(predictions, references)
    finally:
        model.train(was_training)
    return result
