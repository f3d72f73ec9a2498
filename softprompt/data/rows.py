"""Alpaca rows and conversations in, token ids out: reading, the templates, bad-row reporting, splitting, padding.

    rows = load_rows("alpaca.jsonl.gz")                     # instruction / input / output
    rows = load_rows("chats.jsonl")                         # messages (+ system): ShareGPT or OpenAI messages
    rows = load_rows("hub:owner/name", split="train")       # any of them through datasets.load_dataset
    data, report = tokenize(rows, tokenizer, max_length=256)  # input_ids / attention_mask / labels
    print(report.summary())
    train, val = split(data, val_size=0.05, seed=0)
    Trainer(..., train_dataset=train, eval_dataset=val, data_collator=make_collator(tokenizer))

Row numbers in messages are 1-based, in file order (blank JSON lines are not rows). Tokenize before
shuffling or splitting, so that they still point into the file.

Files are read by `readers.py` (values as the file has them); the format (`format="auto"`: from the
columns, `conversations.py`) decides which columns are kept. Conversations keep a `messages` column (the
turns as the file has them) and a `system` column when the file has one; Alpaca rows keep a `system`
column only when one is named (ColumnMap(system=...)). `tokenize` checks each row.

Length-grouped batching works with these columns as they are: `TrainingArguments(
train_sampling_strategy="group_by_length")` measures `len(row["input_ids"])` (the tokenizer's first
model input) when the dataset has no `length` column.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow as pa
from jinja2 import TemplateError
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from softprompt.data.conversations import DEFAULT_COLUMN, LOSS_ON, detect_format, read_conversation
from softprompt.data.readers import HUB, DataError, read_table
from softprompt.data.templates import conversation_texts, training_texts

logger = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output")
IGNORE_INDEX = -100
_SOURCE_TAG = "softprompt rows from "  # how load_rows leaves the file's name in dataset.info
_SHOWN_ROWS = 5  # row numbers listed per reason in a report


@dataclass(frozen=True)
class ColumnMap:
    """Which of the file's columns hold the instruction, the optional input and the output (Alpaca rows), or
    the turns (default: `conversations` for ShareGPT, `messages` for messages), and the optional system text
    (default: a `system` column of a conversation file; Alpaca rows read one only when it is named)."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        for name in (*FIELDS, "system", "messages"):
            value = getattr(self, name)
            if (name in FIELDS or value is not None) and (not isinstance(value, str) or not value):
                raise ValueError(f"ColumnMap.{name}={value!r} is not valid; give the column's name")
        if len({self.instruction, self.input, self.output}) < 3:
            raise ValueError(f"{self} maps two fields to one column; give each field its own column")


@dataclass(frozen=True)
class DataReport:
    """What `tokenize` kept and what it skipped, and why; `summary()` says it in one paragraph."""

    source: str
    rows: int  # rows read
    kept: int
    truncated: int  # kept rows whose end was cut to max_length
    max_length: int
    skipped: dict[str, int] = field(default_factory=dict, hash=False)  # reason -> rows
    first_rows: dict[str, tuple[int, ...]] = field(default_factory=dict, hash=False)  # reason -> first 1-based rows

    def __post_init__(self) -> None:
        assert self.kept + sum(self.skipped.values()) == self.rows, self

    @property
    def num_skipped(self) -> int:
        return self.rows - self.kept

    def check_skipped(self, max_fraction: float) -> None:
        """DataError when more than `max_fraction` of the rows were skipped: a file whose rows are mostly bad
        (a wrong column, max_length too small) must not train "successfully" on what is left."""
        if isinstance(max_fraction, bool) or not isinstance(max_fraction, (int, float)) or not 0 <= max_fraction <= 1:
            raise ValueError(f"max_skipped_fraction={max_fraction!r} is not valid; give a fraction in [0, 1]")
        if self.rows and self.num_skipped / self.rows > max_fraction:
            raise DataError(f"{self.summary()} That is {self.num_skipped / self.rows:.1%} of the rows, more than "
                            f"max_skipped_fraction={max_fraction:g}: fix those rows (or max_length), or raise "
                            "max_skipped_fraction to train on the rest")

    def summary(self) -> str:
        text = (f"{self.source}: kept {self.kept} of {self.rows} rows"
                f" ({self.truncated} cut to max_length={self.max_length})")
        if not self.skipped:
            return text + "; skipped none."
        reasons = []
        for reason, count in self.skipped.items():
            shown = ", ".join(map(str, self.first_rows[reason]))
            more = ", ..." if count > len(self.first_rows[reason]) else ""
            reasons.append(f"{reason}: {count} (rows {shown}{more})")
        return text + f"; skipped {self.num_skipped}: " + "; ".join(reasons) + "."


