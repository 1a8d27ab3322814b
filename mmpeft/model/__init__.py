"""The wrapped model and its life cycle: :class:`MultimodalModel` (``multimodal.py``) with its
block features, wrapping (``wrap.py``), saving and loading (``saving.py``, the file format in
``io.py``), merging (``merge.py``) and parameter counts (``params.py``).

May import: :mod:`mmpeft.targeting`, :mod:`mmpeft.runtime`, :mod:`mmpeft.tuners`,
:mod:`mmpeft.config`, :mod:`mmpeft.utils`.
"""
