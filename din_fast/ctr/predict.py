"""Scoring new rows with a checkpoint: ``din-fast predict``.

A request is one JSON object per line:

    {"user": "u42", "candidates": ["B00004Y2UT", "B0000530HU"]}
    {"history": ["B000052YM0", "B00004TMFE"], "candidates": ["B0000530HU"], "request": "r7"}

    {"user": "u7", "candidates": ["12", "40"], "features": {"hour": 21, "genres": ["Drama", "Comedy|Crime"]}}

``user`` takes the user's behaviours from ``--data`` as the history (all of
them, or of a labeled log the user's label-1 rows; the most recent
``max_len`` kept, as training did); ``history`` gives the items explicitly,
oldest first. A model trained with side features takes each of them in
``features``: one value for every candidate (a multi-valued one with its
values separated by ``|``, as in the data), or a list of one value per
candidate; numeric features as numbers. Each request gets one score per
candidate: the model's click probability. The history is read once per
request for all of its candidates (the models' many-candidates path, a 3-D
attention query).

A model of a labeled log, or of the DIN protocol trained with rare ids
sharing a row (``--min-count`` above 1), has a reserved id for what its
training data held seldom or never: such candidates, history items and
feature values take it (candidates are scored, with the note ``unknown
item``), and keep their category where the checkpoint (a rare item's) or
``--data`` tells it. A model of the DIN protocol without it maps nothing
unknown to anything: an unknown candidate gets no score (``unknown item``)
and unknown history items are skipped and counted. An unknown user gets no
score for any of its candidates (``unknown user``).

New impressions legitimately hold new ids, so the requests are never
refused for them. ``--data`` is: behaviours or a labeled log the
checkpoint was not trained on are refused (din_fast.ctr.foreign_data). A
labeled log given as ``--data`` may be the training log or one that goes on
after it: only its earliest rows, those the checkpoint's time split puts in
training, must be known to the checkpoint; its later rows' new users, items
and feature values take the reserved id.
"""

from __future__ import annotations

import csv
import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .checkpoint import restored_model
from .data import EncodedData, IdMaps, dense_ids
from .errors import DataFormatError, InputError
from .files import check_outputs, open_replacing
from .foreign_data import MAX_UNKNOWN, check_behaviours, check_log
from .labeled_loader import load_labeled_log
from .labeled_samples import encode_log
from .loaders import data_files, load_interactions, text_lines
from .rare_ids import encode_for
from .serving import Encoder
from .training import checkpoint_for_run, log_columns, log_split

# A batch holds requests x (most candidates of one of them) scores: at most this many.
CANDIDATES_PER_BATCH = 1 << 16
OUTPUT_FORMATS = ("csv", "jsonl")


@dataclass
class Request:
    """One request of a requests file, as :func:`read_requests` read it (ids
    as strings, numbers as written).

    Args:
        line: its line in the file, from 1.
        name: its "request" field (a non-string one as JSON), else the line
            number as a str.
        user: the user whose history --data holds; None with ``history``.
        history: the raw item ids, oldest first; None with ``user``.
        candidates: the raw item ids to score, at least one.
        features: {column: a value, or a list of one value per candidate}
            for a model with side features; {} without.
    """

    line: int
    name: str                       # "request" from the file, else the line number
    user: Optional[str]
    history: Optional[list]
    candidates: list
    features: dict                  # column -> a value or a list of one per candidate


@dataclass
class Counts:
    """What the requests held that the checkpoint (or the data) does not know;
    ``unknown_scored``: whether unknown candidates were scored (a labeled
    log's model, with its reserved id) or left without a score.

    Args:
        requests: the requests scored.
        scores: the scores written (candidates without one are not counted).
        unknown_candidates: candidates the checkpoint does not know (of
            requests whose history is known).
        unknown_users: requests naming a user the data lacks (none of their
            candidates scored).
        skipped_history_items: unknown history items left out (DIN
            protocol).
        unknown_history_items: unknown history items scored as the
            reserved id (labeled logs).
        unknown_feature_values: side-feature values scored as the reserved
            id.
        unknown_scored: whether unknown candidates are scored.
    """

    requests: int = 0
    scores: int = 0
    unknown_candidates: int = 0
    unknown_users: int = 0
    skipped_history_items: int = 0
    unknown_history_items: int = 0
    unknown_feature_values: int = 0
    unknown_scored: bool = False


