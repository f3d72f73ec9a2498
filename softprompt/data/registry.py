"""Datasets by name: a small JSON registry (`dataset_registry: datasets.json`, then `data: NAME`), as
LLaMA-Factory's `dataset_info.json` does, whose entries that softprompt can train on read here unchanged.

    {
      "alpaca_en": {"file_name": "alpaca_en_demo.json"},
      "support":   {"path": "chats/support.jsonl", "format": "sharegpt", "columns": {"messages": "dialog"}},
      "ultrachat": {"hub": "HuggingFaceH4/ultrachat_200k", "format": "messages", "split": "train_sft"}
    }

A relative path is relative to the registry file. Plain Python only: the run config resolves names before
any model or data loads, so a wrong name fails at once.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.data.conversations import FORMATS

HUB = "hub:"  # `data: hub:owner/name`: a dataset on the Hugging Face hub (or in its local cache)
# Column roles: softprompt's names, and LLaMA-Factory's for Alpaca rows (prompt / query / response)
COLUMN_ROLES = {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
                "system": "system", "prompt": "instruction", "query": "input", "response": "output"}
# LLaMA-Factory's `tags` that name what softprompt reads anyway (turns of from/value or role/content)
READ_TAGS = {"role_tag": ("from", "role"), "content_tag": ("value", "content"), "user_tag": ("human", "user"),
             "assistant_tag": ("gpt", "assistant", "model"), "system_tag": ("system",)}
ENTRY_KEYS = ("path", "file_name", "hub", "hf_hub_url", "format", "formatting", "columns", "split", "subset", "tags")
MIRRORS = ("ms_hub_url", "om_hub_url")  # LLaMA-Factory's ModelScope / Modelers copies of the hub dataset


@dataclass(frozen=True)
class DataSource:
    """Where rows come from (a path or `hub:owner/name`) and how to read them."""

    location: str
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # column role (instruction, ..., messages, system) -> name
    split: str = "train"
    subset: str | None = None


def resolve(data: str, registry: str | Path | None, format: str = "auto", columns: dict[str, str] | None = None,
            split: str = "train") -> DataSource:
    """The source `data` names: a registry entry when `registry` lists it, else `data` itself (a path or hub id).

    The run's own keys (`format`, the `*_column` keys, `data_split`) apply where the entry says nothing; a key
    set to a value the entry contradicts is an error, never ignored.
    """
    columns = dict(columns or {})
    entries = _read_registry(registry) if registry else {}
    if data not in entries:
        if registry and not data.startswith(HUB) and not Path(data).exists():
            near = difflib.get_close_matches(data, list(entries), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ValueError(f"data={data!r} is neither a name in {registry}{hint} nor an existing path; names there: "
                             f"{', '.join(sorted(entries)) or '(none)'}")
        return DataSource(data, format, columns, split)
    entry = entries[data]
    where = f"{registry}: dataset {data!r}"
    unknown = [key for key in entry if key not in ENTRY_KEYS + MIRRORS]
    if unknown:
        raise ValueError(f"{where}: unsupported key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"softprompt reads {', '.join(ENTRY_KEYS)}")
    paths = [entry[key] for key in ("path", "file_name") if key in entry]
    hubs = [entry[key] for key in ("hub", "hf_hub_url") if key in entry]
    if len(paths) + len(hubs) != 1 or not all(isinstance(v, str) and v for v in paths + hubs):
        mirror = " (ModelScope and Modelers copies are not read)" if any(key in entry for key in MIRRORS) else ""
        raise ValueError(f"{where}: give exactly one of path (or file_name) and hub (or hf_hub_url), as a "
                         f"string{mirror}")
    location = HUB + hubs[0] if hubs else str(Path(registry).parent / paths[0])
    entry_format = entry.get("format", entry.get("formatting", format))
    if entry_format not in FORMATS:
        raise ValueError(f"{where}: format {entry_format!r} is not valid; allowed values: {', '.join(FORMATS)}")
    entry_columns = entry.get("columns", {})
    if not isinstance(entry_columns, dict) or not all(isinstance(v, str) and v for v in entry_columns.values()):
        raise ValueError(f"{where}: columns must map {', '.join(COLUMN_ROLES)} to column names; got {entry_columns!r}")
    unread = [role for role in entry_columns if role not in COLUMN_ROLES]
    if unread:
        raise ValueError(f"{where}: columns {', '.join(map(repr, unread))} are not read (softprompt trains on "
                         f"text turns); columns may map {', '.join(COLUMN_ROLES)}")
    for tag, value in (entry.get("tags") or {}).items():
        if value not in READ_TAGS.get(tag, ()):
            raise ValueError(f"{where}: tags.{tag}={value!r} is not read; turns are read with roles from/role "
                             "(human/user, gpt/assistant/model, system) and text value/content")
    mapped = {COLUMN_ROLES[role]: name for role, name in entry_columns.items()}
    checks = [("format", format, "auto", entry_format), ("data_split", split, "train", entry.get("split", split))]
    checks += [(f"{role}_column", name, None, mapped.get(role, name)) for role, name in columns.items()]
    for key, mine, default, theirs in checks:
        if mine not in (default, theirs):
            raise ValueError(f"{key}={mine!r}, but {where} says {theirs!r}; remove the key or change the entry")
    return DataSource(location, entry_format, {**columns, **mapped}, entry.get("split", split), entry.get("subset"))


def _read_registry(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset_registry={str(path)!r}: no such file; give the path of a JSON file of datasets")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ValueError(f"{path}: must hold an object of dataset name -> {{path or hub, format, columns, split}}")
    return entries
