"""Packaging: the library `emovlm_kd` plus the four Hub files as top-level modules.

`train/configs` and `eval/metrics` (data: YAML settings, `evaluate` metric modules) are installed inside the library
as `emovlm_kd.configs` and `emovlm_kd.metrics`; no top-level `train`, `eval` or `benchmarks` package is installed.
"""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="emovlm-kd",
    version="0.1.0",
    description="EmoVLM-KD: visual emotion analysis with Qwen2-VL, a distilled head and a gate, Hugging Face-native",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    py_modules=["configuration_emovlm_kd", "modeling_emovlm_kd", "pipeline_emovlm_kd", "scoring_emovlm_kd"],
    packages=find_packages(include=["emovlm_kd", "emovlm_kd.*"]) + ["emovlm_kd.configs", "emovlm_kd.metrics"],
    package_dir={"emovlm_kd.configs": "train/configs", "emovlm_kd.metrics": "eval/metrics"},
    package_data={"emovlm_kd.configs": ["*.yaml"], "emovlm_kd.metrics": ["*/*.py"]},
    install_requires=[
        "torch",
        "torchvision",
        "transformers>=5.0",
        "peft",
        "trl",
        "bitsandbytes",
        "datasets",
        "evaluate",
        "scipy",  # emovlm_kd.evaluation.stats (bootstrap, McNemar); evaluate imports it for its own bootstrap
        "huggingface-hub",
        "safetensors",
        "accelerate",
        "tokenizers",
        "pillow",
        "pyyaml",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "demo": ["gradio>=5"],  # emovlm-kd demo, app.py
        "dev": ["pytest", "pytest-timeout", "gradio>=5", "gradio_client", "selenium>=4.10"],  # + Debian chromium
    },
    entry_points={"console_scripts": ["emovlm-kd=emovlm_kd.cli:main"]},
)
