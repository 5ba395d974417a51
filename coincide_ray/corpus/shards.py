"""Record shards: every input file streamed once into Parquet shards of our own (pure: the
Ray tasks that run it are coincide_ray.corpus.stage).

The driver never holds the records. Each input file is read by one Ray task, streamed
(records.file_rows), and cut into shards of `chunk_records` records under
output/records/: the record's JSON text, its row in the file, and the reason it is not
JSON at all when it is not. Beside each file's shards a .keys.npy file holds a 16-byte key
of every record's id (zero where the row does not parse as a record). One more task reads
the keys alone (16 bytes a record) and finds the duplicate ids with numpy: the first copy
that parses wins, as records.accepted_records decides it in one process. The driver gets
back only the duplicates.

The blocks every stage works on are cut from the shards in canonical order (file, then
position), so block i always holds the same records. A block travels between Ray tasks as a
small row of Arrow-friendly columns (where its records lie, which of them are duplicates),
and the worker that needs the records reads them from the shards.

output/records/_index.json names each input file with its version (size and times and
inode locally, the ETag on an object store): a file whose version is unchanged is not read
again, so a rerun over the same records starts from its shards; the duplicates found for
those files are kept beside the index (_duplicates.npy) and not looked for again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from coincide_ray import io
from coincide_ray.records import (RECORD_SUFFIXES, Record, Rejection, file_rows, load_row, parse_record,
                                  unparsable_reason)

RECORDS_DIR = "records"
INDEX_NAME = "_index.json"
FORMAT = 1
SHARD_SCHEMA = pa.schema([("row", pa.int64()), ("text", pa.binary()), ("problem", pa.string())])


def id_key(sample_id: str) -> tuple[int, int]:
    """16 bytes of the id's blake2b as two uint64 (never both zero: zero marks a non-record).
    Two distinct ids share a key with odds of ~1e-24 for 20 million records."""
    digest = hashlib.blake2b(sample_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    high, low = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
    return (high, low) if high or low else (1, 0)


def shard_uri(folder: str, key: str, chunk: int) -> str:
    return io.join(folder, f"{key}-{chunk:06d}.parquet")


def keys_uri(folder: str, key: str) -> str:
    return io.join(folder, f"{key}.keys.npy")


def shard_file(uri: str, folder: str, key: str, chunk_records: int) -> int:
    """Stream one input file into its shards and its keys file; returns its record count.
    Runs in a Ray task: memory is one shard, whatever the size of the file."""
    keys: list[tuple[int, int]] = []
    rows: list[int] = []
    texts: list[bytes | None] = []
    problems: list[str | None] = []

    def flush() -> None:
        table = pa.table({"row": rows, "text": texts, "problem": problems}, schema=SHARD_SCHEMA)
        io.write_parquet(table, shard_uri(folder, key, (len(keys) - 1) // chunk_records))
        rows.clear(), texts.clear(), problems.clear()

    for row, text, raw in file_rows(uri):
        item = parse_record(raw, f"{uri}#{row}")
        keys.append(id_key(item.id) if isinstance(item, Record) else (0, 0))
        rows.append(row), texts.append(text), problems.append(unparsable_reason(raw))
        if len(rows) == chunk_records:
            flush()
    if rows:
        flush()
    io.write_npy(np.array(keys, dtype=np.uint64).reshape(-1, 2), keys_uri(folder, key))
    return len(keys)


@dataclass(frozen=True)
class InputFile:
    uri: str  # as this run names it (positions in messages use it)
    name: str  # relative to the input root: what the index knows it by, however the root is spelled
    version: str  # io.version: unchanged version, unchanged bytes
    key: str  # its shards' file-name stem
    records: int


@dataclass
class Corpus:
    """What the driver keeps of the input: per file its shards and count, and the duplicate
    ids (global positions of later copies and of the first copy). Never the records."""

    folder: str
    chunk_records: int
    files: list[InputFile]
    duplicate_of: dict[int, int]  # global index of a later copy -> global index of the first
    read_again: int = 0  # files streamed into shards by this call (0: all were unchanged)

    @property
    def records(self) -> int:
        return sum(f.records for f in self.files)

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([f.records for f in self.files])]).astype(np.int64)

    def position(self, index: int, offsets: np.ndarray | None = None) -> str:
        offsets = self.offsets() if offsets is None else offsets
        file = int(np.searchsorted(offsets, index, side="right") - 1)
        return f"{self.files[file].uri}#{index - offsets[file]}"

    def blocks(self, block_records: int) -> int:
        return -(-self.records // block_records)

    def block_rows(self, block_records: int, blocks: list[int] | None = None) -> list[dict]:
        """One small row per block (Arrow-friendly: an int and two JSON strings): which shard
        rows it holds and which of them are duplicates. read_block turns it into records."""
        offsets = self.offsets()
        total = int(offsets[-1])
        later = np.array(sorted(self.duplicate_of), dtype=np.int64)
        rows = []
        for block in range(self.blocks(block_records)) if blocks is None else blocks:
            start, stop = block * block_records, min((block + 1) * block_records, total)
            spans, at = [], start
            while at < stop:
                file = int(np.searchsorted(offsets, at, side="right") - 1)
                inside = at - offsets[file]
                chunk, row = divmod(int(inside), self.chunk_records)
                take = int(min(stop - at, self.chunk_records - row, offsets[file + 1] - at))
                spans.append([shard_uri(self.folder, self.files[file].key, chunk), self.files[file].uri, row, row + take])
                at += take
            inside = later[np.searchsorted(later, start):np.searchsorted(later, stop)]
            duplicates = [[int(index) - start, self.position(self.duplicate_of[int(index)], offsets)]
                          for index in inside]
            rows.append({"block": block, "spans": json.dumps(spans), "duplicates": json.dumps(duplicates)})
        return rows


def read_block(row: dict) -> list[Record | Rejection]:
    """The records of a block row (Corpus.block_rows), checked, in canonical order: every
    record as records.parse_record judges it, later copies of an id rejected as duplicates."""
    return [item for item, _ in raw_texts(row)]


def raw_texts(row: dict) -> list[tuple[Record | Rejection, bytes | None]]:
    """(item as read_block gives it, the record's JSON text as the input holds it) for each
    record of a block row."""
    pairs: list[tuple[Record | Rejection, bytes | None]] = []
    for shard, file_uri, start, stop in json.loads(row["spans"]):
        table = io.read_parquet(shard).slice(start, stop - start)
        for number, text, problem in zip(*(table.column(name).to_pylist() for name in SHARD_SCHEMA.names)):
            pairs.append((parse_record(load_row(text, problem), f"{file_uri}#{number}"), text))
    for offset, first in json.loads(row["duplicates"]):
        item, text = pairs[offset]
        pairs[offset] = (Rejection(item.id, "read", "duplicate id", f"{item.position}; first at {first}"), text)
    return pairs


class KeySet:
    """A set of ids as sorted 16-byte keys (two uint64 columns): sent once to every task,
    read there without copying, and asked about a whole block at once."""

    def __init__(self, ids):
        keys = np.array([id_key(i) for i in ids], dtype=np.uint64).reshape(-1, 2)
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        self.high, self.low = keys[order, 0].copy(), keys[order, 1].copy()

    def __len__(self) -> int:
        return len(self.high)

    def holds(self, ids: list[str]) -> np.ndarray:
        if not ids or not len(self.high):
            return np.zeros(len(ids), dtype=bool)
        keys = np.array([id_key(i) for i in ids], dtype=np.uint64).reshape(-1, 2)
        left = np.searchsorted(self.high, keys[:, 0], side="left")
        right = np.searchsorted(self.high, keys[:, 0], side="right")
        found = np.zeros(len(ids), dtype=bool)
        for row in np.flatnonzero(right > left):  # almost always one candidate
            found[row] = bool((self.low[left[row]:right[row]] == keys[row, 1]).any())
        return found


def input_files(input_uri: str) -> list[tuple[str, str]]:
    """(uri, name relative to the input root) of each input file, in canonical order."""
    files = io.list_files(input_uri, RECORD_SUFFIXES)
    prefix = input_uri.rstrip("/") + "/"
    return [(uri, uri[len(prefix):] if uri.startswith(prefix) else uri.rsplit("/", 1)[-1]) for uri in files]


def duplicates(keys: np.ndarray) -> dict[int, int]:
    """{later copy: first copy} over the global index, from the (N, 2) uint64 id keys (zero:
    not a record, never a duplicate). One stable sort of indices; beyond the keys, memory is
    about 24 bytes a record at the peak."""
    order = np.lexsort((keys[:, 1], keys[:, 0]))  # stable: equal keys stay in input order
    same = np.ones(max(len(order) - 1, 0), dtype=bool)
    for column in (0, 1):
        ordered = keys[order, column]
        same &= ordered[1:] == ordered[:-1]
        del ordered
    same &= keys[order[1:]].any(axis=1)
    found: dict[int, int] = {}
    for i in np.flatnonzero(same) + 1:  # the later copies, in sorted order
        first = found.get(int(order[i - 1]), int(order[i - 1]))
        found[int(order[i])] = first
    return found


def find_duplicates(keys_files: list[str], records: int) -> dict[int, int]:
    """duplicates() over every input file's keys, read into one array (a Ray task when the
    job runs: the driver never holds N keys)."""
    keys = np.empty((records, 2), dtype=np.uint64)
    at = 0
    for uri in keys_files:
        part = io.read_npy(uri)
        keys[at:at + len(part)] = part
        at += len(part)
    return duplicates(keys)


Runner = Callable[[Callable, list[tuple]], list]  # (function, argument tuples) -> results, in order


def in_process(fn: Callable, calls: list[tuple]) -> list:
    """A Runner for one process (tests, tools): each call in turn."""
    return [fn(*args) for args in calls]


DUPLICATES_NAME = "_duplicates.npy"


def prepare(input_uri: str, output: str, chunk_records: int, progress: Callable[[str], None] = print,
            run: Runner = in_process) -> Corpus:
    """The corpus of `input_uri`, its shards under output/records. Files whose version the
    index already holds are not read again; the others are streamed by `run` (Ray tasks when
    the job runs: coincide_ray.corpus.stage), all at once, and the duplicate ids are found
    again by one more call. Shards of files the input no longer has, or of their older
    versions, are removed once the new index is written."""
    folder = io.join(output, RECORDS_DIR)
    index_uri = io.join(folder, INDEX_NAME)
    index = read_index(index_uri, chunk_records)
    known = {entry["key"]: entry for entry in index.get("files", [])}
    wanted = []
    for uri, name in input_files(input_uri):
        version = io.version(uri)
        key = hashlib.sha256(f"{name}\0{version}\0{chunk_records}\0{FORMAT}".encode()).hexdigest()[:20]
        wanted.append((uri, name, version, key))
    todo = [(uri, key) for uri, _, _, key in wanted if key not in known or not io.exists(keys_uri(folder, key))]
    if todo:
        progress(f"records: reading {len(todo)} of {len(wanted)} input file(s) into shards under {folder}")
    counts = dict(zip((key for _, key in todo),
                      run(shard_file, [(uri, folder, key, chunk_records) for uri, key in todo])))
    files = [InputFile(uri, name, version, key, counts[key] if key in counts else int(known[key]["records"]))
             for uri, name, version, key in wanted]
    entries = [{"name": f.name, "version": f.version, "key": f.key, "records": f.records} for f in files]
    duplicates_uri = io.join(folder, DUPLICATES_NAME)
    if not todo and index.get("files") == entries and io.exists(duplicates_uri):
        duplicate_of = dict(io.read_npy(duplicates_uri).tolist())  # the same files: the same duplicates
    else:
        [duplicate_of] = run(find_duplicates, [([keys_uri(folder, f.key) for f in files], sum(f.records for f in files))])
        io.write_npy(np.array(sorted(duplicate_of.items()), dtype=np.int64).reshape(-1, 2), duplicates_uri)
        io.write_json({"format": FORMAT, "chunk_records": chunk_records, "files": entries}, index_uri)  # last
        remove_stale(folder, {f.key for f in files})
    corpus = Corpus(folder, chunk_records, files, duplicate_of, len(todo))
    progress(f"records: {corpus.records} in {len(files)} file(s)"
             + (f", {len(corpus.duplicate_of)} later copies of an id" if corpus.duplicate_of else ""))
    return corpus


def read_index(index_uri: str, chunk_records: int) -> dict:
    """The index of the shards under the output, or {} when there is none for this format
    and chunk size (then every file is read into shards again)."""
    if not io.exists(index_uri):
        return {}
    try:
        index = io.read_json(index_uri)
        usable = index.get("format") == FORMAT and index.get("chunk_records") == chunk_records
        return index if usable and isinstance(index.get("files"), list) else {}
    except (ValueError, AttributeError):
        return {}


def remove_stale(folder: str, keep: set[str]) -> None:
    """Remove the shards and keys files of file keys not in `keep`."""
    try:
        present = io.list_files(folder, (".parquet", ".npy"))
    except FileNotFoundError:
        return
    for uri in present:
        name = uri.rsplit("/", 1)[-1]
        if name != DUPLICATES_NAME and name.split("-", 1)[0].split(".", 1)[0] not in keep:
            io.remove(uri)