def _token(value) -> Optional[str]:
    """An id as JSON gives it (parse_int/parse_float keep numbers as written)."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def read_requests(path) -> list:
    """Read a requests file: one JSON object per line (blank lines skipped),
    ``{"user": id}`` or ``{"history": [ids]}``, ``"candidates": [ids]``, and
    optionally ``"features"`` and ``"request"`` (its name); see the module's
    documentation.

    Args:
        path: the UTF-8 JSON-lines file, a str or os.PathLike.

    Returns:
        [Request], in file order.

    Raises:
        din_fast.ctr.errors.DataFormatError: the file is missing, not a
            regular file, not UTF-8, holds no request, or a line is not a
            JSON object, has no non-empty list of candidates, has both or
            neither of "user" and "history", an empty id, or "features" that
            is not an object (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"requests file {path} "
                              f"{'does not exist' if not path.exists() else 'is not a file'}; "
                              "expected JSON lines {\"user\" or \"history\", \"candidates\"}")
    requests = []
    for number, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            value = json.loads(line, parse_int=str, parse_float=str)
        except (json.JSONDecodeError, RecursionError):
            raise DataFormatError(f"{where}: not a JSON object; expected "
                                  '{"user": id or "history": [ids], "candidates": [ids]}') \
                from None
        if not isinstance(value, dict):
            raise DataFormatError(f"{where}: expected a JSON object with \"candidates\"")
        candidates = value.get("candidates")
        if not isinstance(candidates, list) or not candidates \
                or any(_token(c) is None for c in candidates):
            raise DataFormatError(f"{where}: \"candidates\" must be a non-empty list of ids")
        if ("user" in value) == ("history" in value):
            raise DataFormatError(f"{where}: expected exactly one of \"user\" (an id) and "
                                  "\"history\" (a list of ids, oldest first)")
        user, history = value.get("user"), value.get("history")
        if "user" in value and _token(user) is None:
            raise DataFormatError(f"{where}: \"user\" must be a non-empty id")
        if "history" in value and (not isinstance(history, list)
                                   or any(_token(h) is None for h in history)):
            raise DataFormatError(f"{where}: \"history\" must be a list of ids, oldest first")
        features = value.get("features", {})
        if not isinstance(features, dict):
            raise DataFormatError(f"{where}: \"features\" must be an object {{column: value or "
                                  "[one value per candidate]}")
        name = value.get("request", str(number))
        requests.append(Request(number, name if isinstance(name, str) else json.dumps(name),
                                _token(user), history and [_token(h) for h in history],
                                [_token(c) for c in candidates], features))
    if not requests:
        raise DataFormatError(f"{path}: no requests; expected one JSON object per line")
    return requests


def user_histories(data: Optional[EncodedData], requests: list, path: str):
    """The histories of the users the requests name.

    Args:
        data: the users' behaviours, encoded with the checkpoint's id maps
            (a labeled log's: each user's label-1 rows); None when --data
            was not given.
        requests: the Requests.
        path: the requests file, named in the error.

    Returns:
        {raw user id: (int64 dense items, oldest first, and their int64
        dense categories or None), or None for a user the data lacks}; {}
        when no request names a user.

    Raises:
        din_fast.ctr.errors.InputError: requests name users and ``data`` is
            None.
    """
    wanted = sorted({r.user for r in requests if r.user is not None})
    if not wanted:
        return {}
    if data is None:
        raise InputError(f"requests file {path}: requests name users, so --data must give "
                         "their behaviours (or give each request a \"history\")")
    position = pc.index_in(pa.array(wanted, pa.string()), value_set=data.user_ids).to_pylist()
    histories = {}
    for user, u in zip(wanted, position):
        if u is None:
            histories[user] = None
            continue
        span = slice(data.offsets[u], data.offsets[u + 1])
        histories[user] = (data.items[span],
                           None if data.categories is None else data.categories[span])
    return histories


