"""What the input listing sees of each file: its size (from the listing, never by reading
it) and, for local trees, whether it is a symbolic link leading out of the input root."""

from __future__ import annotations

import os

import fsspec

Entry = tuple[int | None, str | None, bool]  # size, why it is refused, is a linked folder


def remote_entries(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Entry]:
    """``path -> (size, None, False)`` of every object under ``root``, sizes from the listing."""
    return {p: (info.get("size"), None, False) for p, info in fs.find(root, withdirs=False, detail=True).items()}


def local_entries(root: str) -> dict[str, Entry]:
    """``path -> (size, problem, linked folder)`` of every file under ``root``, without
    following links out.

    Paths keep the root as given (``root/Label/x.jpg``); a symbolic link is resolved and
    refused when its target is outside the root's real location, or missing. Linked folders
    are not descended into (one leading outside is reported; one inside adds nothing).
    """
    real_root = os.path.realpath(root)
    inside = real_root.rstrip(os.sep) + os.sep
    out: dict[str, Entry] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for d in dirs:
            link = os.path.join(folder, d)
            if os.path.islink(link) and not (os.path.realpath(link) + os.sep).startswith(inside):
                out[link] = (None, f"symbolic link to a folder outside the input root ({os.path.realpath(link)}): "
                                   "not followed", True)
        for f in files:
            path = os.path.join(folder, f)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not target.startswith(inside):
                    out[path] = (None, f"symbolic link to {target}, outside the input root {real_root}: not read", False)
                    continue
                if not os.path.exists(target):
                    out[path] = (None, f"broken symbolic link (to {target}): not read", False)
                    continue
            try:
                out[path] = (os.stat(path).st_size, None, False)
            except OSError as e:
                out[path] = (None, f"cannot stat file: {e}", False)
    return out
