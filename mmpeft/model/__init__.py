"""The wrapped model and its life cycle: :class:`MultimodalModel` (``multimodal.py``) with its
block features, wrapping (``wrap.py``), saving and loading (``saving.py``, the file format in
``io.py``; the recorded dtype and float32 masters in ``precision.py``), merging (``merge.py``),
parameter counts (``params.py``) and named adapter sets
(``adapter_sets.py``, their weighted combination in ``combine.py``).

May import: :mod:`mmpeft.targeting`, :mod:`mmpeft.runtime`, :mod:`mmpeft.tuners`,
:mod:`mmpeft.config`, :mod:`mmpeft.utils`.
"""
