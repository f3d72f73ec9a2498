"""Data files and hub datasets in, a `datasets.Dataset` of their columns out, values as the file has them.

    read_table("rows.jsonl", wanted={"instruction", "input", "output"}, input_column="input")
    read_table("hub:owner/name", split="train")   # through datasets.load_dataset, from its cache offline

Every format is read the same way: values as the file has them (a JSON string "42" stays a string, whatever
else its column holds), a UTF-8 byte order mark at the start is dropped, a key or column given twice is an
error (readers disagree on which one wins), and JSON nested too deep to read is an error naming the file.
JSON columns not in `wanted` are dropped unread.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from softprompt.data.registry import HUB

logger = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".csv", ".parquet")


class DataError(ValueError):
    """The data cannot be read: a wrong path, an empty file, invalid JSON, unknown columns, a dataset not in
    the cache offline, or (with on_bad_row="error") a bad row. The message names the file and, where there is
    one, the row."""


def read_table(source: str | Path, wanted: set[str] = frozenset(), input_column: str = "input",
               split: str = "train", subset: str | None = None) -> datasets.Dataset:
    """The rows of a file, a `save_to_disk` folder (its `split` when it holds a DatasetDict) or `hub:owner/name`.

    A null or missing `input_column` in JSON reads as "" (Alpaca's optional input).
    """
    if str(source).startswith(HUB):
        return read_hub(str(source)[len(HUB):], split, subset)
    if subset is not None:
        raise DataError(f"{source}: a subset ({subset!r}) names a configuration of a hub dataset; "
                        "a local file has none")
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; give the path of a data file or a save_to_disk folder "
                        "(or hub:owner/name, or a name in dataset_registry)")
    if path.is_dir():
        return _read_saved(path, split)
    if split != "train":
        raise DataError(f"{path}: a file has no splits, so data_split={split!r} cannot apply; leave data_split out "
                        "(it picks the split of a hub dataset or of a DatasetDict folder)")
    if path.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        return _read_json(path, set(wanted), input_column)
    if path.name.endswith(".csv"):
        return _read_csv(path)
    if path.name.endswith(".parquet"):
        return _read_parquet(path)
    raise DataError(f"{path}: unknown file type; use one of {', '.join(SUFFIXES)} or a save_to_disk folder")


def read_hub(name: str, split: str, subset: str | None = None) -> datasets.Dataset:
    """`datasets.load_dataset(name, subset, split=split)`: from the hub, or from the local cache when
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set (datasets reads those itself)."""
    if not name or name.count("/") > 1 or name.startswith("/") or name.endswith("/"):
        raise DataError(f"hub:{name}: not a hub dataset id; write hub:owner/name (or hub:name)")
    try:
        loaded = datasets.load_dataset(name, subset, split=split)
    except ConnectionError as e:  # offline (or no network) and not in the cache
        offline = datasets.config.HF_HUB_OFFLINE  # HF_HUB_OFFLINE, or HF_DATASETS_OFFLINE when set
        raise DataError(f"hub:{name}: not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}) and "
                        f"the hub {'is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)' if offline else 'cannot be reached'}"
                        "; load it once with network (or copy that cache here), or give a local file") from e
    except FileNotFoundError as e:  # no such dataset (online), or a missing data file
        raise DataError(f"hub:{name}: {e}; check the dataset id (hub:owner/name)") from e
    except ValueError as e:  # an unknown split or subset: datasets names the ones there are
        raise DataError(f"hub:{name}: {e} (data_split={split!r}" + (f", subset={subset!r})" if subset else ")")) from e
    if len(loaded) == 0:
        raise DataError(f"hub:{name}: the split {split!r} has no rows")
    return loaded


def _read_saved(path: Path, split: str) -> datasets.Dataset:
    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from e
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{path}: a DatasetDict without a {split!r} split (splits: {', '.join(saved)}); "
                            f"save the split to train on, or name it {split!r} (data_split)")
        others = [name for name in saved if name != split]
        log = logger.warning if others else logger.info
        log("%s: a DatasetDict; reading its %r split%s", path, split, f", not {', '.join(others)}" if others else "")
        saved = saved[split]
    elif split != "train":
        raise DataError(f"{path}: a Dataset folder has no splits, so data_split={split!r} cannot apply; "
                        "leave data_split out")
    return saved


class _Object(dict):
    """A JSON object as read, with the keys it gave more than once."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self.repeated = [key for key, count in Counter(key for key, _ in pairs).items() if count > 1]


def _too_deep(path: Path, place: str) -> DataError:
    return DataError(f"{path}: {place} nests JSON arrays or objects deeper than can be read (Python's recursion "
                     "limit): flatten or remove that value")


def _read_json(path: Path, wanted: set[str], input_column: str) -> datasets.Dataset:
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
            raise DataError(f"{path}: {place} is a {type(record).__name__}, not an object (one row, "
                            "with its columns as keys)")
        if record.repeated:
            raise DataError(f"{path}: {place} gives the key {record.repeated[0]!r} twice (JSON readers differ on "
                            "which value wins); keep one")
    names = list(dict.fromkeys(key for record in records for key in record))
    arrays, features = {}, {}
    for name in names:
        if name not in wanted:  # other columns are dropped: never converted, however they are nested
            arrays[name], features[name] = pa.nulls(len(records), pa.string()), datasets.Value("string")
            continue
        values = [record.get(name) for record in records]
        if name == input_column:  # a row without an input, or with a null one, has none: ""
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
