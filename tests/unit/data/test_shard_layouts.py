"""Sharded layouts: WebDataset tar shards and Parquet files, local and on loopback S3: their classes, split,
bad images, I/O failures, the reader's few requests per batch, and the training order that keeps runs together."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlray.data import pipeline
from tlray.data.errors import DataError
from tlray.data.index import DatasetIndex, build_index
from tlray.data.order import rank_shares, train_batches, train_rows
from tlray.data.preprocessing import Preprocessing
from tlray.data.readers import parquet as parquet_reader
from tlray.data.readers import tar as tar_reader
from tlray.data.split import hash_split
from tlray.errors import ReadFailure
from tlray.spec import DatasetSpec, SpecError, validate_spec

from conftest import spec_dict
from s3_fixtures import FlakyProxy, upload_tree

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]


def image_bytes(sample: int, fmt: str = "PNG") -> bytes:
    """A small image of its class's colour; every sample's bytes differ (the noise is seeded by it)."""
    rng = np.random.default_rng(sample)
    base = np.array(COLOURS[sample % 3])
    pixels = np.clip(base + rng.integers(-30, 31, (12, 12, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, shards: int = 3, per_shard: int = 40, bad: tuple[int, ...] = ()) -> dict[str, bytes]:
    """shard-000.tar …: sample n is `s{n:05d}.png` (or .jpg every 5th) + `.cls` (n % 3) + a `.json` the layout
    ignores. Samples in `bad` hold bytes that are no image. Returns each sample key's image bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for n in range(s * per_shard, (s + 1) * per_shard):
                fmt, suffix = ("JPEG", "jpg") if n % 5 == 0 else ("PNG", "png")
                data = b"not an image" if n in bad else image_bytes(n, fmt)
                add_member(tar, f"s{n:05d}.{suffix}", data)
                add_member(tar, f"s{n:05d}.cls", f"{n % 3}\n".encode())
                add_member(tar, f"s{n:05d}.json", b'{"n": %d}' % n)
                images[f"s{n:05d}"] = data
    return images


def sample_of(key: str) -> str:
    """The WebDataset sample key (`s00012`) of an index key (`shard-000.tar#…:s00012.png`)."""
    return tar_reader.parse_key(key)[3].split(".")[0]


# ---------------------------------------------------------------------------------------
# WebDataset: the index
# ---------------------------------------------------------------------------------------
def test_webdataset_classes_are_the_indices_or_the_names_given_and_the_split_is_the_key_hash(tmp_path):
    write_shards(tmp_path / "wds")
    plain = build_index(DatasetSpec(uri=str(tmp_path / "wds"), layout="webdataset", val_fraction=0.25))
    assert plain.classes == ["0", "1", "2"]
    samples = plain.train + plain.val
    assert len(samples) == 120 and len({sample_of(k) for k, _ in samples}) == 120
    assert all(int(sample_of(k)[1:]) % 3 == label for k, label in samples)
    spec = DatasetSpec(
        uri=str(tmp_path / "wds"), layout="webdataset", val_fraction=0.25, classes=["red", "green", "blue"]
    )
    named = build_index(spec)
    assert named.classes == ["red", "green", "blue"] and named.train == plain.train and named.val == plain.val
    assert {sample_of(k) for k, _ in named.val} == {
        f"s{n:05d}" for n in range(120) if hash_split(f"s{n:05d}", spec) == "val"
    }
    assert 10 < len(named.val) < 50
    # keys sort in shard order, so consecutive rows are neighbours in one shard
    assert [tar_reader.parse_key(k)[:2] for k, _ in named.train] == sorted(
        tar_reader.parse_key(k)[:2] for k, _ in named.train
    )


