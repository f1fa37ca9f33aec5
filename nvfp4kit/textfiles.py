"""Reading text files: the one reader of calibration, evaluation and training text.

Every command that reads text (``quantize --calib``, ``qat --data``, ``eval --text``, ``train --data``)
reads each file through :func:`read_documents`, so a file that is not what it should be is refused in one
way, with a :class:`TextFileError` (a ``ValueError``) naming the file and what was expected:

* a plain text file (``.txt``, ``.md``, ``.rst``, ``.text``, no suffix, or any other suffix) is one
  document: UTF-8 text (a NUL byte or an invalid UTF-8 sequence is refused, naming its offset and line;
  line ends are read as Python's text mode reads them, ``\\r\\n`` and ``\\r`` as ``\\n``);
* a ``.jsonl`` file holds one JSON object per line (blank lines are skipped), each record's text in the
  ``text`` field (or ``text_field``); a ``.json`` file holds a list of such objects, one object, or JSON
  lines. A line that is not valid JSON or not an object, or a text field that is not a string, is
  refused naming its line; records without the field (or with it empty or null) are skipped, and a file
  with no text record at all is refused, naming the fields its records have;
* a ``.parquet`` / ``.csv`` file is read with the ``datasets`` library (offline): its text column, one
  document per non-empty row; a file it cannot read is refused naming the file and the reader's reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".text", ""})
JSON_SUFFIXES = frozenset({".jsonl", ".json"})
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}
# the datasets builder of every suffix read as records (a folder mixes no two builders)
RECORD_BUILDERS = {".jsonl": "json", ".json": "json", **TABLE_SUFFIXES}


class TextFileError(ValueError):
    """A text file that cannot be read as what its name says (the message names the file)."""


def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_text_file(path: str | os.PathLike, what: str = "text file") -> str:
    """The UTF-8 text of ``path`` (line ends as text mode reads them); ``what`` names its role in errors."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise TextFileError(f"{what} {str(p)!r} is a folder, expected a file") from None
    except OSError as e:
        raise TextFileError(f"{what} {str(p)!r} cannot be read: {e.strerror or e}") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise TextFileError(
            f"{what} {str(p)!r} is not a text file (a NUL byte at offset {nul}, line {_line_of(data, nul)}: a "
            "binary file, or text in UTF-16/32); expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextFileError(
            f"{what} {str(p)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line "
            f"{_line_of(data, e.start)}: {e.reason}); save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _record_text(rec, field: str, where: str, what: str, path: str, fields: set) -> str | None:
    if not isinstance(rec, dict):
        raise TextFileError(f"{what} {path!r}: {where} is {_json_type(rec)}, expected an object with a {field!r} "
                            "field")
    fields.update(rec)
    v = rec.get(field)
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise TextFileError(f"{what} {path!r}: {where}: the {field!r} field is {_json_type(v)}, expected a string")
    return v


def _json_lines(text: str, path: str, what: str) -> list[tuple[str, object]]:
    out = []
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise TextFileError(f"{what} {path!r}: line {i} is not valid JSON ({e.msg} at column {e.colno}); "
                                "expected one JSON object per line") from None
    return out


def _json_records(text: str, path: str, what: str, suffix: str) -> list[tuple[str, object]]:
    if suffix == ".jsonl":
        return _json_lines(text, path, what)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as whole:
        try:  # a .json file may hold JSON lines too
            return _json_lines(text, path, what)
        except TextFileError:
            raise TextFileError(f"{what} {path!r} is not valid JSON ({whole.msg} at line {whole.lineno}, column "
                                f"{whole.colno}); expected a list of objects or JSON lines") from None
    if isinstance(doc, list):
        return [(f"record {i}", r) for i, r in enumerate(doc, start=1)]
    return [("the document", doc)]


def _table_texts(p: Path, builder: str, field: str, what: str) -> list[str]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from .optional import require

    datasets = require("datasets", f"reading {builder} files")

    try:
        ds = datasets.load_dataset(builder, data_files=[str(p)], split="train")
    except Exception as e:  # noqa: BLE001 - datasets wraps every reader error; name the file and the cause
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise TextFileError(
            f"{what} {str(p)!r} cannot be read as {builder} ({type(cause).__name__}: {cause})") from None
    if field not in ds.column_names:
        raise TextFileError(f"{what} {str(p)!r} has no {field!r} column (columns: {', '.join(ds.column_names)}); "
                            "name the text column")
    return [str(t) for t in ds[field] if t]


def read_documents(path: str | os.PathLike, text_field: str = "text", what: str = "text file") -> list[str]:
    """The documents of one file (see the module docs): a plain text file is one document (possibly
    empty); a JSON lines / JSON / parquet / csv file gives one per record with non-empty text and must
    hold at least one."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        texts = _table_texts(p, TABLE_SUFFIXES[suffix], text_field, what)
    elif suffix in JSON_SUFFIXES:
        text = read_text_file(p, what).removeprefix("\ufeff")
        if not text.strip():
            raise TextFileError(f"{what} {str(p)!r} is empty; expected JSON records with a {text_field!r} field")
        fields: set = set()
        records = _json_records(text, str(p), what, suffix)
        if not records:
            raise TextFileError(f"{what} {str(p)!r} holds no records (an empty list); expected JSON records with a "
                                f"{text_field!r} field")
        texts = [t for where, rec in records
                 if (t := _record_text(rec, text_field, where, what, str(p), fields)) is not None]
        if not texts:
            seen = f"the records have the fields: {', '.join(sorted(map(str, fields)))}" if fields else \
                "the records have no fields"
            raise TextFileError(f"{what} {str(p)!r} has no text records: no {text_field!r} field with text ({seen}); "
                                f"expected records with a {text_field!r} field")
    else:
        return [read_text_file(p, what)]
    if not texts:
        raise TextFileError(f"{what} {str(p)!r} has no text records (no non-empty {text_field!r} value)")
    return texts


__all__ = ["JSON_SUFFIXES", "RECORD_BUILDERS", "TABLE_SUFFIXES", "TEXT_SUFFIXES", "TextFileError",
           "read_documents", "read_text_file"]
