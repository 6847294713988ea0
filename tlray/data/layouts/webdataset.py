"""`dataset.layout: webdataset`: `.tar` shards of samples `<key>.<jpg|jpeg|png|webp>` + `<key>.cls`.

`dataset.uri` is the folder or prefix of the shards, or a brace pattern of them
(`s3://bucket/shards-{000000..000099}.tar`). A sample's key is WebDataset's: its member path up to the
first dot of the file name. `<key>.cls` holds the class index as text; `dataset.classes` names the
classes (entry i is class i), else the indices are the names. The split is the stable hash split of
the sample key, so re-sharding the same samples moves none between train and val.

The index streams each shard's members once (concurrently), recording every image's offset and size
in the shard: the reader (tlray.data.readers.tar) then fetches a batch with a few ranged reads.
"""

from __future__ import annotations

import itertools
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor

from tlray.data.errors import DataError
from tlray.data.layouts import Row
from tlray.data.listing import is_hidden
from tlray.data.readers.tar import sample_key
from tlray.data.split import hash_split
from tlray.io import storage
from tlray.io.s3 import S3Error, StoredObject
from tlray.spec import DatasetSpec

READER = "tar"
DATA_FILES = "`.tar` shards"
RUN_LENGTH = 32  # consecutive samples of a shard read together (order.py): a batch is a few spans
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
INDEX_THREADS = 16  # shards listed at once


def is_data_file(key: str) -> bool:
    return key.endswith(".tar") and not any(is_hidden(part) for part in key.split("/"))


def label_source(dataset: DatasetSpec) -> tuple[str, str]:
    return "dataset.uri", dataset.uri


def root(dataset: DatasetSpec) -> str:
    """The folder of a brace pattern (`…/shards-{000..009}.tar` -> `…`), else dataset.uri itself."""
    if "{" not in dataset.uri:
        return dataset.uri
    cut = dataset.uri.rfind("/", 0, dataset.uri.index("{"))
    return dataset.uri[:cut] if cut >= 0 else "."


def expand_braces(pattern: str) -> list[str]:
    """`a-{00..02}.tar` -> a-00.tar, a-01.tar, a-02.tar (zero padding kept); `{x,y}` lists too."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        choices = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return list(itertools.chain.from_iterable(expand_braces(head + c + tail) for c in choices))


def shards(dataset: DatasetSpec, files: dict[str, StoredObject]) -> list[str]:
    """The shard keys to read, in order: every listed `.tar`, or those the brace pattern names."""
    if "{" not in dataset.uri:
        return sorted(files)
    folder = root(dataset)
    cut = dataset.uri.rfind("/", 0, dataset.uri.index("{")) + 1  # the pattern's names, relative to its folder
    named = [name[cut:] for name in expand_braces(dataset.uri)]
    missing = [name for name in named if name not in files]
    if missing:
        shown = ", ".join(missing[:3]) + (f", … {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"dataset.uri: {len(missing)} shard(s) of the pattern do not exist under {folder}: {shown}")
    return named


def members(dataset: DatasetSpec, shard: str) -> list[tuple[str, str, int, int, str]]:
    """(sample key, suffix, data offset, size, content of a .cls member or "") of every file in a shard,
    streamed once from start to end: on S3 one GET, whose body tarfile reads as it arrives."""
    location = storage.join(storage.absolute_uri(root(dataset)), shard)
    out = []
    try:
        with open_stream(location, dataset.endpoint_url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, dot, suffix = name.partition(".")
                if not dot or is_hidden(name):
                    continue
                key = f"{folder}/{stem}" if folder else stem
                content = tar.extractfile(member).read().decode("utf-8", "replace") if suffix == "cls" else ""
                out.append((key, suffix.lower(), member.offset_data, member.size, content))
    except (OSError, S3Error, tarfile.TarError) as exc:
        raise DataError(f"dataset.uri: cannot read shard {location}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 — botocore's errors, without importing botocore for local data
        raise DataError(f"dataset.uri: cannot read shard {location}: {type(exc).__name__}: {exc}") from None
    return out


def open_stream(location: str, endpoint_url: str | None):
    """The shard's bytes as one sequential stream: a local file, or the body of one S3 GET (pyarrow's
    S3 files would issue a ranged GET per small read)."""
    if not storage.is_s3(location):
        return open(location, "rb")
    from tlray.io import s3

    bucket, key = location[len("s3://") :].split("/", 1)
    client = s3.client(endpoint_url, max_attempts=storage.s3_max_attempts())
    return client.get_object(Bucket=bucket, Key=key)["Body"]


def class_index(text: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise DataError(f"dataset.uri: {where} holds '{text.strip()[:40]}', not a class index") from None


def rows(dataset: DatasetSpec, files: dict[str, StoredObject]) -> list[Row]:
    """(sample key in its shard, class name, split) for every sample with an image and a `.cls`."""
    names = shards(dataset, files)
    with ThreadPoolExecutor(max(1, min(INDEX_THREADS, len(names)))) as pool:
        listed = list(pool.map(lambda shard: members(dataset, shard), names))
    out, unlabelled = [], []
    for shard, shard_members in zip(names, listed, strict=True):
        labels, images = {}, {}
        for key, suffix, offset, size, content in shard_members:
            if suffix == "cls":
                labels[key] = class_index(content, f"{shard}: {key}.cls")
            elif suffix in IMAGE_SUFFIXES and key not in images:
                images[key] = sample_key(shard, offset, size, f"{key}.{suffix}")
        for key, where in images.items():
            if key not in labels:
                unlabelled.append(f"{shard}: {key}")
                continue
            out.append((where, class_name(dataset, labels[key], f"{shard}: {key}.cls"), hash_split(key, dataset)))
    if unlabelled:
        shown = ", ".join(unlabelled[:3]) + (f", … {len(unlabelled) - 3} more" if len(unlabelled) > 3 else "")
        raise DataError(f"dataset.uri: {len(unlabelled)} sample(s) have an image but no .cls label: {shown}")
    return out


def class_name(dataset: DatasetSpec, index: int, where: str) -> str:
    if dataset.classes is None:
        if index < 0:
            raise DataError(f"dataset.uri: {where} holds class {index}; class indices start at 0")
        return str(index)
    if not 0 <= index < len(dataset.classes):
        raise DataError(
            f"dataset.classes: {where} holds class {index}, outside the {len(dataset.classes)} classes named"
        )
    return dataset.classes[index]


def classes(dataset: DatasetSpec, labelled: list[Row]) -> list[str]:
    """dataset.classes in its order; without it the indices found, as names, in numeric order."""
    if dataset.classes is not None:
        return list(dataset.classes)
    return sorted({label for _, label, _ in labelled}, key=int)