def test_webdataset_brace_pattern_takes_the_shards_it_names(tmp_path, monkeypatch):
    write_shards(tmp_path / "wds")
    index = build_index(DatasetSpec(uri=str(tmp_path / "wds" / "shard-{000..001}.tar"), layout="webdataset"))
    assert index.root == str(tmp_path / "wds")
    assert {tar_reader.parse_key(k)[0] for k, _ in index.train + index.val} == {"shard-000.tar", "shard-001.tar"}
    with pytest.raises(DataError, match=r"^dataset.uri: 1 shard\(s\) of the pattern do not exist .*shard-003.tar"):
        build_index(DatasetSpec(uri=str(tmp_path / "wds" / "shard-{002..003}.tar"), layout="webdataset"))
    monkeypatch.chdir(tmp_path / "wds")  # a relative pattern: its folder is the working directory
    relative = build_index(DatasetSpec(uri="shard-{001,002}.tar", layout="webdataset"))
    assert relative.root == str(tmp_path / "wds")
    assert {tar_reader.parse_key(k)[0] for k, _ in relative.train + relative.val} == {"shard-001.tar", "shard-002.tar"}


def test_webdataset_fingerprint_follows_the_shards(tmp_path):
    write_shards(tmp_path / "wds")
    spec = DatasetSpec(uri=str(tmp_path / "wds"), layout="webdataset")
    first = build_index(spec).fingerprint
    assert build_index(spec).fingerprint == first
    write_shards(tmp_path / "wds", shards=1, bad=(3,))  # shard-000.tar rewritten
    assert build_index(spec).fingerprint != first


def test_webdataset_class_outside_the_named_classes_names_dataset_classes(tmp_path):
    write_shards(tmp_path / "wds", shards=1)
    with pytest.raises(DataError, match=r"^dataset.classes: shard-000.tar: s00002.cls holds class 2, outside the 2"):
        build_index(DatasetSpec(uri=str(tmp_path / "wds"), layout="webdataset", classes=["a", "b"]))


@pytest.mark.parametrize(
    "dataset, expected",
    [
        (
            {"layout": "imagefolder", "classes": ["a", "b"]},
            "dataset.classes: only used with `layout: webdataset` or `parquet`",
        ),
        ({"layout": "webdataset", "classes": ["a", "a"]}, "dataset.classes: names a class twice: a"),
        ({"layout": "webdataset", "image_column": "jpg"}, "dataset.image_column: only used with `layout: parquet`"),
        ({"layout": "parquet", "label_column": "image"}, "dataset.label_column: is the image column too"),
        ({"layout": "webdataset", "manifest": "m.csv"}, "dataset.manifest: only used with `layout: manifest`"),
    ],
    ids=["classes-imagefolder", "classes-twice", "column-webdataset", "same-columns", "manifest-webdataset"],
)
def test_shard_spec_rules_name_the_key(tmp_path, dataset, expected):
    raw = spec_dict(str(tmp_path / "d"), str(tmp_path / "out"), dataset=dataset)
    with pytest.raises(SpecError) as error:
        validate_spec(raw)
    assert expected in str(error.value)


def test_shard_layout_specs_are_valid(tmp_path):
    for dataset in ({"layout": "webdataset", "classes": ["a", "b"]}, {"layout": "parquet", "image_column": "img"}):
        assert validate_spec(spec_dict(str(tmp_path / "d"), str(tmp_path / "out"), dataset=dataset)).dataset.layout


# ---------------------------------------------------------------------------------------
# WebDataset: the reader
# ---------------------------------------------------------------------------------------
def spread_batch(index: DatasetIndex) -> list[str]:
    """A batch over two shards, two stretches of shard-000 far apart, in no particular order."""
    keys = [k for k, _ in index.train]
    by_shard = {s: [k for k in keys if tar_reader.parse_key(k)[0] == s] for s in ("shard-000.tar", "shard-002.tar")}
    batch = by_shard["shard-000.tar"][:6] + by_shard["shard-002.tar"][3:12] + by_shard["shard-000.tar"][-5:]
    return batch[::-1]


