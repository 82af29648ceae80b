"""megasft: Megatron-style 3-D parallel supervised fine-tuning of Llama-family models."""
from setuptools import find_packages, setup

setup(
    name="megasft",
    version="0.1.0",
    description="Tensor x pipeline x data parallel SFT for Llama-family LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megasft", "megasft.*"]),
    install_requires=[
        # A range, not a pin: an exact pin would drag a CUDA build onto CPU machines. CI pins the
        # CPU build itself before installing this package.
        "torch>=2.4",
        "numpy",
        "sentencepiece",
        "pyyaml",
        "safetensors",
        "zstandard",   # .jsonl.zst inputs to tools/preprocess_data.py
    ],
    extras_require={
        "hf": ["transformers>=4.45", "tokenizers", "jinja2", "matplotlib"],   # matplotlib: tools/plot_metrics.py
        # Parquet and Arrow (datasets save_to_disk) inputs to tools/preprocess_data.py; `datasets` itself is
        # not needed to read them.
        "data": ["pyarrow>=14"],
        # Optional accelerators, never required: every code path has a pure-torch fallback.
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
        "test": ["pytest", "transformers>=4.45", "tokenizers", "jinja2", "matplotlib", "pyarrow>=14"],
    },
    entry_points={
        "console_scripts": [
            "megasft=megasft.cli:main",
            "megasft-train=megasft.train:main",   # = megasft train
        ],
    },
)
