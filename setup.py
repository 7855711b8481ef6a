"""mmgpt: DeepSpeed training system for MultiModal-GPT (OpenFlamingo + LoRA)."""
from setuptools import find_packages, setup

setup(
    name="mmgpt",
    version="0.1.0",
    description="Fast DeepSpeed training, export and chat for MultiModal-GPT (OpenFlamingo-9B + LoRA)",
    python_requires=">=3.10",
    # kernels/ holds the package `mmgpt_kernels` and is no package itself: the bare name `kernels`
    # is a PyPI package that transformers probes for, and ours must never be mistaken for it
    # (not even when running from the repository root, where kernels/ is on sys.path).
    # ds_configs/ ships inside the package as `mmgpt.ds_configs` (data only), so the default
    # DeepSpeed configs resolve in a non-editable install too.
    packages=find_packages(include=["mmgpt", "mmgpt.*"]) + ["mmgpt_kernels", "mmgpt.ds_configs"],
    package_dir={"mmgpt_kernels": "kernels/mmgpt_kernels", "mmgpt.ds_configs": "ds_configs"},
    include_package_data=True,
    package_data={"mmgpt": ["resources/*", "resources/*/*"], "mmgpt.ds_configs": ["*.json"],
                  "mmgpt.eval": ["lmms_tasks/*.yaml", "lmms_tasks/*.py"]},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.23,<6",
        "peft>=0.21,<0.22",
        "open_clip_torch>=3.3,<4",
        "sentencepiece>=0.2",
        "protobuf",
        "tensorboard>=2.20",
        "safetensors>=0.7",
        "pyyaml>=6",
        "pillow>=10",
        "numpy",
    ],
    extras_require={
        # mmgpt.eval's caption metrics: the COCO caption evaluation (PTB tokenizer, BLEU, METEOR,
        # CIDEr; needs Java). A ~100 MB download, so only for those who evaluate captions.
        "eval": ["pycocoevalcap>=1.2,<2", "pycocotools>=2.0.2"],
        # `mmgpt serve`, the web demo (gradio_client, which its tests drive it with, comes along).
        "demo": ["gradio>=6,<7"],
        "dev": ["pytest>=8", "pycocoevalcap>=1.2,<2", "pycocotools>=2.0.2", "gradio>=6,<7"],
        "flash": ["flash-attn>=2.7"],
    },
    # `python -m lmms_eval --model mmgpt` (lmms-eval's plugin route: the entry-point group
    # `lmms_eval.models`; lmms-eval itself is not a dependency, mmgpt.eval.lmms imports it).
    entry_points={"console_scripts": ["mmgpt=mmgpt.cli:main"],
                  "lmms_eval.models": ["mmgpt=mmgpt.eval.lmms:manifest"]},
)
