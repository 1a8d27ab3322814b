"""Where the multimodal layers go: the families and their presets, selection (``all-linear``,
``exclude``, layers, patterns), placement by structure for unknown transformers, the wrap-time
dry run (probe), preparing a host (explicit attention, frozen norms) and injecting the layers.

May import: :mod:`mmpeft.runtime`, :mod:`mmpeft.tuners`, :mod:`mmpeft.backbones`,
:mod:`mmpeft.config`, :mod:`mmpeft.utils`.
"""
