"""The official encoder weight files by name: address, size, hash; a checked download into a cache.

``resolve_weights("sam_vit_b")`` returns the local path of ``sam_vit_b_01ec64.pth``: from the cache
when it is there (size and hash checked), else downloaded from Meta's published address with
``torch.hub.download_url_to_file`` into a temporary file, checked, then renamed into the cache (a
download of the wrong size or hash is refused and removed; nothing half-written is ever left under
the final name). An existing path is returned as it is.

The cache is ``$MMPEFT_CACHE`` when set, else torch's own ``torch.hub.get_dir()/checkpoints`` (where
``torch.hub.load_state_dict_from_url`` puts the same files, so a copy already there is reused). With
``MMPEFT_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` nothing is downloaded. Without the file and without a
network: one :class:`~mmpeft.errors.MmpeftFileNotFoundError` naming the file, its address, the
cache path and ``model.checkpoint=PATH``.

Meta publishes the addresses (the READMEs and download scripts of facebookresearch/segment-anything,
sam2 and dinov2) but no checksums. SAM's file names carry the first 6 hex digits of the file's md5
(``sam_vit_b_01ec64.pth``), checked here with the full md5. The sha256 and sizes below are those
recorded identically by several independent projects that verify these downloads; a file with no
recorded hash (``sha256=None``) is checked for its size where known, and its sha256 is written
beside it at the first download (``<file>.sha256``, with its size and mtime) and checked whenever the
file has changed since (docs/mfnet.md, "Weights"). A cached file is hashed again only then.
"""

from __future__ import annotations

import hashlib
import http.client
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MmpeftFileNotFoundError, MmpeftKeyError, MmpeftValueError

__all__ = [
    "WeightFile",
    "WEIGHT_FILES",
    "weights_cache_dir",
    "fetch_weights",
    "fetch_timm_weights",
    "resolve_weights",
]

_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"
_SAM21 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2/"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightFile:
    """One official weight file.

    Attributes:
        name: the name ``model.checkpoint`` takes (``"sam_vit_b"``).
        url: the published address; the file name is its last component.
        size: bytes (None: not known).
        sha256: the full sha256 (None: not known; recorded at the first download, see the module).
        md5: the full md5 (SAM: its first 6 hex digits are in the published file name).
    """

    name: str
    url: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _table() -> dict[str, WeightFile]:
    rows = [
        WeightFile(
            "sam_vit_b",
            _SAM + "sam_vit_b_01ec64.pth",
            375042383,
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            "01ec64d29a2fca3f0661936605ae66f8",
        ),
        WeightFile(
            "sam_vit_l",
            _SAM + "sam_vit_l_0b3195.pth",
            1249524607,
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            "0b3195507c641ddb6910d2bb5adee89c",
        ),
        WeightFile(
            "sam_vit_h",
            _SAM + "sam_vit_h_4b8939.pth",
            2564550879,
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            "4b8939a88964f0f4ff5f5b2642c598a6",
        ),
    ]
    sam2 = {  # (release, size) -> sha256
        ("sam2_hiera_tiny", 155906050): "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125",
        ("sam2_hiera_small", 184309650): "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3",
        ("sam2_hiera_base_plus", 323493298): "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071",
        ("sam2_hiera_large", 897952466): "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b",
        ("sam2.1_hiera_tiny", 156008466): "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
        ("sam2.1_hiera_small", 184416285): "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
        ("sam2.1_hiera_base_plus", 323606802): "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
        ("sam2.1_hiera_large", 898083611): "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
    }
    for (name, size), sha in sam2.items():
        rows.append(WeightFile(name, (_SAM21 if name.startswith("sam2.1") else _SAM2) + name + ".pt", size, sha))
    dinov2_small = (88283115, "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9")
    for arch in ("vits14", "vitb14", "vitl14", "vitg14"):
        for reg in ("", "_reg"):
            stem = f"dinov2_{arch}"
            url = f"{_DINOV2}{stem}/{stem}{'_reg4' if reg else ''}_pretrain.pth"
            known = dinov2_small if arch == "vits14" and not reg else (None, None)
            rows.append(WeightFile(stem + reg, url, *known))
    return {r.name: r for r in rows}


