"""Finding checkpoint files: a local directory in Hugging Face layout, or a Hub repo id.

Hub downloads go through `huggingface_hub`, so they land in the standard cache and honour
`HF_HUB_OFFLINE`, `HF_HOME` and tokens the usual way.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpt2model.errors import CheckpointError

_OFFLINE_HINT = (
    "pass a local directory in Hugging Face layout instead, "
    "or run with network access; with HF_HUB_OFFLINE=1 only files already in the Hub cache are used"
)


def is_local(name_or_path: str | os.PathLike) -> bool:
    """A name is local when it exists on disk or looks like a path rather than a repo id."""
    s = str(name_or_path)
    return Path(s).exists() or s.startswith((".", "/", "~")) or os.sep + os.sep in s


def split_revision(name: str) -> tuple[str, str | None]:
    """'org/model@rev' -> ('org/model', 'rev'): a Hub id may name a branch, tag or commit."""
    repo, sep, revision = name.partition("@")
    return (repo, revision or None) if sep else (name, None)


def pin(name: str, revision: str | None = None) -> tuple[str, str]:
    """A Hub model at `revision` (default: its main branch) -> ('repo@<commit>', commit).

    The commit is the snapshot the files resolve to, so every worker that loads the pinned name
    reads exactly the same files, a month later too.
    """
    repo, named = split_revision(name)
    path = _hub_file(repo, "config.json", required=True, revision=revision or named)
    commit = path.parent.name  # the cache keeps each commit's files in snapshots/<commit>/
    return f"{repo}@{commit}", commit


CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
                    "flax_model.msgpack", "tokenizer.json", "vocab.json", "merges.txt")


def file_hashes(name_or_path: str | os.PathLike) -> dict[str, str]:
    """sha256 of each checkpoint file a job reads (weights shards included), by file name."""
    import hashlib
    import json

    found = {f: resolve_file(name_or_path, f, required=False) for f in CHECKPOINT_FILES}
    index = found.get("model.safetensors.index.json")
    if index is not None:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        found.update({f: resolve_file(name_or_path, f) for f in shards})
    out = {}
    for filename, path in found.items():
        if path is not None:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    digest.update(block)
            out[filename] = digest.hexdigest()
    return out


def resolve_file(name_or_path: str | os.PathLike, filename: str, *, required: bool = True
                 ) -> Path | None:
    """Return the local path of `filename` from a checkpoint directory or Hub repo.

    A Hub id may carry a revision as `repo@revision` (see `pin`). Returns None for a missing
    optional file; raises CheckpointError (one line, with the way out) for a missing required
    file, an unknown repo or revision, or an unreachable Hub.
    """
    if is_local(name_or_path):
        root = Path(name_or_path).expanduser()
        if not root.is_dir():
            raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist")
        path = root / filename
        if path.is_file():
            return path
        if required:
            raise CheckpointError(f"{filename} is missing from checkpoint directory {str(root)!r}")
        return None
    repo, revision = split_revision(str(name_or_path))
    return _hub_file(repo, filename, required=required, revision=revision)


def _hub_file(repo_id: str, filename: str, *, required: bool, revision: str | None = None
              ) -> Path | None:
    # Imported here: the hub client is only needed for repo ids, and its import is slow.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except LocalEntryNotFoundError:
        # Checked first: it subclasses EntryNotFoundError. Offline, an optional file that is not
        # cached is treated as absent; the required ones (config, weights) still fail loudly.
        if not required:
            return None
        raise CheckpointError(
            f"cannot fetch {filename} of {repo_id!r}: the Hugging Face Hub is unreachable or "
            f"offline and the file is not cached; {_OFFLINE_HINT}"
        ) from None
    except EntryNotFoundError:
        if required:
            raise CheckpointError(f"{filename} is missing from Hub repo {repo_id!r}") from None
        return None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"Hub repo {repo_id!r} has no revision {revision!r} (a branch, tag or commit)"
        ) from None
    except GatedRepoError:
        raise CheckpointError(
            f"Hub repo {repo_id!r} is gated: log in with `hf auth login` after accepting its terms"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"Hub repo {repo_id!r} was not found (or is private); {_OFFLINE_HINT}"
        ) from None
    except (OSError, ValueError) as err:  # connection errors, bad repo id syntax
        raise CheckpointError(
            f"cannot fetch {filename} of {repo_id!r}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}; {_OFFLINE_HINT}"
        ) from None
