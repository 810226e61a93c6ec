"""Reading labeled impression logs: one row per shown item with its 0/1 label.

A log is a CSV/TSV table (a header names the columns, in any order and case)
or a Parquet file with the columns user, item, timestamp and the label
column, optionally category, and the side features a run names: categorical
ones (any side: user, item, context), whose cell may hold several values
separated by ``|`` (multi-valued, as MovieLens genres), and numeric ones.
Other columns are ignored.

Every problem is a DataFormatError naming the file, the line (the row of a
Parquet file) and the column, and what was expected there. pyarrow reads the
columns (typed first; as text when a cell does not parse, so that the check
of that column finds the row); a row index becomes a line number by counting
the file's non-empty lines, which is all pyarrow skips. The slow passes run
only for files that are wrong anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import DataFormatError, InputError, snippet
from .loaders import (TABLE_BLOCK_BYTES, BadRow, as_float64, encoded_ids, first_bad_line,
                      first_index, is_parquet, table_delimiter, table_header, text_lines)

SEPARATOR = "|"                        # between the values of a multi-valued feature
ID_COLUMNS = ("user", "item", "category")
RESERVED_COLUMNS = ("user", "item", "category", "timestamp")


@dataclass(frozen=True)
class LogColumns:
    """The columns of a labeled log a run reads: the label, and the
    categorical and numeric side features. Names match the header's in any
    case (:func:`header_name`); a side feature keeps the name it is given, which
    the log's ``features`` and ``numeric``, the id maps, the model and
    predict's requests all call it by, as the run's config records it.
    ``checkpoint``: None where the command's options name the columns
    (train), else the checkpoint whose model reads them (evaluate, predict),
    which the message about a missing column names instead of an option."""

    label: str = "label"
    features: tuple = ()
    numeric: tuple = ()
    checkpoint: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "label", header_name(self.label))
        named = [("--label-column", self.label)] + [("--features", f) for f in self.features] \
            + [("--numeric-features", f) for f in self.numeric]
        seen = {}
        for option, name in named:
            name = header_name(name)
            if not name:
                raise InputError(f"{option}: an empty column name; expected column names "
                                 "separated by commas")
            if name in RESERVED_COLUMNS:
                raise InputError(f"{option}: {name!r} is one of the log's own columns "
                                 f"{RESERVED_COLUMNS}; name another column")
            if name in seen:
                raise InputError(f"{option}: column {name!r} is named twice (also by "
                                 f"{seen[name]}); each column has one role")
            seen[name] = option

    @property
    def required(self) -> tuple:
        """The header names (lower case) of the columns a log must have."""
        return ("user", "item", "timestamp", self.label) \
            + tuple(map(header_name, self.features + self.numeric))


def header_name(name: str) -> str:
    """The header name a column option means: trimmed, lower case (headers
    compare in any case)."""
    return name.strip().lower()


@dataclass
class LabeledLog:
    """A labeled log's rows ordered by timestamp (ties in file order), ids as
    strings. ``categories`` is None for a log without a category column;
    ``features`` holds each categorical feature as lists of strings (one
    list per row, empty where the cell is), ``numeric`` each numeric one."""

    users: pa.DictionaryArray
    items: pa.DictionaryArray
    categories: Optional[pa.DictionaryArray]
    timestamps: np.ndarray
    labels: np.ndarray
    features: dict = field(default_factory=dict)
    numeric: dict = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)


def load_labeled_log(path, columns: LogColumns) -> LabeledLog:
    """A labeled log in a CSV/TSV or Parquet file (see the module's docstring)."""
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(f"data path {path} is a directory; a labeled log is a CSV/TSV or "
                              f"Parquet file with the columns user,item,timestamp,"
                              f"{columns.label} (the Amazon layout has no labels)")
    if not path.exists():
        raise DataFormatError(f"data path {path} does not exist; expected a CSV/TSV or Parquet "
                              "file")
    if not path.is_file():
        raise DataFormatError(f"data path {path} is not a regular file; expected a CSV/TSV or "
                              "Parquet file")
    return _load_parquet(path, columns) if is_parquet(path) else _load_table(path, columns)


# ---------------------------------------------------------------- CSV / TSV

def _load_table(path: Path, columns: LogColumns) -> LabeledLog:
    header_line = next(text_lines(path), "")
    delimiter = table_delimiter(path, header_line)
    header = table_header(header_line, path, delimiter, columns.required,
                          optional=("category",), options=_options(columns))
    wanted = [name for name in header if not name.startswith("_ignored_")]
    try:
        try:
            table = _read_csv(path, header, wanted, delimiter, typed=columns)
        except pa.ArrowInvalid:
            # A cell that does not parse as its column's type: read every
            # column as text, and the column's own check finds the row.
            table = _read_csv(path, header, wanted, delimiter, typed=None)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
        raise first_bad_line(path, delimiter, header) or DataFormatError(
            f"{path}: not a {'TSV' if delimiter == chr(9) else 'CSV'} table pyarrow can read "
            f"({type(error).__name__})") from None
    try:
        return _log_of_table(table, columns, str(path))
    except BadRow as bad:
        raise bad.error(path, "line", _line_of_row(path, bad.row)) from None


def _options(columns: LogColumns) -> dict:
    """What names each column, for messages about a missing one: the option
    that named it, or the checkpoint trained with it and its columns (which
    evaluate and predict take from it: they have no option to change)."""
    if columns.checkpoint is None:
        roles = ("--label-column", "--features", "--numeric-features")
    else:
        trained = ", ".join((columns.label,) + columns.features + columns.numeric)
        where = (f"checkpoint {columns.checkpoint} was trained with the columns {trained}, "
                 "which --data must hold")
        roles = tuple(f"{role}: {where}" for role in ("the label column", "a side feature",
                                                     "a numeric feature"))
    return {columns.label: roles[0], **{header_name(f): roles[1] for f in columns.features},
            **{header_name(f): roles[2] for f in columns.numeric}}


def _read_csv(path: Path, header: list, wanted: list, delimiter: str, typed) -> pa.Table:
    import pyarrow.csv as pacsv

    types = {name: pa.string() for name in wanted}
    if typed is not None:
        numbers = ("timestamp", typed.label) + tuple(map(header_name, typed.numeric))
        types.update({name: pa.float64() for name in numbers})
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=header, skip_rows=1,
                                       block_size=TABLE_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        # Only a truly empty cell is missing: pyarrow's default null values
        # (NA, null, N/A, NaN ...) would make a label "NA" an empty cell
        # instead of the value it is.
        convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types=types,
                                             null_values=[""], strings_can_be_null=False))


