"""Scoring new rows with a checkpoint: ``din-fast predict``.

A request is one JSON object per line:

    {"user": "u42", "candidates": ["B00004Y2UT", "B0000530HU"]}
    {"history": ["B000052YM0", "B00004TMFE"], "candidates": ["B0000530HU"], "request": "r7"}

``user`` takes the user's behaviours from ``--data`` as the history (all of
them, the most recent ``max_len`` kept, as training did); ``history`` gives
the items explicitly, oldest first. Each request gets one score per
candidate: the model's click probability. The history is read once per
request for all of its candidates (the models' many-candidates path, a 3-D
attention query). Nothing unknown is mapped to anything: an unknown
candidate gets no score (``unknown item``), an unknown user none for any of
its candidates (``unknown user``), and unknown history items are skipped and
counted.
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
from .data import EncodedData, IdMaps, encode
from .errors import DataFormatError, InputError
from .files import check_outputs, open_replacing
from .loaders import data_files, load_interactions, text_lines
from .training import checkpoint_for_run

# A batch holds requests x (most candidates of one of them) scores: at most this many.
CANDIDATES_PER_BATCH = 1 << 16
OUTPUT_FORMATS = ("csv", "jsonl")


@dataclass
class Request:
    line: int
    name: str                       # "request" from the file, else the line number
    user: Optional[str]
    history: Optional[list]
    candidates: list


@dataclass
class Counts:
    """What the requests held that the checkpoint (or the data) does not know."""

    requests: int = 0
    scores: int = 0
    unknown_candidates: int = 0
    unknown_users: int = 0
    skipped_history_items: int = 0


def _token(value) -> Optional[str]:
    """An id as JSON gives it (parse_int/parse_float keep numbers as written)."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def read_requests(path) -> list:
    """The requests of a JSON-lines file; DataFormatError naming the line."""
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
        name = value.get("request", str(number))
        requests.append(Request(number, name if isinstance(name, str) else json.dumps(name),
                                _token(user), history and [_token(h) for h in history],
                                [_token(c) for c in candidates]))
    if not requests:
        raise DataFormatError(f"{path}: no requests; expected one JSON object per line")
    return requests


def user_histories(data: Optional[EncodedData], requests: list, path: str):
    """{user id: its known dense items} for the requests that name a user."""
    wanted = sorted({r.user for r in requests if r.user is not None})
    if not wanted:
        return {}
    if data is None:
        raise InputError(f"requests file {path}: requests name users, so --data must give "
                         "their behaviours (or give each request a \"history\")")
    position = pc.index_in(pa.array(wanted, pa.string()), value_set=data.user_ids).to_pylist()
    return {user: data.items[data.offsets[u]:data.offsets[u + 1]] if u is not None else None
            for user, u in zip(wanted, position)}


def predict_file(checkpoint_path, requests_path, data_path=None, output=None,
                 output_format=None, *, device="cpu", backend="auto") -> Counts:
    """Score a requests file with a checkpoint, writing CSV or JSON lines to
    ``output`` (default stdout; a file is checked before anything is read and
    written atomically, see din_fast.files); returns what was scored and what
    was unknown."""
    check_outputs({"--output": output}, {"--checkpoint": checkpoint_path,
                                         "--requests": requests_path,
                                         "--data": data_files(data_path)})
    checkpoint, config = checkpoint_for_run(checkpoint_path, backend, device)
    requests = read_requests(requests_path)
    data = None if data_path is None else encode(load_interactions(data_path),
                                                 checkpoint.id_maps)
    histories = user_histories(data, requests, requests_path)
    model = restored_model(checkpoint, config)
    counts = Counts()
    with (open_replacing(output, "--output", newline="", encoding="utf-8") if output
          else nullcontext(sys.stdout)) as out:
        write_scores(score_requests(model, checkpoint.id_maps, config.max_len, requests,
                                    histories, device, counts), out,
                     output_format_of(output, output_format))
    return counts


def score_requests(model, id_maps: IdMaps, max_len, requests: list, histories: dict, device,
                   counts: Counts) -> Iterator[tuple]:
    """(request, candidate, probability or None, note) for every candidate of
    every request, in file order."""
    for batch in _batches(requests):
        rows = _encode_batch(batch, histories, id_maps, max_len, counts)
        scores = _score_batch(model, rows, id_maps, device)
        for request, (_, candidates, note), row_scores in zip(batch, rows, scores):
            counts.requests += 1
            for raw, dense, score in zip(request.candidates, candidates, row_scores):
                if note:
                    yield request.name, raw, None, note
                elif dense == 0:
                    counts.unknown_candidates += 1
                    yield request.name, raw, None, "unknown item"
                else:
                    counts.scores += 1
                    yield request.name, raw, float(score), ""


def _batches(requests: list) -> Iterator[list]:
    batch, most = [], 0
    for request in requests:
        most_with = max(most, len(request.candidates))
        if batch and (len(batch) + 1) * most_with > CANDIDATES_PER_BATCH:
            yield batch
            batch, most_with = [], len(request.candidates)
        batch.append(request)
        most = most_with
    if batch:
        yield batch


def _encode_batch(batch, histories, id_maps: IdMaps, max_len, counts: Counts) -> list:
    """(history dense ids, candidate dense ids, note) per request."""
    rows = []
    for request in batch:
        candidates = id_maps.dense_items(pa.array(request.candidates, pa.string()))
        if request.user is not None:
            history = histories[request.user]
            if history is None:
                counts.unknown_users += 1
                rows.append((np.zeros(0, np.int64), candidates, "unknown user"))
                continue
        else:
            history = id_maps.dense_items(pa.array(request.history, pa.string()))
        known = history[history != 0]
        counts.skipped_history_items += len(history) - len(known)
        rows.append((known[-max_len:] if max_len else known, candidates, ""))
    return rows


@torch.no_grad()
def _score_batch(model, rows, id_maps: IdMaps, device) -> np.ndarray:
    """Click probabilities [requests, most candidates]: each history pooled once
    for all of its request's candidates (padding candidates score garbage that
    is never read)."""
    width = max(max(len(h) for h, _, _ in rows), 1)
    most = max(len(c) for _, c, _ in rows)
    history = np.zeros((len(rows), width), np.int64)
    candidates = np.zeros((len(rows), most), np.int64)
    for r, (h, c, _) in enumerate(rows):
        history[r, :len(h)] = h
        candidates[r, :len(c)] = c
    lengths = torch.tensor([len(h) for h, _, _ in rows])
    category = id_maps.item_category
    inputs = [torch.from_numpy(a) for a in (history, category[history])] + [lengths] + \
        [torch.from_numpy(a) for a in (candidates, category[candidates])]
    logits = model(*(t.to(device) for t in inputs))
    return torch.sigmoid(logits.double()).cpu().numpy()


def write_scores(rows: Iterator[tuple], out, output_format: str) -> None:
    """CSV (request,candidate,score,note; no score for unknowns) or JSON lines."""
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
    if requested:
        return requested
    return "jsonl" if path and Path(path).suffix.lower() in (".jsonl", ".json") else "csv"


def describe(counts: Counts) -> str:
    return (f"{counts.scores} score(s) for {counts.requests} request(s); "
            f"{counts.unknown_candidates} unknown candidate(s) and "
            f"{counts.unknown_users} unknown user(s) without a score; "
            f"{counts.skipped_history_items} unknown history item(s) skipped")
