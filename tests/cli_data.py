"""Small data files in the layouts din-fast reads, for the data and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def write_csv(path: Path, interactions) -> Path:
    """The interactions as a user,item,category,timestamp table (timestamp = position)."""
    category = dict(zip(interactions.category_items.tolist(),
                        interactions.category_values.tolist()))
    rows = ["user,item,category,timestamp"]
    for u, user in enumerate(interactions.user_ids.tolist()):
        items = interactions.items[interactions.offsets[u]:interactions.offsets[u + 1]]
        rows += [f"{user},{item},{category[item]},{t}" for t, item in enumerate(items.tolist())]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_amazon(directory: Path, name="Small", lines=None, attributes=None) -> Path:
    """An Amazon-layout directory: <name>.txt and <name>_item2attributes.json."""
    directory.mkdir(exist_ok=True)
    lines = ["1 10 11 12 13", "2 11 14 10", "3 15 12"] if lines is None else lines
    attributes = ({"10": [7, 1], "11": [2], "12": [7, 3, 2], "13": [4], "14": [1],
                   "15": [3]} if attributes is None else attributes)
    (directory / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (directory / f"{name}_item2attributes.json").write_text(json.dumps(attributes))
    return directory


@pytest.fixture
def one_torch_thread():
    """One torch thread, as the command sets (cli.add_threads_option); main()
    sets the count for the whole process, so the other tests get theirs back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
