"""Alpaca rows in, token ids out: reading, the seed's template, bad-row reporting, splitting, padding.

    rows = load_rows("alpaca.jsonl.gz")                     # instruction / input / output
    data, report = tokenize(rows, tokenizer, max_length=256)  # input_ids / attention_mask / labels
    print(report.summary())
    train, val = split(data, val_size=0.05, seed=0)
    Trainer(..., train_dataset=train, eval_dataset=val, data_collator=make_collator(tokenizer))

Row numbers in messages are 1-based, in file order (blank JSON lines are not rows). Tokenize before
shuffling or splitting, so that they still point into the file.

Every format is read the same way: values as the file has them (a JSON string "42" stays a string, whatever
else its column holds), a UTF-8 byte order mark at the start is dropped, a key or column given twice is an
error (readers disagree on which one wins), and JSON nested too deep to read is an error naming the file.

Length-grouped batching works with these columns as they are: `TrainingArguments(
train_sampling_strategy="group_by_length")` measures `len(row["input_ids"])` (the tokenizer's first
model input) when the dataset has no `length` column.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow as pa
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from softprompt.data.templates import training_texts

logger = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output")
SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".csv", ".parquet")
IGNORE_INDEX = -100
_SOURCE_TAG = "softprompt rows from "  # how load_rows leaves the file's name in dataset.info
_SHOWN_ROWS = 5  # row numbers listed per reason in a report


class DataError(ValueError):
    """The data cannot be read as Alpaca rows: a wrong path, an empty file, invalid JSON, unknown columns,
    or (with on_bad_row="error") a bad row. The message names the file and, where there is one, the row."""


@dataclass(frozen=True)
class ColumnMap:
    """Which of the file's columns hold the instruction, the optional input and the output."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"

    def __post_init__(self) -> None:
        for name in FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
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

def load_rows(path: str | Path, columns: ColumnMap | None = None) -> datasets.Dataset:
    """The Alpaca rows of a file or a `save_to_disk` folder, as columns instruction / input / output.

    Reads .json (an array, or JSON lines), .jsonl, .json.gz, .jsonl.gz, .csv, .parquet, and folders
    written by `Dataset.save_to_disk` (a `DatasetDict` folder gives its "train" split). A missing
    `input` (no column, no key, or null) means "". Other values are kept as they are, bad ones
    included: `tokenize` skips and reports bad rows, so that none is dropped in silence.
    """
    columns = columns or ColumnMap()
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; give the path of a data file or a save_to_disk folder")
    if path.is_dir():
        table = _read_saved(path)
    elif path.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        table = _read_json(path, columns)
    elif path.name.endswith(".csv"):
        table = _read_csv(path)
    elif path.name.endswith(".parquet"):
        table = _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown file type; use one of {', '.join(SUFFIXES)} or a save_to_disk folder")
    if len(table) == 0:
        raise DataError(f"{path}: the file has no rows")
    return _select(path, table, columns)


def _read_saved(path: Path) -> datasets.Dataset:
    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from e
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(saved)}); "
                            "save the split to train on, or name it 'train'")
        others = [name for name in saved if name != "train"]
        log = logger.warning if others else logger.info
        log("%s: a DatasetDict; reading its 'train' split%s", path, f", not {', '.join(others)}" if others else "")
        saved = saved["train"]
    return saved


