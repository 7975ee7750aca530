"""Local instruction-data files: reading them and naming their columns.

Supported files hold one example per record with (after column mapping) an ``instruction``,
an optional ``input`` and an ``output``: the layouts of alpaca-gpt4, fingpt-sentiment,
medical_meadow flashcards (instruction/input/output) and MathInstruct (instruction/output,
plus a ``source`` column that can be mapped to ``task``). Nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Mapping, Union

from ..base.errors import DataError, ParameterError

log = logging.getLogger("fedshield")

FIELDS = ("instruction", "input", "output")
# Optional field: a label or task name that a Dirichlet or task split can key on.
TASK_FIELD = "task"
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class MissingColumns(DataError):
    """A data file without a column its mapping (or the default field names) asks for; the
    message names the file and the columns. A site's start-up check tells it from other
    data errors (fedshield.fl.site_check)."""


def parse_columns(spec: Union[str, Mapping[str, str], None]) -> Dict[str, str]:
    """``"instruction=question,output=answer"`` (or a mapping) -> {field: column in the file}.

    Fields are instruction, input, output and task; unmapped ones use their own name.
    """
    if spec is None or spec == "":
        return {}
    if isinstance(spec, str):
        pairs = {}
        for part in spec.split(","):
            name, sep, column = (x.strip() for x in part.partition("="))
            if not sep or not name or not column:
                raise ParameterError(f"columns={spec!r}: expected FIELD=COLUMN[,FIELD=COLUMN...], "
                                     f"got the part {part!r}")
            if name in pairs:
                raise ParameterError(f"columns={spec!r}: field {name!r} mapped twice")
            pairs[name] = column
        spec = pairs
    if not isinstance(spec, Mapping):
        raise ParameterError(f"columns must be a mapping or 'FIELD=COLUMN,...', got {spec!r}")
    unknown = sorted(set(spec) - set(FIELDS) - {TASK_FIELD})
    if unknown:
        raise ParameterError(f"columns: unknown fields {unknown}; known: "
                             f"{list(FIELDS) + [TASK_FIELD]}")
    bad = {k: v for k, v in spec.items() if not isinstance(v, str) or not v}
    if bad:
        raise ParameterError(f"columns: column names must be non-empty strings, got {bad}")
    return dict(spec)


def _read_records(path: Path) -> List[Mapping]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            obj = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(obj, dict) and isinstance(obj.get("data"), list):
                obj = obj["data"]  # {"data": [...]}, as some exports wrap it
            if not isinstance(obj, list):
                raise DataError(f"{path}: expected a JSON list of objects, "
                                f"got a {type(obj).__name__}")
            return obj
        if suffix == ".jsonl":
            records = []
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}: line {lineno} is not valid JSON: {exc}") from exc
            return records
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as fh:
                return list(csv.DictReader(fh))
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq  # noqa: PLC0415 - optional dependency
            except ImportError as exc:
                raise DataError(f"{path}: reading Parquet needs the 'pyarrow' package, which is "
                                "not installed (pip install pyarrow, or convert to JSONL)") from exc
            try:
                return pq.read_table(path).to_pylist()
            except Exception as exc:  # pyarrow raises several unrelated types
                raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {SUFFIXES}")


def _text(value, path: Path, row: int, column: str, required: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        value = ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{path}: row {row}, column {column!r}: expected text, "
                        f"got {type(value).__name__}")
    text = value if isinstance(value, str) else str(value)
    if required and not text.strip():
        raise DataError(f"{path}: row {row}, column {column!r} is empty")
    return text


def load_instruction_data(path: Union[str, Path],
                          columns: Union[str, Mapping[str, str], None] = None
                          ) -> List[Dict[str, str]]:
    """Read a local .json (list of objects), .jsonl, .csv or .parquet file of instructions.

    Returns one ``{"instruction", "input", "output"}`` dict per record (plus ``"task"`` when
    ``columns`` maps one, e.g. MathInstruct's ``source``). ``columns`` maps fields to the
    file's column names, e.g. ``{"instruction": "question", "output": "answer"}``. The input
    column may be absent (MathInstruct) unless mapped explicitly; instruction and output
    must be non-empty in every row. Any problem raises :class:`fedshield.DataError` naming
    the file (and the row where it applies).
    """
    path = Path(path)
    mapping = parse_columns(columns)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = _read_records(path)
    if not records:
        raise DataError(f"{path}: holds no examples")
    first_bad = next((i for i, r in enumerate(records) if not isinstance(r, Mapping)), None)
    if first_bad is not None:
        raise DataError(f"{path}: record {first_bad} is a {type(records[first_bad]).__name__}, "
                        "expected an object with named columns")

    present = set().union(*(r.keys() for r in records))
    source = {f: mapping.get(f, f) for f in FIELDS}
    wanted = ["instruction", "output"] + [f for f in ("input", TASK_FIELD) if f in mapping]
    if "task" in mapping:
        source[TASK_FIELD] = mapping[TASK_FIELD]
    missing = [f"{source[f]!r}" + (f" (for {f})" if source[f] != f else "")
               for f in wanted if source[f] not in present]
    if missing:
        raise MissingColumns(f"{path}: missing column(s) {', '.join(missing)}; the file has "
                        f"{sorted(present)} (map others with columns, e.g. "
                        "instruction=question,output=answer)")

    examples = []
    for row, record in enumerate(records):
        ex = {
            "instruction": _text(record.get(source["instruction"]), path, row,
                                 source["instruction"], required=True),
            "input": _text(record.get(source["input"]), path, row, source["input"],
                           required=False),
            "output": _text(record.get(source["output"]), path, row, source["output"],
                            required=True),
        }
        if TASK_FIELD in source:
            ex[TASK_FIELD] = _text(record.get(source[TASK_FIELD]), path, row,
                                   source[TASK_FIELD], required=True)
        examples.append(ex)
    log.info("loaded %d examples from %s", len(examples), path)
    return examples
