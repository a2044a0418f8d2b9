"""Dataset rows for tasks: local jsonl / json / parquet files, or a Hugging Face Hub dataset, as lists of dicts.

Rows are plain dicts (a task's splits are a few thousand rows; lists keep them deterministic and easy to test).
Bad rows are skipped, never fatal: :func:`clean_rows` counts them by reason and logs the first few row numbers.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("ossrl.tasks")

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class BadRow(ValueError):
    """Raised by a row converter: the row is skipped and counted under this reason."""


def is_local(path: str | Path) -> bool:
    return Path(path).suffix in LOCAL_SUFFIXES or Path(path).exists()


def read_local(path: str | Path) -> list[Any]:
    """Rows of a local .jsonl (one JSON object a line), .json (a list of objects) or .parquet file.

    A jsonl line that is not valid UTF-8 or not valid JSON becomes a :class:`BadRow` entry naming its line (the
    warning of :func:`clean_rows` names the file), so it is skipped and counted like any other bad row instead of
    failing the whole load."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {str(p)!r} does not exist (working directory: {Path.cwd()})")
    if p.suffix == ".jsonl":
        rows: list[Any] = []
        with p.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    rows.append(BadRow(f"not valid UTF-8 (byte {raw[e.start]:#04x}, column {e.start + 1}) at line "
                                       f"{number}"))  # fmt: skip
                    continue
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append(BadRow(f"invalid JSON ({e.msg}, column {e.colno}) at line {number}"))
        return rows
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not valid UTF-8 (byte offset {e.start})") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} line {e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
        if not isinstance(data, list):
            raise ValueError(f"{p}: a .json dataset must be a list of objects, got {type(data).__name__}")
        return data
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    raise ValueError(f"{p}: unsupported dataset file type {p.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def load_hub(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """``datasets.load_dataset(name, config, split=split)`` as a list of dicts, with a readable error offline."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 (network, auth, missing split: all mean "cannot get it from the Hub")
        raise RuntimeError(
            f"could not load {name!r} (config {config!r}, split {split!r}) from the Hugging Face Hub: "
            f"{type(err).__name__}: {err}. Offline? Pass a local .jsonl/.parquet file instead (path=...)"
        ) from err
    return [dict(row) for row in ds]


def clean_rows(
    rows: Iterable[Any], convert: Callable[[dict[str, Any]], dict[str, Any]], *, source: str, show: int = 5
) -> list[dict[str, Any]]:
    """``convert`` every row; rows that are not dicts or whose conversion raises :class:`BadRow` are skipped.

    Logs one warning: how many were skipped, per reason, and the first ``show`` row numbers (0-based, counting the
    rows read: a jsonl file's non-empty lines). Raises if no row is left."""
    out: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    first: list[str] = []
    total = 0
    for i, row in enumerate(rows):
        total += 1
        try:
            if isinstance(row, BadRow):
                raise row
            if not isinstance(row, dict):
                raise BadRow(f"not an object ({type(row).__name__})")
            out.append(convert(row))
        except BadRow as why:
            reasons[str(why)] += 1
            if len(first) < show:
                first.append(f"{i} ({why})")
    if reasons:
        n_bad = sum(reasons.values())
        by_reason = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        log.warning("%s: skipped %d of %d rows: %s; first bad rows (0-based): %s",
                    source, n_bad, total, by_reason, "; ".join(first))  # fmt: skip
    if not out:
        raise ValueError(f"{source}: no usable rows ({total} read, all bad)" if total else f"{source}: no rows")
    return out


def require(row: dict[str, Any], *fields: str) -> list[Any]:
    """The values of ``fields``, each a non-empty string, or BadRow naming the first one missing."""
    values = []
    for name in fields:
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            raise BadRow(f"missing field {name!r}" if value in (None, "") else f"field {name!r} is not text")
        values.append(value)
    return values
