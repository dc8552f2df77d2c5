"""Installs gift_fast and its Triton kernels as the subpackage gift_fast.kernels.

The kernels live in the top-level folder ``kernels/`` of the repository but are never installed as
a top-level ``kernels`` module: that name belongs to Hugging Face's kernel-hub package.
"""
from setuptools import find_packages, setup

setup(
    name="gift_fast",
    version="0.1.0",
    description="Fused Triton kernels for LLM post-training losses without materialising logits",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gift_fast", "gift_fast.*"]) + ["gift_fast.kernels"],
    package_dir={"gift_fast": "gift_fast", "gift_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "liger-kernel>=0.8", "transformers>=4.45", "tokenizers",
                 "tqdm", "matplotlib", "pytest-benchmark"],
        "bench": ["pytest-benchmark", "matplotlib", "liger-kernel>=0.8", "cut-cross-entropy"],
        "train": ["transformers>=4.45", "tokenizers", "tqdm", "matplotlib"],
        # GIFT in verl (gift_fast.integrations.verl); written against verl 0.9.1's API
        "verl": ["verl>=0.9.1,<0.10", "transformers>=4.45"],
    },
    entry_points={
        "console_scripts": ["gift-fast=gift_fast.cli:main"],
        # verl (0.9.1) imports every "verl.plugins" entry point on `import verl`, in every worker:
        # this registers GIFT with verl's registries (gift_fast.integrations.verl.register).
        "verl.plugins": ["gift_fast = gift_fast.integrations.verl"],
    },
)
