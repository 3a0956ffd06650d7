"""What the input listing sees of each file: its size and version tag (from the listing,
never by reading it) and, for local trees, whether it is a symbolic link leading out of the
input root.

The listing is streamed: the folders at the top of the input (the labels) are listed
concurrently by a bounded pool of threads, each a page at a time (S3's ListObjectsV2 pages of
1,000 keys, or as many local entries), and pages come back as they are listed through a
bounded queue; no listing cache is kept, so the caller can spill pages to disk and hold
nothing per image, whatever the size of a folder.
"""

from __future__ import annotations

import collections
import logging
import os
import posixpath
import queue
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pandas as pd

from fruitdask.errors import InputError
from fruitdask.schema import SKIPPED_COLUMNS
from fruitdask.storage import stores
from fruitdask.storage.base import Entry, find_pages
from fruitdask.storage.stores import translate
from fruitdask.storage.urls import get_fs, is_remote, unsafe_name

logger = logging.getLogger(__name__)

#: Folders listed at once (each an S3 ListObjectsV2 stream, or a local walk).
LIST_THREADS = 16


#: Entries per batch at most: a folder of any size is listed (and handed on) a page at a time,
#: S3's ListObjectsV2 page (1,000 keys) or as many local entries.
PAGE = 1000


def _stream(folders: list[str], list_pages, files: list[Entry], threads: int) -> Iterator[list[Entry]]:
    """``files``, then each folder's entries a page at a time, in folder order, listed by
    ``threads`` threads.

    ``threads`` folders are listed at once, each into a queue of two pages: a listing thread
    waits while the consumer is behind, so at most ``3 * threads`` pages are held, whatever
    the size of a folder or of the lake. A thread's error is raised here; a consumer that
    stops early stops the threads."""
    for i in range(0, len(files), PAGE):
        yield files[i : i + PAGE]
    if not folders:
        return
    width = max(1, min(threads, len(folders)))
    stop, done = threading.Event(), object()

    def put(q: queue.Queue, item) -> None:
        while not stop.is_set():
            try:
                return q.put(item, timeout=0.1)
            except queue.Full:
                continue

    def produce(folder: str, q: queue.Queue) -> None:
        try:
            for page in list_pages(folder):
                if stop.is_set():
                    return
                if page:
                    put(q, page)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(q, e)
        finally:
            put(q, done)

    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="fruitdask-list") as pool:
        todo = iter(folders)
        pending: collections.deque = collections.deque()

        def start_next() -> None:
            folder = next(todo, None)
            if folder is not None:
                q: queue.Queue = queue.Queue(maxsize=2)
                pool.submit(produce, folder, q)
                pending.append(q)

        try:
            for _ in range(width):
                start_next()
            while pending:
                q = pending[0]
                item = q.get()
                if item is done:
                    pending.popleft()
                    start_next()
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            stop.set()


def remote_batches(fs: fsspec.AbstractFileSystem, root: str, threads: int = LIST_THREADS) -> Iterator[list[Entry]]:
    """Batches of ``(path, size, ETag, None)``, a listing page at a time, under each
    top-level folder of ``root``."""
    def split(folder: str) -> tuple[list[Entry], list[str]]:
        top = fs.ls(folder, detail=True, refresh=True)
        return ([(i["name"], i.get("size"), i.get("ETag"), None) for i in top if i.get("type") != "directory"],
                [i["name"] for i in top if i.get("type") == "directory"])

    files, folders = _widen(root, split, threads)

    store = stores.for_fs(fs)
    # Its own pages (S3: ListObjectsV2 as each page arrives); a file system no store serves:
    # one recursive listing.
    list_pages = store.list_pages if store is not None else find_pages

    try:
        yield from _stream(folders, lambda folder: list_pages(fs, folder), files, threads)
    finally:
        fs.invalidate_cache(root)