def _line_of_row(path: Path, row: Optional[int]) -> Optional[int]:
    """The line number of data row ``row`` (0-based) of a table file: the
    row-th non-empty line after the header (pyarrow skips empty lines)."""
    if row is None:
        return None
    lines = text_lines(path)
    next(lines, None)
    seen = -1
    for number, line in enumerate(lines, start=2):
        if line.rstrip("\r\n"):
            seen += 1
            if seen == row:
                return number
    return None


# ---------------------------------------------------------------- Parquet

def _load_parquet(path: Path, columns: LogColumns) -> LabeledLog:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataFormatError(f"{path}: not a Parquet file pyarrow can read "
                              f"({type(error).__name__})") from None
    names = {}
    for name in schema.names:
        key = name.strip().lower()
        if key in names and key in columns.required + ("category",):
            raise DataFormatError(f"{path}: column {key!r} named more than once (names compare "
                                  "in any case)")
        names.setdefault(key, name)
    options = _options(columns)
    missing = [c for c in columns.required if c not in names]
    if missing:
        raise DataFormatError(f"{path}: no column {missing[0]!r}"
                              f"{' (' + options[missing[0]] + ')' if missing[0] in options else ''}"
                              f"; the file has {', '.join(sorted(names))}")
    wanted = [c for c in columns.required + ("category",) if c in names]
    try:
        table = pq.read_table(path, columns=[names[c] for c in wanted])
    except (pa.ArrowInvalid, OSError) as error:
        raise DataFormatError(f"{path}: a damaged Parquet file ({type(error).__name__})") \
            from None
    table = table.rename_columns(wanted)
    converted = {}
    for name in wanted:
        column = table[name].combine_chunks()
        kind = _kind(name, columns)
        try:
            converted[name] = _parquet_column(column, kind, bools=name == columns.label)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError):
            raise DataFormatError(f"{path}, column {name}: has type {column.type}; expected "
                                  f"{_EXPECTED_TYPE[kind]}") from None
        bad = first_index(converted[name].is_null())
        if bad is not None:
            raise DataFormatError(f"{path}, row {bad + 1}, column {name}: null; expected a value")
    try:
        return _log_of_table(pa.table(converted), columns, str(path))
    except BadRow as bad:
        raise bad.error(path, "row", None if bad.row is None else bad.row + 1) from None


