"""Encoder weights by name (mmpeft.backbones.weights): the real download code against a local HTTP
server on 127.0.0.1 serving a small file whose size and hash the test registers; never the internet."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from mmpeft.backbones import weights
from mmpeft.errors import MmpeftFileNotFoundError, MmpeftValueError

PAYLOAD = b"official weights, " * 4096  # 73,728 bytes


class _Server:
    """A thread serving ``files`` (path -> bytes) on 127.0.0.1; ``hits`` counts the requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[_Server]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "MMPEFT_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    s = _Server()
    yield s
    s.close()


def _register(monkeypatch: pytest.MonkeyPatch, server: _Server, name: str, body: bytes, **known: object) -> None:
    """Serve ``body`` at the entry's file name and point the table's entry at the server; the
    size and hashes registered are ``PAYLOAD``'s unless ``known`` says otherwise."""
    entry = weights.WEIGHT_FILES[name]
    server.files["/" + entry.filename] = body
    fields = {
        "url": f"{server.url}/{entry.filename}",
        "size": len(PAYLOAD),
        "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
        "md5": hashlib.md5(PAYLOAD).hexdigest() if entry.md5 else None,
        **known,
    }
    monkeypatch.setitem(weights.WEIGHT_FILES, name, replace(entry, **fields))


