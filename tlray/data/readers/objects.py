"""Reader `objects`: every image is its own file or S3 object, read with one GET, many in flight."""

from __future__ import annotations

from collections.abc import Iterator

from tlray.io.fetch import read_as_completed


def read(
    root: str, keys: list[str], endpoint_url: str | None, concurrency: int, retry_seconds: float
) -> Iterator[tuple[int, bytes]]:
    """(position, bytes) of every `root/key` as each read finishes (tlray.io.fetch): the caller decodes
    one image while the next ones are still on the wire."""
    return read_as_completed(root, keys, endpoint_url, concurrency, retry_seconds)