_EXPECTED_TYPE = {"id": "ids (strings or integers)", "number": "numbers",
                  "values": "ids or lists of ids"}


def _kind(name: str, columns: LogColumns) -> str:
    if name in ("timestamp", columns.label) or name in map(header_name, columns.numeric):
        return "number"
    return "values" if name in map(header_name, columns.features) else "id"


def _parquet_column(column: pa.Array, kind: str, bools: bool) -> pa.Array:
    """A Parquet column as the CSV path reads it: ids and values as strings
    (a list column of a feature joined with the separator), numbers as
    float64 (timestamp types as their integer value, integers beyond 2**53
    rounded; booleans only where ``bools``: a label)."""
    if kind == "number":
        if not (pa.types.is_timestamp(column.type) or pa.types.is_integer(column.type)
                or pa.types.is_floating(column.type)
                or (bools and pa.types.is_boolean(column.type))):
            raise TypeError(column.type)
        return as_float64(column)
    if pa.types.is_boolean(column.type) or pa.types.is_floating(column.type):
        raise TypeError(column.type)         # 1.0 or True as an id: no one meant that
    if kind == "values" and (pa.types.is_list(column.type)
                             or pa.types.is_large_list(column.type)):
        values = column.values
        if pa.types.is_boolean(values.type) or pa.types.is_floating(values.type):
            raise TypeError(column.type)
        strings = pa.ListArray.from_arrays(column.offsets, values.cast(pa.string()),
                                           mask=column.is_null())
        return pc.binary_join(strings, SEPARATOR)
    return column.cast(pa.string())


# ---------------------------------------------------------------- checks and the log

def _log_of_table(table: pa.Table, columns: LogColumns, source: str) -> LabeledLog:
    """The log of a table whose ids and features are strings and whose
    numbers are float64 or strings (a CSV read as text); BadRow at the first
    cell that fails its column's check."""
    if table.num_rows == 0:
        raise DataFormatError(f"{source}: no data rows after the header; expected one row per "
                              "impression")
    # Where train's options name the columns, a multi-valued one can be a feature.
    hint = " (a multi-valued column goes in --features)" if columns.checkpoint is None else ""
    ids = {name: _id_column(table[name], name, hint) for name in ID_COLUMNS
           if name in table.column_names}
    timestamps = _numbers(table["timestamp"], "timestamp", "a finite numeric timestamp")
    labels = _numbers(table[columns.label], columns.label, "a label, 0 or 1")
    bad = first_index((labels != 0) & (labels != 1))
    if bad is not None:
        raise BadRow(bad, f"label {labels[bad]:g} is not 0 or 1; expected a 0/1 label",
                     columns.label)
    if "category" in ids:
        _check_one_category(ids["item"], ids["category"])
    # Keyed by the names the run gives them, read from the header's.
    numeric = {name: _numbers(table[header_name(name)], header_name(name), "a finite number")
               for name in columns.numeric}
    features = {name: _feature_values(table[header_name(name)], header_name(name), source)
                for name in columns.features}
    # Time order, ties in file order (a stable sort).
    order = np.argsort(timestamps, kind="stable")
    take = pa.array(order)
    return LabeledLog(
        ids["user"].take(take), ids["item"].take(take),
        ids["category"].take(take) if "category" in ids else None,
        timestamps[order], labels[order].astype(np.float32),
        {name: values.take(take) for name, values in features.items()},
        {name: values[order] for name, values in numeric.items()}, source)


