"""Out-of-core index build at MS MARCO scale: time and peak RSS.

Synthetic documents with `--k` distinct dims each (a fixed random dim pattern
shifted by a random offset per row, so generation costs almost nothing) are
streamed through `IndexWriter`; peak RSS is the process's ru_maxrss. The
index is then loaded and searched.

  python benchmarks/index_build.py                        # 8.8M docs x 512 = 4.5e9 postings
  python benchmarks/index_build.py --n_docs 200000        # quick
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from laspar_jax.index import Index, IndexWriter  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--n_docs", type=int, default=8_800_000)
  p.add_argument("--k", type=int, default=512)
  p.add_argument("--dim", type=int, default=30_522)
  p.add_argument("--value_dtype", default="float16")
  p.add_argument("--ram_budget_gb", type=float, default=6.0)
  p.add_argument("--batch", type=int, default=20_000)
  p.add_argument("--path", default=os.environ.get("TMPDIR", "/tmp") + "/laspar_build_bench")
  p.add_argument("--keep", action="store_true", help="keep the index afterwards")
  a = p.parse_args(argv)
  path = pathlib.Path(a.path)
  if path.exists():
    shutil.rmtree(path)
  rng = np.random.default_rng(0)
  pattern = np.sort(rng.choice(a.dim, a.k, replace=False)).astype(np.int32)
  t0 = time.time()
  last = t0
  with IndexWriter(path, a.dim, value_dtype=a.value_dtype, ram_budget_bytes=int(a.ram_budget_gb * 2**30)) as w:
    for b0 in range(0, a.n_docs, a.batch):
      n = min(a.batch, a.n_docs - b0)
      off = rng.integers(0, a.dim, (n, 1), dtype=np.int32)
      idx = pattern[None, :] + off
      idx[idx >= a.dim] -= a.dim
      val = rng.random((n, a.k), dtype=np.float32)
      w.add([f"D{j}" for j in range(b0, b0 + n)], idx, val)
      if time.time() - last > 60:
        last = time.time()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"  {b0 + n} docs, {last - t0:.0f}s, peak RSS so far {rss:.2f} GiB", flush=True)
    t_add = time.time() - t0
  t_total = time.time() - t0
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  ix = Index.load(path, verify="size")
  q_idx = np.stack([rng.choice(a.dim, 30, replace=False) for _ in range(20)])
  q_val = rng.random((20, 30), dtype=np.float32)
  ix.search(q_idx[:1], q_val[:1], k=10)
  t = time.time()
  rows, _ = ix.search(q_idx, q_val, k=10, threads=1)
  ms = (time.time() - t) * 1e3 / 20
  print(
    f"n_docs={a.n_docs} k={a.k} postings={ix.n_postings:.3e} dim={a.dim} "
    f"value_dtype={a.value_dtype} ram_budget={a.ram_budget_gb} GiB"
  )
  print(
    f"add phase {t_add:.0f}s (includes spills), merge {ix.manifest['stats']['merge_seconds']:.0f}s, "
    f"total {t_total:.0f}s; runs {ix.manifest['stats']['n_runs']}; "
    f"peak RSS {peak_gib:.2f} GiB; index {ix.size_bytes() / 2**30:.1f} GiB on disk"
  )
  print(
    f"search on it: {ms:.1f} ms/query (k=10, 1 thread; first touches of a cold "
    f"page cache included); top row of query 0: {ix.lookup(rows[:1, :1])[0, 0]}"
  )
  if not a.keep:
    shutil.rmtree(path)


if __name__ == "__main__":
  main()
