"""Local instruction-data files, client splits (IID, Dirichlet) and length-safe tokenisation.

Supported files hold one example per record with (after column mapping) an ``instruction``,
an optional ``input`` and an ``output``: the layouts of alpaca-gpt4, fingpt-sentiment,
medical_meadow flashcards (instruction/input/output) and MathInstruct (instruction/output,
plus a ``source`` column that can be mapped to ``task``). Nothing is downloaded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Sequence, Union

if TYPE_CHECKING:
    import torch

import numpy as np

from .errors import DataError, ParameterError

log = logging.getLogger("fedshield")

FIELDS = ("instruction", "input", "output")
# Optional field: a label or task name that a Dirichlet or task split can key on.
TASK_FIELD = "task"
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


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
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the file has "
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


# --------------------------------------------------------------------------
# Client splits
# --------------------------------------------------------------------------


def _check_split_args(examples: Sequence, n_clients) -> None:
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise ParameterError(f"n_clients must be an int >= 1, got {n_clients!r}")
    if len(examples) < n_clients:
        raise DataError(f"{len(examples)} examples cannot give each of {n_clients} clients "
                        "at least one")


def split_iid(examples: Sequence[Mapping], n_clients: int, seed: int) -> List[List[Mapping]]:
    """A seeded shuffle cut into ``n_clients`` shards whose sizes differ by at most one."""
    _check_split_args(examples, n_clients)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [[examples[i] for i in part] for part in np.array_split(order, n_clients)]


def _stable_bucket(text: str, buckets: int) -> int:
    # Python's hash() is salted per process; a digest keeps splits reproducible.
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(),
                          "little") % buckets


def dirichlet_labels(examples: Sequence[Mapping], key: Union[str, Callable, None] = None,
                     buckets: int = 10) -> List[str]:
    """The class of every example that :func:`split_dirichlet` skews over.

    ``key`` is a field name or a function of the example. ``None`` uses the ``task`` field when
    every example has one, else the instruction text. Data without labels (alpaca, flashcards)
    has near-unique instructions; when a key takes more than ``buckets`` distinct values, the
    classes are ``buckets`` stable-hash buckets of it (arbitrary but reproducible groups).
    fingpt-sentiment's few instruction templates stay classes of their own.
    """
    if key is None:
        key = TASK_FIELD if all(TASK_FIELD in ex for ex in examples) else "instruction"
    if isinstance(key, str):
        field = key
        absent = [i for i, ex in enumerate(examples) if field not in ex]
        if absent:
            raise DataError(f"examples {absent[:5]} have no {field!r} field to split on")
        values = [str(ex[field]) for ex in examples]
    elif callable(key):
        values = [str(key(ex)) for ex in examples]
    else:
        raise ParameterError(f"key must be a field name, a function or None, got {key!r}")
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ParameterError(f"buckets must be an int >= 1, got {buckets!r}")
    if len(set(values)) > buckets:
        values = [f"bucket{_stable_bucket(v, buckets)}" for v in values]
    return values


def split_dirichlet(examples: Sequence[Mapping], n_clients: int, alpha: float, seed: int,
                    key: Union[str, Callable, None] = None, buckets: int = 10,
                    max_tries: int = 100) -> List[List[Mapping]]:
    """Non-IID split: each class's examples go to clients in Dirichlet(alpha) proportions.

    Classes come from :func:`dirichlet_labels` (``key``, ``buckets``). Small ``alpha`` gives
    each client few classes, large ``alpha`` tends to IID. As in Hsu et al. (2019) and
    FedLab, a client already holding ``len(examples) / n_clients`` examples gets no more of
    the next class, which keeps sizes from running away. Draws repeat (seeded, so the result
    is deterministic) until every client has an example; after ``max_tries`` it raises.
    """
    _check_split_args(examples, n_clients)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ParameterError(f"alpha must be a finite number > 0, got {alpha!r}")
    labels = dirichlet_labels(examples, key, buckets)
    classes = sorted(set(labels))
    by_class = {c: [i for i, lab in enumerate(labels) if lab == c] for c in classes}
    rng = np.random.default_rng(seed)
    n, cap = len(examples), len(examples) / n_clients
    for _ in range(max_tries):
        parts: List[List[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(by_class[c])
            p = rng.dirichlet([alpha] * n_clients)
            p = p * np.array([len(part) < cap for part in parts])
            if p.sum() == 0:  # every client full: spread the rest evenly
                p = np.ones(n_clients)
            cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(int(i) for i in chunk)
        if min(len(part) for part in parts) > 0:
            shards = []
            for part in parts:
                rng.shuffle(part)
                shards.append([examples[i] for i in part])
            log.debug("dirichlet split (alpha=%s, %d classes): sizes %s", alpha, len(classes),
                      [len(s) for s in shards])
            return shards
    raise DataError(f"split_dirichlet: after {max_tries} draws with alpha={alpha}, some of the "
                    f"{n_clients} clients still got no example ({n} examples, {len(classes)} "
                    "classes); use a larger alpha, fewer clients or more data")


# --------------------------------------------------------------------------
# Tokenisation that keeps the answer
# --------------------------------------------------------------------------


def prompt_tail(ids: Sequence[int], limit: int, bos_token_id: int | None
                ) -> tuple[List[int], int]:
    """The prompt cut from the left to at most `limit` tokens, a leading bos kept, so the
    "### Response:" marker at its end survives. Returns (ids, prompt tokens kept besides bos)."""
    ids = list(ids)
    bos = ids[:1] if bos_token_id is not None and ids and ids[0] == bos_token_id else []
    if len(ids) <= limit:
        return ids, len(ids) - len(bos)
    room = max(limit - len(bos), 0)
    return bos + ids[len(ids) - room:] if room else bos, room


def tokenize_fitting(examples: Sequence[Mapping[str, str]], tokenizer, max_len: int,
                     compact: bool = True, source: str = "data"
                     ) -> tuple[Dict[str, "torch.Tensor"], Dict[str, int]]:
    """Like :func:`fedshield.data.tokenize_examples`, but long examples do not stop the run.

    A sequence is [bos] + prompt + output + eos; the loss covers output + eos only. When it is
    longer than ``max_len``, the prompt loses tokens from its left (after bos), so the
    "### Response:" marker and the whole answer survive. An example whose answer + eos (plus
    bos and at least 8 prompt tokens) cannot fit is skipped: truncating the answer would teach
    the model to stop early. Returns the tensors and ``{"kept", "truncated", "skipped"}``;
    if every example is skipped it raises :class:`fedshield.DataError`.
    """

    from .data import IGNORE_INDEX, format_prompt, pad_rows  # noqa: PLC0415 - no torch at import

    if max_len < 2:
        raise ParameterError(f"max_len must be >= 2, got {max_len}")
    for attr in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, attr, None) is None:
            raise ParameterError(f"tokenizer has no {attr}")
    min_prompt = 8
    rows, label_rows = [], []
    truncated = skipped = 0
    for ex in examples:
        prompt = format_prompt(ex["instruction"], ex.get("input", ""), compact=compact)
        p_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        c_ids = list(tokenizer(ex["output"], add_special_tokens=False)["input_ids"])
        c_ids.append(tokenizer.eos_token_id)
        if len(p_ids) + len(c_ids) > max_len:
            p_ids, kept = prompt_tail(p_ids, max_len - len(c_ids), tokenizer.bos_token_id)
            if kept < min_prompt:
                skipped += 1
                continue
            truncated += 1
        rows.append(p_ids + c_ids)
        label_rows.append([IGNORE_INDEX] * len(p_ids) + c_ids)
    stats = {"kept": len(rows), "truncated": truncated, "skipped": skipped}
    if truncated or skipped:
        log.info("%s: %d examples longer than max_len=%d: %d had their prompt cut from the "
                 "left, %d were skipped (answer too long)", source, truncated + skipped,
                 max_len, truncated, skipped)
    if not rows:
        raise DataError(f"{source}: all {len(examples)} examples have answers too long for "
                        f"max_len={max_len}; raise max_len")
    return pad_rows(rows, label_rows, max_len, tokenizer.pad_token_id), stats