def predict_file(checkpoint_path, requests_path, data_path=None, output=None,
                 output_format=None, *, device="cpu", backend="auto",
                 max_unknown: float = MAX_UNKNOWN) -> Counts:
    """Score a requests file with a checkpoint, writing CSV or JSON lines to
    ``output`` (default stdout; a file is checked before anything is read and
    written atomically, see din_fast.ctr.files); returns what was scored and what
    was unknown. ``data_path`` (the users' behaviours) is refused when it
    contradicts the checkpoint (din_fast.ctr.foreign_data, ``max_unknown``).

    Args:
        checkpoint_path: a ``din-fast train --checkpoint`` file.
        requests_path: the requests, JSON lines (:func:`read_requests`).
        data_path: the behaviours (or labeled log) of the users the requests
            name; None when every request gives its history.
        output: the file to write; None: stdout.
        output_format: "csv" or "jsonl"; None: jsonl for a ``.jsonl`` or
            ``.json`` output, else csv.
        device: "cpu" or "cuda".
        backend: the attention backend ("auto", "triton", "torch",
            "reference").
        max_unknown: the largest share, in [0, 1], of the data's rows in any
            column with ids the checkpoint does not know.

    Returns:
        The Counts of what was scored and what was unknown.

    Raises:
        din_fast.ctr.errors.InputError: an output that cannot be written or
            is an input, a device or backend this machine lacks, a bad
            checkpoint, requests or data file, data that contradicts the
            checkpoint, requests naming users without ``data_path``, or
            "features" that do not fit the model (naming the line).
    """
    check_outputs({"--output": output}, {"--checkpoint": checkpoint_path,
                                         "--requests": requests_path,
                                         "--data": data_files(data_path)})
    checkpoint, config = checkpoint_for_run(checkpoint_path, backend, device)
    requests = read_requests(requests_path)
    maps = checkpoint.id_maps
    data, categories = None, ItemCategories(maps)
    if data_path is not None and config.label_column is not None:
        log = load_labeled_log(data_path, log_columns(config, checkpoint_path))
        check_log(log, maps, checkpoint_path, log_split(config), max_unknown)
        data = encode_log(log, maps).data
        if log.categories is not None:      # one category per item: its first row's
            first_row = pa.array(np.unique(log.items.indices.to_numpy(), return_index=True)[1])
            categories = ItemCategories(maps, log.items.take(first_row).cast(pa.string()),
                                        log.categories.take(first_row).cast(pa.string()))
    elif data_path is not None:
        interactions = load_interactions(data_path)
        check_behaviours(interactions, maps, checkpoint_path, max_unknown)
        data = encode_for(interactions, maps)
        categories = ItemCategories(maps, interactions.category_items,
                                    interactions.category_values)
    histories = user_histories(data, requests, requests_path)
    model = restored_model(checkpoint, config)
    counts = Counts(unknown_scored=maps.unknown)
    with (open_replacing(output, "--output", newline="", encoding="utf-8") if output
          else nullcontext(sys.stdout)) as out:
        write_scores(score_requests(model, maps, config.max_len, requests, histories, device,
                                    counts, requests_path, categories), out,
                     output_format_of(output, output_format))
    return counts