#: name -> :class:`WeightFile`: SAM (``sam_vit_b/l/h``), SAM2 / SAM2.1 (``sam2_hiera_*``,
#: ``sam2.1_hiera_*``: tiny, small, base_plus, large), DINOv2 (``dinov2_vit{s,b,l,g}14[_reg]``)
WEIGHT_FILES: dict[str, WeightFile] = _table()


def weights_cache_dir() -> Path:
    """``$MMPEFT_CACHE`` when set, else ``torch.hub.get_dir()/checkpoints`` (torch's own cache)."""
    env = os.environ.get("MMPEFT_CACHE")
    if env:
        return Path(env).expanduser()
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("MMPEFT_OFFLINE", "HF_HUB_OFFLINE")
    )


def _digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) of the file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _record(path: Path) -> Path:
    """The file beside ``path`` recording its checked sha256 with the size and mtime it had then."""
    return path.with_name(path.name + ".sha256")


def _recorded(path: Path) -> tuple[str | None, bool]:
    """(the sha256 recorded for ``path`` or None, whether the file is unchanged since: same size and mtime)."""
    record = _record(path)
    fields = record.read_text().split() if record.is_file() else []
    if len(fields) != 3:
        return None, False
    st = path.stat() if path.exists() else None
    return fields[0], st is not None and fields[1:] == [str(st.st_size), str(st.st_mtime_ns)]


def _write_record(path: Path, sha: str, record: Path) -> None:
    st = path.stat()
    try:
        record.write_text(f"{sha} {st.st_size} {st.st_mtime_ns}\n")
    except OSError:  # a read-only shared cache: the file is hashed again at the next use
        pass


def _check(entry: WeightFile, path: Path, first: str | None) -> tuple[str | None, str]:
    """(what is wrong with ``path`` as ``entry``'s file, or None; its sha256). Size, sha256 and md5
    are compared with the published ones; the sha256 of a file with none published, with ``first``
    (its first download's) when there is one."""
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return f"{size} bytes where the published file has {entry.size}", ""
    sha, md5 = _digests(path)
    expected = entry.sha256 or first
    if expected is not None and sha != expected:
        whose = "the published file has" if entry.sha256 else "its first download had"
        return f"sha256 {sha} where {whose} {expected}", sha
    if entry.md5 is not None and md5 != entry.md5:
        return f"md5 {md5} where the published file has {entry.md5}", sha
    return None, sha


def _checked_cache_hit(entry: WeightFile, path: Path) -> bool:
    """True when ``path`` holds ``entry``'s file (hashed again only when it changed since its last
    check); a file that fails the checks is an error naming it."""
    if not path.is_file():
        return False
    first, unchanged = _recorded(path)
    if unchanged and first is not None and entry.sha256 in (None, first):
        return True
    wrong, sha = _check(entry, path, first)
    if wrong is not None:
        raise MmpeftValueError(
            f"the cached file {path} is not {entry.name!r} ({entry.url}): {wrong}. Delete it to download it "
            f"again, or pass a good local copy with model.checkpoint=PATH"
        )
    _write_record(path, sha, _record(path))
    return True


def _unreachable(entry: WeightFile, path: Path, reason: str) -> MmpeftFileNotFoundError:
    return MmpeftFileNotFoundError(
        f"encoder weights {entry.name!r} ({entry.filename}) are not in the cache ({path}) and were not "
        f"downloaded from {entry.url}: {reason}. Download the file from that address into {path.parent} "
        f"(or set MMPEFT_CACHE), or pass a local copy with model.checkpoint=PATH"
    )


