"""Reader `parquet`: images in a column of Parquet files, a batch read with one file open per file.

A sample's key says where its image lives: `<file key>#<row group>:<row in the group>` (zero-padded,
so sorted keys follow the file's order). A batch's keys are grouped by file, and each file's image
column is read once for all the row groups the batch needs (pyarrow coalesces their column chunks into
few ranged reads); only the batch's rows are kept. The column holds bytes, or Hugging Face's
`{bytes, path}` struct of an `Image` feature.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import as_completed

from tlray.io import storage
from tlray.io.fetch import shared_pool, with_retries


def sample_key(file: str, row_group: int, row: int) -> str:
    return f"{file}#{row_group:06d}:{row:09d}"


def parse_key(key: str) -> tuple[str, int, int]:
    """(file key, row group, row in the group) of a sample key."""
    file, _, where = key.partition(".parquet#")
    group, row = where.split(":")
    return file + ".parquet", int(group), int(row)


def image_bytes(value) -> bytes:
    """A cell of the image column: bytes, or a `{bytes, path}` struct; empty (a bad image) when it has none."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value or b"")


def read_file(
    location: str, wanted: list[tuple[int, int, int]], image_column: str, endpoint_url: str | None
) -> list[tuple[int, bytes]]:
    """(position, image) of each (position, row group, row) wanted from one file: one open, one column read."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(location, endpoint_url)
    groups = sorted({group for _, group, _ in wanted})
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f, pre_buffer=True)
        column = parquet.read_row_groups(groups, columns=[image_column], use_threads=False).column(0)
        starts, total = {}, 0
        for group in groups:
            starts[group] = total
            total += parquet.metadata.row_group(group).num_rows
    for _, group, row in wanted:
        if row >= parquet.metadata.row_group(group).num_rows:
            raise IndexError(f"row group {group} has no row {row}: the file changed since indexing")
    cells = column.take([starts[group] + row for _, group, row in wanted]).to_pylist()
    return [(position, image_bytes(cell)) for (position, _, _), cell in zip(wanted, cells, strict=True)]


def read(
    root: str,
    keys: list[str],
    endpoint_url: str | None,
    concurrency: int,
    retry_seconds: float,
    image_column: str = "image",
) -> Iterator[tuple[int, bytes]]:
    """(position, image bytes) of every key, file by file as each read finishes (`concurrency` files at once)."""
    by_file: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for position, key in enumerate(keys):
        file, group, row = parse_key(key)
        by_file[file].append((position, group, row))

    def fetch(file: str) -> list[tuple[int, bytes]]:
        location = storage.join(root, file)
        rows = by_file[file]
        groups = sorted({g for _, g, _ in rows})
        name = f"{location} (row group{'s' if len(groups) > 1 else ''} {', '.join(map(str, groups))})"
        return with_retries(lambda: read_file(location, rows, image_column, endpoint_url), name, retry_seconds)

    if len(by_file) <= 1 or concurrency <= 1:
        for file in by_file:
            yield from fetch(file)
        return
    futures = [shared_pool(concurrency).submit(fetch, file) for file in by_file]
    try:
        for future in as_completed(futures):
            yield from future.result()
    finally:
        for future in futures:
            future.cancel()
