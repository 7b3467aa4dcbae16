"""qalora: GPTQ quantization, QA-LoRA fine-tuning, exact merge, export and evaluation."""

__version__ = "0.1.0"