def score_requests(model, id_maps: IdMaps, max_len, requests: list, histories: dict, device,
                   counts: Counts, path: str = "requests",
                   categories: Optional["ItemCategories"] = None) -> Iterator[tuple]:
    """Score requests, in batches of at most CANDIDATES_PER_BATCH scores,
    each history pooled once for all of its candidates. Every request is
    encoded (and so checked) first, so that a bad one stops the command
    before any score is written, stdout included.

    Args:
        model: the checkpoint's model (din_fast.DIN or BaseModel), in eval
            mode on ``device``.
        id_maps: the checkpoint's IdMaps.
        max_len: keep the most recent ``max_len`` history items; None: all.
        requests: the Requests.
        histories: :func:`user_histories` of the requests.
        device: where the model runs.
        counts: the Counts to update (in place).
        path: the requests file, named in errors.
        categories: the ItemCategories giving the items' categories;
            None: the id maps' alone.

    Returns:
        An iterator of (request name, raw candidate, click probability as
        a float or None, note: "", "unknown item" or "unknown user") for
        every candidate of every request, in file order, scored as it is
        read.

    Raises:
        din_fast.ctr.errors.DataFormatError: a request's "features" that do
            not fit the model (naming the line).
    """
    encoder = Encoder.from_id_maps(id_maps)
    categories = categories or ItemCategories(id_maps)
    rows = [_encode_request(request, histories, id_maps, encoder, categories, max_len, counts,
                            path)
            for request in requests]
    return _scored(model, id_maps, requests, rows, device, counts)


def _scored(model, id_maps: IdMaps, requests: list, rows: list, device,
            counts: Counts) -> Iterator[tuple]:
    """score_requests' iterator: the requests, their EncodedRequests
    ``rows``, scored batch by batch."""
    for batch in _batches(list(zip(requests, rows))):
        scores = _score_batch(model, [row for _, row in batch], device)
        for (request, row), row_scores in zip(batch, scores):
            counts.requests += 1
            for raw, dense, score in zip(request.candidates, row.candidates, row_scores):
                unknown = dense == 0 or dense > len(id_maps.item_ids)
                counts.unknown_candidates += bool(unknown and not row.note)
                if row.note or unknown and not id_maps.unknown:
                    yield request.name, raw, None, row.note or "unknown item"
                else:
                    counts.scores += 1
                    yield request.name, raw, float(score), "unknown item" if unknown else ""


@dataclass
class EncodedRequest:
    """A request's dense inputs; ``note`` why it is not scored.

    Args:
        history: [T] int64 dense item ids, oldest first.
        history_categories: [T] int64 their categories; None without
            categories.
        candidates: [C] int64 dense item ids.
        candidate_categories: [C] int64; None without categories.
        features: {side feature: a list of C lists of dense ids}.
        numeric: [C, N] float32 standardized numeric features; None
            without any.
        note: "" (scored) or why not ("unknown user").
    """

    history: np.ndarray
    history_categories: Optional[np.ndarray]
    candidates: np.ndarray
    candidate_categories: Optional[np.ndarray]
    features: dict
    numeric: Optional[np.ndarray]
    note: str = ""


def _batches(pairs: list) -> Iterator[list]:
    """Lists of consecutive (Request, EncodedRequest) pairs, each at most
    CANDIDATES_PER_BATCH requests x most candidates (one request alone may
    hold more)."""
    batch, most = [], 0
    for pair in pairs:
        count = len(pair[0].candidates)
        most_with = max(most, count)
        if batch and (len(batch) + 1) * most_with > CANDIDATES_PER_BATCH:
            yield batch
            batch, most_with = [], count
        batch.append(pair)
        most = most_with
    if batch:
        yield batch


