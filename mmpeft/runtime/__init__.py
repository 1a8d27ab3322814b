"""How the frozen model runs with the modality axis: attention and block features (padding-free
windowed attention, blocks run once per stacked batch), activation checkpointing, frozen norms, the
modality axis in the batch, presence masks of missing modalities, per-modality input stems, Hugging Face
``labels=`` per modality and the first-forward checks.

May import: :mod:`mmpeft.tuners`, :mod:`mmpeft.config`, :mod:`mmpeft.utils`.
"""
