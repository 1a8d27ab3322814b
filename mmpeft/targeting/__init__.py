"""Where the multimodal layers go: the families and their presets (``targets``, with the family
record in ``family`` and the convolutional-attention families in ``hybrid``), selection
(``all-linear``, ``exclude``, layers, patterns), placement by structure for unknown transformers
(``structure``), the wrap-time dry run (``probe``: the input size and channels it reads in
``inputs``, the shape-only run in ``shapes``), what a preset leaves uncovered (``coverage``),
preparing a host (explicit attention, frozen norms) and injecting the layers (``inject``).

May import: :mod:`mmpeft.runtime`, :mod:`mmpeft.tuners`, :mod:`mmpeft.backbones`,
:mod:`mmpeft.config`, :mod:`mmpeft.utils`.
"""
