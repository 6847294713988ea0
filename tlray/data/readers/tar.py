"""Reader `tar`: samples inside `.tar` shards (WebDataset), a batch's samples read with few ranged GETs.

A sample's key says where its image lives: `<shard key>#<data offset>:<size>:<member name>` (the offset
zero-padded, so sorted keys follow the shard's order). A batch's keys are grouped by shard, and the
byte ranges of one shard that lie close together (a gap of at most MAX_GAP bytes) are read as one span:
one ranged GET on S3, one seek and read locally. With the training order's runs of consecutive samples
(tlray.data.order), a batch of 64 is a handful of requests instead of 64.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import as_completed
from dataclasses import dataclass

from tlray.io import storage
from tlray.io.fetch import read_range, shared_pool

MAX_GAP = 256 * 1024  # bytes read and thrown away rather than paying for another request
MAX_SPAN = 32 * 1024 * 1024  # one request's bytes at most: a span is held in memory while decoded


def sample_key(shard: str, offset: int, size: int, member: str) -> str:
    return f"{shard}#{offset:012d}:{size}:{member}"


def parse_key(key: str) -> tuple[str, int, int, str]:
    """(shard key, data offset, size, member name) of a sample key."""
    shard, _, where = key.partition(".tar#")
    offset, size, member = where.split(":", 2)
    return shard + ".tar", int(offset), int(size), member


@dataclass
class Span:
    shard: str
    start: int
    end: int
    samples: list[tuple[int, int, int, str]]  # (position in the batch, offset, size, member)

    def name(self, root: str) -> str:
        """What a failure names: the shard, and the members the span holds."""
        members = [m for _, _, _, m in self.samples]
        more = f" and {len(members) - 1} more" if len(members) > 1 else ""
        return f"{storage.join(root, self.shard)} (member {members[0]}{more})"


def spans_of(keys: list[str]) -> list[Span]:
    """The batch's samples grouped by shard and coalesced into spans of nearby bytes, fewest requests first."""
    by_shard: dict[str, list[tuple[int, int, int, str]]] = defaultdict(list)
    for position, key in enumerate(keys):
        shard, offset, size, member = parse_key(key)
        by_shard[shard].append((position, offset, size, member))
    spans: list[Span] = []
    for shard, samples in by_shard.items():
        current: Span | None = None
        for sample in sorted(samples, key=lambda s: s[1]):
            _, offset, size, _ = sample
            end = offset + size
            if current and offset - current.end <= MAX_GAP and max(end, current.end) - current.start <= MAX_SPAN:
                current.end = max(current.end, end)
                current.samples.append(sample)
            else:
                current = Span(shard, offset, end, [sample])
                spans.append(current)
    return spans


def read(
    root: str, keys: list[str], endpoint_url: str | None, concurrency: int, retry_seconds: float
) -> Iterator[tuple[int, bytes]]:
    """(position, image bytes) of every key, span by span as each read finishes (`concurrency` in flight)."""

    def fetch(span: Span) -> bytes:
        location = storage.join(root, span.shard)
        return read_range(location, span.start, span.end - span.start, endpoint_url, retry_seconds, span.name(root))

    def members(span: Span, data: bytes) -> Iterator[tuple[int, bytes]]:
        for position, offset, size, _ in span.samples:
            yield position, data[offset - span.start : offset - span.start + size]

    spans = spans_of(keys)
    if len(spans) <= 1 or concurrency <= 1:
        for span in spans:
            yield from members(span, fetch(span))
        return
    futures = {shared_pool(concurrency).submit(fetch, span): span for span in spans}
    try:
        for future in as_completed(futures):
            yield from members(futures[future], future.result())
    finally:
        for future in futures:
            future.cancel()
