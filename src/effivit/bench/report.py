"""Report writers: markdown sections of ``docs/benchmarks.md``, terminal tables, CSV and JSON.

Each script in ``benchmarks/`` owns named sections of ``docs/benchmarks.md`` delimited by
``<!-- BEGIN name -->`` / ``<!-- END name -->`` and rewrites only those with :func:`update_section`, so
scripts run at different times (and by different people) never overwrite each other's results.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/-]+$")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Several benchmark scripts may finish at the same time; serialise read-modify-write of one file.
    # The lock lives in the temp dir so no stray file appears next to the document.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"effivit-section-{digest}.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, accept the (rare) race
        yield
        return
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def replace_section(text: str, name: str, markdown: str) -> str:
    """``text`` with the block between the ``name`` markers replaced by ``markdown`` (appended if absent)."""
    if not _NAME_RE.match(name):
        raise ValueError(f"section name {name!r} may only contain letters, digits and _ . : / -")
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    body = markdown.strip("\n")
    block = f"{begin}\n{body}\n{end}"
    i = text.find(begin)
    if i >= 0:
        j = text.find(end, i + len(begin))
        if j < 0:
            raise ValueError(f"section {name!r} has a BEGIN marker but no END marker")
        return text[:i] + block + text[j + len(end):]
    if text and not text.endswith("\n"):
        text += "\n"
    sep = "\n" if text else ""
    return f"{text}{sep}{block}\n"


def update_section(path: str | os.PathLike, name: str, markdown: str) -> Path:
    """Replace (or append) the block between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in ``path``.

    The file is created if missing; the rest of it is left byte for byte as it was. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        new = replace_section(text, name, markdown)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, path)
    return path


def read_section(path: str | os.PathLike, name: str) -> str | None:
    """The body of section ``name`` in ``path`` (``None`` when absent)."""
    path = Path(path)
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    i = text.find(begin)
    j = text.find(end, i + 1) if i >= 0 else -1
    if i < 0 or j < 0:
        return None
    return text[i + len(begin):j].strip("\n")


# --- tables -------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str] | tuple[str, str, str]],
    style: str = "text",
) -> str:
    """Rows as a table. ``columns``: ``(key, header)`` or ``(key, header, format_spec)``.

    style: ``"text"`` (aligned, for terminals) or ``"markdown"``.
    """
    if style not in ("text", "markdown"):
        raise ValueError(f"style={style!r}; allowed: 'text', 'markdown'")
    heads = [c[1] for c in columns]
    cells = [[_fmt(r.get(c[0]), c[2] if len(c) > 2 else None) for c in columns] for r in rows]
    numeric = [all(_is_num(r.get(c[0])) for r in rows) and bool(rows) for c in columns]
    if style == "markdown":
        out = ["| " + " | ".join(heads) + " |",
               "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(out)
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, numeric)).rstrip()

    out = [line(heads), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _is_num(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


# --- files --------------------------------------------------------------------------------------------------


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> Path:
    """Rows as CSV with exactly ``fields`` as columns (missing values empty, extra keys ignored)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n", encoding="utf-8")
    return path
