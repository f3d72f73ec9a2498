"""The tokenized rows of a data file, cached on disk: a second run over the same rows starts training in seconds.

    <cache root>/tokenized/<key>/   (cache root: $SOFTPROMPT_CACHE, else ~/.cache/softprompt)
        data-*.arrow, dataset_info.json, state.json     datasets' save_to_disk
        report.json                                     the DataReport, so the run prints the same summary

The key covers everything the tokens depend on: the file (path, size, modification time; for a folder,
every file in it; for `hub:owner/name`, the arrow files `datasets` cached it in), the tokenizer (its full
serialisation and special tokens), the template, max_length, the columns, the format, the split and loss_on. A folder is written under a temporary name and renamed into place, so a killed run or a
concurrent one never leaves a half cache behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import datasets

from softprompt.data.readers import HUB
from softprompt.data.rows import ColumnMap, DataReport, load_rows, tokenize
from softprompt.io.base_models import cache_root

logger = logging.getLogger(__name__)

FORMAT = 4  # bump when load_rows() or tokenize() change what they produce (3: conversations, loss_on; 4: one BOS a row)


def tokenized_rows(path: str | Path, columns: ColumnMap, tokenizer, max_length: int, template: str,
                   cache: bool = True, format: str = "auto", loss_on: str = "assistant", split: str = "train",
                   subset: str | None = None) -> tuple[datasets.Dataset, DataReport]:
    """`tokenize(load_rows(path))`, from the cache when the same file was tokenized the same way before."""
    hub = str(path).startswith(HUB)
    rows = load_rows(path, columns, format, split, subset) if hub else None  # known by the files datasets cached

    def encode() -> tuple[datasets.Dataset, DataReport]:
        read = rows if rows is not None else load_rows(path, columns, format, split, subset)
        return tokenize(read, tokenizer, max_length=max_length, template=template, loss_on=loss_on)

    if not cache or not (hub or Path(path).exists()):  # load_rows names a missing file
        return encode()
    files = [Path(f["filename"]) for f in rows.cache_files] if hub else _files(path)
    settings = [dataclasses.asdict(columns), max_length, template, format, loss_on, split, subset]
    folder = cache_root() / "tokenized" / _key(files, settings, tokenizer)
    if (folder / "report.json").is_file():
        try:
            report = DataReport(**_report_fields(json.loads((folder / "report.json").read_text(encoding="utf-8"))))
            return datasets.load_from_disk(str(folder)), report
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            logger.warning("tokenized cache %s is unreadable (%s); tokenizing again", folder, err)
    data, report = encode()
    try:
        _store(folder, data, report)
    except OSError as err:  # a read-only or full disk: train without the cache
        logger.warning("could not cache the tokenized rows in %s: %s", folder, err)
    return data, report


def _store(folder: Path, data: datasets.Dataset, report: DataReport) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        data.flatten_indices().save_to_disk(str(tmp))
        (tmp / "report.json").write_text(json.dumps(dataclasses.asdict(report), ensure_ascii=False), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process stored it first
            if not (folder / "report.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report_fields(raw: dict) -> dict:
    raw["first_rows"] = {reason: tuple(rows) for reason, rows in raw.get("first_rows", {}).items()}
    return raw


def _files(path) -> list[Path]:
    path = Path(path).resolve()
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _key(files: list[Path], settings: list, tokenizer) -> str:
    h = hashlib.sha256(f"softprompt-tokenized-{FORMAT}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    special = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, getattr(tokenizer, "chat_template", None),
               tokenizer.padding_side, tokenizer.truncation_side, type(tokenizer).__name__]
    h.update(json.dumps(special, default=str).encode())
    return h.hexdigest()[:32]