def test_webdataset_reader_returns_each_samples_bytes_with_one_ranged_get_per_span(
    s3_env, s3_bucket, tmp_path, monkeypatch
):
    images = write_shards(tmp_path / "wds")
    upload_tree(s3_env, s3_bucket, "wds/", tmp_path / "wds")
    with FlakyProxy(s3_env, fail_ratio=0.0) as proxy:
        index = build_index(DatasetSpec(uri=f"s3://{s3_bucket}/wds", layout="webdataset", endpoint_url=proxy.endpoint))
        batch = spread_batch(index)

        def read(concurrency: int) -> tuple[dict[int, bytes], int]:
            before = len(proxy.log)
            got = dict(tar_reader.read(index.root, batch, proxy.endpoint, concurrency, 5.0))
            return got, sum(1 for method, path in proxy.log[before:] if method == "GET")

        got, gets = read(8)
        assert got == {i: images[sample_of(k)] for i, k in enumerate(batch)}
        assert gets == 2  # shard-000's two stretches are 29 small samples apart: one span
        monkeypatch.setattr(tar_reader, "MAX_GAP", 16 * 1024)  # neighbours still coalesce
        got, gets = read(1)
        assert got == {i: images[sample_of(k)] for i, k in enumerate(batch)} and gets == 3


def test_webdataset_shard_deleted_after_indexing_is_a_read_failure_naming_shard_and_member(tmp_path):
    write_shards(tmp_path / "wds")
    index = build_index(DatasetSpec(uri=str(tmp_path / "wds"), layout="webdataset"))
    batch = spread_batch(index)
    (tmp_path / "wds" / "shard-002.tar").unlink()
    with pytest.raises(ReadFailure) as error:
        list(tar_reader.read(index.root, batch, None, 4, 1.0))
    assert error.value.location.startswith(f"{tmp_path}/wds/shard-002.tar (member s00")
    assert "FileNotFoundError" in error.value.reason


def test_webdataset_shard_shortened_after_indexing_is_a_read_failure(tmp_path):
    write_shards(tmp_path / "wds", shards=1)
    index = build_index(DatasetSpec(uri=str(tmp_path / "wds"), layout="webdataset"))
    shard = tmp_path / "wds" / "shard-000.tar"
    shard.write_bytes(shard.read_bytes()[:20_000])
    with pytest.raises(ReadFailure, match="changed since indexing") as error:
        list(tar_reader.read(index.root, [k for k, _ in index.train][-3:], None, 1, 1.0))
    assert "shard-000.tar (member s000" in error.value.location


def test_webdataset_server_error_after_retries_is_a_read_failure(s3_env, s3_bucket, tmp_path):
    write_shards(tmp_path / "wds", shards=2)
    upload_tree(s3_env, s3_bucket, "wds/", tmp_path / "wds")
    index = build_index(DatasetSpec(uri=f"s3://{s3_bucket}/wds", layout="webdataset", endpoint_url=s3_env))
    with FlakyProxy(s3_env, fail_ratio=0.0, broken_paths=("shard-001.tar",)) as proxy:
        keys = [k for k, _ in index.train]
        with pytest.raises(ReadFailure) as error:
            list(tar_reader.read(index.root, keys[:5] + keys[-5:], proxy.endpoint, 4, 2.0))
    assert error.value.location.startswith(f"s3://{s3_bucket}/wds/shard-001.tar (member s000")
    assert "HTTP 500" in error.value.reason and error.value.attempts > 1


# ---------------------------------------------------------------------------------------
# Decoding a batch through the pipeline's batch function (without Ray)
# ---------------------------------------------------------------------------------------
class TablesRef:
    """Stands in for the ObjectRef of the key tables: DecodeBatch looks them up by its hex."""

    def __init__(self, name: str):
        self.name = name

    def hex(self) -> str:
        return self.name


