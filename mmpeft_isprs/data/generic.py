"""Your own tiles: :class:`GenericLayout` (one folder per modality plus labels, files sharing a stem)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .io import IMAGE_SUFFIXES
from .layouts import LabelFormat, Layout, ModalitySpec, SplitSpec, TileFiles, _split_tile
from .palette import ISPRS, DatasetInfo
from .patterns import merge_patterns, resolve_file
from .splits import list_splits

__all__ = ["GenericLayout"]


def _find(folder: Path, stem: str, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> Path:
    """``folder/stem.<suffix>`` for the first suffix that exists (else the first suffix)."""
    for suffix in suffixes:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return folder / f"{stem}{suffixes[0]}"


@dataclass
class GenericLayout(Layout):
    """Your own tiles: one folder per modality plus a label folder, files sharing a stem.

    ``root/<folder of each modality>/<stem>.<tif|tiff|png|jpg|jpeg>`` and
    ``root/<label_dir>/<stem>.<ext>`` (optionally ``root/<eval_label_dir>/<stem>.<ext>`` with
    eroded labels for scoring). Any number of modalities; labels as class indices
    (``label_format="index"``, values in ``info.ignore_values`` ignored) or colours
    (``"colour"``, ``info.palette``). Splits: ``splits={...}``, or folders
    ``root/<split>/<folder>/...``, or lists ``root/splits/<split>.txt`` / ``root/<split>.txt``.

    Example::

        GenericLayout(
            modalities=(ModalitySpec("optical"), ModalitySpec("dsm", "elevation"),
                        ModalitySpec("sar")),
            info=ISPRS, label_format="colour", label_dir="labels",
        )

    Attributes:
        modalities: the inputs; each is read from the folder ``folders.get(name, name)``.
        info: classes, palette, ignore values.
        label_format: ``"index"`` or ``"colour"``.
        label_dir: folder of the training labels.
        eval_label_dir: folder of eroded labels for scoring (``None``: score on label_dir).
        folders: modality name -> folder name, where they differ.
        colour_tolerance: snap near-palette colours (colour labels only).
        files: file name patterns by role (a modality's source, ``labels``, ``eval_labels``),
            relative to the root (``{id}``: the tile's stem; see :mod:`.patterns`), used instead
            of ``<folder>/<stem>.<ext>`` for these roles: a raster named otherwise (``radar/s1_{id}_vv.tif``).
    """

    modalities: tuple[ModalitySpec, ...] = (ModalitySpec("optical"), ModalitySpec("dsm", "elevation"))
    info: DatasetInfo = ISPRS
    label_format: LabelFormat = "index"
    label_dir: str = "labels"
    eval_label_dir: str | None = None
    folders: dict[str, str] = field(default_factory=dict)
    colour_tolerance: int = 0
    split: SplitSpec = field(default_factory=SplitSpec)
    splits: dict[str, list[str]] | None = None
    files: dict[str, str | list[str]] | None = None

    def __post_init__(self) -> None:
        names = [m.name for m in self.modalities]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"GenericLayout: modality names must be distinct and non-empty: {names}")
        if self.label_format not in ("index", "colour"):
            raise ValueError("GenericLayout: label_format must be 'index' or 'colour'")
        Layout.__init__(self, self.split, self.splits)
        self.patterns = merge_patterns({}, self.files)

    def _file(self, base: Path, role: str, folder: str | None, stem: str) -> Path | None:
        """The file of ``role``: its pattern when ``files`` gives one, else ``folder/stem.<ext>``."""
        if role in self.patterns:
            return resolve_file(base, self.patterns[role], stem)
        return _find(base / folder, stem) if folder else None

    def tile_files(self, root: Path, tile_id: str) -> TileFiles:
        base, stem = _split_tile(Path(root), tile_id)
        inputs = {m.name: self._file(base, m.role, self.folder(m), stem) for m in self.modalities}
        labels = self._file(base, "labels", self.label_dir, stem)
        evals = self._file(base, "eval_labels", self.eval_label_dir, stem)
        return TileFiles(tile_id, inputs, labels, evals)  # type: ignore[arg-type]

    def folder(self, m: ModalitySpec) -> str:
        """The folder modality ``m`` is read from: ``folders[name]``, else its source's folder."""
        return self.folders.get(m.name) or self.folders.get(m.role, m.role)

    def base_splits(self, root: Path) -> dict[str, list[str]]:
        return list_splits(Path(root), self.folder(self.modalities[0]), ("train", "val", "test"))
