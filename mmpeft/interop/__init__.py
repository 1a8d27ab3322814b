"""What talks to peft and to the unwrapped model: export to and import from peft (``peft_interop``),
the per-family preparation peft needs (``peft_families``) and the reference forwards that run a
wrapped model modality by modality (``reference``, ``lockstep_reference``).

May import: :mod:`mmpeft.model.multimodal`, :mod:`mmpeft.targeting`, :mod:`mmpeft.runtime`,
:mod:`mmpeft.tuners`, :mod:`mmpeft.backbones`, :mod:`mmpeft.config`, :mod:`mmpeft.utils`.
"""
