"""Adapters on the Hub (mmpeft.model.hub): push_to_hub / save_pretrained(push_to_hub=True) and
load_multimodal(base, "owner/name"), never the internet. ``HfApi.create_repo`` / ``upload_folder``
are replaced by a stand-in that commits the uploaded folder into a local Hugging Face cache (the
layout ``snapshot_download`` reads); loading then runs the real ``snapshot_download`` with
``HF_HUB_OFFLINE=1`` on that cache."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mmpeft import MultimodalModel, load_multimodal, wrap_multimodal
from mmpeft.errors import MmpeftFileNotFoundError, MmpeftTypeError
from tests.helpers import assert_close, randomise_trainables

hf = pytest.importorskip("huggingface_hub")
pytest.importorskip("huggingface_hub.constants")  # a lazy submodule: imported before hf.constants is read
MODALITIES = ("optical", "dsm")


def tiny_timm_vit(seed: int = 0) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """A local stand-in for the Hub: uploads land in a Hugging Face cache; the Hub is offline."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls: list[tuple[Any, ...]] = []

    def create_repo(self: Any, repo_id: str, *, private: Any = None, exist_ok: bool = False, **kw: Any) -> Any:
        calls.append(("create_repo", repo_id, private, exist_ok))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self: Any, *, repo_id: str, folder_path: str, commit_message: str, **kw: Any) -> Any:
        files = sorted(p.relative_to(folder_path) for p in Path(folder_path).rglob("*") if p.is_file())
        commit = hashlib.sha1(b"".join(Path(folder_path, f).read_bytes() for f in files)).hexdigest()
        store = cache / f"models--{repo_id.replace('/', '--')}"
        for f in files:
            (store / "snapshots" / commit / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(folder_path, f), store / "snapshots" / commit / f)
        (store / "refs").mkdir(parents=True, exist_ok=True)
        (store / "refs" / (kw.get("revision") or "main")).write_text(commit)
        calls.append(("upload_folder", repo_id, commit_message, [str(f) for f in files], kw))
        return SimpleNamespace(oid=commit)

    monkeypatch.setattr(hf.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hf.HfApi, "upload_folder", upload_folder)
    return SimpleNamespace(cache=cache, calls=calls)


def _trained() -> Any:
    wrapped = wrap_multimodal(tiny_timm_vit(), MODALITIES, "lora")
    randomise_trainables(wrapped)
    return wrapped.eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {m: torch.randn(2, 3, 32, 32, generator=g) for m in MODALITIES}


def _same_outputs(a: Any, b: Any) -> None:
    x = _inputs()
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    for m in MODALITIES:
        assert_close(out_b[m], out_a[m], rel=0)


def test_push_then_load_reproduces_outputs(hub: SimpleNamespace) -> None:
    wrapped = _trained()
    info = wrapped.push_to_hub("user/tiny-adapters", private=True, commit_message="first")
    assert hub.calls[0] == ("create_repo", "user/tiny-adapters", True, True)
    _, repo, message, files, _ = hub.calls[1]
    assert (repo, message) == ("user/tiny-adapters", "first")
    assert files == ["README.md", "adapter_model.safetensors", "mmpeft_config.json"]
    loaded = load_multimodal(tiny_timm_vit(), "user/tiny-adapters")  # the real snapshot_download, offline
    _same_outputs(wrapped, loaded)
    snapshot = hub.cache / "models--user--tiny-adapters" / "snapshots" / info.oid
    assert (snapshot / "README.md").read_text().startswith("---\nlibrary_name: mmpeft\n")


def test_save_pretrained_push_to_hub(hub: SimpleNamespace, tmp_path: Path) -> None:
    wrapped = _trained()
    wrapped.add_adapter("second")
    wrapped.set_adapter("second")
    randomise_trainables(wrapped, seed=9)  # the active set's trainables: "second" differs from "default"
    wrapped.set_adapter("default")
    target = tmp_path / "tiny-adapters"
    wrapped.save_pretrained(target, push_to_hub=True, repo_id="user/two-sets")
    assert (target / "README.md").is_file()  # the card is written into the directory pushed
    files = hub.calls[-1][3]
    assert "second/mmpeft_config.json" in files and "adapter_model.safetensors" in files
    loaded = load_multimodal(tiny_timm_vit(), "user/two-sets")
    _same_outputs(wrapped, loaded)
    # peft's other readers of a Hub id: from_pretrained, and load_adapter of a set in its folder
    _same_outputs(wrapped, MultimodalModel.from_pretrained(tiny_timm_vit(), "user/two-sets"))
    loaded.load_adapter("user/two-sets", "second")
    loaded.set_adapter("second")
    wrapped.set_adapter("second")
    _same_outputs(wrapped, loaded)
    wrapped.set_adapter("default")
    # repo_id defaults to the directory's name (a bare name: the token's user, as transformers)
    wrapped.save_pretrained(target, push_to_hub=True)
    assert hub.calls[-2][1] == "tiny-adapters" and hub.calls[-1][1] == "me/tiny-adapters"
    # a card the user wrote is kept
    (target / "README.md").write_text("my card\n")
    wrapped.save_pretrained(target, push_to_hub=True, repo_id="user/two-sets")
    assert (target / "README.md").read_text() == "my card\n"