def local_batches(root: str, threads: int = LIST_THREADS) -> Iterator[list[Entry]]:
    """Batches of ``(path, size, mtime_ns, problem)`` of every file under ``root``, one per
    top-level folder, without following links out of the root.

    Paths keep the root as given (``root/Label/x.jpg``); a symbolic link is resolved and
    refused when its target is outside the root's real location, or missing. Linked folders
    are not descended into (one leading outside is reported; one inside adds nothing).
    """
    real_root = os.path.realpath(root)
    inside = real_root.rstrip(os.sep) + os.sep

    def split(folder: str) -> tuple[list[Entry], list[str]]:
        files: list[Entry] = []
        folders: list[str] = []
        with os.scandir(folder) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.is_dir(follow_symlinks=False):
                    folders.append(e.path)
                elif e.is_symlink() and os.path.isdir(e.path):
                    files.extend(_linked_folder(e.path, inside))
                else:
                    files.append(_local_file(e.path, real_root, inside))
        return files, folders

    files, folders = _widen(root, split, threads)
    yield from _stream(folders, lambda top: _walk(top, real_root, inside), files, threads)


def _widen(root: str, split, threads: int, depth: int = 3) -> tuple[list[Entry], list[str]]:
    """The files at the top and the folders to list in parallel: descend (up to ``depth``
    levels) while there are fewer folders than threads (``Training/``, ``Test/`` above labels)."""
    files, folders = split(root)
    for _ in range(depth):
        if not folders or len(folders) >= threads:
            break
        deeper: list[str] = []
        for folder in folders:
            more_files, more_folders = split(folder)
            files.extend(more_files)
            deeper.extend(more_folders)
        folders = deeper
    return files, folders


def _linked_folder(link: str, inside: str) -> list[Entry]:
    if (os.path.realpath(link) + os.sep).startswith(inside):
        return []
    return [(link, None, None, f"symbolic link to a folder outside the input root ({os.path.realpath(link)}): not followed")]


def _walk(top: str, real_root: str, inside: str) -> Iterator[list[Entry]]:
    """Every file under ``top``, :data:`PAGE` entries at a time (folders read entry by entry,
    never as a whole list), links not followed."""
    page: list[Entry] = []
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                    continue
                if e.is_symlink() and os.path.isdir(e.path):
                    page.extend(_linked_folder(e.path, inside))
                else:
                    page.append(_local_file(e.path, real_root, inside))
                if len(page) >= PAGE:
                    yield page
                    page = []
    if page:
        yield page


def _local_file(path: str, real_root: str, inside: str) -> Entry:
    if os.path.islink(path):
        target = os.path.realpath(path)
        if not target.startswith(inside):
            return (path, None, None, f"symbolic link to {target}, outside the input root {real_root}: not read")
        if not os.path.exists(target):
            return (path, None, None, f"broken symbolic link (to {target}): not read")
    try:
        st = os.stat(path)
    except OSError as e:
        return (path, None, None, f"cannot stat file: {e}")
    return (path, st.st_size, str(st.st_mtime_ns), None)


def is_linked_folder_entry(entry: Entry) -> bool:
    """A refused linked folder (reported, but it is no image)."""
    return entry[3] is not None and entry[3].startswith("symbolic link to a folder")


def label_of(path: str) -> str:
    return posixpath.basename(posixpath.dirname(path))


# --- the input listing (iter_images, scan_images, list_images) -----------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class ListedBatch:
    """One page of the listing (at most 1,000 entries): accepted images and files refused from the listing
    alone. ``images``: ``(path, label, size, tag)``; ``refused``: ``(path, label, reason, size, tag)``."""

    images: list[tuple[str, str, int | None, str | None]]
    refused: list[tuple[str, str, str, int | None, str | None]]


