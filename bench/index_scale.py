"""Driver cost of indexing a million keys: listing, labels, split, fingerprint, and the key tables
that ship to the workers. The listing is generated (a fake S3 paginator with AWS's page size of
1,000 keys), so this measures tlray's own time and memory, not a store's latency.

    .venv/bin/python bench/index_scale.py [--keys 1000000] [--classes 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PAGE = 1_000


class FakePaginator:
    def __init__(self, keys_by_folder: dict[str, int], root: str):
        self.keys_by_folder, self.root = keys_by_folder, root

    def paginate(self, Bucket: str, Prefix: str, Delimiter: str | None = None):  # noqa: N803 — boto3's names
        if Delimiter:  # the top-level listing: only the folders
            yield {"CommonPrefixes": [{"Prefix": f"{self.root}{folder}/"} for folder in self.keys_by_folder]}
            return
        folder = Prefix[len(self.root) :].rstrip("/")
        count = self.keys_by_folder[folder]
        for start in range(0, count, PAGE):
            yield {
                "Contents": [
                    {"Key": f"{Prefix}img_{n:07d}.jpg", "Size": 40_000 + n % 997, "ETag": f'"{n:032x}"'}
                    for n in range(start, min(count, start + PAGE))
                ]
            }


class FakeClient:
    def __init__(self, paginator):
        self.paginator = paginator

    def get_paginator(self, name: str):
        return self.paginator


def rss_mib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) // 1024


def measure(keys: int, classes: int) -> dict:
    from tlray.data.index import KeyTable, build_index
    from tlray.io import s3
    from tlray.spec import DatasetSpec

    folders = {f"class_{k:02d}": keys // classes for k in range(classes)}
    s3.client = lambda endpoint_url, max_attempts=10: FakeClient(FakePaginator(folders, "images/"))
    rss_before = rss_mib("VmRSS")  # torch and pyarrow are imported by now
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    started = time.perf_counter()
    index = build_index(DatasetSpec(uri="s3://bench/images"))
    indexed = time.perf_counter()
    tables = {split: KeyTable.of(getattr(index, split)) for split in ("train", "val")}
    tabled = time.perf_counter()
    table_bytes = sum(t.blob.nbytes + t.offsets.nbytes + t.labels.nbytes for t in tables.values())
    return {
        "keys": len(index.train) + len(index.val),
        "classes": len(index.classes),
        "index_seconds": round(indexed - started, 2),
        "key_tables_seconds": round(tabled - indexed, 2),
        "rss_before_mib": rss_before,
        "peak_rss_growth_mib": rss_mib("VmHWM") - rss_before,
        "rss_growth_mib": rss_mib("VmRSS") - rss_before,
        "shipped_to_workers_mib": round(table_bytes / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    result = measure(args.keys, args.classes)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
