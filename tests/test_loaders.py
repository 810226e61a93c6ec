"""Reading behaviour logs (din_fast.ctr.loaders): Amazon layout, CSV/TSV, Parquet."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from din_fast.ctr.data import encode
from din_fast.ctr.errors import DataFormatError
from din_fast.ctr.loaders import load_amazon_directory, load_interactions, load_table

from cli_data import write_amazon


def user_items(interactions, user_id):
    u = interactions.user_ids.to_pylist().index(user_id)
    items = interactions.items.dictionary.take(interactions.items.indices).to_pylist()
    return items[interactions.offsets[u]:interactions.offsets[u + 1]]


def categories(interactions):
    return dict(zip(interactions.category_items.to_pylist(),
                    interactions.category_values.to_pylist()))


def test_amazon_directory_sequences_and_leaf_category(tmp_path):
    data = load_interactions(write_amazon(tmp_path / "amazon"))
    assert data.user_ids.to_pylist() == ["1", "2", "3"]
    assert user_items(data, "1") == ["10", "11", "12", "13"]
    assert user_items(data, "3") == ["15", "12"]
    assert categories(data)["10"] == "1" and categories(data)["12"] == "2"   # the last attribute


def test_amazon_ids_are_tokens_of_any_length(tmp_path):
    # Integers beyond int64 (or JSON's 4300-digit limit) and ASIN-like strings stay ids.
    huge = "9" * 5000
    data = load_interactions(write_amazon(
        tmp_path / "amazon", lines=[f"{huge} B00004Y2UT 11", "u2 11 B00004Y2UT"],
        attributes=None))
    (tmp_path / "amazon" / "Small_item2attributes.json").write_text(
        '{"B00004Y2UT": [1, ' + huge + '], "11": ["brand", "cat-7"]}')
    data = load_interactions(tmp_path / "amazon")
    assert user_items(data, huge) == ["B00004Y2UT", "11"]
    assert categories(data) == {"B00004Y2UT": huge, "11": "cat-7"}


ROWS = [("timestamp", "item", "user", "category", "extra"),
        (30, 5, 2, 1, "x"), (10, 6, 1, 2, "x"), (20, 7, 1, 1, "x"),
        (10, 8, 1, 3, "x"), (5, 9, 2, 3, "x"), (20, 6, 2, 2, "x")]


def check_rows_order(data):
    assert data.user_ids.to_pylist() == ["1", "2"]
    assert user_items(data, "1") == ["6", "8", "7"]               # 6 and 8 tie: file order
    assert user_items(data, "2") == ["9", "6", "5"]
    assert categories(data)["8"] == "3"


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t"), (".txt", "\t")])
def test_table_orders_by_timestamp_then_file_order(tmp_path, suffix, sep):
    path = tmp_path / f"log{suffix}"
    path.write_text("\n".join(sep.join(map(str, r)) for r in ROWS) + "\n")
    check_rows_order(load_table(path))


def test_parquet_with_integer_ids_and_timestamp_type(tmp_path):
    header, *rows = ROWS
    columns = {name.upper() if name == "user" else name: [r[i] for r in rows]
               for i, name in enumerate(header)}
    table = pa.table(columns).set_column(
        0, "timestamp", pa.array(columns["timestamp"], pa.int64()).cast(pa.timestamp("s")))
    pq.write_table(table, tmp_path / "log.parquet")
    check_rows_order(load_interactions(tmp_path / "log.parquet"))


def test_string_ids_asins_hashes_and_padding_spaces(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("User, Item ,category,timestamp\n"
                    "u0, B00004Y2UT, Beauty/Nails, 1\n"
                    "u0,9f86d081884c7d65,Beauty/Skin,2.5\n"
                    '"u,1",B00004Y2UT,Beauty/Nails,1e3\n')
    data = load_interactions(path)
    assert data.user_ids.to_pylist() == ["u,1", "u0"]
    assert user_items(data, "u0") == ["B00004Y2UT", "9f86d081884c7d65"]
    encoded = encode(data)
    assert encoded.id_maps.item_ids.to_pylist() == ["9f86d081884c7d65", "B00004Y2UT"]
    assert encoded.id_maps.category_ids.to_pylist() == ["Beauty/Nails", "Beauty/Skin"]
    assert encoded.item_category.tolist() == [0, 2, 1]


def test_field_longer_than_pythons_csv_limit_is_an_id(tmp_path):
    path = tmp_path / "log.csv"
    long_id = "x" * 200_000
    path.write_text(f"user,item,category,timestamp\n1,{long_id},3,4\n1,2,3,5\n")
    assert user_items(load_interactions(path), "1") == [long_id, "2"]


@pytest.mark.parametrize("content, line, expected", [
    ("", "line 1", "empty file"),
    ("user,item,timestamp\n1,2,3\n", "line 1", "missing column(s) ['category']"),
    ("user,item,item,category,timestamp\n1,2,2,3,4\n", "line 1", "named more than once"),
    ("user,item,category,timestamp\n1,2,3,4\n1,,3,5\n", "line 3", "empty item id"),
    ("user,item,category,timestamp\n1,2,3,4\n\n1,2,3,soon\n", "line 4", "numeric timestamp"),
    ("user,item,category,timestamp\n1,2,3,inf\n", "line 2", "finite numeric timestamp"),
    ("user,item,category,timestamp\n1,2,3,4\n1,2,3\n", "line 3", "expected 4 fields"),
    ("user,item,category,timestamp\n1,2,3,4\n1,2,3,4,5\n", "line 3", "expected 4 fields"),
    ("user,item,category,timestamp\n1,2,3,4\n1,\"2,3,4\n", "line 3", "on one line"),
    ("user,item,category,timestamp\n", "", "no data rows"),
    ("user,item,category,timestamp\n1,2,3,4\n2,2,4,5\n", "line 3", "one category per item"),
    ("user,item,category,timestamp\n1,2,3,4\n1,\xff\n", "line 3", "not UTF-8"),
])
def test_bad_table_names_file_line_and_expectation(tmp_path, content, line, expected):
    path = tmp_path / "bad.csv"
    path.write_bytes(content.encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    with pytest.raises(DataFormatError) as error:
        load_interactions(path)
    message = str(error.value)
    assert str(path) in message and line in message and expected in message


@pytest.mark.parametrize("content, expected", [
    (b"PAR1 not really", "not a Parquet file"),
])
def test_bad_parquet(tmp_path, content, expected):
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=expected):
        load_interactions(path)


def test_parquet_nulls_and_missing_columns_name_the_row(tmp_path):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"user": ["a", None], "item": ["1", "2"], "category": ["c", "c"],
                             "timestamp": [1.0, 2.0]}), path)
    with pytest.raises(DataFormatError, match=r"nulls.parquet, row 2: user is null"):
        load_interactions(path)
    pq.write_table(pa.table({"user": ["a"], "item": ["1"]}), path)
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['category', 'timestamp'\]"):
        load_interactions(path)


@pytest.mark.parametrize("lines, attributes, fragment, expected", [
    ([], None, "Small.txt", "empty file"),
    (["1"], None, "Small.txt, line 1", "'user_id item_1 item_2 ...'"),
    (["1 10 99"], None, "amazon", "no category for item '99'"),
    (["1 10"], {"10": []}, "Small_item2attributes.json", "non-empty list"),
    (["1 10"], {"10": [[1]]}, "Small_item2attributes.json", "non-empty list"),
    (["1 10 11", "2 10", "1 11"], None, "Small.txt, line 3",
     "user '1' already has line 1; expected one line per user"),
])
def test_bad_amazon_files(tmp_path, lines, attributes, fragment, expected):
    directory = write_amazon(tmp_path / "amazon", lines=lines, attributes=attributes)
    with pytest.raises(DataFormatError) as error:
        encode(load_interactions(directory))
    assert fragment in str(error.value) and expected in str(error.value)


def test_amazon_item_listed_twice_needs_one_category(tmp_path):
    directory = write_amazon(tmp_path / "amazon", lines=["1 10 11"])
    attributes = directory / "Small_item2attributes.json"
    attributes.write_text('{"10": [7, 1], "11": [2], "10": [7, 3]}')
    with pytest.raises(DataFormatError, match=r"Small_item2attributes.json, item '10': listed "
                       "twice with different categories"):
        load_interactions(directory)
    attributes.write_text('{"10": [7, 1], "11": [2], "10": [9, 1]}')     # same category
    assert categories(load_interactions(directory)) == {"10": "1", "11": "2"}


@pytest.mark.parametrize("columns, expected", [
    ({"user": ["a"], "User": ["b"], "item": ["1"], "category": ["c"], "timestamp": [1.0]},
     r"column\(s\) \['user'\] named more than once"),
    ({"user": ["a"], "item": ["1"], "category": ["c"], "timestamp": [True]},
     "column timestamp has type bool; expected numbers"),
])
def test_ambiguous_parquet_is_refused(tmp_path, columns, expected):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(DataFormatError, match=expected):
        load_interactions(path)


def test_amazon_directory_needs_both_files(tmp_path):
    directory = write_amazon(tmp_path / "amazon")
    (directory / "Small.txt").unlink()
    with pytest.raises(DataFormatError, match="Small.txt"):
        load_amazon_directory(directory)
    with pytest.raises(DataFormatError, match="nowhere.* does not exist"):
        load_interactions(tmp_path / "nowhere")


def test_many_blocks_read_as_one(tmp_path, monkeypatch):
    # Large files arrive from pyarrow in blocks (chunked columns): the same
    # interactions whatever the block size.
    rng = np.random.default_rng(0)
    path = tmp_path / "big.csv"
    users, items = rng.integers(0, 300, 20000), rng.integers(0, 500, 20000)
    path.write_text("user,item,category,timestamp\n" + "".join(
        f"u{u},i{i},c{i % 7},{t % 50}\n" for t, (u, i) in enumerate(zip(users, items))))
    whole = load_interactions(path)
    monkeypatch.setattr("din_fast.ctr.loaders.TABLE_BLOCK_BYTES", 4096)
    blocks = load_interactions(path)
    assert whole.items.dictionary.take(whole.items.indices).equals(
        blocks.items.dictionary.take(blocks.items.indices))
    assert np.array_equal(whole.offsets, blocks.offsets)
    assert whole.user_ids.equals(blocks.user_ids)
    assert categories(whole) == categories(blocks)
