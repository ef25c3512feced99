"""Upload a finished export folder to the Hugging Face Hub: a thin wrapper over huggingface_hub.

    push_folder(folder, "user/name", private=True)   # = HfApi.create_repo(exist_ok=True) + upload_folder

The token comes from `token=`, else huggingface_hub's usual places (HF_TOKEN, `hf auth login`). Nothing is
checked or rewritten on the way: what is in the folder (built by mode-export format=hub) is what goes up.
"""

from __future__ import annotations

from pathlib import Path

from mode.errors import ModeError


def push_folder(folder, repo_id: str, *, private: bool = True, token: str | None = None,
                commit_message: str = "Upload from mode-export") -> str:
    """Create the model repo if needed and upload every file of `folder`; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise ModeError(f"{folder}: no README.md (model card); build the folder with mode-export format=hub")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=commit_message)
    except Exception as err:  # network, authentication, permissions: one line, the folder stays for a retry
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModeError(f"upload of {folder} to {repo_id} failed ({first}); the folder is complete, retry with "
                        f"huggingface-cli upload {repo_id} {folder}") from err
    url = getattr(commit, "commit_url", None) or str(commit)
    print(f"uploaded {folder} -> https://huggingface.co/{repo_id}", flush=True)
    return url