def decode_batch(index: DatasetIndex, spec: DatasetSpec, rows: np.ndarray, on_bad_image: str) -> dict:
    dataset = spec.model_copy(update={"on_bad_image": on_bad_image, "read_concurrency": 4, "read_retry_seconds": 1.0})
    ref = TablesRef(f"shards-{spec.layout}-{on_bad_image}-{index.fingerprint}")
    pipeline.LOADED_TABLES[ref.hex()] = pipeline.key_tables_of(index)
    preprocessing = Preprocessing(12, 8, (0.5,) * 3, (0.5,) * 3, "bilinear")
    source = pipeline.describe_source(index, dataset, preprocessing, ref)
    pairs = np.stack([rows, np.zeros_like(rows)], axis=1)
    return pipeline.DecodeBatch(source, "train")({"data": pairs})


def test_webdataset_batch_decodes_and_a_bad_image_is_skipped_and_counted_or_fails(tmp_path):
    spec = DatasetSpec(uri=str(tmp_path / "wds"), layout="webdataset", val_fraction=0.25)
    broken = [next(n for n in range(s, 120) if hash_split(f"s{n:05d}", spec) == "train") for s in (7, 95)]
    write_shards(tmp_path / "wds", bad=tuple(broken))
    index = build_index(spec)
    rows = np.array(train_rows(len(index.train), 0, 0, 0, 1, run_length=16))  # the whole split, as one batch
    out = decode_batch(index, spec, rows, "skip")
    bad = {i for i, r in enumerate(rows) if int(sample_of(index.train[r][0])[1:]) in broken}
    assert len(bad) == 2
    assert {i for i, label in enumerate(out["label"]) if label == pipeline.BAD_LABEL} == bad
    good = [i for i in range(len(rows)) if i not in bad]
    assert [int(out["label"][i]) for i in good] == [index.train[rows[i]][1] for i in good]
    red = out["image"][[i for i in good if index.train[rows[i]][1] == 0]]
    assert red.shape[1:] == (3, 8, 8) and red[:, 0].mean() > 150 > red[:, 2].mean()
    with pytest.raises(
        DataError, match=r"dataset.on_bad_image: cannot decode .*/shard-00\d.tar#\d+:\d+:s000\d\d.(png|jpg)"
    ):
        decode_batch(index, spec, rows, "fail")