# ---- reading ----------------------------------------------------------------------------------------

def load_rows(path: str | Path, columns: ColumnMap | None = None, format: str = "auto", split: str = "train",
              subset: str | None = None) -> datasets.Dataset:
    """The rows of a file, a `save_to_disk` folder or `hub:owner/name`, as columns instruction / input /
    output (Alpaca) or messages (+ system) (ShareGPT, OpenAI messages).

    Reads .json (an array, or JSON lines), .jsonl, .json.gz, .jsonl.gz, .csv, .parquet, folders written by
    `Dataset.save_to_disk` (a `DatasetDict` folder gives its `split`), and hub datasets through
    `datasets.load_dataset` (its `split`, configuration `subset`). `format` is alpaca, sharegpt, messages or
    auto (from the columns). A missing Alpaca `input` (no column, no key, or null) means "". Other values are
    kept as they are, bad ones included: `tokenize` skips and reports bad rows, so that none is dropped in silence.
    """
    columns = columns or ColumnMap()
    conversation = {columns.messages} if columns.messages else set(DEFAULT_COLUMN.values())
    wanted = {columns.instruction, columns.input, columns.output, columns.system or "system", *conversation}
    table = read_table(path, wanted, columns.input, split, subset)
    source = str(path) if str(path).startswith(HUB) else Path(path)
    if len(table) == 0:
        raise DataError(f"{source}: the file has no rows")
    return _select(source, table, columns, format)


def _select(path: Path | str, table: datasets.Dataset, columns: ColumnMap, format: str) -> datasets.Dataset:
    present = table.column_names
    try:
        format = detect_format(str(path), present, format, (columns.instruction, columns.output), columns.messages)
    except ValueError as e:
        raise DataError(str(e)) from None
    if format != "alpaca":
        return _select_conversations(path, table, columns.messages or DEFAULT_COLUMN[format],
                                     columns.system or "system", format)
    required = ["instruction", "output"] + ([] if columns.input == "input" else ["input"])  # a named input must exist
    for name in required:
        column = getattr(columns, name)
        if column not in present:
            raise DataError(f"{path}: no column {column!r} for the {name} (columns present: {', '.join(present)}); "
                            f"pass ColumnMap({name}=...) naming one of them")
    if columns.input not in present:
        table = table.add_column(columns.input, [""] * len(table), feature=datasets.Value("string"))
    mapping = {getattr(columns, name): name for name in FIELDS}
    if columns.system is not None:  # named: it must be there
        if columns.system not in present:
            raise DataError(f"{path}: no column {columns.system!r} for the system text (columns present: "
                            f"{', '.join(present)}); name one of them, or none")
        mapping[columns.system] = "system"
    table = table.select_columns(list(mapping)).rename_columns(mapping).select_columns(list(mapping.values()))
    table.info.description = _SOURCE_TAG + str(path)
    return table


def _select_conversations(path: Path | str, table: datasets.Dataset, column: str, system: str,
                          format: str) -> datasets.Dataset:
    present = table.column_names
    if column not in present:
        raise DataError(f"{path}: no column {column!r} holding the {format} turns (columns present: "
                        f"{', '.join(present)}); set messages_column to the column that holds them")
    mapping = {column: "messages", **({system: "system"} if system in present and system != column else {})}
    table = table.select_columns(list(mapping)).rename_columns(mapping)
    table.info.description = _SOURCE_TAG + str(path)
    return table


def _source_of(dataset: datasets.Dataset) -> str:
    description = dataset.info.description or ""
    return description[len(_SOURCE_TAG):] if description.startswith(_SOURCE_TAG) else "the dataset"


# ---- tokenizing -------------------------------------------------------------------------------------

def _row_problem(instruction: Any, input: Any, output: Any, system: Any = None) -> str | None:
    for name, value in (("instruction", instruction), ("input", input), ("output", output), ("system", system)):
        if value is None and name in ("instruction", "output"):
            return f"{name} is missing"
        if value is not None and not isinstance(value, str):
            return f"{name} is {type(value).__name__}, not a string"
    if not output.strip():
        return "output is empty"
    return None


