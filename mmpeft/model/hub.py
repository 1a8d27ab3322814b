"""Adapters on the Hugging Face Hub, through ``huggingface_hub`` (installed with peft, timm and
transformers; the ``hub`` extra names it): ``push_to_hub`` / ``save_pretrained(..., push_to_hub=True)``
upload the files :meth:`save_pretrained` writes and a model card (``README.md``, as peft writes one);
``load_multimodal(base, "owner/name")`` downloads them with ``snapshot_download``.

A source that is an existing path is a local directory, exactly as before; a string that is not
one and has the form ``owner/name`` is a Hub repo (``HF_HUB_OFFLINE=1``: from the local cache only).
Anything else, or a repo that cannot be fetched, is one error naming both possibilities.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import MmpeftError, MmpeftFileNotFoundError, MmpeftTypeError
from ..tuners import method_of
from .io import CONFIG_NAME, WEIGHTS_NAME

__all__ = [
    "HUB_OPTIONS",
    "HubMixin",
    "MissingDependencyError",
    "is_hub_repo_id",
    "model_card",
    "resolve_adapter_source",
]

#: the ``snapshot_download`` options ``load_multimodal`` passes on (the rest are the model's)
HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only")
CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_PUSH_OPTIONS = ("private", "token", "commit_message", "revision", "create_pr", "base_model")
_PUSH_ID = re.compile(r"^([A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")  # a bare name: the token's user


class MissingDependencyError(MmpeftError, ImportError):
    """An optional dependency an operation needs is not installed."""


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise MissingDependencyError(
            "the Hub needs huggingface_hub (installed with peft, timm or transformers): pip install 'mmpeft[hub]'"
        ) from None
    return huggingface_hub


def is_hub_repo_id(source: str | os.PathLike) -> bool:
    """True when ``source`` is a string of the form ``owner/name`` that is not an existing path."""
    return isinstance(source, str) and not os.path.exists(source) and bool(_REPO_ID.match(source))


def _both(source: str, reason: str) -> MmpeftFileNotFoundError:
    return MmpeftFileNotFoundError(
        f"{Path(source) / CONFIG_NAME} not found: {source!r} is neither a local directory written by "
        f"save_pretrained nor a Hub repo that could be fetched ({reason}). Pass an existing directory, or a Hub "
        "repo id 'owner/name' (with HF_HUB_OFFLINE=1 only repos already in the Hugging Face cache are found)"
    )


def resolve_adapter_source(source: str | os.PathLike, **hub_options: Any) -> Path:
    """The local directory of ``source``: an existing path as it is; a Hub repo id downloaded
    (``snapshot_download`` of the mmpeft files, with ``hub_options``: ``revision``, ``token``,
    ``cache_dir``, ``local_files_only``); anything else an error naming both possibilities."""
    unknown = sorted(set(hub_options) - set(HUB_OPTIONS))
    if unknown:
        raise MmpeftTypeError(f"unknown Hub option(s) {unknown}; the Hub options are {list(HUB_OPTIONS)}")
    if not isinstance(source, (str, os.PathLike)):
        raise MmpeftTypeError(f"the adapters' source must be a directory or a Hub repo id, got {type(source).__name__}")
    if os.path.exists(source):
        return Path(source)
    if not is_hub_repo_id(source):
        raise _both(os.fspath(source), "not an existing path, and not of the form 'owner/name'")
    hub = _hub()
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError  # a lazy submodule: imported

    patterns = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, f"*/{CONFIG_NAME}", f"*/{WEIGHTS_NAME}"]
    try:
        folder = hub.snapshot_download(str(source), allow_patterns=patterns, **hub_options)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise _both(str(source), f"{type(err).__name__}: {first}") from None
    return Path(folder)


def _base_name(base: Any) -> str | None:
    """The base model's Hub id or name: Hugging Face's ``name_or_path``, timm's ``hf_hub_id`` /
    ``architecture``; None when it has none."""
    cfg = getattr(base, "config", None)
    name = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
    if not name:
        pcfg = getattr(base, "pretrained_cfg", None) or {}
        name = pcfg.get("hf_hub_id") or pcfg.get("architecture") if isinstance(pcfg, dict) else None
    return str(name) if name else None


def model_card(wrapped: Any, base_model: str | None = None, repo_id: str | None = None) -> str:
    """The ``README.md`` written beside the adapters (as peft writes one): YAML metadata
    (``library_name: mmpeft``, ``base_model`` when it is a Hub id, tags) and the base model,
    modalities, method(s), fusion rules, adapter sets and trainable / frozen counts."""
    base = base_model or _base_name(wrapped.base_model)
    config = wrapped.config
    methods = sorted({method_of(r).name for r in config.rules})
    fusions = sorted({str(getattr(r, "fusion", "none")) for r in config.rules})
    counts = wrapped.count_adapter_parameters()
    lines = ["---", "library_name: mmpeft"]
    if base and _REPO_ID.match(base):
        lines.append(f"base_model: {base}")
    lines += ["tags:", "- mmpeft", "- multimodal", *(f"- {m}" for m in methods), "---", ""]
    title = repo_id or f"mmpeft adapters for {base or type(wrapped.base_model).__name__}"
    lines += [f"# {title}", "", f"Multimodal adapters trained with mmpeft {__version__}.", ""]
    facts = {
        "Base model": base or f"{type(wrapped.base_model).__name__} (not a Hub model)",
        "Modalities": ", ".join(config.modalities),
        "Method": ", ".join(methods) + (f" (preset {config.preset})" if config.preset else ""),
        "Fusion": ", ".join(fusions),
        "Adapter sets": ", ".join(wrapped.adapters),
        "Trainable parameters": f"{counts.trainable:,} of {counts.trainable + counts.frozen:,}",
    }
    lines += [f"- **{k}**: {v}" for k, v in facts.items()]
    lines += ["", "| group | trainable | frozen |", "| --- | ---: | ---: |"]
    lines += [f"| {g.name} | {g.trainable:,} | {g.frozen:,} |" for g in counts.groups]
    source = repo_id or "owner/name"
    lines += ["", "## Use", "", "```python", "from mmpeft import load_multimodal", ""]
    lines += [f"model = load_multimodal(base_model, {source!r})  # base_model: {base or 'the model wrapped'}", "```"]
    return "\n".join(lines) + "\n"


def _upload(wrapped: Any, folder: Path, repo_id: str, options: dict[str, Any]) -> Any:
    """Write the model card into ``folder`` (unless one is there) and upload the folder to ``repo_id``."""
    hub = _hub()
    api = hub.HfApi(token=options.pop("token", None))
    url = api.create_repo(repo_id, private=options.pop("private", None), exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id  # a bare name: under the token's user
    base_model = options.pop("base_model", None)
    card = folder / CARD_NAME
    if not card.exists():  # a card the user wrote is kept
        card.write_text(model_card(wrapped, base_model, repo_id))
    message = options.pop("commit_message", None) or "Upload mmpeft adapters"
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message, **options)


class HubMixin:
    """``push_to_hub`` of :class:`~mmpeft.MultimodalModel` (mixed into it)."""

    def push_to_hub(
        self,
        repo_id: str,
        *,
        selected_adapters: Sequence[str] | None = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        base_model: str | None = None,
    ) -> Any:
        """Upload the adapters (what :meth:`save_pretrained` writes, every set or
        ``selected_adapters``) and a model card to the Hub repo ``repo_id`` (created if needed,
        ``private`` as given); ``base_model``: the base model's Hub id for the card (default: the
        model's own ``name_or_path`` / timm ``hf_hub_id``). Returns ``HfApi.upload_folder``'s
        commit info. Load them with ``load_multimodal(base, repo_id)``."""
        if not isinstance(repo_id, str) or not _PUSH_ID.match(repo_id):
            raise MmpeftTypeError(f"repo_id must be a Hub repo id 'owner/name' (or 'name'), got {repo_id!r}")
        options = {"private": private, "token": token, "commit_message": commit_message, "base_model": base_model}
        options.update(revision=revision, create_pr=create_pr)
        with tempfile.TemporaryDirectory(prefix="mmpeft-push-") as tmp:
            self.save_pretrained(tmp, selected_adapters=selected_adapters)  # type: ignore[attr-defined]
            return _upload(self, Path(tmp), repo_id, options)

    def _push_target(self, directory: str | os.PathLike, repo_id: str | None, options: dict[str, Any]) -> str:
        """The repo ``save_pretrained(directory, push_to_hub=True, repo_id=...)`` uploads to (default:
        the directory's name, as transformers does), checked with the options before anything is written."""
        unknown = sorted(set(options) - set(_PUSH_OPTIONS))
        if unknown:
            raise MmpeftTypeError(f"unknown push_to_hub option(s) {unknown}; the options are {list(_PUSH_OPTIONS)}")
        repo = repo_id or Path(directory).resolve().name
        if not _PUSH_ID.match(repo):
            raise MmpeftTypeError(
                f"save_pretrained(push_to_hub=True): {repo!r} is not a Hub repo id; pass repo_id='owner/name'"
            )
        _hub()  # installed
        return repo

    def _push_saved(self, directory: str | os.PathLike, repo: str, options: dict[str, Any]) -> Any:
        """Upload ``directory`` as :meth:`save_pretrained` wrote it (with a model card) to ``repo``."""
        return _upload(self, Path(directory), repo, dict(options))