def _encode_request(request: Request, histories: dict, id_maps: IdMaps, encoder: Encoder,
                    item_categories: "ItemCategories", max_len, counts: Counts,
                    path: str) -> EncodedRequest:
    raw_candidates = pa.array(request.candidates, pa.string())
    candidates = id_maps.dense_items(raw_candidates)
    features, numeric = _encode_features(request, encoder, counts, path)
    history = categories = None
    note = ""
    if request.user is not None:
        found = histories[request.user]
        if found is None:
            counts.unknown_users += 1
            note = "unknown user"
        else:
            history, categories = found
    else:
        raw_history = pa.array(request.history, pa.string())
        history = id_maps.dense_items(raw_history)
        categories = item_categories(raw_history)
    if history is None:
        history = np.zeros(0, np.int64)
    if not id_maps.unknown:        # unknown items are skipped: the model has no id for them
        known = history != 0
        counts.skipped_history_items += int((~known).sum())
        history = history[known]
        categories = None if categories is None else categories[known]
    else:
        counts.unknown_history_items += int((history > len(id_maps.item_ids)).sum())
    if max_len:
        history = history[-max_len:]
        categories = None if categories is None else categories[-max_len:]
    if id_maps.category_ids is not None and categories is None:
        categories = category_of(id_maps, history)
    return EncodedRequest(history, categories, candidates, item_categories(raw_candidates),
                          features, numeric, note)


class ItemCategories:
    """The dense categories of raw items, for a model with categories: an
    item's own in the id maps (a rare item's among them); for one they do
    not list, with the maps' reserved row, its category in the data
    (``items`` and their ``categories``, raw; where given and listed there:
    a cold item keeps its category's row), else the reserved category.
    Without categories, None; without the reserved row, 0 for unknown items
    (which are skipped or left unscored).

    Args:
        maps: the checkpoint's IdMaps.
        items: raw item ids of the data (--data), a pyarrow string array;
            None: the maps alone.
        categories: the raw category of each of ``items``.
    """

    def __init__(self, maps: IdMaps, items: Optional[pa.Array] = None,
                 categories: Optional[pa.Array] = None):
        self.maps, self.items = maps, items
        if items is not None and maps.category_ids is not None:
            self.of_item = np.append(0, maps.dense(maps.category_ids, categories))

    def __call__(self, raw: pa.Array) -> Optional[np.ndarray]:
        maps = self.maps
        if maps.category_ids is None:
            return None
        category = maps.categories_of(raw)
        if not maps.unknown:
            return category
        if self.items is not None:
            category = np.where(category == 0, self.of_item[dense_ids(self.items, raw)],
                                category)
        return np.where(category == 0, maps.num_categories, category)


def category_of(id_maps: IdMaps, items: np.ndarray) -> np.ndarray:
    """The dense category of dense items.

    Args:
        id_maps: IdMaps with categories.
        items: int dense item ids (0 the padding; the reserved id with
            ``unknown`` maps).

    Returns:
        Their dense categories, int64, the shape of ``items``; the padding's
        is 0, the reserved item's the reserved category.
    """
    table = id_maps.item_category
    if id_maps.unknown:
        table = np.append(table, id_maps.num_categories)
    return table[items]


def _encode_features(request: Request, encoder: Encoder, counts: Counts, path: str):
    """({feature: a list of dense ids per candidate}, numeric [C, N] standardized or None)."""
    try:
        features, numeric, unknown = encoder.encode_features(request.features,
                                                             len(request.candidates))
    except ValueError as error:
        raise DataFormatError(f"{path}, line {request.line}: \"features\" {error}") from None
    counts.unknown_feature_values += unknown
    return features, None if numeric is None else np.array(numeric, dtype=np.float32)