def test_hub_options_refused_before_writing(hub: SimpleNamespace, tmp_path: Path) -> None:
    wrapped = _trained()
    with pytest.raises(MmpeftTypeError, match="options of push_to_hub=True"):
        wrapped.save_pretrained(tmp_path / "x", repo_id="user/x")
    with pytest.raises(MmpeftTypeError, match=r"unknown push_to_hub option\(s\) \['privat'\]"):
        wrapped.save_pretrained(tmp_path / "x", push_to_hub=True, repo_id="user/x", privat=True)
    with pytest.raises(MmpeftTypeError, match="'a b' is not a Hub repo id"):
        wrapped.save_pretrained(tmp_path / "a b", push_to_hub=True)
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert hub.calls == []


def test_model_card(hub: SimpleNamespace) -> None:
    wrapped = _trained()
    info = wrapped.push_to_hub("user/card", base_model="google/vit-base-patch16-224")
    card = (hub.cache / "models--user--card" / "snapshots" / info.oid / "README.md").read_text()
    counts = wrapped.count_adapter_parameters()
    assert "base_model: google/vit-base-patch16-224\n" in card
    assert "- **Modalities**: optical, dsm" in card
    assert "- **Method**: lora (preset mmlora)" in card
    assert f"- **Trainable parameters**: {counts.trainable:,} of {counts.trainable + counts.frozen:,}" in card
    for g in counts.groups:
        assert f"| {g.name} | {g.trainable:,} | {g.frozen:,} |" in card
    assert "load_multimodal(base_model, 'user/card')" in card


def test_local_directory_unchanged_and_errors_name_both(hub: SimpleNamespace, tmp_path: Path) -> None:
    wrapped = _trained()
    wrapped.save_pretrained(tmp_path / "user" / "local")
    # deliberate difference from peft (whose save_pretrained always writes README.md): a save without
    # push_to_hub writes the two files it always wrote, the card only goes with a push
    assert sorted(p.name for p in (tmp_path / "user" / "local").iterdir()) == [
        "adapter_model.safetensors",
        "mmpeft_config.json",
    ]
    # an existing path is a local directory, even when it reads as owner/name
    _same_outputs(wrapped, load_multimodal(tiny_timm_vit(), str(tmp_path / "user" / "local")))
    with pytest.raises(MmpeftFileNotFoundError, match="neither a local directory .* nor a Hub repo.*owner/name"):
        load_multimodal(tiny_timm_vit(), "user/not-pushed")  # offline, not in the cache
    with pytest.raises(MmpeftFileNotFoundError, match="not of the form 'owner/name'"):
        load_multimodal(tiny_timm_vit(), str(tmp_path / "missing" / "dir"))
    with pytest.raises(MmpeftTypeError, match="Hub option"):
        from mmpeft.model.hub import resolve_adapter_source

        resolve_adapter_source("user/x", revison="main")


def test_without_huggingface_hub_one_clear_import_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from mmpeft.model.hub import MissingDependencyError

    wrapped = _trained()
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub raises ImportError
    with pytest.raises(MissingDependencyError, match=r"needs huggingface_hub .*pip install 'mmpeft\[hub\]'") as err:
        load_multimodal(tiny_timm_vit(), "user/anything")
    assert isinstance(err.value, ImportError)
    with pytest.raises(MissingDependencyError):
        wrapped.push_to_hub("user/anything")
    wrapped.save_pretrained(tmp_path / "local")  # a local directory needs no Hub
    _same_outputs(wrapped, load_multimodal(tiny_timm_vit(), str(tmp_path / "local")))
