"""mmpeft: parameter-efficient multimodal fine-tuning of frozen vision transformers."""
__version__ = "0.1.0"