@torch.no_grad()
def _score_batch(model, rows: list, device) -> np.ndarray:
    """Click probabilities [requests, most candidates]: each history pooled once
    for all of its request's candidates (padding candidates score garbage that
    is never read)."""
    width = max(max(len(r.history) for r in rows), 1)
    most = max(len(r.candidates) for r in rows)
    history = np.zeros((len(rows), width), np.int64)
    candidates = np.zeros((len(rows), most), np.int64)
    categories = rows[0].history_categories is not None
    history_categories, candidate_categories = np.zeros_like(history), np.zeros_like(candidates)
    for r, row in enumerate(rows):
        history[r, :len(row.history)] = row.history
        candidates[r, :len(row.candidates)] = row.candidates
        if categories:
            history_categories[r, :len(row.history)] = row.history_categories
            candidate_categories[r, :len(row.candidates)] = row.candidate_categories
    as_tensor = lambda a: torch.from_numpy(a).to(device)
    kwargs = {}
    if rows[0].features:
        kwargs["features"] = {name: as_tensor(_padded_values([row.features[name]
                                                              for row in rows], most))
                              for name in rows[0].features}
    if rows[0].numeric is not None:
        numeric = np.zeros((len(rows), most, rows[0].numeric.shape[1]), np.float32)
        for r, row in enumerate(rows):
            numeric[r, :len(row.candidates)] = row.numeric
        kwargs["numeric"] = as_tensor(numeric)
    lengths = torch.tensor([len(r.history) for r in rows], device=device)
    logits = model(as_tensor(history), as_tensor(history_categories) if categories else None,
                   lengths, as_tensor(candidates),
                   as_tensor(candidate_categories) if categories else None, **kwargs)
    return torch.sigmoid(logits.double()).cpu().numpy()


def _padded_values(per_request: list, most: int) -> np.ndarray:
    """[requests, most, widest] ids of per-candidate id lists, 0-padded."""
    widest = max(max((len(v) for values in per_request for v in values), default=0), 1)
    out = np.zeros((len(per_request), most, widest), np.int64)
    for r, values in enumerate(per_request):
        for c, v in enumerate(values):
            out[r, c, :len(v)] = v
    return out


def write_scores(rows: Iterator[tuple], out, output_format: str) -> None:
    """Write scored rows as CSV or JSON lines.

    Args:
        rows: (request, candidate, score or None, note) tuples, as
            :func:`score_requests` yields them.
        out: a text file open for writing.
        output_format: "csv" (a header, then request,candidate,score,note;
            the score empty where there is none, 6 significant digits) or
            "jsonl" (``{"request", "candidate", "score"}`` with ``"note"``
            where there is one; a null score where there is none).
    """
    if output_format == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(("request", "candidate", "score", "note"))
        for request, candidate, score, note in rows:
            writer.writerow((request, candidate, "" if score is None else f"{score:.6g}", note))
    else:
        for request, candidate, score, note in rows:
            record = {"request": request, "candidate": candidate, "score": score}
            if note:
                record["note"] = note
            out.write(json.dumps(record) + "\n")


def output_format_of(path: Optional[str], requested: Optional[str]) -> str:
    """The output format of predict's --output and --format.

    Args:
        path: the output file; None for stdout.
        requested: "csv", "jsonl" or None.

    Returns:
        ``requested`` where given, else "jsonl" for a ``.jsonl`` or
        ``.json`` path (any case), else "csv".
    """
    if requested:
        return requested
    return "jsonl" if path and Path(path).suffix.lower() in (".jsonl", ".json") else "csv"


def describe(counts: Counts) -> str:
    """The note ``din-fast predict`` prints on stderr.

    Args:
        counts: the Counts :func:`predict_file` returned.

    Returns:
        One line: the scores and requests, and what was unknown (scored as
        the reserved id, or left without a score and skipped).
    """
    if counts.unknown_scored:
        return (f"{counts.scores} score(s) for {counts.requests} request(s); "
                f"{counts.unknown_users} unknown user(s) without a score; "
                f"{counts.unknown_candidates} unknown candidate(s), "
                f"{counts.unknown_history_items} unknown history item(s) and "
                f"{counts.unknown_feature_values} unknown feature value(s) scored as the "
                "reserved id")
    return (f"{counts.scores} score(s) for {counts.requests} request(s); "
            f"{counts.unknown_candidates} unknown candidate(s) and "
            f"{counts.unknown_users} unknown user(s) without a score; "
            f"{counts.skipped_history_items} unknown history item(s) skipped")
