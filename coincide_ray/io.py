"""The one place that opens files: fsspec URIs (plain paths, file://, s3://), atomic writes.

S3-compatible endpoints and credentials come from the standard AWS settings
(AWS_ENDPOINT_URL, the credentials chain), which s3fs and botocore read themselves.
Every object-store call is retried with exponential backoff when it fails in a way that
can pass (5xx, SlowDown, a connection cut mid-body); a call that keeps failing raises
StorageError naming the object. A missing object or a refused permission is not retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


class InputFormatError(ValueError):
    """An input file that cannot be read as its format at all."""


class StorageError(OSError):
    """An object-store call that kept failing after every retry."""


class OutsideRootError(ValueError):
    """A path that, followed to the file it names, leaves the root it must stay under."""


ATTEMPTS = 4  # our tries per call, on top of s3fs's and botocore's own; backoff 0.5 s doubling
BACKOFF_S = 0.5
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, InputFormatError,
             StorageError)
try:  # missing or partial credentials do not appear on a retry
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    PERMANENT += (NoCredentialsError, PartialCredentialsError)
except ImportError:
    pass
T = TypeVar("T")


def retried(uri: str, what: str, call: Callable[[], T]) -> T:
    """`call()`, retried on transient failures when `uri` is not a local path."""
    if "://" not in uri or uri.startswith("file://"):
        return call()
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except PERMANENT:
            raise
        except Exception as error:  # anything else from the network stack may pass on a retry
            if attempt == ATTEMPTS - 1:
                last = " ".join(str(error).split())[:200]  # one line, whatever the server sent
                raise StorageError(f"{what} {uri} failed {ATTEMPTS} times; last error: "
                                   f"{type(error).__name__}: {last}") from error
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def absolute(uri: str) -> str:
    """A local path made absolute (`~` expanded), so that Ray workers, whose working folder
    is not the driver's, read the same files; URIs (s3://, file://) as they are."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return retried(uri, "checking", lambda: fs.exists(path))


def size(uri: str) -> int:
    fs, path = resolve(uri)
    return int(retried(uri, "sizing", lambda: fs.size(path)))


def is_file(uri: str) -> bool:
    fs, path = resolve(uri)
    return bool(retried(uri, "checking", lambda: fs.isfile(path)))


def digest_cache_folder() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "coincide-ray", "sha256")


def digest(uri: str) -> str:
    """A digest of the object's content, never of its name, size or time alone.

    On an object store: the ETag, which the store computes from the bytes (an MD5 for a
    single PUT, an MD5 of part MD5s for a multipart upload). Locally: the file's sha256,
    remembered under a key of (path, size, mtime, ctime, inode) so that an unchanged file
    is not read again on the next start; any write changes ctime, so a rewritten file is
    always hashed anew."""
    fs, path = resolve(uri)
    if not isinstance(fs, LocalFileSystem):
        tag, _ = _etag(uri)
        return f"etag:{tag}" if tag else "sha256:" + hashlib.sha256(read_bytes(uri)).hexdigest()
    stat = os.stat(path)
    remembered = _digest_key(path, stat)
    try:
        with open(remembered) as f:
            return f.read()
    except OSError:
        pass
    content = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 2**20), b""):
            content.update(block)
    value = "sha256:" + content.hexdigest()
    _remember(remembered, value)
    return value


def _digest_key(path: str, stat: os.stat_result) -> str:
    key = f"{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}"
    name = hashlib.sha256(key.encode()).hexdigest()
    return os.path.join(digest_cache_folder(), name[:2], name)  # 256 folders: millions of images stay listable


def _remember(remembered: str, value: str) -> None:
    try:
        write_bytes(remembered, value.encode())
    except OSError:  # a read-only home: digests are then recomputed, never wrong
        pass


def _etag(uri: str) -> tuple[str, int | None]:
    """An object's ETag (without quotes; "" when the store gives none) and size, by one HEAD."""
    fs, path = resolve(uri)
    info = retried(uri, "checking", lambda: fs.info(path))
    return str(info.get("ETag") or info.get("etag") or "").strip('"'), info.get("size")


