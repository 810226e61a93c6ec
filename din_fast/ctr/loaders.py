"""Reading behaviour logs into :class:`Interactions`: raw string ids, each
user's behaviours in time order.

Three layouts: a CSV/TSV table or a Parquet file with the columns user, item,
category, timestamp (read by pyarrow, columnar, multi-threaded), and the
Amazon directory layout of the DIN and S3-Rec papers. Ids are any non-empty
token (integers, ASINs, hashes) and stay strings; timestamps are numbers.

Every problem with a file is a DataFormatError that names the file and the
line (CSV/TSV, Amazon), the row (Parquet) or the JSON line, and what was
expected there. pyarrow's own errors do not say which line is wrong, so when
it rejects a table (or a check on its columns fails), a line-by-line pass
over the file finds the first bad line and says what is wrong with it: the
slow path runs only for files that are wrong anyway.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import DataFormatError, snippet

TABLE_COLUMNS = ("user", "item", "category", "timestamp")
AMAZON_ATTRIBUTES_SUFFIX = "_item2attributes.json"
PARQUET_MAGIC = b"PAR1"


@dataclass
class Interactions:
    """Behaviours with raw (string) ids, grouped by user and in time order.

    User ``u`` (raw id ``user_ids[u]``) has the items
    ``items[offsets[u]:offsets[u + 1]]``, oldest first; ``items`` is
    dictionary-encoded (each distinct id stored once). Item
    ``category_items[j]`` has category ``category_values[j]``.

    Args:
        user_ids: [U] string array, the users' raw ids (no repeats).
        offsets: [U + 1] int64, from 0 to len(items), non-decreasing: user
            u's behaviours are items[offsets[u]:offsets[u + 1]].
        items: [N] dictionary-encoded string array, every user's items back
            to back.
        category_items: [M] string array, items with a category (each
            once; every item of ``items`` among them for training data).
        category_values: [M] string array, the category of each.
        source: names the data in messages (its path, or "synthetic").
    """

    user_ids: pa.Array
    offsets: np.ndarray
    items: pa.DictionaryArray
    category_items: pa.Array
    category_values: pa.Array
    source: str


def load_interactions(path) -> Interactions:
    """Read behaviours from any of the three layouts.

    Args:
        path: a directory in the Amazon layout (:func:`load_amazon_directory`),
            a Parquet file (by its PAR1 magic bytes, :func:`load_parquet`) or
            a CSV/TSV file with a header (:func:`load_table`); a str or
            os.PathLike.

    Returns:
        The Interactions, ``source`` the path.

    Raises:
        din_fast.ctr.errors.DataFormatError: the path does not exist, is
            neither a regular file nor a directory, cannot be read, or its
            contents are not behaviours in the layout (naming the line or
            row).
    """
    path = Path(path)
    if path.is_dir():
        return load_amazon_directory(path)
    if path.is_file():
        return load_parquet(path) if is_parquet(path) else load_table(path)
    if not path.exists():
        raise DataFormatError(f"data path {path} does not exist; expected a directory in the "
                              "Amazon layout, a CSV/TSV or a Parquet file")
    raise DataFormatError(f"data path {path} is not a regular file or a directory; expected "
                          "a directory in the Amazon layout, a CSV/TSV or a Parquet file")


def is_parquet(path: Path) -> bool:
    """Whether the file at ``path`` is Parquet, by its leading magic bytes
    (whatever its name says).

    Args:
        path: a regular file.

    Returns:
        True for Parquet, False for anything else (a CSV/TSV table).

    Raises:
        din_fast.ctr.errors.DataFormatError: it cannot be opened.
    """
    with opened(path) as handle:
        return handle.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC


def table_delimiter(path: Path, header_line: str) -> str:
    """A table's delimiter.

    Args:
        path: the CSV/TSV file.
        header_line: its first line.

    Returns:
        A tab for a .tsv file or a header holding one, else a comma.
    """
    return "\t" if path.suffix.lower() == ".tsv" or "\t" in header_line else ","


def header_names(path) -> list:
    """The column names of a CSV/TSV or Parquet file, as written (nothing
    else is read); [] for a directory or a path that is not a readable file
    (load_interactions names what is wrong with it).

    Args:
        path: a data path, a str or os.PathLike.

    Returns:
        [str]: the header's names, untrimmed, in file order.
    """
    path = Path(path)
    try:
        if not path.is_file():
            return []
        if is_parquet(path):
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        line = next(text_lines(path), "")
    except (OSError, UnicodeDecodeError, pa.ArrowInvalid, DataFormatError):
        return []
    return next(csv.reader([line], delimiter=table_delimiter(path, line)), [])


def data_files(path) -> list:
    """The files load_interactions(path) reads, for checking that no output
    overwrites them.

    Args:
        path: a data path, or None (the synthetic set).

    Returns:
        [Path]: the path itself; for a directory the two files of the
        Amazon layout; [] for None.

    Raises:
        din_fast.ctr.errors.DataFormatError: a directory that does not hold
            exactly one ``<Name>_item2attributes.json`` and its
            ``<Name>.txt``.
    """
    if path is None:
        return []
    path = Path(path)
    return list(_amazon_files(path)) if path.is_dir() else [path]


def opened(path: Path):
    """Open a data file for reading, as bytes.

    Args:
        path: the file.

    Returns:
        The open binary file (a context manager).

    Raises:
        din_fast.ctr.errors.DataFormatError: it cannot be opened (missing,
            no permission, a directory), with the system's reason.
    """
    try:
        return open(path, "rb")
    except OSError as error:
        raise DataFormatError(f"{path}: cannot be read ({error.strerror})") from None


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, read lazily (a UTF-8 byte-order mark
    is dropped).

    Args:
        path: the file.

    Yields:
        Each line as a str, its line ending kept.

    Raises:
        din_fast.ctr.errors.DataFormatError: the file cannot be opened, is
            UTF-16 (by its byte-order mark), or a line holds a NUL byte or
            is not UTF-8 (naming the line), raised as iteration reaches it.
    """
    with opened(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                raise DataFormatError(f"{path}: UTF-16 text; expected UTF-8 (convert it, "
                                      "e.g. iconv -f UTF-16 -t UTF-8)")
            if b"\0" in raw:
                raise DataFormatError(f"{path}, line {number}: a NUL byte; expected UTF-8 text")
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataFormatError(f"{path}, line {number}: not UTF-8 text; expected "
                                      "UTF-8 text") from None


# ---------------------------------------------------------------- Amazon layout

def load_amazon_directory(directory) -> Interactions:
    """Read a directory in the Amazon layout of the DIN and S3-Rec papers.

    ``<Name>.txt`` holds ``user item_1 item_2 ...`` per line, oldest first
    (one line per user; blank lines are skipped), and
    ``<Name>_item2attributes.json`` maps each item to its attribute ids,
    the last one being the leaf category, as in the original DIN code.

    Args:
        directory: the directory, a str or os.PathLike.

    Returns:
        The Interactions, users in file order.

    Raises:
        din_fast.ctr.errors.DataFormatError: not exactly one
            ``*_item2attributes.json`` file or no matching ``.txt``, a line
            with a user and no item, a user on two lines, an empty sequences
            file, or an attributes file that is not a JSON object of
            non-empty attribute lists (or lists an item twice with two
            categories); naming the file and line or item.
    """
    directory = Path(directory)
    sequences_file, attributes_file = _amazon_files(directory)
    user_ids, lengths, items = [], [], []
    line_of_user = {}
    for line_number, line in enumerate(text_lines(sequences_file), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 2:
            raise DataFormatError(f"{sequences_file}, line {line_number}: expected "
                                  "'user_id item_1 item_2 ...', got one field")
        # Two lines of one user have no order between them (the layout has no
        # timestamps), so they are refused rather than guessed at.
        first_line = line_of_user.setdefault(tokens[0], line_number)
        if first_line != line_number:
            raise DataFormatError(f"{sequences_file}, line {line_number}: user "
                                  f"{snippet(tokens[0])} already has line {first_line}; "
                                  "expected one line per user")
        user_ids.append(tokens[0])
        items.extend(tokens[1:])
        lengths.append(len(tokens) - 1)
    if not user_ids:
        raise DataFormatError(f"{sequences_file}: empty file; expected one line per user, "
                              "'user_id item_1 item_2 ...'")
    category_items, category_values = _load_leaf_categories(attributes_file)
    return Interactions(pa.array(user_ids, pa.string()),
                        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        pa.array(items, pa.string()).dictionary_encode(), category_items,
                        category_values, str(directory))


def _amazon_files(directory: Path) -> tuple[Path, Path]:
    """(``<Name>.txt``, ``<Name>_item2attributes.json``) of an Amazon-layout directory."""
    attribute_files = sorted(directory.glob("*" + AMAZON_ATTRIBUTES_SUFFIX))
    if len(attribute_files) != 1:
        raise DataFormatError(f"{directory}: expected exactly one "
                              f"'<Name>{AMAZON_ATTRIBUTES_SUFFIX}' file, found "
                              f"{len(attribute_files)}")
    name = attribute_files[0].name[:-len(AMAZON_ATTRIBUTES_SUFFIX)]
    sequences_file = directory / f"{name}.txt"
    if not sequences_file.is_file():
        raise DataFormatError(f"{directory}: found {attribute_files[0].name} but not the "
                              f"sequences file {sequences_file.name}")
    return sequences_file, attribute_files[0]


def _load_leaf_categories(path: Path):
    expected = 'a JSON object {"item_id": [attribute ids, ...]}'
    with opened(path) as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataFormatError(f"{path}, line {line}: not UTF-8 text; expected {expected}") \
            from None
    def unique_categories(pairs):
        """An object's dict; an item listed twice must keep its category (the
        last attribute), or which one the file means is anyone's guess."""
        values = {}
        for key, value in pairs:
            earlier = values.setdefault(key, value)
            if _leaf(earlier) != _leaf(value):
                raise DataFormatError(f"{path}, item {snippet(key)}: listed twice with "
                                      "different categories (last attributes); expected one "
                                      "category per item")
        return values

    try:
        # Numbers stay the tokens they are written as: ids of any length.
        attributes = json.loads(text, parse_int=str, parse_float=str,
                                object_pairs_hook=unique_categories)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}, line {error.lineno}: {error.msg}; expected {expected}") \
            from None
    except RecursionError:
        raise DataFormatError(f"{path}: JSON nested too deeply; expected {expected}") from None
    if not isinstance(attributes, dict) or not attributes:
        raise DataFormatError(f"{path}: expected a non-empty {expected}")
    items, categories = [], []
    for key, values in attributes.items():
        if not isinstance(values, list) or not values or not isinstance(values[-1], str) \
                or not values[-1].strip():
            raise DataFormatError(f"{path}, item {snippet(key)}: expected a non-empty list of "
                                  "attribute ids, the last one the category")
        items.append(key)
        categories.append(values[-1])
    return pa.array(items, pa.string()), pa.array(categories, pa.string())


def _leaf(values):
    """The category of an attribute list (its last id); anything else as it is."""
    return values[-1] if isinstance(values, list) and values else values


# ---------------------------------------------------------------- tables

def load_table(path) -> Interactions:
    """Read a CSV (or TSV: by the .tsv suffix or a tab in the header) whose
    header names the columns user, item, category, timestamp (any case;
    other columns are ignored). Each user's rows are ordered by timestamp,
    ties kept in file order.

    Args:
        path: the UTF-8 file, a str or os.PathLike.

    Returns:
        The Interactions, users in sorted id order.

    Raises:
        din_fast.ctr.errors.DataFormatError: a missing or repeated column,
            no data row, a line pyarrow cannot parse (quoting, a wrong
            number of fields), an empty id, a timestamp that is not a
            finite number, an item with two categories, or text that is not
            UTF-8; naming the first bad line.
    """
    path = Path(path)
    header_line = next(text_lines(path), "")
    delimiter = table_delimiter(path, header_line)
    header = table_header(header_line, path, delimiter)
    try:
        # Timestamps as numbers first (the fast path); pyarrow's number parser
        # rejects " 5", which Python's accepts, so a failure retries with them
        # as text, trimmed and converted afterwards.
        try:
            table = _read_table(path, header, delimiter, pa.float64())
        except pa.ArrowInvalid:
            table = _read_table(path, header, delimiter, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
        raise _first_bad_line(path, delimiter, header) or DataFormatError(
            f"{path}: not a {'TSV' if delimiter == chr(9) else 'CSV'} table pyarrow can read "
            f"({type(error).__name__}); expected the columns {','.join(TABLE_COLUMNS)}") \
            from None
    try:
        return _interactions_from_table(table, path)
    except BadRow as bad:
        raise _first_bad_line(path, delimiter, header) or bad.error(path, "data row") from None


def _read_table(path: Path, header: list, delimiter: str, timestamp_type) -> pa.Table:
    import pyarrow.csv as pacsv

    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=header, skip_rows=1,
                                       block_size=TABLE_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(
            include_columns=list(TABLE_COLUMNS),
            column_types={"user": pa.string(), "item": pa.string(), "category": pa.string(),
                          "timestamp": timestamp_type}))


# A row longer than a block is an error in pyarrow; 16 MB keeps any sane row.
TABLE_BLOCK_BYTES = 16 << 20


def table_header(line: str, path: Path, delimiter: str, required=TABLE_COLUMNS, optional=(),
                 options=None) -> list:
    """The header's column names, as pyarrow is to read them.

    Args:
        line: the file's first line.
        path: the file, named in errors.
        delimiter: "," or a tab.
        required: the columns that must be present (lower case).
        optional: columns read where present.
        options: {column: the option that named it}, quoted in the error
            for a missing one (labeled logs: "--label-column", ...); None.

    Returns:
        The names, trimmed and lower case; those not among ``required`` and
        ``optional`` renamed ``_ignored_<i>`` (pyarrow needs names).

    Raises:
        din_fast.ctr.errors.DataFormatError: naming line 1, for an empty
            line, a header the csv module cannot parse, a required column
            missing, or a required or optional column named twice.
    """
    expected = ",".join(required)
    if not line.strip():
        raise DataFormatError(f"{path}, line 1: empty file; expected a header naming the "
                              f"columns {expected}")
    try:
        header = [name.strip().lower() for name in next(csv.reader([line], delimiter=delimiter,
                                                                     strict=True))]
    except csv.Error as error:
        raise DataFormatError(f"{path}, line 1: {error}; expected a header naming the columns "
                              f"{expected}") from None
    missing = [c for c in required if c not in header]
    if missing and options:
        named = [f"{c!r} ({options[c]})" if c in options else repr(c) for c in missing]
        raise DataFormatError(f"{path}, line 1: the header has no column {', '.join(named)}; "
                              f"its columns are {','.join(header)}")
    if missing:
        raise DataFormatError(f"{path}, line 1: header is missing column(s) {missing}; "
                              f"expected the columns {list(required)}")
    used = tuple(required) + tuple(optional)
    repeated = sorted({c for c in used if header.count(c) > 1})
    if repeated:
        raise DataFormatError(f"{path}, line 1: column(s) {repeated} named more than once")
    # Unnamed or repeated other columns are ignored, but pyarrow needs names.
    return [name if name in used else f"_ignored_{i}" for i, name in enumerate(header)]


class BadRow(Exception):
    """A row that fails a check on the parsed columns; :meth:`error` turns
    it into the DataFormatError a user sees.

    Args:
        row: the 0-based row; None when the check cannot tell which.
        problem: what is wrong, the message's end.
        column: the column, where one is named; else None.
    """

    def __init__(self, row: Optional[int], problem: str, column: Optional[str] = None):
        super().__init__(problem)
        self.row, self.problem, self.column = row, problem, column

    def error(self, path: Path, unit: str = "row", number: Optional[int] = None) \
            -> DataFormatError:
        """The error a user sees.

        Args:
            path: the file, named first.
            unit: what a row is called there ("row" in Parquet, "data row").
            number: the row's number as shown; None: ``row + 1`` (no number
                where the row is unknown).

        Returns:
            A DataFormatError "<path>, <unit> <number>, column <column>:
            <problem>" (the parts that are known).
        """
        number = self.row + 1 if number is None and self.row is not None else number
        where = str(path) if number is None else f"{path}, {unit} {number}"
        if self.column:
            where += f", column {self.column}"
        return DataFormatError(f"{where}: {self.problem}")


def first_index(mask) -> Optional[int]:
    """The index of the first True of ``mask``.

    Args:
        mask: a 1-D bool array-like (a pyarrow array included).

    Returns:
        The int index, or None when there is no True.
    """
    indices = np.flatnonzero(np.asarray(mask))
    return int(indices[0]) if len(indices) else None


def encoded_ids(column, name: str) -> pa.DictionaryArray:
    """A column of ids, dictionary-encoded with surrounding spaces dropped
    (" a" and "a" are one id). The checks and the trimming run on the
    distinct values only.

    Args:
        column: a string pyarrow Array or ChunkedArray.
        name: the column's name, for the messages ("user", "item").

    Returns:
        A pyarrow DictionaryArray of the trimmed ids.

    Raises:
        BadRow: at the first empty id or id holding a NUL byte (not a
            ValueError: the caller turns it into a DataFormatError naming
            the line).
    """
    encoded = column.combine_chunks().dictionary_encode()
    values = pc.utf8_trim_whitespace(encoded.dictionary)
    for bad_values, problem in (
            (pc.equal(pc.utf8_length(values), 0), f"empty {name} id; expected a non-empty token"),
            # Valid UTF-8, but the mark of a binary or UTF-16 file.
            (pc.match_substring(values, "\0"), f"a NUL byte in a {name} id; expected UTF-8 text")):
        bad_values = bad_values.to_numpy(zero_copy_only=False)
        if bad_values.any():
            raise BadRow(first_index(bad_values[encoded.indices.to_numpy()]), problem)
    if values.equals(encoded.dictionary):
        return encoded
    merged = values.dictionary_encode()       # " a" and "a" are one id
    return pa.DictionaryArray.from_arrays(merged.indices.take(encoded.indices),
                                          merged.dictionary)


def _interactions_from_table(table: pa.Table, path: Path) -> Interactions:
    """Interactions of a table with string columns user, item, category and a
    string or float64 timestamp; BadRow for an empty id, a timestamp that is
    not a finite number, or an item with two categories."""
    if table.num_rows == 0:
        raise DataFormatError(f"{path}: no data rows after the header; expected one row per "
                              "behaviour")
    columns = {name: encoded_ids(table[name], name) for name in TABLE_COLUMNS[:3]}
    timestamps = table["timestamp"].combine_chunks()
    if pa.types.is_string(timestamps.type):
        try:
            timestamps = pc.utf8_trim_whitespace(timestamps).cast(pa.float64())
        except pa.ArrowInvalid:
            raise BadRow(None, "a timestamp that is not a number") from None
    bad = first_index(pc.invert(pc.fill_null(pc.is_finite(timestamps), False)))
    if bad is not None:
        raise BadRow(bad, "expected a finite numeric timestamp")
    item_codes = columns["item"].indices.to_numpy()
    category_codes = columns["category"].indices.to_numpy()
    # Each item's category is the one of its first row; any other row disagreeing is an error.
    _, first_row = np.unique(item_codes, return_index=True)
    first_category = np.empty(len(columns["item"].dictionary), dtype=category_codes.dtype)
    first_category[item_codes[first_row]] = category_codes[first_row]
    bad = first_index(category_codes != first_category[item_codes])
    if bad is not None:
        raise BadRow(bad, "the item has another category on an earlier row; expected one "
                      "category per item")
    user_dictionary = columns["user"].dictionary
    user_order = pc.sort_indices(user_dictionary)
    user_rank = np.empty(len(user_dictionary), dtype=np.int64)
    user_rank[user_order.to_numpy()] = np.arange(len(user_dictionary))
    users = user_rank[columns["user"].indices.to_numpy()]
    # Group by user (in id order), then time; pyarrow's sort is stable, which
    # keeps ties in file order.
    order = pc.sort_indices(pa.table({"user": users, "timestamp": timestamps}),
                            sort_keys=[("user", "ascending"), ("timestamp", "ascending")])
    order = order.to_numpy()
    users = users[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    return Interactions(
        user_dictionary.take(user_order),
        np.append(starts, len(order)).astype(np.int64),
        pa.DictionaryArray.from_arrays(pa.array(item_codes[order]), columns["item"].dictionary),
        columns["item"].dictionary,
        columns["category"].dictionary.take(pa.array(first_category)),
        str(path))


def table_rows(path: Path, delimiter: str, header: list) -> Iterator[tuple]:
    """The data lines of a table file, parsed one by one (the slow path,
    for finding the line pyarrow rejected).

    Args:
        path: the table file.
        delimiter: "," or a tab.
        header: the column names of :func:`table_header`.

    Yields:
        (line number, {column: field}) for every non-empty data line.

    Raises:
        din_fast.ctr.errors.DataFormatError: at the first line the csv
            module cannot parse either (a quoting error) or with a wrong
            number of fields, or that is not UTF-8 text.
    """
    lines = text_lines(path)
    next(lines, None)
    columns = ",".join(n for n in header if not n.startswith("_ignored_"))
    for number, line in enumerate(lines, start=2):
        where = f"{path}, line {number}"
        if not line.rstrip("\r\n"):
            continue                                   # pyarrow skips empty lines too
        try:
            fields = next(csv.reader([line], delimiter=delimiter, strict=True))
        except csv.Error as error:
            raise DataFormatError(f"{where}: {error}; expected {len(header)} "
                                  f"{delimiter!r}-separated fields on one line") from None
        if len(fields) != len(header):
            raise DataFormatError(f"{where}: expected {len(header)} fields ({columns}, ...), "
                                  f"got {len(fields)}")
        yield number, dict(zip(header, fields))


def first_bad_line(path: Path, delimiter: str, header: list) -> Optional[DataFormatError]:
    """The error of the first line of a table file that cannot be parsed.

    Args:
        path: the table file.
        delimiter: "," or a tab.
        header: the column names of :func:`table_header`.

    Returns:
        The DataFormatError :func:`table_rows` raises there, or None when
        every line parses.
    """
    try:
        for _ in table_rows(path, delimiter, header):
            pass
    except DataFormatError as error:
        return error
    return None


def _first_bad_line(path: Path, delimiter: str, header: list) -> Optional[DataFormatError]:
    """The DataFormatError of the first bad line of a behaviour table (the
    checks of pyarrow's parse and of _interactions_from_table, line by
    line), or None when every line passes."""
    first_category = {}
    try:
        for number, row in table_rows(path, delimiter, header):
            where = f"{path}, line {number}"
            for name in TABLE_COLUMNS[:3]:
                if not row[name].strip():
                    return DataFormatError(f"{where}: empty {name} id; expected a non-empty "
                                           "token")
            try:
                timestamp = float(row["timestamp"])
            except ValueError:
                timestamp = math.nan
            if not math.isfinite(timestamp):
                return DataFormatError(f"{where}: expected a finite numeric timestamp, got "
                                       f"{snippet(row['timestamp'])}")
            item, category = row["item"].strip(), row["category"].strip()
            seen = first_category.setdefault(item, (category, number))
            if seen[0] != category:
                return DataFormatError(f"{where}: item {snippet(item)} has category "
                                       f"{snippet(category)}, but {snippet(seen[0])} on line "
                                       f"{seen[1]}; expected one category per item")
    except DataFormatError as error:
        return error
    return None


def load_parquet(path) -> Interactions:
    """Read a Parquet file with the columns user, item, category (any type
    castable to string; ids are their string form) and timestamp (numbers
    or a timestamp type); names compare in any case. Each user's rows are
    ordered by timestamp, ties kept in file order.

    Args:
        path: the file, a str or os.PathLike.

    Returns:
        The Interactions, users in sorted id order.

    Raises:
        din_fast.ctr.errors.DataFormatError: not a Parquet file pyarrow can
            read or a damaged one, a missing or repeated column, a column of
            a type that does not convert (a bool timestamp, say), a null,
            an empty id, a timestamp that is not finite, or an item with two
            categories; naming the row where there is one.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataFormatError(f"{path}: not a Parquet file pyarrow can read "
                              f"({type(error).__name__})") from None
    names = {name.strip().lower(): name for name in schema.names}
    missing = [c for c in TABLE_COLUMNS if c not in names]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {missing}; expected the columns "
                              f"{list(TABLE_COLUMNS)}")
    # Names compare as in a CSV header (any case, spaces trimmed): "user" and
    # "User" both present would leave it to chance which one is read.
    repeated = sorted({c for c in TABLE_COLUMNS
                       if sum(name.strip().lower() == c for name in schema.names) > 1})
    if repeated:
        raise DataFormatError(f"{path}: column(s) {repeated} named more than once (names "
                              "compare in any case)")
    try:
        table = pq.read_table(path, columns=[names[c] for c in TABLE_COLUMNS])
    except (pa.ArrowInvalid, OSError) as error:
        raise DataFormatError(f"{path}: a damaged Parquet file ({type(error).__name__})") \
            from None
    table = table.rename_columns(list(TABLE_COLUMNS))
    columns = []
    for name in TABLE_COLUMNS:
        column = table[name]
        if name == "timestamp" and pa.types.is_boolean(column.type):
            raise DataFormatError(f"{path}: column timestamp has type bool; expected numbers "
                                  "or a timestamp type")
        try:
            column = as_float64(column) if name == "timestamp" else column.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataFormatError(f"{path}: column {name} has type {column.type}; expected "
                                  f"{'numbers' if name == 'timestamp' else 'ids'}") from None
        bad = first_index(column.is_null().combine_chunks())
        if bad is not None:
            raise DataFormatError(f"{path}, row {bad + 1}: {name} is null; expected a value")
        columns.append(column)
    try:
        return _interactions_from_table(pa.table(columns, names=list(TABLE_COLUMNS)), path)
    except BadRow as bad:
        raise bad.error(path) from None


def as_float64(column: pa.Array) -> pa.Array:
    """A Parquet column of numbers as float64, a timestamp type as its integer
    value. Integers are cast unsafely: float64 holds them exactly up to 2**53
    only, and nanoseconds since 1970 (pandas' datetimes) are beyond; rounded
    to the nearest float64 they keep their order, all a timestamp gives.
    Other types are cast safely.

    Args:
        column: a pyarrow array (or chunked array) read from Parquet.

    Returns:
        The column as float64.

    Raises:
        pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError: a type or a
            value that does not convert (strings that are no numbers).
    """
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.int64())
    return column.cast(pa.float64(), safe=not pa.types.is_integer(column.type))


# ---------------------------------------------------------------- synthetic data

def synthetic_interactions(num_users: int = 2000, num_categories: int = 40,
                           items_per_category: int = 25, interests_per_user: int = 6,
                           min_length: int = 8, max_length: int = 30,
                           seed: int = 0) -> Interactions:
    """A seeded dataset where the next click depends on the history items related
    to it, which is what DIN's attention is for.

    Each user has a few interest categories and, in each, a favourite spot on
    that category's ring of items. Every behaviour picks one interest and an
    item close to that interest's spot. So the target is predicted by the
    user's earlier items of the same category (and their positions), while the
    other interests in the history are noise: attention can pick the related
    items out, sum pooling has to see them blurred with all the rest.
    Ids are the strings of integers from 1.

    Args:
        num_users: the users.
        num_categories: the categories, each with its own items.
        items_per_category: the items of each category, on a ring (so
            num_categories * items_per_category items).
        interests_per_user: the categories each user draws from (at most
            ``num_categories``).
        min_length: the fewest behaviours of a user.
        max_length: the most (>= min_length).
        seed: seeds everything; the same arguments give the same data.

    Returns:
        The Interactions, ``source`` "synthetic".
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_length, max_length + 1, size=num_users)
    interests = np.stack([rng.choice(num_categories, interests_per_user, replace=False)
                          for _ in range(num_users)])
    spots = rng.integers(0, items_per_category, size=(num_users, interests_per_user))
    user_of = np.repeat(np.arange(num_users), lengths)
    which = rng.integers(0, interests_per_user, size=len(user_of))
    category = interests[user_of, which]
    offset = rng.integers(-1, 2, size=len(user_of))           # the spot or a neighbour
    position = (spots[user_of, which] + offset) % items_per_category
    items = category * items_per_category + position + 1      # raw ids from 1
    all_items = np.arange(1, num_categories * items_per_category + 1, dtype=np.int64)
    as_strings = lambda ids: pa.array(ids).cast(pa.string())
    return Interactions(as_strings(np.arange(1, num_users + 1)),
                        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        as_strings(items).dictionary_encode(), as_strings(all_items),
                        as_strings((all_items - 1) // items_per_category + 1), "synthetic")