class _Object(dict):
    """A JSON object as read, with the keys it gave more than once."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self.repeated = [key for key, count in Counter(key for key, _ in pairs).items() if count > 1]


def _too_deep(path: Path, place: str) -> DataError:
    return DataError(f"{path}: {place} nests JSON arrays or objects deeper than can be read (Python's recursion "
                     "limit); Alpaca fields are strings: flatten or remove that value")


def _read_json(path: Path, columns: ColumnMap) -> datasets.Dataset:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:  # "-sig": a byte order mark at the start is dropped
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text{' (gzip)' if path.suffix == '.gz' else ''}: {e}") from e
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if text.lstrip().startswith("["):  # one JSON array
        try:
            records = json.loads(text, object_pairs_hook=_Object)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        except RecursionError:
            raise _too_deep(path, "the file") from None
        places = [f"row {number} (1-based)" for number in range(1, len(records) + 1)]
    else:  # JSON lines; split on "\n" only, since JSON strings may hold a raw U+2028
        records, places = [], []
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line, object_pairs_hook=_Object))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                                    "fix or remove that line") from e
                except RecursionError:
                    raise _too_deep(path, f"line {number}") from None
                places.append(f"line {number}")
    for place, record in zip(places, records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: {place} is a {type(record).__name__}, not an object with "
                            f"{', '.join(FIELDS)}")
        if record.repeated:
            raise DataError(f"{path}: {place} gives the key {record.repeated[0]!r} twice (JSON readers differ on "
                            "which value wins); keep one")
    names = list(dict.fromkeys(key for record in records for key in record))
    wanted = {columns.instruction, columns.input, columns.output}
    arrays, features = {}, {}
    for name in names:
        if name not in wanted:  # other columns are dropped: never converted, however they are nested
            arrays[name], features[name] = pa.nulls(len(records), pa.string()), datasets.Value("string")
            continue
        values = [record.get(name) for record in records]
        if name == columns.input:  # a row without an input, or with a null one, has none: ""
            values = ["" if value is None else value for value in values]
        try:
            arrays[name], features[name] = _json_column(values)
        except RecursionError:
            raise _too_deep(path, f"column {name!r}") from None
    return datasets.Dataset(pa.table(arrays), info=datasets.DatasetInfo(features=datasets.Features(features)))


def _json_column(values: list) -> tuple[pa.Array, Any]:
    """A column of strings as it is; any other column as JSON text per value (datasets' Json feature): a
    string stays a string ("42" is not 42), and tokenize names each row whose value is not a string."""
    if all(value is None or isinstance(value, str) for value in values):
        return pa.array(values, pa.string()), datasets.Value("string")
    encoded = [None if value is None else json.dumps(value, ensure_ascii=False) for value in values]
    return pa.ExtensionArray.from_storage(datasets.Json().pa_type, pa.array(encoded, pa.string())), datasets.Json()


def _read_csv(path: Path) -> datasets.Dataset:
    import pandas as pd

    try:
        # Every cell as text, and "NA" or "null" as the words they are; an empty cell reads as "".
        text = {"dtype": str, "keep_default_na": False, "encoding": "utf-8-sig"}
        header = pd.read_csv(path, header=None, nrows=1, **text).iloc[0].tolist()  # as written: pandas renames repeats
        frame = pd.read_csv(path, **text)
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path}: the file is empty") from e
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid CSV file: {e}") from e
    _refuse_repeated(path, header)
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _refuse_repeated(path: Path, names: list[str]) -> None:
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DataError(f"{path}: the column {repeated[0]!r} appears twice (readers differ on which one wins); "
                        "rename or remove one")


def _read_parquet(path: Path) -> datasets.Dataset:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        _refuse_repeated(path, names)  # before reading: pyarrow's own message for it names no column plainly
        return datasets.Dataset(pq.read_table(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a valid Parquet file: {e}") from e


def _select(path: Path, table: datasets.Dataset, columns: ColumnMap) -> datasets.Dataset:
    present = table.column_names
    required = ["instruction", "output"] + ([] if columns.input == "input" else ["input"])  # a named input must exist
    for name in required:
        column = getattr(columns, name)
        if column not in present:
            raise DataError(f"{path}: no column {column!r} for the {name} (columns present: {', '.join(present)}); "
                            f"pass ColumnMap({name}=...) naming one of them")
    if columns.input not in present:
        table = table.add_column(columns.input, [""] * len(table), feature=datasets.Value("string"))
    mapping = {getattr(columns, name): name for name in FIELDS}
    table = table.select_columns(list(mapping)).rename_columns(mapping).select_columns(list(FIELDS))
    table.info.description = _SOURCE_TAG + str(path)
    return table


def _source_of(dataset: datasets.Dataset) -> str:
    description = dataset.info.description or ""
    return description[len(_SOURCE_TAG):] if description.startswith(_SOURCE_TAG) else "the dataset"


# ---- tokenizing -------------------------------------------------------------------------------------

def _row_problem(instruction: Any, input: Any, output: Any) -> str | None:
    for name, value in (("instruction", instruction), ("input", input), ("output", output)):
        if value is None and name != "input":
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
) -> tuple[datasets.Dataset, DataReport]:
    """Rows with instruction / input / output become input_ids / attention_mask / labels.

    template="alpaca" is the seed's `process_func`, token for token: the prompt and `output + eos` are
    tokenized apart with the tokenizer's default special tokens, the prompt's labels are -100, and the
    row is cut at max_length. template="chat" uses the tokenizer's chat template instead (the user says
    instruction + "\\n" + input; only the assistant's tokens are learned).

    Bad rows (missing, non-string or empty fields; a response cut away by max_length) are skipped and
    counted in the report, or raise DataError with on_bad_row="error".
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} is not valid; it must be an integer of at least 2")
    if template not in ("alpaca", "chat"):
        raise ValueError(f"template={template!r} is not valid; allowed values: 'alpaca', 'chat'")
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row={on_bad_row!r} is not valid; allowed values: 'skip', 'error'")
    if template == "alpaca" and tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token, which ends every Alpaca response; set tokenizer.eos_token")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' needs a tokenizer with a chat template, and this one has none; "
                         "use template='alpaca' or set tokenizer.chat_template")
    source = _source_of(dataset)
    for name in ("instruction", "output"):
        if name not in dataset.column_names:
            raise DataError(f"{source}: no column {name!r} (columns present: {', '.join(dataset.column_names)}); "
                            "read files with load_rows(path, ColumnMap(...)) or rename the columns")
    # The chat template already holds its special tokens; the seed's template takes the tokenizer's default.
    special = {} if template == "alpaca" else {"add_special_tokens": False}

    def encode(batch: dict[str, list]) -> pa.Table:
        size = len(batch["instruction"])
        inputs = batch["input"] if "input" in batch else [None] * size
        problems = [_row_problem(*row) for row in zip(batch["instruction"], inputs, batch["output"])]
        good = [i for i in range(size) if problems[i] is None]
        texts = [training_texts(tokenizer, template, batch["instruction"][i], inputs[i] or "", batch["output"][i])
                 for i in good]
        # One batched call into the fast tokenizer does the work (prompts and responses apart, as the
        # seed); the rest is list arithmetic.
        ids = _token_ids(tokenizer, [prompt for prompt, _ in texts] + [response for _, response in texts], special)
        prompts, responses = ids[: len(texts)], ids[len(texts):]
        input_ids, labels, truncated = [[]] * size, [[]] * size, [False] * size  # bad rows stay empty
        for i, prompt, response in zip(good, prompts, responses):
            if len(prompt) >= max_length:
                problems[i] = f"response cut away by max_length={max_length}"
                continue
            input_ids[i] = (prompt + response)[:max_length]
            labels[i] = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
            truncated[i] = len(prompt) + len(response) > max_length
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