def test_download_then_cache(server: _Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _register(monkeypatch, server, "sam_vit_b", PAYLOAD)
    path = Path(weights.resolve_weights("sam_vit_b", progress=False))
    assert path == tmp_path / "cache" / "sam_vit_b_01ec64.pth"
    assert path.read_bytes() == PAYLOAD
    assert server.hits == ["/sam_vit_b_01ec64.pth"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["sam_vit_b_01ec64.pth", "sam_vit_b_01ec64.pth.sha256"]
    # a second use reads the cache: no request
    assert Path(weights.resolve_weights("sam_vit_b", progress=False)) == path
    assert len(server.hits) == 1
    # an existing path is returned as it is, nothing fetched
    assert weights.resolve_weights(str(path)) == str(path)
    assert len(server.hits) == 1


def test_corrupted_download_refused_and_removed(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = bytearray(PAYLOAD)
    bad[100] ^= 1  # same size, one bit flipped: only the hash can see it
    _register(monkeypatch, server, "sam2.1_hiera_tiny", bytes(bad))
    with pytest.raises(MmpeftValueError, match=r"corrupted \(sha256 [0-9a-f]{64} where the published file has"):
        weights.fetch_weights("sam2.1_hiera_tiny", progress=False)
    cache = weights.weights_cache_dir()
    assert list(cache.iterdir()) == []  # neither the file nor a temporary nor a record is left
    # a download of the wrong size is refused too
    _register(monkeypatch, server, "sam2.1_hiera_tiny", PAYLOAD[:-1])
    with pytest.raises(MmpeftValueError, match=f"{len(PAYLOAD) - 1} bytes where the published file has"):
        weights.fetch_weights("sam2.1_hiera_tiny", progress=False)
    assert list(cache.iterdir()) == []


def test_md5_checked_where_only_it_is_known(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """SAM's file names carry the md5's first 6 hex digits: the full md5 is checked too."""
    _register(monkeypatch, server, "sam_vit_l", PAYLOAD, sha256=None, md5="0" * 32)
    with pytest.raises(MmpeftValueError, match="md5 .* where the published file has 0000"):
        weights.fetch_weights("sam_vit_l", progress=False)


def test_no_hash_published_recorded_at_first_download(
    server: _Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _register(monkeypatch, server, "dinov2_vitb14", PAYLOAD, size=None, sha256=None)
    path = weights.fetch_weights("dinov2_vitb14", progress=False)
    record = path.with_name(path.name + ".sha256")
    assert record.read_text().split()[:2] == [hashlib.sha256(PAYLOAD).hexdigest(), str(len(PAYLOAD))]
    assert weights.fetch_weights("dinov2_vitb14", progress=False) == path  # unchanged: no request
    assert len(server.hits) == 1
    path.write_bytes(PAYLOAD + b"!")  # the cached file changes (a partial copy by hand, ...)
    with pytest.raises(MmpeftValueError, match="its first download had"):
        weights.fetch_weights("dinov2_vitb14", progress=False)
    assert path.read_bytes() == PAYLOAD + b"!"  # a cached file is not deleted: the error says to


def test_no_network_no_cache_one_clear_error(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, server, "sam_vit_b", PAYLOAD)
    server.close()  # nothing listens any more: the connection is refused
    with pytest.raises(MmpeftFileNotFoundError) as err:
        weights.resolve_weights("sam_vit_b", progress=False)
    message = str(err.value)
    entry = weights.WEIGHT_FILES["sam_vit_b"]
    for part in ("sam_vit_b_01ec64.pth", entry.url, "model.checkpoint=PATH", str(weights.weights_cache_dir())):
        assert part in message, part
    assert list(weights.weights_cache_dir().iterdir()) == []
    # offline mode: the same error without trying the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MmpeftFileNotFoundError, match="offline mode is on.*model.checkpoint=PATH"):
        weights.resolve_weights("sam_vit_b", progress=False)


def test_neither_path_nor_name(tmp_path: Path) -> None:
    with pytest.raises(
        MmpeftFileNotFoundError,
        match="model.checkpoint .*sam_vit_q.pth not found: neither an existing file, nor the name of an official .*nor a timm",
    ):
        weights.resolve_weights(str(tmp_path / "sam_vit_q.pth"))


def test_the_table_is_the_official_one() -> None:
    """Addresses on Meta's published hosts, in the layout of the official download scripts; SAM's
    md5 begins with the 6 hex digits of its file name; hashes are full-length hex."""
    names = set(weights.WEIGHT_FILES)
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h"} <= names
    assert {f"sam2{v}_hiera_{s}" for v in ("", ".1") for s in ("tiny", "small", "base_plus", "large")} <= names
    assert {f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")} <= names
    for name, e in weights.WEIGHT_FILES.items():
        assert e.url.startswith("https://dl.fbaipublicfiles.com/"), name
        if name.startswith("sam_"):
            prefix = re.fullmatch(r"sam_vit_[blh]_([0-9a-f]{6})\.pth", e.filename)
            assert prefix and e.md5 and e.md5.startswith(prefix.group(1)), name
        elif name.startswith("sam2"):
            release = "092824" if name.startswith("sam2.1") else "072824"
            assert e.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/{release}/{name}.pt"
        else:
            arch = name.removesuffix("_reg")
            reg = "_reg4" if name.endswith("_reg") else ""
            assert e.url == f"https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256), name
        assert e.md5 is None or re.fullmatch(r"[0-9a-f]{32}", e.md5), name


@pytest.mark.slow
def test_mfnet_checkpoint_by_name(server: _Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``model.checkpoint=dinov2_vits14`` (a name, not a path) builds the model a local copy of the
    same file builds: fetched from the server, checked, loaded from the cache."""
    timm = pytest.importorskip("timm")
    import torch

    from mmpeft_isprs.model import build_mfnet

    sizes = {"embed_dim": 32, "depth": 4, "num_heads": 2}
    torch.manual_seed(5)  # a tiny DINOv2 trunk in timm's layout, as a file holds it
    trunk = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=56, init_values=1.0, **sizes)
    local = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(dict(trunk.state_dict()), local)
    body = local.read_bytes()
    _register(monkeypatch, server, "dinov2_vits14", body, size=len(body), sha256=hashlib.sha256(body).hexdigest())
    # the same file as timm's pretrained weights of a timm name, in a Hugging Face cache (offline)
    timm_name = "vit_small_patch14_dinov2.lvd142m"
    hub_cache = _hf_cache(monkeypatch, tmp_path, "timm/" + timm_name, {"model.safetensors": trunk.state_dict()})
    models = []
    for checkpoint in ("dinov2_vits14", timm_name, str(local)):
        torch.manual_seed(0)
        cfg = dict(backbone="dinov2_vits14", encoder_kwargs={"init_values": 1.0}, **sizes)
        models.append(build_mfnet(**cfg, img_size=64, method="lora", checkpoint=checkpoint).eval())
    by_name, by_timm_name, by_path = models
    assert by_name.load_report.source == str(weights.weights_cache_dir() / "dinov2_vits14_pretrain.pth")
    assert by_timm_name.load_report.source.startswith(str(hub_cache))
    assert by_name.load_report.loaded == by_path.load_report.loaded == by_timm_name.load_report.loaded
    assert by_path.load_report.loaded
    g = torch.Generator().manual_seed(1)
    x = {"optical": torch.randn(1, 3, 64, 64, generator=g), "dsm": torch.randn(1, 1, 64, 64, generator=g)}
    with torch.no_grad():
        assert torch.equal(by_name(x), by_path(x)) and torch.equal(by_timm_name(x), by_path(x))
    assert len(server.hits) == 1


def _hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, repo: str, files: dict[str, dict]) -> Path:
    """A Hugging Face cache holding ``repo`` at ``main`` with ``files`` (safetensors), the Hub offline."""
    hf = pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants  # noqa: F401 (a lazy submodule: imported before hf.constants is read)
    from safetensors.torch import save_file

    cache = tmp_path / "hf-cache"
    store = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (store / "snapshots" / commit).mkdir(parents=True)
    for name, state in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(store / "snapshots" / commit / name))
    (store / "refs").mkdir()
    (store / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_timm_name_not_cached_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("timm")
    _hf_cache(monkeypatch, tmp_path, "timm/other", {})
    with pytest.raises(MmpeftFileNotFoundError) as err:
        weights.resolve_weights("vit_small_patch14_dinov2.lvd142m")
    for part in ("'vit_small_patch14_dinov2.lvd142m'", "https://huggingface.co/timm/vit_small_patch14_dinov2.lvd142m"):
        assert part in str(err.value)
    assert "model.checkpoint=PATH" in str(err.value)


def test_the_docs_list_every_file_with_its_address() -> None:
    """docs/mfnet.md ("Weights") has one row per file: its name, file, address, size and hashes as in the table."""
    text = (Path(__file__).parents[1] / "docs" / "mfnet.md").read_text()
    for name, e in weights.WEIGHT_FILES.items():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
        assert len(rows) == 1, name
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        assert cells[1:3] == [f"`{e.filename}`", e.url], name
        assert cells[3] == (f"{e.size:,}" if e.size else "-"), name
        assert cells[4].startswith(f"`{e.sha256}`" if e.sha256 else "-"), name
        assert e.md5 is None or f"md5 `{e.md5}`" in cells[4], name


def test_read_only_cache_still_checked(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared cache the user cannot write (the record beside the file fails to be written): the
    file placed there is used, checked, and hashed again at the next use."""
    _register(monkeypatch, server, "sam_vit_b", PAYLOAD)
    cache = weights.weights_cache_dir()
    cache.mkdir(parents=True)
    (cache / "sam_vit_b_01ec64.pth").write_bytes(PAYLOAD)
    monkeypatch.setattr(weights, "_record", lambda p: p.parent / "not-writable" / (p.name + ".sha256"))
    for _ in range(2):
        assert weights.fetch_weights("sam_vit_b", progress=False) == cache / "sam_vit_b_01ec64.pth"
    assert server.hits == [] and sorted(p.name for p in cache.iterdir()) == ["sam_vit_b_01ec64.pth"]
    (cache / "sam_vit_b_01ec64.pth").write_bytes(PAYLOAD[:-1] + b"?")  # still checked at each use
    with pytest.raises(MmpeftValueError, match="the cached file .* is not 'sam_vit_b'"):
        weights.fetch_weights("sam_vit_b", progress=False)
