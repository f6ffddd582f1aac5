"""Where a sweep keeps its trials' checkpoints: a local or NFS folder, or a URI that
``pyarrow.fs`` reads (``s3://bucket/prefix``); see docs/sweeps.md (Checkpoints on
shared storage).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from metalearn.core.config import ConfigError


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` (s3, gs, hdfs, ...), False for a path on this disk."""
    return "://" in location and not location.startswith("file://")


def resolve(location: str, default: str) -> str:
    """``location`` as Tune takes it (an absolute path or the URI), or ``default``
    (an absolute path) when it is empty."""
    if not location:
        return os.path.abspath(default)
    location = location.removeprefix("file://")
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a path or a URI; a URI's query (an endpoint override)
    stays at the end."""
    if not is_uri(location):
        return os.path.join(location, *parts)
    url = urlsplit(location)
    path = "/".join([url.path.rstrip("/"), *parts])
    return urlunsplit((url.scheme, url.netloc, path, url.query, ""))


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) of a path or URI; ConfigError when pyarrow
    cannot read the URI (an unknown scheme, a malformed query)."""
    try:
        return pafs.FileSystem.from_uri(location)
    except (ValueError, OSError, TypeError) as err:
        raise ConfigError(f"storage {location!r}: {str(err).splitlines()[0]} (give a "
                          f"folder, or a URI such as s3://bucket/prefix)") from None


def check_writable(location: str) -> None:
    """Write and delete a small file under a URI (a folder: check that it can be made);
    ConfigError naming the storage and the likely fix when that fails (no bucket, no
    credentials, no endpoint)."""
    if not is_uri(location):
        # Nothing is created here (a failed check must leave no folder behind): the
        # nearest existing folder on the way must be writable.
        folder = location
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
            raise ConfigError(f"storage {location}: {folder} is not a writable folder; "
                              f"choose a writable folder")
        return
    fs, path = filesystem(location)
    probe = f"{path.rstrip('/')}/.metalearn-probe-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as stream:
            stream.write(b"metalearn storage probe\n")
        fs.delete_file(probe)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"storage {location}: cannot write there ({str(err).splitlines()[0][:300]}); "
            f"check that the bucket exists and that this machine has credentials for it "
            f"(for an S3-compatible server, AWS_ENDPOINT_URL)") from None


def exists(location: str) -> bool:
    if not is_uri(location):
        return os.path.exists(location)
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@contextlib.contextmanager
def local_copy(location: str):
    """A local folder with the contents of ``location``: the folder itself when it is
    on this disk, else a download into a temporary folder of the same base name (the
    name a checkpoint's provenance records), removed on exit."""
    if not is_uri(location):
        yield location
        return
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{location}: no such folder in the storage")
    parent = tempfile.mkdtemp(prefix="metalearn-download-")
    folder = os.path.join(parent, os.path.basename(path.rstrip("/")))
    try:
        pafs.copy_files(path, folder, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        yield folder
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def uri_of(path: str, fs: pafs.FileSystem, storage: str) -> str:
    """A checkpoint's address that ``local_copy`` takes: the path when ``fs`` is this
    disk, else ``storage``'s scheme and query around ``path`` (a bucket-relative path
    as Tune returns it)."""
    if isinstance(fs, pafs.LocalFileSystem) or not is_uri(storage):
        return path
    url = urlsplit(storage)
    if url.scheme in ("s3", "gs", "gcs"):  # pyarrow's path starts with the bucket
        bucket, _, key = path.lstrip("/").partition("/")
        return urlunsplit((url.scheme, bucket, "/" + key, url.query, ""))
    return urlunsplit((url.scheme, url.netloc, path, url.query, ""))


__all__ = ["check_writable", "exists", "filesystem", "is_uri", "join", "local_copy",
           "resolve", "uri_of"]