def fetch_weights(name: str, *, progress: bool = True) -> Path:
    """The local path of the official file ``name`` (a key of :data:`WEIGHT_FILES`), downloaded and
    checked on first use (see the module). Raises :class:`~mmpeft.errors.MmpeftKeyError` for an
    unknown name, :class:`~mmpeft.errors.MmpeftValueError` for a corrupted download (removed) or
    cached file, :class:`~mmpeft.errors.MmpeftFileNotFoundError` when it cannot be downloaded."""
    entry = WEIGHT_FILES.get(name)
    if entry is None:
        raise MmpeftKeyError(f"no official weight file named {name!r}; the names are {sorted(WEIGHT_FILES)}")
    path = weights_cache_dir() / entry.filename
    if _checked_cache_hit(entry, path):
        return path
    if _offline():
        raise _unreachable(entry, path, "offline mode is on (MMPEFT_OFFLINE / HF_HUB_OFFLINE)")
    import torch.hub

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{entry.filename}.part{os.getpid()}")
    try:
        try:
            torch.hub.download_url_to_file(entry.url, str(part), progress=progress)
        except (OSError, http.client.HTTPException) as err:
            raise _unreachable(entry, path, f"{type(err).__name__}: {err}") from None
        wrong, sha = _check(entry, part, _recorded(path)[0])
        if wrong is not None:
            raise MmpeftValueError(
                f"the download of {entry.name!r} from {entry.url} is corrupted ({wrong}) and was removed; "
                "try again, or download the file yourself and pass it with model.checkpoint=PATH"
            )
        _write_record(part, sha, _record(path))  # the rename keeps the size and mtime
        os.replace(part, path)
    finally:
        if part.exists():
            part.unlink()
    return path


def _timm_source(name: str) -> tuple[str, str | None] | None:
    """(Hub repo, file name or None) where timm's ``pretrained=True`` takes the weights of the timm
    pretrained name ``name`` (``vit_small_patch14_dinov2.lvd142m``, or an architecture: its default
    tag); None when ``name`` is not one (or timm is not installed)."""
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        return None
    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # a string timm cannot parse is not one of its names
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    return cfg.hf_hub_id, cfg.hf_hub_filename


def fetch_timm_weights(name: str) -> Path:
    """The file timm's ``pretrained=True`` loads for ``name`` (its pretrained config's Hub repo,
    ``model.safetensors``, else ``pytorch_model.bin``), through ``huggingface_hub.hf_hub_download``
    (the Hugging Face cache; its hashes checked by huggingface_hub; ``HF_HUB_OFFLINE=1``: the cache
    only). Not reachable: one error naming the name, the repo and ``model.checkpoint=PATH``."""
    source = _timm_source(name)
    if source is None:
        raise MmpeftKeyError(f"{name!r} is not a timm pretrained name with weights on the Hugging Face Hub")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo, filename = source
    repo, _, revision = repo.partition("@")
    last: Exception | None = None
    for file in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:
        try:
            return Path(hf_hub_download(repo, file, revision=revision or None))
        except EntryNotFoundError as err:  # the other file name
            last = err
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            last = err
            break
    reason = str(last).strip().splitlines()[0].rstrip(".") if str(last).strip() else type(last).__name__
    raise MmpeftFileNotFoundError(
        f"timm's pretrained weights {name!r} (https://huggingface.co/{repo}) are not in the Hugging Face cache and "
        f"were not downloaded: {reason}. Run once with a network (they stay in the cache), or pass a local copy "
        "with model.checkpoint=PATH"
    )


def resolve_weights(checkpoint: str | os.PathLike, *, progress: bool = True) -> str:
    """A local file for ``model.checkpoint``: an existing path as it is; a name of
    :data:`WEIGHT_FILES` fetched (:func:`fetch_weights`); a timm pretrained name (``<architecture>.<tag>``)
    the file timm's ``pretrained=True`` loads (:func:`fetch_timm_weights`); anything else an error
    naming the possibilities."""
    value = os.fspath(checkpoint)
    if os.path.exists(value):
        return value
    if value in WEIGHT_FILES:
        return str(fetch_weights(value, progress=progress))
    if _timm_source(value) is not None:
        return str(fetch_timm_weights(value))
    raise MmpeftFileNotFoundError(
        f"model.checkpoint {value} not found: neither an existing file, nor the name of an official weight file "
        f"({', '.join(sorted(WEIGHT_FILES))}; docs/mfnet.md, 'Weights'), nor a timm pretrained name"
    )
