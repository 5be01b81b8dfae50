"""`--model` as a Hugging Face Hub id: `observe-r1 serve --model Qwen/Qwen2.5-VL-3B-Instruct`.

A `--model` that is no local path but reads `owner/name` is fetched into the Hub cache (HF_HOME) before the
server starts, with the token in $HF_TOKEN for gated or private repositories; with HF_HUB_OFFLINE=1 only the
cache is read. Both engines then load the local snapshot, and the served name defaults to the Hub id.
"""

from __future__ import annotations

import re
from pathlib import Path

from observe_r1.errors import UserError
from observe_r1.modeling import check_model_folder
from observe_r1_serve.config import ServerConfig

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model(config: ServerConfig) -> None:
    """Points `config.model` at a checked local model folder, downloading a Hub id first."""
    if config.model.exists() or not HUB_ID.match(str(config.model)):
        check_model_folder(config.model)
        return
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    repo = str(config.model)
    try:
        local = snapshot_download(repo)
    except (HfHubHTTPError, OSError) as e:  # unknown or gated repository, no network, offline without a copy
        raise UserError(f"--model {repo} is no local folder, and the Hub gave no copy of it: {e}") from e
    config.served_model_name = config.served_model_name or repo
    config.model = Path(local)
    check_model_folder(config.model)