def tokenize(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 256,
    template: Literal["alpaca", "chat"] = "alpaca",
    num_proc: int | None = None,
    on_bad_row: Literal["skip", "error"] = "skip",
    loss_on: Literal["assistant", "all"] = "assistant",
) -> tuple[datasets.Dataset, DataReport]:
    """Rows with instruction / input / output, or with messages (+ system), become input_ids / attention_mask / labels.

    template="alpaca" is the seed's `process_func`, token for token: the prompt and `output + eos` are
    tokenized apart with the tokenizer's default special tokens, the prompt's labels are -100, and the
    row is cut at max_length. One difference: a tokenizer that starts every text with BOS (Gemma's, Llama's)
    gets it once, at the row's start; the seed's function would put a learned BOS inside every row. template="chat" uses the tokenizer's chat template instead (the user says
    instruction + "\\n" + input; only the assistant's tokens are learned). A conversation is rendered turn by
    turn (`templates.conversation_texts`), each piece tokenized as the seed tokenizes its two, and a row
    of one user and one assistant turn gives the Alpaca row's tokens. loss_on="all" gives every token its label.

    Bad rows (missing, non-string or empty fields; turns out of order; every assistant token cut away by
    max_length) are skipped and counted in the report, or raise DataError with on_bad_row="error".
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} is not valid; it must be an integer of at least 2")
    if template not in ("alpaca", "chat"):
        raise ValueError(f"template={template!r} is not valid; allowed values: 'alpaca', 'chat'")
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row={on_bad_row!r} is not valid; allowed values: 'skip', 'error'")
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r} is not valid; allowed values: {', '.join(LOSS_ON)}")
    if template == "alpaca" and tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token, which ends every Alpaca response; set tokenizer.eos_token")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' needs a tokenizer with a chat template, and this one has none; "
                         "use template='alpaca' or set tokenizer.chat_template")
    source = _source_of(dataset)
    conversations = "messages" in dataset.column_names
    for name in () if conversations else ("instruction", "output"):
        if name not in dataset.column_names:
            raise DataError(f"{source}: no column {name!r} (columns present: {', '.join(dataset.column_names)}); "
                            "read files with load_rows(path, ColumnMap(...)) or rename the columns")
    # The chat template already holds its special tokens; the seed's template takes the tokenizer's default.
    special = {} if template == "alpaca" else {"add_special_tokens": False}
    bos = tokenizer.bos_token_id if template == "alpaca" else None

    def pieces(batch: dict[str, list]) -> tuple[list[str | None], list[list[tuple[str, bool]]]]:
        """Each row's problem (None: good) and its (text, is_assistant) pieces ([] for a bad row)."""
        if conversations:
            systems = batch["system"] if "system" in batch else [None] * len(batch["messages"])
            read = [read_conversation(turns, system) for turns, system in zip(batch["messages"], systems)]
            problems, texts = [problem for _, problem in read], []
            for i, (messages, _) in enumerate(read):
                try:
                    texts.append(conversation_texts(tokenizer, template, messages) if messages else [])
                except TemplateError as e:  # a chat template that refuses this row (e.g. no system role)
                    problems[i] = f"the chat template refuses it: {e}"
                    texts.append([])
            return problems, texts
        size = len(batch["instruction"])
        inputs = batch["input"] if "input" in batch else [None] * size
        systems = batch["system"] if "system" in batch else [None] * size
        rows = list(zip(batch["instruction"], inputs, batch["output"], systems))
        problems = [_row_problem(*row) for row in rows]
        texts = [[] if problem else list(zip(training_texts(tokenizer, template, instruction, input or "", output,
                                                            system), (False, True)))
                 for problem, (instruction, input, output, system) in zip(problems, rows)]
        return problems, texts

    def encode(batch: dict[str, list]) -> pa.Table:
        problems, rows = pieces(batch)
        # One batched call into the fast tokenizer does the work (each piece apart, as the seed tokenizes
        # prompt and response); the rest is list arithmetic.
        ids = iter(_token_ids(tokenizer, [text for row in rows for text, _ in row], special))
        size = len(rows)
        input_ids, labels, truncated = [[]] * size, [[]] * size, [False] * size  # bad rows stay empty
        for i, row in enumerate(rows):
            row_ids, row_labels, first_learned = [], [], None
            for k, (_, assistant) in enumerate(row):
                part = next(ids)
                if k and bos is not None and part[:1] == [bos]:
                    part = part[1:]  # a tokenizer that starts every text with BOS (Gemma's, Llama's): once a row
                if assistant and first_learned is None:
                    first_learned = len(row_ids)
                row_ids += part
                row_labels += part if assistant or loss_on == "all" else [IGNORE_INDEX] * len(part)
            if problems[i] is not None:
                continue
            if first_learned >= max_length:
                problems[i] = f"response cut away by max_length={max_length}"
                continue
            input_ids[i], labels[i] = row_ids[:max_length], row_labels[:max_length]
            truncated[i] = len(row_ids) > max_length
        # An Arrow table with a fixed schema: a batch of bad rows alone keeps the types, and no cast is needed.
        int_lists = pa.list_(pa.int64())
        return pa.table({
            "input_ids": pa.array(input_ids, int_lists),
            "attention_mask": pa.array([[1] * len(row) for row in input_ids], int_lists),
            "labels": pa.array(labels, int_lists),
            "problem": pa.array(problems, pa.string()),
            "truncated": pa.array(truncated, pa.bool_()),
        })

    encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc="Tokenizing")
    problems = encoded.data.column("problem").to_pylist()
    skipped: dict[str, int] = {}
    first_rows: dict[str, list[int]] = {}
    for i, problem in enumerate(problems):
        if problem is not None:
            if on_bad_row == "error":
                raise DataError(f"{source}: row {i + 1} (1-based): {problem}; fix the row, "
                                "or pass on_bad_row='skip' to skip such rows and count them in the report")
            skipped[problem] = skipped.get(problem, 0) + 1
            if len(first_rows.setdefault(problem, [])) < _SHOWN_ROWS:
                first_rows[problem].append(i + 1)
    kept = [i for i, problem in enumerate(problems) if problem is None]
    report = DataReport(source=source, rows=len(problems), kept=len(kept), max_length=max_length,
                        truncated=encoded.data.column("truncated").to_pylist().count(True), skipped=skipped,
                        first_rows={reason: tuple(rows) for reason, rows in first_rows.items()})
    if len(kept) < len(problems):
        encoded = encoded.select(kept)  # an index map over the rows, not a copy of them
    encoded = encoded.remove_columns(["problem", "truncated"])
    if report.skipped:
        logger.warning("%s", report.summary())
    return encoded, report


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], special: dict) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, return_attention_mask=False, return_token_type_ids=False, **special)["input_ids"]


