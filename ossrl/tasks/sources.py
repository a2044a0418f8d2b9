"""Reading a dataset task's rows: local files (strict: a bad byte, line or row names the file and the line), folders
in the Hub's split layout, Hub ids, and in-memory rows."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ossrl.tasks.data import load_hub

log = logging.getLogger("ossrl.tasks")


FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class DatasetFileError(ValueError):
    """A data file that cannot be read as a dataset; the message names the file and, where there is one, the line."""


# --- reading data ---------------------------------------------------------------------------------------------------


def read_data_file(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a local .jsonl / .json / .csv / .parquet file, strictly: invalid UTF-8, a line that is not a JSON
    object, a CSV row with the wrong number of fields raise :class:`DatasetFileError` naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {str(p)!r} does not exist (working directory: {Path.cwd()})")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _json_lines(p, _decode(p))
    if suffix == ".json":
        return _json_file(p, _decode(p))
    if suffix == ".csv":
        return _csv_file(p, _decode(p))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as err:  # noqa: BLE001 (pyarrow raises several kinds for a damaged file)
            raise DatasetFileError(f"{p}: not a readable parquet file ({type(err).__name__}: {err})") from err
    raise DatasetFileError(f"{p}: unsupported dataset file type {p.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetFileError(
            f"{path}:{line}: not UTF-8 text: byte 0x{data[err.start]:02x} at byte {column} of line {line} "
            "(save the file as UTF-8)"
        ) from None
    return text.removeprefix("\ufeff")


def _json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetFileError(f"{path}:{number}: not valid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(value, dict):
            raise DatasetFileError(f"{path}:{number}: a line must be a JSON object (one row), got "
                                   f"{type(value).__name__}")  # fmt: skip
        rows.append(value)
    return rows


def _json_file(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines in a .json file (the Hub's loader reads those too)
            return _json_lines(path, text)
        raise DatasetFileError(f"{path}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
    if isinstance(data, list):
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DatasetFileError(f"{path}: item {i} of the list is {type(row).__name__}, not an object (a row)")
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) == 1:  # columns: {"prompt": [...], "answer": [...]}
            return [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    raise DatasetFileError(f"{path}: a .json dataset must be a list of objects (rows) or an object of equal-length "
                           "column lists")  # fmt: skip


def _csv_file(path: Path, text: str) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise DatasetFileError(f"{path}:1: a .csv dataset needs a header row naming the columns")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise DatasetFileError(f"{path}:1: repeated column names {repeated}")
    records = []
    for values in reader:
        if not values:
            continue
        if len(values) != len(header):
            raise DatasetFileError(f"{path}:{reader.line_num}: {len(values)} fields; the header has {len(header)}")
        records.append(values)
    columns = [_csv_column([r[j] for r in records]) for j in range(len(header))]
    return [{name: col[i] for name, col in zip(header, columns, strict=True)} for i in range(len(records))]


def _csv_column(values: list[str]) -> list[Any]:
    """Typed as pandas (and so ``datasets``) reads CSV: all-integer columns are ints, all-number columns floats, the
    rest strings; empty fields are None."""
    filled = [v for v in values if v != ""]
    for kind in (int, float):
        try:
            converted = [kind(v) for v in filled]
        except ValueError:
            continue
        it = iter(converted)
        return [next(it) if v != "" else None for v in values]
    return [v if v != "" else None for v in values]


def _folder_files(folder: Path, split: str) -> tuple[list[Path], list[str]]:
    """The data files of ``split`` in a folder, by the Hub's file-name rules, and the splits it has."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), str(folder))
    except Exception as err:  # noqa: BLE001 (datasets raises its own EmptyDatasetError / FileNotFoundError)
        raise DatasetFileError(f"{folder}: no data files found ({type(err).__name__}: {err})") from err
    splits = {str(name): [Path(f) for f in files if Path(f).suffix.lower() in FILE_SUFFIXES]
              for name, files in found.items()}  # fmt: skip
    splits = {name: sorted(files) for name, files in splits.items() if files}
    if not splits:
        raise DatasetFileError(f"{folder}: no {'/'.join(FILE_SUFFIXES)} files in this folder")
    return splits.get(split, []), sorted(splits)


def _in_memory_rows(source: Any) -> list[Any] | None:
    """Rows of a list of dicts, a ``datasets.Dataset`` or a pandas DataFrame; None for anything else."""
    if isinstance(source, list | tuple):
        return list(source)
    if hasattr(source, "column_names") and hasattr(source, "to_list"):  # datasets.Dataset
        return source.to_list()
    if hasattr(source, "to_dict") and hasattr(source, "columns") and hasattr(source, "iloc"):  # pandas.DataFrame
        return source.to_dict("records")
    return None


def _is_split_mapping(source: Any) -> bool:
    """A ``DatasetDict`` or a plain ``{split: rows}`` mapping."""
    return isinstance(source, Mapping) and bool(source) and all(_in_memory_rows(v) is not None for v in source.values())


def load_source(source: Any, split: str, *, subset: str | None = None) -> tuple[list[Any], str]:
    """(raw rows, a label for messages) of ``split`` of a data source (see the module docstring)."""
    rows = _in_memory_rows(source)
    if rows is not None:
        if split != "train":
            raise ValueError(f"a {type(source).__name__} of rows is one split; it has no split {split!r} (leave "
                             "split as 'train', or pass a DatasetDict / {split: rows} mapping)")  # fmt: skip
        return rows, f"{type(source).__name__} of {len(rows)} rows"
    if _is_split_mapping(source):
        if split not in source:
            raise ValueError(f"the dataset has no split {split!r}; splits: {', '.join(map(str, source))}")
        rows = _in_memory_rows(source[split]) or []
        return rows, f"split {split!r} ({len(rows)} rows)"
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"dataset path: expected a file, a folder, a Hub dataset id, a list of dicts or a "
                        f"datasets.Dataset; got {type(source).__name__}")  # fmt: skip
    path = Path(source).expanduser()
    if path.is_file():
        if split != "train":
            raise ValueError(f"{path} is one file, read as the split 'train'; it has no split {split!r} (give the "
                             "held-out rows as another file: eval_split: FILE)")  # fmt: skip
        return read_data_file(path), str(path)
    if path.is_dir():
        files, splits = _folder_files(path, split)
        if not files:
            raise ValueError(f"{path}: no data files for split {split!r}; splits found: {', '.join(splits)}")
        return [row for f in files for row in read_data_file(f)], f"{path} [{split}]"
    text = str(source)
    if path.suffix.lower() in FILE_SUFFIXES or text.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(text):
        raise FileNotFoundError(f"dataset {text!r}: no such file or folder (working directory: {Path.cwd()})")
    return load_hub(text, subset, split), f"{text}[{split}]" + (f" ({subset})" if subset else "")


# --- module:function ------------------------------------------------------------------------------------------------
