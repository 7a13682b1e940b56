"""Paths a user gives: local (relative to the working directory) or object storage.

Every file a run reads or writes goes through :func:`resolve`, which returns
an ``etils.epath.Path`` (the path library Orbax itself uses): a local path
becomes absolute against the current directory (Orbax and TensorStore refuse
relative ones), and ``gs://`` / ``s3://`` URLs stay URLs (``pathlib`` would
turn ``gs://b/x`` into the local ``gs:/b/x``).

Writes are atomic: a reader sees the old file or the new one, never half of
either. Locally that is a temporary file in the same directory renamed over
the target; on object storage an object appears only when its upload
completes, so the content is staged in a local temporary file and uploaded
in one piece (a failure before the upload leaves the old object).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import IO, Iterator

from etils import epath

__all__ = ["resolve", "is_remote", "atomic_write_text", "atomic_write_bytes", "atomic_open", "staged_dir",
           "same_file", "read_text", "jsonl_lines", "move", "create_exclusive", "fs_of", "local_copy"]

REMOTE_SCHEMES = ("gs://", "s3://")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an object-storage URL (``gs://``, ``s3://``)."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def resolve(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: URLs unchanged, local paths made absolute (``~`` expanded)."""
    if isinstance(path, epath.Path) and is_remote(path):
        return path
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two user paths name the same file (symlinks and relative forms resolved locally)."""
    if is_remote(a) or is_remote(b):
        return os.fspath(resolve(a)).rstrip("/") == os.fspath(resolve(b)).rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(a)))) == \
        os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(b))))


def read_text(path: str | os.PathLike) -> str:
    """The text of a local or remote file (UTF-8)."""
    return resolve(path).read_text(encoding="utf-8")


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text, split at ``"\\n"`` alone (like ``splitlines``, no empty last line).

    ``str.splitlines`` also splits at U+0085, U+2028 and U+2029, which JSON
    leaves unescaped inside strings when written with ``ensure_ascii=False``
    (jaxpost's own ``.jsonl`` files, and those of many tools): a record
    holding one would be cut in two and read as malformed. A ``"\\r\\n"``
    ending leaves a ``"\\r"``, which ``json.loads`` skips as whitespace.
    """
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open ``path`` for writing so that it is replaced only when the block exits without error.

    ``mode`` is ``"w"`` or ``"wb"``. On an exception the target is left as it
    was (or absent) and the partial file is removed. Parent directories are
    created.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    target = resolve(path)
    enc = None if "b" in mode else encoding
    if is_remote(target):
        fd, tmp = tempfile.mkstemp(prefix="jaxpost-upload-")
        os.close(fd)
        try:
            with open(tmp, mode, encoding=enc) as f:
                yield f
            target.parent.mkdir(parents=True, exist_ok=True)
            epath.Path(tmp).copy(target, overwrite=True)
        finally:
            os.unlink(tmp)
        return
    directory = os.fspath(target.parent)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode, encoding=enc) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.fspath(target))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[str]:
    """A local directory to fill; on success it replaces the directory ``path``.

    For writers that only take local paths (safetensors, tokenizers'
    ``save_pretrained``). Locally the new directory is built beside the
    target and swapped in by two renames (the old one is removed after), so
    ``path`` is never a half-written directory. Remotely every file is
    uploaded after the block; the old objects under ``path`` that the new
    directory does not have are removed.
    """
    target = resolve(path)
    if is_remote(target):
        tmp = tempfile.mkdtemp(prefix="jaxpost-stage-")
        try:
            yield tmp
            target.mkdir(parents=True, exist_ok=True)
            written = set()
            for root, _, files in os.walk(tmp):
                for name in files:
                    rel = os.path.relpath(os.path.join(root, name), tmp)
                    dest = target / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    epath.Path(os.path.join(root, name)).copy(dest, overwrite=True)
                    written.add(rel)
            fs, root = fs_of(target)
            for key in fs.find(root):  # one listing call; epath refuses recursive globs on GCS
                rel = os.path.relpath(key, root)
                if rel not in written:
                    fs.rm(key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    parent = os.fspath(target.parent)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent)
    try:
        yield tmp
        old = None
        if os.path.exists(os.fspath(target)):
            old = os.path.join(parent, f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(os.fspath(target), old)
        os.replace(tmp, os.fspath(target))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def fs_of(path: str | os.PathLike):
    """``(fsspec filesystem, path without scheme)`` of an object-storage path."""
    import fsspec
    scheme, rest = os.fspath(path).split("://", 1)
    return fsspec.filesystem(scheme), rest.rstrip("/")


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves a file or directory tree (a rename locally; copy + delete on object storage)."""
    src, dst = resolve(src), resolve(dst)
    if is_remote(src) or is_remote(dst):
        fs, _ = fs_of(src)
        fs.mv(os.fspath(src), os.fspath(dst), recursive=True)
        return
    os.makedirs(os.fspath(dst.parent), exist_ok=True)
    os.replace(os.fspath(src), os.fspath(dst))


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
    """Creates ``path`` with ``data`` only if it does not exist; returns whether this call created it.

    Atomic against concurrent creators: ``O_CREAT | O_EXCL`` locally, a
    create-only precondition (``ifGenerationMatch=0``) on GCS.
    """
    target = resolve(path)
    if is_remote(target):
        fs, _ = fs_of(target)
        try:
            fs.pipe(os.fspath(target), data, mode="create")
        except FileExistsError:
            return False
        return True
    os.makedirs(os.fspath(target.parent), exist_ok=True)
    try:
        fd = os.open(os.fspath(target), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


_COPIES: dict[str, str] = {}


def local_copy(path: str | os.PathLike) -> str:
    """A local path holding the file or directory ``path``: itself when local, else a download (once per process).

    For readers that need local files (``datasets``' memory-mapped Arrow,
    safetensors, tokenizers): each host of a pod downloads its own copy, so
    nothing needs a shared filesystem. A missing object raises
    ``FileNotFoundError`` naming the URL.
    """
    if not is_remote(path):
        return os.fspath(resolve(path))
    url = os.fspath(path)
    if url not in _COPIES:
        src = resolve(url)
        if not src.exists():
            raise FileNotFoundError(f"{url} does not exist (or is not readable with this host's credentials)")
        local = os.path.join(tempfile.mkdtemp(prefix="jaxpost-download-"), src.name)
        fs, key = fs_of(src)
        fs.get(key, local, recursive=src.is_dir())
        _COPIES[url] = local
    return _COPIES[url]