# ---------------------------------------------------------------------------------------
# The shard-aware training order
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, world, run", [(203, 2, 8), (1000, 3, 32), (50, 2, 16)])
def test_shard_order_covers_each_share_in_runs_with_equal_steps(rows, world, run):
    shares = rank_shares(rows, 5, world, run)
    assert np.array_equal(np.sort(np.concatenate(shares)), np.arange(rows))  # a partition
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # a share is made of whole runs of consecutive rows, except where the cut between ranks falls
    assert sum(int(np.sum(np.diff(s) != 1)) for s in shares) <= -(-rows // run) + world
    for rank, share in enumerate(shares):
        epochs = [train_rows(rows, 5, epoch, rank, world, run) for epoch in range(3)]
        for order in epochs:
            assert len(order) == rows // world and len(set(order.tolist())) == len(order)
            assert set(order.tolist()) <= set(share.tolist())
            assert len(share) - len(order) <= 1
            position = np.searchsorted(share, order)
            breaks = int(np.sum(np.diff(position) != 1))
            assert breaks <= -(-len(share) // run)  # at most one break per run: runs are read contiguously
            assert breaks >= min(3, len(share) // run - 1)  # and the runs are shuffled
        assert not np.array_equal(epochs[0], epochs[1])
        assert np.array_equal(epochs[2], train_rows(rows, 5, 2, rank, world, run))  # reproducible
    steps = {train_batches(rows, world, 8)[1] for _ in range(world)}
    assert len(steps) == 1 and all(len(train_rows(rows, 5, 0, r, world, run)) == rows // world for r in range(world))


def test_run_length_one_is_the_row_shuffle():
    assert np.array_equal(train_rows(500, 3, 1, 1, 2, run_length=1), train_rows(500, 3, 1, 1, 2))
    breaks = int(np.sum(np.diff(np.searchsorted(rank_shares(500, 3, 2)[1], train_rows(500, 3, 1, 1, 2))) != 1))
    assert breaks > 200


# ---------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------
HF_NAMES = ["zebra", "apple", "mango"]  # not sorted: the ClassLabel's order is the class order


def write_parquet(
    folder: Path,
    files: int = 2,
    per_file: int = 60,
    row_group: int = 16,
    labels: str = "hf",
    image_column: str = "image",
    label_column: str = "label",
    bad: tuple[int, ...] = (),
) -> dict[int, bytes]:
    """part-0.parquet …, row n of the dataset is image n, class n % 3. `labels`: "hf" (int64 with the ClassLabel
    metadata that `datasets`' to_parquet() writes, images as its {bytes, path} struct), "int" or "str" (plain
    columns, images as bytes). Returns each row's image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for f in range(files):
        numbers = range(f * per_file, (f + 1) * per_file)
        blobs = [b"" if n in bad else image_bytes(n) for n in numbers]
        images.update(zip(numbers, blobs, strict=True))
        if labels == "hf":
            image = pa.array([{"bytes": b, "path": f"{n}.png"} for n, b in zip(numbers, blobs, strict=True)])
            table = pa.table({image_column: image, label_column: pa.array([n % 3 for n in numbers], pa.int64())})
            features = {image_column: {"_type": "Image"}, label_column: {"names": HF_NAMES, "_type": "ClassLabel"}}
            metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
            table = table.replace_schema_metadata(metadata)
        else:
            label = [n % 3 for n in numbers] if labels == "int" else [f"c{n % 3}" for n in numbers]
            table = pa.table({"id": list(numbers), image_column: pa.array(blobs, pa.binary()), label_column: label})
        pq.write_table(table, folder / f"part-{f}.parquet", row_group_size=row_group)
    return images


def row_of(index: DatasetIndex, key: str, per_file: int = 60, row_group: int = 16) -> int:
    """The dataset row (image number) of an index key."""
    file, group, row = parquet_reader.parse_key(key)
    return int(file.split("-")[1].split(".")[0]) * per_file + group * row_group + row


def test_parquet_from_hugging_face_on_s3_takes_the_class_label_names(s3_env, s3_bucket, tmp_path):
    write_parquet(tmp_path / "hf")
    upload_tree(s3_env, s3_bucket, "hf/train/", tmp_path / "hf")
    spec = DatasetSpec(uri=f"s3://{s3_bucket}/hf/train", layout="parquet", endpoint_url=s3_env, val_fraction=0.25)
    index = build_index(spec)
    assert index.classes == HF_NAMES
    samples = index.train + index.val
    assert sorted(row_of(index, k) for k, _ in samples) == list(range(120))
    assert all(label == row_of(index, k) % 3 for k, label in samples)
    assert {k for k, _ in index.val} == {k for k, _ in samples if hash_split(k, spec) == "val"} and 10 < len(
        index.val
    ) < 50
    assert index.fingerprint == build_index(spec).fingerprint


def test_parquet_integer_labels_are_named_by_dataset_classes_or_their_indices(tmp_path):
    write_parquet(tmp_path / "p", labels="int")
    assert build_index(DatasetSpec(uri=str(tmp_path / "p"), layout="parquet")).classes == ["0", "1", "2"]
    named = build_index(DatasetSpec(uri=str(tmp_path / "p"), layout="parquet", classes=["x", "b", "a"]))
    assert named.classes == ["x", "b", "a"] and all(label == row_of(named, k) % 3 for k, label in named.train)
    with pytest.raises(
        DataError, match=r"^dataset.classes: part-0.parquet row 2 of row group 0 has class 2, outside the 2"
    ):
        build_index(DatasetSpec(uri=str(tmp_path / "p"), layout="parquet", classes=["x", "b"]))


def test_parquet_string_labels_in_columns_named_by_the_spec(tmp_path):
    write_parquet(tmp_path / "p", labels="str", image_column="jpeg", label_column="species")
    index = build_index(
        DatasetSpec(uri=str(tmp_path / "p"), layout="parquet", image_column="jpeg", label_column="species")
    )
    assert index.classes == ["c0", "c1", "c2"]
    assert all(label == row_of(index, k) % 3 for k, label in index.train + index.val)
    with pytest.raises(
        DataError,
        match=r"^dataset.image_column: .*part-0.parquet has no column 'image' \(its columns: id, jpeg, species\)",
    ):
        build_index(DatasetSpec(uri=str(tmp_path / "p"), layout="parquet", label_column="species"))


def test_parquet_reader_reads_each_file_once_for_the_batch(s3_env, s3_bucket, tmp_path):
    images = write_parquet(tmp_path / "hf")
    upload_tree(s3_env, s3_bucket, "hf/", tmp_path / "hf")
    with FlakyProxy(s3_env, fail_ratio=0.0) as proxy:
        index = build_index(DatasetSpec(uri=f"s3://{s3_bucket}/hf", layout="parquet", endpoint_url=proxy.endpoint))
        keys = [k for k, _ in index.train]
        batch = (keys[:20] + keys[-30:])[::-1]  # two files, five row groups
        assert len({parquet_reader.parse_key(k)[:2] for k in batch}) >= 4
        before = len(proxy.log)
        got = dict(parquet_reader.read(index.root, batch, proxy.endpoint, 4, 5.0))
        gets = sum(1 for method, _ in proxy.log[before:] if method == "GET")
    assert got == {i: images[row_of(index, k)] for i, k in enumerate(batch)}
    assert gets <= 2 * 2  # per file: the footer, then the row groups' image column chunks in one coalesced read


def test_parquet_batch_decodes_and_a_file_deleted_after_indexing_is_a_read_failure(tmp_path):
    spec = DatasetSpec(uri=str(tmp_path / "p"), layout="parquet", val_fraction=0.25)
    write_parquet(tmp_path / "p", labels="hf", bad=(5, 77))
    index = build_index(spec)
    rows = np.array(train_rows(len(index.train), 0, 0, 0, 1, run_length=32))
    out = decode_batch(index, spec, rows, "skip")
    bad = {i for i, r in enumerate(rows) if row_of(index, index.train[r][0]) in (5, 77)}
    expected_bad = {n for n in (5, 77) if any(row_of(index, k) == n for k, _ in index.train)}
    assert len(bad) == len(expected_bad) >= 1
    assert {i for i, label in enumerate(out["label"]) if label == pipeline.BAD_LABEL} == bad
    assert [int(out["label"][i]) for i in range(len(rows)) if i not in bad] == [
        index.train[r][1] for i, r in enumerate(rows) if i not in bad
    ]
    (tmp_path / "p" / "part-1.parquet").unlink()
    with pytest.raises(ReadFailure) as error:
        decode_batch(index, spec, rows, "skip")
    assert error.value.location.startswith(f"{tmp_path}/p/part-1.parquet (row groups 0, 1, 2, 3)")


@pytest.mark.parametrize("layout, kind", [("webdataset", "`.tar` shards"), ("parquet", "`.parquet` files")])
def test_a_folder_without_shards_says_what_it_looked_for(tmp_path, layout, kind):
    write_shards(tmp_path / "d", shards=1) if layout == "parquet" else write_parquet(tmp_path / "d", files=1)
    with pytest.raises(DataError, match=f"^dataset.uri: no {kind} under {tmp_path}/d$"):
        build_index(DatasetSpec(uri=str(tmp_path / "d"), layout=layout))


def test_evaluate_labels_shards_by_the_models_classes_with_the_training_fingerprint(tmp_path):
    from tlray.flows.evaluate import labelled_index

    write_shards(tmp_path / "wds", shards=2)
    spec = DatasetSpec(uri=str(tmp_path / "wds"), layout="webdataset", classes=["a", "b", "c"])
    index = labelled_index(spec, ["c", "b", "a"])
    assert index.train == [] and len(index.val) == 80 and index.root == str(tmp_path / "wds")
    assert all(index.classes[label] == "abc"[int(sample_of(k)[1:]) % 3] for k, label in index.val)
    assert index.fingerprint == build_index(spec).fingerprint
