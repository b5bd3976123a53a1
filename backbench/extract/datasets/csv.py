"""``csv:PATH``: a UTF-8 CSV of ``path,label`` rows, or of one 0/1 column per label (multi-label)."""

from __future__ import annotations

import csv
import io
import posixpath
from pathlib import Path

import numpy as np

from backbench.errors import DataSourceError
from backbench.extract.datasets.base import FileSource
from backbench.labels import normalize_labels


def _positive(value: str) -> bool:
    """A multi-label cell: 1 (or 1.0, true, yes) is positive; 0, -1 (uncertain) and blank are not."""
    try:
        return float(value) == 1.0
    except ValueError:
        return value.lower() in ("true", "yes")


def _csv_reader(file: Path) -> csv.DictReader:
    """A reader over a UTF-8 CSV (a byte-order mark is dropped); other encodings are refused
    naming the first byte that is not UTF-8, rather than misread."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataSourceError(f"{str(file)!r} is not UTF-8: byte 0x{data[exc.start]:02x} on line {line} (offset "
                              f"{exc.start}) is not valid UTF-8; save the CSV as UTF-8 (e.g. `iconv -f latin1 -t "
                              f"utf-8`)") from None
    return csv.DictReader(io.StringIO(text, newline=""))


def _once_each(file: Path, rows: list[tuple[str, str]], lines: list[int]) -> None:
    """Refuse an image listed twice: with two labels it has no true one; with the same label it
    would count twice (and be retrieved by itself). Paths compare normalized (``./a.png`` is ``a.png``)."""
    seen: dict[str, tuple[str, int]] = {}
    for (path, label), line in zip(rows, lines):
        first = seen.setdefault(posixpath.normpath(path), (label, line))
        if first[1] == line:
            continue
        if first[0] != label:
            raise DataSourceError(f"{str(file)!r} lists {path!r} twice with different labels: {first[0]!r} (line "
                                  f"{first[1]}) and {label!r} (line {line}); keep the right one")
        raise DataSourceError(f"{str(file)!r} lists {path!r} twice (lines {first[1]} and {line}); "
                              f"list each image once")


class CsvSource(FileSource):
    """A UTF-8 CSV with columns ``path,label``; paths relative to the CSV's folder, each listed once.

    Multi-label (``labels=[COL, ...]``, or ``["*"]`` for every column but ``path``): one 0/1
    column per label, as CheXpert's CSVs have (1 is positive; 0, -1 "uncertain" and blank
    count as negative). The classes are the label names, and each sample's label is stored
    as a bitmask (bit k set: label k positive), so the cache keeps one int64 per row;
    ``multilabel`` is True and the probes run one-vs-rest and report mean AUROC.
    """

    MAX_LABELS = 62

    def __init__(self, path: str | Path, labels: list[str] | None = None) -> None:
        file = Path(path).expanduser()
        self.spec, self.root = f"csv:{file}", file.parent
        if not file.is_file():
            raise DataSourceError(f"CSV file {str(file)!r} does not exist")
        if labels:
            return self._multilabel(file, labels)
        reader = _csv_reader(file)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataSourceError(
                f"{str(file)!r} lacks column(s) {', '.join(sorted(missing))}; expected a header 'path,label' "
                f"(or name the label columns of a multi-label CSV with --labels)"
            )
        rows, lines = [], []
        for line, row in enumerate(reader, start=2):
            if not (row.get("path") or "").strip() or not (row.get("label") or "").strip():
                raise DataSourceError(f"{str(file)!r} line {line}: empty path or label")
            rows.append((row["path"].strip(), row["label"].strip()))
            lines.append(reader.line_num)
        if not rows:
            raise DataSourceError(f"{str(file)!r} lists no images")
        _once_each(file, rows, lines)
        self.ids = [p for p, _ in rows]
        self.labels, self.classes = normalize_labels([lab for _, lab in rows], what=repr(str(file)))

    def _multilabel(self, file: Path, labels: list[str]) -> None:
        reader = _csv_reader(file)
        fields = list(reader.fieldnames or [])
        cols = [f for f in fields if f != "path"] if labels in (["*"], ["all"]) else list(labels)
        missing = [c for c in ["path", *cols] if c not in fields]
        if missing:
            raise DataSourceError(f"{str(file)!r} lacks column(s) {', '.join(missing)} (has: {', '.join(fields)})")
        if not cols or len(cols) > self.MAX_LABELS:
            raise DataSourceError(f"--labels names {len(cols)} columns; a multi-label CSV needs 1 to "
                                  f"{self.MAX_LABELS}")
        ids, masks, lines = [], [], []
        for line, row in enumerate(reader, start=2):
            if not (row.get("path") or "").strip():
                raise DataSourceError(f"{str(file)!r} line {line}: empty path")
            ids.append(row["path"].strip())
            masks.append(sum(1 << k for k, c in enumerate(cols) if _positive((row.get(c) or "").strip())))
            lines.append(reader.line_num)
        if not ids:
            raise DataSourceError(f"{str(file)!r} lists no images")
        _once_each(file, [(p, "+".join(c for k, c in enumerate(cols) if m >> k & 1) or "none")
                          for p, m in zip(ids, masks)], lines)
        self.spec = f"csv:{file}?labels={','.join(cols)}"
        self.classes, self.ids, self.labels = cols, ids, np.asarray(masks, dtype=np.int64)
        self.multilabel = True


def open_csv(arg: str, split: str, *, labels: list[str] | None = None) -> CsvSource:
    """The registry's opener: ``PATH`` or ``PATH?labels=A,B`` (``labels`` wins when given)."""
    if "?labels=" in arg:
        arg, _, cols = arg.partition("?labels=")
        labels = labels or [c for c in cols.split(",") if c]
    return CsvSource(arg, labels)