def version(uri: str) -> str:
    """What changes whenever the file's content may have: the ETag and size on an object
    store; locally size, mtime, ctime and inode (any write changes ctime). Unlike digest it
    never reads the file."""
    fs, path = resolve(uri)
    if not isinstance(fs, LocalFileSystem):
        tag, size = _etag(uri)
        return f"etag:{tag}:{size}" if tag else digest(uri)
    stat = os.stat(path)
    return f"stat:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"


def under(root: str, relative: str) -> str:
    """The uri of `relative` under `root`. Locally the real path is checked first: a
    symbolic link (the file's or a folder's) that leads out of the root raises
    OutsideRootError, and a missing file FileNotFoundError. Object stores have no links; the
    key was confined to the prefix when the record was parsed (records.confine_image_path)."""
    uri = join(root, relative)
    fs, path = resolve(uri)
    if isinstance(fs, LocalFileSystem):
        real_root = os.path.realpath(resolve(root)[1])
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise OutsideRootError(f"{relative} leads outside the image root")
        if not os.path.exists(real):
            raise FileNotFoundError(uri)
        uri = real
    return uri


def read_under(root: str, relative: str) -> bytes:
    return read_bytes(under(root, relative))


def read_with_digest(uri: str) -> tuple[bytes, str]:
    """The file's bytes and its digest (as `digest` gives it) from one read: an object
    store's ETag comes with the object, a local file's sha256 is remembered for the next
    `digest` of it."""
    fs, path = resolve(uri)
    if isinstance(fs, LocalFileSystem):
        stat = os.stat(path)
        data = read_bytes(uri)
        value = "sha256:" + hashlib.sha256(data).hexdigest()
        if os.stat(path).st_ctime_ns == stat.st_ctime_ns:  # not rewritten while it was read
            _remember(_digest_key(path, stat), value)
        return data, value

    def read() -> tuple[bytes, str]:
        with fs.open(path, "rb") as f:
            data = f.read()
            tag = str((getattr(f, "details", None) or {}).get("ETag") or "").strip('"')
        return data, (f"etag:{tag}" if tag else "sha256:" + hashlib.sha256(data).hexdigest())

    return retried(uri, "reading", read)


def list_files(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """One file, or every file under a folder/prefix with one of `suffixes`, sorted by name
    (the canonical record order starts with sorted file names)."""
    fs, path = resolve(uri)
    if not exists(uri):
        raise FileNotFoundError(f"no such file or folder: {uri}")
    if retried(uri, "checking", lambda: fs.isfile(path)):
        return [uri]
    found = sorted(p for p in retried(uri, "listing", lambda: fs.find(path)) if p.endswith(suffixes))
    if not found:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {uri}")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [p if isinstance(fs, LocalFileSystem) else f"{protocol}://{p}" for p in found]


def list_folders(uri: str) -> list[str]:
    """The names of the folders (prefixes) directly under `uri`, sorted; [] when none."""
    fs, path = resolve(uri)
    try:
        entries = retried(uri, "listing", lambda: fs.ls(path, detail=True))
    except FileNotFoundError:
        return []
    return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == "directory")


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    return retried(uri, "reading", read)


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[Any]:
    """The file opened for streamed reading (buffered; an object store reads it in ranged
    GETs, each retried by s3fs)."""
    fs, path = resolve(uri)
    f = retried(uri, "opening", lambda: fs.open(path, "rb", block_size=8 * 2**20))
    try:
        yield f
    finally:
        f.close()


