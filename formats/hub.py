"""
Where files come from: a Hugging Face hub repo, or a sub-folder of one, read from the local cache or downloaded.

    folder = hub.resolve("google/gemma-2-2b", choose_model_files)                  # a local folder with those files
    folder = hub.resolve("google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82", choose_sae_files)

What a repo or sub-folder holds is decided from its file list, never by trying downloads one after another: online
the hub's own listing (HfApi.list_repo_tree); offline (HF_HUB_OFFLINE=1), or when the hub cannot be reached, the
files of the cached snapshot, HF_HUB_CACHE/models--org--name/snapshots/<refs/main>/... . `choose` picks the files
that are needed from that list and only those are downloaded. Each failure is one line that names the repo and what
to do: FileNotFoundError (no such repo, nothing cached), PermissionError (gated or private), ValueError (the files
are not what the caller expected).

huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE into `huggingface_hub.constants` when it is imported; both are
read from there at each call (so a test may monkeypatch them), and HF_HUB_OFFLINE from the environment too.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

LOGIN = "log in with `hf auth login` (or `huggingface-cli login`, or set HF_TOKEN)"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def offline() -> bool:
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or env


def cache_dir() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def is_hub_path(path: str, *, sub_folders: bool) -> bool:
    """`org/name` (and, with sub_folders, `org/name/sub/folder`): what a hub path looks like, and a local one not."""
    parts = str(path).split("/")
    if os.path.exists(path) or len(parts) < 2 or (len(parts) > 2 and not sub_folders):
        return False
    return all(_NAME.fullmatch(p) for p in parts) and ".." not in parts


def split(path: str) -> tuple[str, str]:
    """'org/name/sub/folder' -> ('org/name', 'sub/folder'); the sub-folder is '' for the repo's top."""
    parts = path.strip("/").split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


# ----------------------------------------------------------------------------------------------------------------------
# Listing: what a repo (or one of its folders) holds


@dataclass
class Listing:
    repo_id: str
    sub: str  # the sub-folder listed ('' for the whole repo)
    repo_type: str
    files: dict[str, int]  # path relative to sub -> size in bytes
    snapshot: str | None  # the cached snapshot folder when the listing came from the cache; None: from the hub
    where: str  # for messages: "on the hub" or "in the local cache (...)"

    def folder(self) -> str:
        return os.path.join(self.snapshot, *self.sub.split("/")) if self.sub else self.snapshot


def cached_snapshot(repo_id: str, repo_type: str = "model") -> str | None:
    """The snapshot folder refs/main points at in the hub cache (the layout hf_hub_download writes), or None."""
    from huggingface_hub.file_download import repo_folder_name
    storage = os.path.join(cache_dir(), repo_folder_name(repo_id=repo_id, repo_type=repo_type))
    snapshots = os.path.join(storage, "snapshots")
    ref = os.path.join(storage, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            snap = os.path.join(snapshots, f.read().strip())
        return snap if os.path.isdir(snap) else None
    # downloaded by commit hash only (no refs/main): the newest snapshot
    found = [os.path.join(snapshots, d) for d in os.listdir(snapshots)] if os.path.isdir(snapshots) else []
    return max(found, key=os.path.getmtime) if found else None


def _cached_files(folder: str) -> dict[str, int]:
    files = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p):  # follows the snapshot's symlinks into blobs/; a dangling one is not cached
                files[os.path.relpath(p, folder).replace(os.sep, "/")] = os.path.getsize(p)
    return files


def _hub_error(e: Exception, repo_id: str, missing: str) -> Exception | None:
    """The one-line error for a hub answer that is final; None for 'could not reach the hub' (try the cache).
    `missing` names what an EntryNotFoundError means: the folder listed or the file downloaded."""
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)
    if isinstance(e, LocalEntryNotFoundError):  # hf_hub_download's "not cached and the hub not reachable"
        return None
    if isinstance(e, GatedRepoError):
        return PermissionError(f"{repo_id} is a gated repo: accept its conditions on https://huggingface.co/{repo_id} "
                               f"and {LOGIN}")
    if isinstance(e, RepositoryNotFoundError):
        return FileNotFoundError(f"{repo_id}: no such repo on the hub, or a private one: check the name, or {LOGIN}")
    if isinstance(e, RevisionNotFoundError):
        return FileNotFoundError(f"{repo_id}: the hub has no branch main in this repo")
    if isinstance(e, EntryNotFoundError):
        return FileNotFoundError(f"{repo_id}: the repo has no {missing}")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status in (401, 403):
        return PermissionError(f"{repo_id}: the hub refused access (HTTP {status}): {LOGIN}")
    return None


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}" if str(e).strip() else type(e).__name__


