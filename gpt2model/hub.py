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


def resolve_file(name_or_path: str | os.PathLike, filename: str, *, required: bool = True
                 ) -> Path | None:
    """Return the local path of `filename` from a checkpoint directory or Hub repo.

    Returns None for a missing optional file; raises CheckpointError (one line, with the way
    out) for a missing required file, an unknown repo or an unreachable Hub.
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
    return _hub_file(str(name_or_path), filename, required=required)


def _hub_file(repo_id: str, filename: str, *, required: bool) -> Path | None:
    # Imported here: the hub client is only needed for repo ids, and its import is slow.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
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
