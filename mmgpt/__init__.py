"""mmgpt: train, export and chat with MultiModal-GPT (OpenFlamingo + LoRA) on DeepSpeed."""

__version__ = "0.1.0"