def list_files(repo_id: str, sub: str = "", *, repo_type: str = "model") -> Listing:
    """The files under repo_id/sub: from the hub, or from the cached snapshot offline or when the hub is unreachable.
    Raises FileNotFoundError / PermissionError with one line."""
    unreachable = ""
    if not offline():
        from huggingface_hub import HfApi
        try:
            items = HfApi().list_repo_tree(repo_id, path_in_repo=sub or None, recursive=True, repo_type=repo_type)
            prefix = sub + "/" if sub else ""
            files = {f.path[len(prefix):]: f.size or 0 for f in items
                     if getattr(f, "size", None) is not None and f.path.startswith(prefix)}
            return Listing(repo_id, sub, repo_type, files, None, "on the hub")
        except Exception as e:  # which exceptions a failed connection raises depends on the hub client's version
            final = _hub_error(e, repo_id, f"folder {sub!r}")
            if final is not None:
                raise final from None
            if not isinstance(e, (OSError, ConnectionError)) and "httpx" not in type(e).__module__ \
                    and "requests" not in type(e).__module__:
                raise
            unreachable = _describe(e)
    snap = cached_snapshot(repo_id, repo_type)
    kind = "" if repo_type == "model" else f"{repo_type} "
    if snap is None:
        if offline():
            raise FileNotFoundError(
                f"{kind}{repo_id} is not in the local hub cache ({cache_dir()}) and HF_HUB_OFFLINE=1 forbids "
                f"downloading: run once online (unset HF_HUB_OFFLINE; gated repos also need you to {LOGIN}), or set "
                f"HF_HUB_CACHE to a cache that holds it")
        raise FileNotFoundError(
            f"{kind}{repo_id}: the hub cannot be reached ({unreachable}) and the repo is not in the local hub cache "
            f"({cache_dir()}): connect to the internet, or set HF_HUB_CACHE to a cache that holds it")
    where = "in the local hub cache (HF_HUB_OFFLINE=1)" if offline() else "in the local hub cache (hub unreachable)"
    folder = os.path.join(snap, *sub.split("/")) if sub else snap
    if not os.path.isdir(folder):
        cached = _top_folders(_cached_files(snap))
        raise FileNotFoundError(f"{kind}{repo_id}: no folder {sub!r} {where}; cached: {cached}")
    return Listing(repo_id, sub, repo_type, _cached_files(folder), snap, where)


def _top_folders(files) -> str:
    tops = sorted({f.split("/")[0] + ("/" if "/" in f else "") for f in files})
    return ", ".join(tops[:8]) + (f", ... ({len(tops)} entries)" if len(tops) > 8 else "") if tops else "nothing"


# ----------------------------------------------------------------------------------------------------------------------
# Resolving: a local folder that holds the files a caller needs


def resolve(path: str, choose: Callable[[dict[str, int]], list[str]], *, repo_type: str = "model") -> str:
    """The local folder for hub path `org/name[/sub/folder]` holding the files choose(listing) returns (paths relative
    to the sub-folder). choose raises ValueError / FileNotFoundError with a reason, which comes back prefixed with
    the hub path and where the listing came from."""
    repo_id, sub = split(path)
    try:
        listing = list_files(repo_id, sub, repo_type=repo_type)
    except FileNotFoundError as e:
        if os.path.isdir(path.split("/")[0]):  # `out/sae` may be a mistyped local path rather than a hub repo
            raise FileNotFoundError(f"{path}: no such local file or folder; as a hub path: {e}") from None
        raise
    try:
        wanted = choose(listing.files)
    except (ValueError, FileNotFoundError) as e:
        hint = "; only files already downloaded are visible offline" if listing.snapshot else ""
        raise type(e)(f"{path}: {e} ({listing.where}{hint})") from None
    if listing.snapshot is not None:
        return listing.folder()
    return download(listing, wanted)


def download(listing: Listing, names: list[str]) -> str:
    """hf_hub_download each file (a no-op for files already cached); returns the local folder of listing.sub."""
    from huggingface_hub import hf_hub_download
    repo_id, sub = listing.repo_id, listing.sub
    folder = None
    for name in names:
        try:
            local = hf_hub_download(repo_id, name, subfolder=sub or None, repo_type=listing.repo_type,
                                    cache_dir=cache_dir())
        except Exception as e:
            rel = "/".join(filter(None, (sub, name)))
            final = _hub_error(e, repo_id, f"file {rel!r}")
            if final is not None:
                raise final from None
            raise FileNotFoundError(f"{repo_id}: downloading {rel} failed ({_describe(e)}); run again once the hub "
                                    f"can be reached") from None
        folder = local[:-len(name)].rstrip("/" + os.sep)
    return folder


def open_file(listing: Listing, name: str):
    """A binary file object for listing's file `name`: the cached copy, or a stream from the hub that fetches byte
    ranges as the reader advances (only as much of a large file is downloaded as is read)."""
    if listing.snapshot is not None:
        return open(os.path.join(listing.folder(), *name.split("/")), "rb")
    from huggingface_hub import HfFileSystem
    kind = {"model": "", "dataset": "datasets/", "space": "spaces/"}[listing.repo_type]
    return HfFileSystem().open(f"{kind}{listing.repo_id}/{'/'.join(filter(None, (listing.sub, name)))}", "rb",
                               block_size=8 << 20)