def _id_column(column, name: str, hint: str) -> pa.DictionaryArray:
    """encoded_ids, and no multi-valued separator: one id per cell (``hint``
    ends the message about a separator)."""
    try:
        encoded = encoded_ids(column, name)
    except BadRow as bad:
        raise BadRow(bad.row, bad.problem, name) from None
    has_separator = pc.match_substring(encoded.dictionary, SEPARATOR).to_numpy(
        zero_copy_only=False)
    if has_separator.any():
        row = first_index(has_separator[encoded.indices.to_numpy()])
        raise BadRow(row, f"{name} id {snippet(encoded[row].as_py())} holds {SEPARATOR!r}, the "
                     f"separator of multi-valued features; expected one id{hint}", name)
    return encoded


def _numbers(column, name: str, expected: str) -> np.ndarray:
    """A column as finite float64 values; BadRow at the first that is not one."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_string(column.type):
        trimmed = pc.utf8_trim_whitespace(column)
        try:
            column = trimmed.cast(pa.float64())
        except pa.ArrowInvalid:
            for row, text in enumerate(trimmed.to_pylist()):
                try:
                    float(text)
                except ValueError:
                    raise BadRow(row, f"{snippet(text)} is not a number; expected {expected}",
                                 name) from None
    values = column.to_numpy(zero_copy_only=False)
    bad = first_index(~np.isfinite(values))
    if bad is not None:
        got = "an empty cell" if column.is_null()[bad].as_py() else f"{values[bad]}"
        raise BadRow(bad, f"{got}; expected {expected}", name)
    return values


def _check_one_category(items: pa.DictionaryArray, categories: pa.DictionaryArray) -> None:
    item_codes = items.indices.to_numpy()
    category_codes = categories.indices.to_numpy()
    _, first_row = np.unique(item_codes, return_index=True)
    first_category = np.empty(len(items.dictionary), dtype=category_codes.dtype)
    first_category[item_codes[first_row]] = category_codes[first_row]
    bad = first_index(category_codes != first_category[item_codes])
    if bad is not None:
        raise BadRow(bad, f"item {snippet(items[bad].as_py())} has category "
                     f"{snippet(categories[bad].as_py())} here and "
                     f"{snippet(categories.dictionary[int(first_category[item_codes[bad]])].as_py())}"
                     " on an earlier row; expected one category per item", "category")


def _feature_values(column, name: str, source: str) -> pa.ListArray:
    """A feature column as a list of values per row: the cell split at the
    separator, each value trimmed, empty values dropped (an empty cell has
    none). An empty column, or a value holding a NUL byte, is an error."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lists = pc.split_pattern(column, SEPARATOR)
    values = pc.utf8_trim_whitespace(lists.flatten())
    keep = pc.greater(pc.utf8_length(values), 0)
    if not pc.any(keep).as_py():
        raise DataFormatError(f"{source}, column {name}: empty on every row; expected feature "
                              f"values (several in a cell separated by {SEPARATOR!r})")
    row_of_value = np.repeat(np.arange(len(lists)), np.diff(lists.offsets.to_numpy()))
    nul = pc.match_substring(values, "\0").to_numpy(zero_copy_only=False)
    if nul.any():
        raise BadRow(int(row_of_value[np.flatnonzero(nul)[0]]),
                     "a NUL byte in a value; expected UTF-8 text", name)
    keep = keep.to_numpy(zero_copy_only=False)
    counts = np.bincount(row_of_value[keep], minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(pa.array(keep)))
