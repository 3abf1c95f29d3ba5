"""The Hugging Face Hub: download a repo's files into the hub cache, and say in one line what went wrong.

Everything minicalm fetches goes through here: checkpoints and tokenizers (`snapshot`), the Parquet files of
JGLUE's tasks (`files` lists a revision's tree to find them, `download` fetches each). huggingface_hub does the
work and honours its environment (HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE=1: files cached by an earlier download are
used without asking the hub). What this module adds is the error: huggingface_hub reports five different situations
through a handful of exception classes and paragraphs of text; a user needs to know which one happened, for which
repo, revision and file: no such repo, no such revision, no such file, the hub could not be reached, or offline and
not cached.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.hf_api import RepoFile


class HubError(FileNotFoundError):
    """A repo, revision or file that could not be had; the message is one line and says which and why."""


def snapshot(repo_id: str, revision: str | None, patterns: list[str], repo_type: str = "model",
             offline_hint: str = "") -> Path:
    """The cache folder of a repo revision with the files matching `patterns` (those it has) downloaded."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, allow_patterns=patterns))
    except (OSError, EntryNotFoundError) as e:   # huggingface_hub's errors; OSError covers HTTP and connection
        raise HubError(explain(e, repo_id, revision, repo_type, offline_hint=offline_hint)) from e


def download(repo_id: str, filename: str, revision: str | None, repo_type: str = "model",
             offline_hint: str = "") -> Path:
    """The cached path of one file of a repo revision, downloaded if needed."""
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, repo_type=repo_type))
    except (OSError, EntryNotFoundError) as e:
        raise HubError(explain(e, repo_id, revision, repo_type, filename, offline_hint)) from e


def files(repo_id: str, revision: str | None, repo_type: str = "model") -> list[str] | None:
    """The paths of every file in a repo revision (its tree, listed recursively), or None when the hub could not be
    asked (HF_HUB_OFFLINE, or no connection): the caller then falls back on a file the hub cache may hold. An answer
    of the hub's (no such repo or revision, gated, ...) raises HubError."""
    api = HfApi()
    try:   # the revision's commit first: one request, which fails at once offline or unreachable (the listing retries)
        commit = api.repo_info(repo_id, revision=revision, repo_type=repo_type).sha
        return sorted(f.path for f in api.list_repo_tree(repo_id, recursive=True, revision=commit,
                                                         repo_type=repo_type) if isinstance(f, RepoFile))
    except (HfHubHTTPError, EntryNotFoundError) as e:
        raise HubError(explain(e, repo_id, revision, repo_type)) from e
    except Exception:   # OfflineModeIsEnabled, or the HTTP client's own connection error (httpx's or requests', by
        return None     # huggingface_hub's version: no public base class names them all)


def describe(repo_id: str, revision: str | None, repo_type: str = "model") -> str:
    """How messages name a repo revision: "dataset shunk031/JGLUE (revision refs/convert/parquet)"."""
    return f"{'dataset ' if repo_type == 'dataset' else ''}{repo_id} (revision {revision or 'main'})"


def explain(e: OSError | EntryNotFoundError, repo_id: str, revision: str | None, repo_type: str = "model",
            filename: str | None = None, offline_hint: str = "") -> str:
    """One line for a failed download: which of the five situations, and the repo, revision and file.
    offline_hint says what to do instead when the hub is out of reach (e.g. pass a local folder)."""
    repo = describe(repo_id, revision, repo_type)
    file = f" file {filename}" if filename else ""
    if isinstance(e, LocalEntryNotFoundError):   # nothing asked or nothing answered, and nothing in the cache
        where = f"{repo}{file} is not in the hub cache {constants.HF_HUB_CACHE}"
        why = (f"HF_HUB_OFFLINE is set and {where}: run once with the hub reachable" if constants.HF_HUB_OFFLINE
               else f"the hub ({constants.ENDPOINT}) could not be reached and {where}")
        return why + (f", or {offline_hint}" if offline_hint else "")
    if isinstance(e, GatedRepoError):
        return f"{repo} is gated: accept its conditions on its hub page, then log in (hf auth login)"
    if isinstance(e, RepositoryNotFoundError):
        return f"no repo {repo_id} on the hub ({constants.ENDPOINT}): check the id (a private one needs hf auth login)"
    if isinstance(e, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} on the hub (a branch, tag, commit or refs/pr/N)"
    if isinstance(e, EntryNotFoundError):
        return f"{repo} has no file {filename!r}"
    if isinstance(e, HfHubHTTPError):
        status = getattr(e.response, "status_code", "?")
        return f"the hub ({constants.ENDPOINT}) answered HTTP {status} for {repo}{file}"
    return f"downloading {repo}{file} failed: {type(e).__name__}: {e}"   # a broken connection, a full disk, ...