# ---- splitting and batching -------------------------------------------------------------------------

def split(
    dataset: datasets.Dataset, val_size: float | int, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, validation), shuffled with `seed`: val_size is a fraction in [0, 1) or a number of rows; 0 gives
    no validation set (None)."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"val_size={val_size!r} is not valid; give a fraction in [0, 1) or a number of rows")
    if val_size == 0:
        return dataset, None
    if isinstance(val_size, float):
        if not 0 < val_size < 1:
            raise ValueError(f"val_size={val_size!r} is not valid; a fraction must be in [0, 1)")
        val_rows = math.ceil(val_size * len(dataset))  # as datasets' train_test_split counts
    else:
        val_rows = val_size
    if not 0 < val_rows < len(dataset):
        raise ValueError(f"val_size={val_size!r} gives {val_rows} validation rows of {len(dataset)}; "
                         "leave at least one row for training, and give a non-negative size")
    parts = dataset.train_test_split(test_size=val_rows, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def make_collator(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> DataCollatorForSeq2Seq:
    """transformers' DataCollatorForSeq2Seq, padding on the right: input_ids with the pad token,
    attention_mask with 0, labels with -100; optionally to a multiple of `pad_to_multiple_of` (8 suits
    tensor cores). The caller's tokenizer is left as it is."""
    multiple = pad_to_multiple_of
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r} is not valid; give a positive integer or None")
    if tokenizer.padding_side != "right" or tokenizer.pad_token is None:
        if tokenizer.pad_token is None and tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with; "
                             "set tokenizer.pad_token")
        tokenizer = copy.deepcopy(tokenizer)  # a shallow copy shares the special tokens with the caller's
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # any id will do: padding is masked out of attention and loss
    return DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=pad_to_multiple_of,
                                  label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