def write_bytes(uri: str, data: bytes) -> None:
    """Publish `data` under `uri` so that no partial file is ever visible there.

    Local: write a uniquely named temporary file beside it, then rename (atomic on POSIX).
    Object stores: a single PUT, which appears whole or not at all.
    """
    fs, path = resolve(uri)
    if isinstance(fs, LocalFileSystem):
        def fill(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        _replace_locally(path, fill)
    else:
        retried(uri, "writing", lambda: fs.pipe_file(path, data))


def _replace_locally(path: str, fill: Callable[[str], None]) -> None:
    """`fill` writes a temporary file beside `path`, which then takes its place in one rename."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        fill(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish_file(local_path: str, uri: str) -> None:
    """Copy a finished local file to `uri` so that no partial file is ever visible there
    (locally: a temporary name, then a rename; object stores: an upload that appears whole)."""
    fs, path = resolve(uri)
    if isinstance(fs, LocalFileSystem):
        _replace_locally(path, lambda tmp: shutil.copyfile(local_path, tmp))
    else:
        retried(uri, "writing", lambda: fs.put_file(local_path, path))


def remove(uri: str) -> None:
    fs, path = resolve(uri)
    retried(uri, "removing", lambda: fs.rm_file(path))


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue().to_pybytes()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def json_text(obj: Any) -> bytes:
    """One value as compact JSON in UTF-8; a lone surrogate is kept as it came."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


def parquet_from_bytes(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


def npy_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _parquet_call(uri: str, call: Callable[[], T]) -> T:
    """`call()` on a Parquet file. A file that does not read back whole (truncated, not
    Parquet, a corrupt page) is an InputFormatError naming it, not retried: Arrow says so
    with ArrowInvalid, while a failing connection raises the network stack's own error."""
    def guarded() -> T:
        try:
            return call()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            first = " ".join(str(error).split())[:200]
            raise InputFormatError(f"{uri} is not a readable Parquet file ({first})") from None

    return retried(uri, "reading", guarded)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    return _parquet_call(uri, lambda: pq.read_table(path, filesystem=fs, columns=columns))


def read_parquet_batches(uri: str, batch_rows: int = 1024) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """The whole file as record batches of `batch_rows`, streamed (buffered reads, no
    pre-buffering): the file's bytes and a second decoded copy are never in memory at once,
    as they are with read_table, so a reader can keep the batches' buffers as its own."""
    fs, path = resolve(uri)

    def read() -> tuple[pa.Schema, list[pa.RecordBatch]]:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f, buffer_size=8 * 2**20, pre_buffer=False)
            return parquet.schema_arrow, list(parquet.iter_batches(batch_size=batch_rows))

    return _parquet_call(uri, read)


def iter_parquet(uri: str, batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
    """The file's record batches, one at a time (memory: one batch, not the file)."""
    fs, path = resolve(uri)
    with open_read(uri) as f:
        try:
            parquet = pq.ParquetFile(f, buffer_size=8 * 2**20, pre_buffer=False)
            yield from parquet.iter_batches(batch_size=batch_rows)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            first = " ".join(str(error).split())[:200]
            raise InputFormatError(f"{uri} is not a readable Parquet file ({first})") from None


def read_parquet_rows(uri: str, rows: np.ndarray, columns: list[str], batch_rows: int = 512) -> pa.Table:
    """Only `rows` (sorted positions) of `columns`. The file is streamed in batches of
    `batch_rows` (buffered reads, no pre-buffering) and each batch is cut down at once; row
    groups none of the rows fall in are skipped. Memory is one batch, never the whole file
    (a 2,500-row file at D = 20,480 is 205 MB decoded)."""
    fs, path = resolve(uri)

    def read() -> pa.Table:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f, buffer_size=8 * 2**20, pre_buffer=False)
            pieces, start = [], 0
            for group in range(parquet.num_row_groups):
                stop = start + parquet.metadata.row_group(group).num_rows
                if ((rows >= start) & (rows < stop)).any():
                    at = start
                    for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                        inside = rows[(rows >= at) & (rows < at + batch.num_rows)] - at
                        if len(inside):
                            pieces.append(pa.Table.from_batches([batch.take(pa.array(inside))]))
                        at += batch.num_rows
                start = stop
            return pa.concat_tables(pieces) if pieces else parquet.schema_arrow.empty_table().select(columns)

    rows_read = _parquet_call(uri, read)
    pa.default_memory_pool().release_unused()  # else Arrow's allocator keeps what it decoded
    return rows_read


def parquet_schema(uri: str) -> pa.Schema:
    fs, path = resolve(uri)
    return _parquet_call(uri, lambda: pq.read_schema(path, filesystem=fs))


def write_parquet(table: pa.Table, uri: str) -> None:
    write_bytes(uri, parquet_bytes(table))


def write_npy(array: np.ndarray, uri: str) -> None:
    write_bytes(uri, npy_bytes(array))


def read_npy(uri: str) -> np.ndarray:
    return npy_from_bytes(read_bytes(uri))


def write_json(obj: Any, uri: str) -> None:
    write_bytes(uri, json_bytes(obj))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))