def iter_images(
    url: str, storage_options: Mapping[str, Any] | None = None, max_file_bytes: int | None = None,
    threads: int = LIST_THREADS,
) -> Iterator[ListedBatch]:
    """Stream the images under ``url``, recursively, with their label, a batch per listing page
    listed (folders listed concurrently; nothing cached); set aside those refused from the
    listing alone, before any byte of them is read.

    The label is the name of the folder that holds the image (``Cherry 1/r_0_100.jpg`` has
    label ``Cherry 1``). Extensions ``.jpg``, ``.jpeg`` and ``.png`` match in any letter case.
    Refused: files over ``max_file_bytes`` (by the size the listing reports: one huge object
    would be read whole into a worker), and, locally, symbolic links that lead outside the
    input root (or nowhere); links inside the root are kept, linked folders not followed.

    Raises
    ------
    InputError
        ``url`` does not exist or is a file.
    """
    fs, root = get_fs(url, storage_options)
    remote = is_remote(url)
    try:
        if not fs.exists(root):
            raise InputError(f"input {url!r} does not exist: check the path, or pass --input DIR_OR_URI")
        if not fs.isdir(root):
            raise InputError(f"input {url!r} is a file, not a folder: pass the folder that holds <Label>/<image>.jpg")
        batches = remote_batches(fs, root, threads) if remote else local_batches(root, threads)
        for entries in batches:
            yield _accept(entries, fs, remote, max_file_bytes)
    except stores.storage_exceptions() as e:
        raise translate(e, url) from e


def _accept(entries: list[Entry], fs: fsspec.AbstractFileSystem, remote: bool, max_file_bytes: int | None) -> ListedBatch:
    images, refused = [], []
    for path, size, tag, problem in entries:
        name = posixpath.basename(path)
        if not is_linked_folder_entry((path, size, tag, problem)) and (
            name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS)
        ):
            continue
        label = label_of(path)
        # Full URLs for remote files so any process can open them without the root.
        full = fs.unstrip_protocol(path) if remote else path
        problem = problem or unsafe_name(full)
        if problem is None and max_file_bytes is not None and size is not None and size > max_file_bytes:
            problem = (f"file of {size:,} bytes is over the {max_file_bytes:,}-byte limit (--max-file-mb "
                       f"{max_file_bytes / 2**20:g}): not read; raise --max-file-mb if such files are expected")
        if problem is None:
            images.append((full, label, size, tag))
        else:
            refused.append((full, label, problem, size, tag))
    return ListedBatch(images, refused)


def scan_images(
    url: str, storage_options: Mapping[str, Any] | None = None, max_file_bytes: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole listing of :func:`iter_images` in memory (for small trees: the classifier's
    test folders, the bench), sorted by path.

    Returns
    -------
    (listing, rejected)
        ``listing``: columns ``path`` and ``label``;
        ``rejected``: ``path, label, stage, reason`` (stage ``list``), for ``errors.parquet``.
    """
    rows: list[pd.DataFrame] = []
    rejected: list[pd.DataFrame] = []
    for batch in iter_images(url, storage_options, max_file_bytes):
        rows.extend((p, lab) for p, lab, _, _ in batch.images)
        rejected.extend((p, lab, "list", reason) for p, lab, reason, _, _ in batch.refused)
    if not rows and not rejected:
        raise InputError(
            f"no images found under {url!r}: expected <Label>/<image>.jpg|.jpeg|.png files (any letter case)"
        )
    listing_df = pd.DataFrame(sorted(rows), columns=["path", "label"])
    return listing_df, pd.DataFrame(sorted(rejected), columns=SKIPPED_COLUMNS)


def list_images(
    url: str, storage_options: Mapping[str, Any] | None = None, max_file_bytes: int | None = None
) -> pd.DataFrame:
    """The accepted images of :func:`scan_images` (refused ones are logged as warnings).

    Raises
    ------
    InputError
        No image under ``url`` (or every one was refused).
    """
    listing, rejected = scan_images(url, storage_options, max_file_bytes)
    for row in rejected.itertuples():
        logger.warning("skipped %s: %s", row.path, row.reason)
    if listing.empty:
        raise InputError(f"every image under {url!r} was refused ({len(rejected)}; first: {rejected['reason'].iloc[0]})")
    return listing
