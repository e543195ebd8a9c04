"""Retrieval latency, recall and index size on a synthetic learned-sparse collection.

Times, in one run and on the same data, laspar_jax exact search over the raw
(version 1) index, exact and approximate (block-max, theta) search over the
compressed (version 2) index with 8-bit and float32 impacts (approximate: block-max
with theta, and score-at-a-time over impact-ordered heads with exact re-scoring
from a forward index, `index/approx.py`, per --saat budget:n_cand), the version-1
approximate mode (--legacy_approx), PISA MaxScore / BMW (pyterrier-pisa) and
Seismic (pyseismic-lsr), one thread each; recall@k is against exact search
over the raw float32 index (and, for approximate modes, against exact search
over the same index). Index sizes on disk are printed against PISA's.

  python benchmarks/retrieval.py                                 # 1M docs, D=30522 and 4194304
  python benchmarks/retrieval.py --n_docs 100000 --dims 30522    # smaller
  python benchmarks/retrieval.py --engines exact,blocked,approx  # no external engines

Indexes are cached under --workdir by collection spec.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from laspar_jax.index import Index, build_index  # noqa: E402
from laspar_jax.index.approx import approx_bytes  # noqa: E402
from laspar_jax.index.backends import PisaBackend, SeismicBackend  # noqa: E402
from laspar_jax.index.compress import compress_index  # noqa: E402
from laspar_jax.index.synthetic import SyntheticCollection, SyntheticSpec  # noqa: E402


def _recall(ref_rows, rows, k):
  return float(
    np.mean(
      [
        len(set(a[:k][a[:k] >= 0]) & set(b[:k][b[:k] >= 0])) / max(1, (a[:k] >= 0).sum())
        for a, b in zip(ref_rows, rows)
      ]
    )
  )


_CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
_OPTS = {"clock": "cpu", "reps": 2}


def _now() -> float:
  return _CLOCK[_OPTS["clock"]]()


def _time_per_query(fn, q_idx, q_val):
  """Calls fn one query at a time, `reps` passes; returns (rows, scores, per-query ms: min over passes)."""
  fn(q_idx[:1], q_val[:1])  # warm-up / compile
  best = np.full(q_idx.shape[0], np.inf)
  for _ in range(_OPTS["reps"]):
    rows, scores = [], []
    for i in range(q_idx.shape[0]):
      t = _now()
      r, s = fn(q_idx[i : i + 1], q_val[i : i + 1])
      best[i] = min(best[i], (_now() - t) * 1e3)
      rows.append(r[0])
      scores.append(s[0])
  return np.stack(rows), np.stack(scores), best


def _time_batch(fn):
  """ms of one call of fn (min over `reps` calls)."""
  best = np.inf
  for _ in range(_OPTS["reps"]):
    t = _now()
    out = fn()
    best = min(best, (_now() - t) * 1e3)
  return out, best


def run_dim(args, dim: int) -> list[dict]:
  spec = SyntheticSpec(n_docs=args.n_docs, dim=dim, n_queries=args.n_queries, seed=args.seed)
  col = SyntheticCollection(spec)
  work = pathlib.Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  tag = f"n{spec.n_docs}_d{dim}_s{spec.seed}"
  path = work / f"laspar_{tag}"
  if args.legacy_approx:
    path = work / f"laspar_approx_{tag}"
  if not path.exists():
    t = time.time()
    build_index(col.doc_batches(20_000), path, dim, approx=args.legacy_approx, ram_budget_bytes=3 << 30)
    print(f"[D={dim}] laspar index built in {time.time() - t:.0f}s", flush=True)
  ix = Index.load(path, verify="size")
  sizes = {"laspar raw float32 (v1)": _postings_bytes(ix)}
  blocked = {}
  if "blocked" in args.engines:
    for vd in ("uint8", "float32"):
      bpath = work / f"laspar_blocked_{vd}_{tag}"
      if not bpath.exists():
        t = time.time()
        compress_index(ix, bpath, value_dtype=vd, approx="approx" in args.engines)
        print(f"[D={dim}] compressed ({vd}) in {time.time() - t:.0f}s", flush=True)
      blocked[vd] = Index.load(bpath, verify="size")
      extra = approx_bytes(blocked[vd].manifest)
      sizes[f"laspar blocked {vd} (v2)"] = _postings_bytes(blocked[vd]) - extra
      if extra:
        sizes[f"  + {vd} approx structures (heads, forward index)"] = extra
  q_idx, q_val = col.queries()
  st = ix.stats(q_idx, q_val)
  print(
    f"[D={dim}] docs {st['n_docs']} postings {st['n_postings']} mean doc len "
    f"{st['mean_doc_length']:.1f} mean query len {st['mean_query_length']:.1f} "
    f"postings/query (FLOPS) {st['flops_per_query']:.3g}",
    flush=True,
  )
  k = args.k
  out = []
  exact_fn = lambda qi, qv: ix.search(qi, qv, k=k, threads=1)  # noqa: E731
  ref_rows, _, ms = _time_per_query(exact_fn, q_idx, q_val)
  # Batched call (one numba call for all queries, still one thread).
  _, batch_ms = _time_batch(lambda: ix.search(q_idx, q_val, k=k, threads=1))
  batch_ms /= q_idx.shape[0]
  out.append(
    dict(engine="laspar exact", dim=dim, mean_ms=ms.mean(), p99_ms=np.percentile(ms, 99), batch_ms=batch_ms, recall=1.0)
  )
  print(out[-1], flush=True)
  for vd, bix in blocked.items():
    fn = lambda qi, qv: bix.search(qi, qv, k=k, threads=1)  # noqa: E731
    b_rows, _, ms = _time_per_query(fn, q_idx, q_val)
    out.append(_row(f"blocked {vd} exact", dim, ms, _recall(ref_rows, b_rows, k)))
    print(out[-1], flush=True)
    if bix.impact_rows is not None:
      for budget, n_cand in args.saat:
        fn = lambda qi, qv, b=budget, c=n_cand: bix.search(  # noqa: E731
          qi, qv, k=k, threads=1, mode="approx", budget=b, n_cand=c
        )
        rows, _, ms = _time_per_query(fn, q_idx, q_val)
        name = f"blocked {vd} approx b={budget} c={n_cand}"
        out.append(_row(name, dim, ms, _recall(ref_rows, rows, k), _recall(b_rows, rows, k)))
        print(out[-1], flush=True)
    if vd != "uint8":
      continue
    for theta in args.thetas:
      fn = lambda qi, qv, th=theta: bix.search(qi, qv, k=k, threads=1, mode="approx", theta=th)  # noqa: E731
      rows, _, ms = _time_per_query(fn, q_idx, q_val)
      out.append(_row(f"blocked {vd} approx th={theta}", dim, ms, _recall(ref_rows, rows, k), _recall(b_rows, rows, k)))
      print(out[-1], flush=True)
  if "approx" in args.engines and args.legacy_approx:
    for budget, n_cand in [(2000, 200), (5000, 300), (5000, 500), (10000, 500)]:
      fn = lambda qi, qv: ix.search(
        qi,
        qv,
        k=k,
        mode="approx",
        budget=budget,  # noqa: E731
        n_cand=n_cand,
      )
      rows, _, ms = _time_per_query(fn, q_idx, q_val)
      out.append(
        dict(
          engine=f"laspar approx b={budget} c={n_cand}",
          dim=dim,
          mean_ms=ms.mean(),
          p99_ms=np.percentile(ms, 99),
          batch_ms=float("nan"),
          recall=_recall(ref_rows, rows, k),
        )
      )
      print(out[-1], flush=True)
  if "pisa" in args.engines:
    try:
      ppath = work / f"pisa_{tag}"
      t = time.time()
      if not (ppath / "pt_meta.json").exists():
        pisa = PisaBackend.build(col.doc_batches(20_000), ppath)
        print(f"[D={dim}] PISA index built in {time.time() - t:.0f}s", flush=True)
      else:
        pisa = PisaBackend(ppath)
      for algo in ("maxscore", "block_max_wand"):
        pisa.search(q_idx[:2], q_val[:2], k=k, query_algorithm=algo)
        (rows, _), ms = _time_batch(lambda algo=algo: pisa.search(q_idx, q_val, k=k, query_algorithm=algo, threads=1))
        ms /= q_idx.shape[0]
        out.append(
          dict(
            engine=f"PISA {algo}",
            dim=dim,
            mean_ms=ms,
            p99_ms=float("nan"),
            batch_ms=ms,
            recall=_recall(ref_rows, rows, k),
          )
        )
        print(out[-1], flush=True)
      # PISA writes its compressed index and block-max data at the first query: sizes after the searches.
      pfiles = {f.name: f.stat().st_size for f in ppath.rglob("*") if f.is_file()}
      print(f"[D={dim}] PISA files: {pfiles}", flush=True)
      # What PISA queries: the compressed index, its block-max (wand) data and lexicons; inv.* is
      # the uncompressed intermediate pyterrier-pisa leaves beside it.
      sizes["PISA (query-time files)"] = sum(v for n, v in pfiles.items() if not n.startswith("inv."))
      sizes["PISA (whole directory)"] = sum(pfiles.values())
      sizes["PISA compressed postings only (*.block_simdbp)"] = sum(
        v for n, v in pfiles.items() if n.endswith("simdbp")
      )
    except Exception as e:  # report, don't hide
      print(f"[D={dim}] PISA failed: {type(e).__name__}: {e}", flush=True)
  if "seismic" in args.engines:
    if dim > 65_536 and not args.seismic_lv:
      print(
        f"[D={dim}] Seismic skipped: SeismicIndex takes <= 65,536 components (--seismic_lv tries SeismicIndexLV)",
        flush=True,
      )
    else:
      try:
        t = time.time()
        sei = SeismicBackend.build(col.doc_batches(20_000), large_vocab=dim > 65_536, num_threads=args.seismic_threads)
        print(f"[D={dim}] Seismic index built in {time.time() - t:.0f}s", flush=True)
        for qc, hf in [(10, 0.9), (20, 0.7)]:
          sei.search(q_idx[:2], q_val[:2], k=k, query_cut=qc, heap_factor=hf)
          (rows, _), ms = _time_batch(
            lambda qc=qc, hf=hf: sei.search(q_idx, q_val, k=k, query_cut=qc, heap_factor=hf, threads=1)
          )
          ms /= q_idx.shape[0]
          out.append(
            dict(
              engine=f"Seismic cut={qc} hf={hf}",
              dim=dim,
              mean_ms=ms,
              p99_ms=float("nan"),
              batch_ms=ms,
              recall=_recall(ref_rows, rows, k),
            )
          )
          print(out[-1], flush=True)
        del sei
      except Exception as e:
        print(f"[D={dim}] Seismic failed: {type(e).__name__}: {e}", flush=True)
  print(f"\n[D={dim}] index size on disk (postings + block directory + doc ids):", flush=True)
  ref = sizes.get("PISA (query-time files)")
  for name, b in sizes.items():
    ratio = f"  {b / ref:.2f}x PISA" if ref else ""
    print(f"  {name:48s} {b / 1e6:10.1f} MB{ratio}", flush=True)
  for r in out:
    r["sizes"] = sizes
  return out


def _postings_bytes(ix) -> int:
  """Bytes of every file of a laspar index (postings, directory, doc ids and lengths)."""
  return ix.size_bytes()


def _row(engine, dim, ms, recall, recall_same=float("nan")):
  return dict(
    engine=engine,
    dim=dim,
    mean_ms=float(ms.mean()),
    p99_ms=float(np.percentile(ms, 99)),
    batch_ms=float("nan"),
    recall=recall,
    recall_same=recall_same,
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--n_docs", type=int, default=1_000_000)
  p.add_argument("--n_queries", type=int, default=1_000)
  p.add_argument("--dims", default="30522,4194304")
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--engines", default="exact,blocked,approx,pisa,seismic")
  p.add_argument("--thetas", type=lambda s: [float(x) for x in s.split(",")], default=[1.05, 1.1, 1.2, 1.5])
  p.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="cpu: process time (shared machines)")
  p.add_argument("--reps", type=int, default=2, help="timing passes; the minimum is reported")
  p.add_argument(
    "--saat",
    type=lambda s: [tuple(int(v) for v in x.split(":")) for x in s.split(",")],
    default=[(3000, 300), (10000, 300), (10000, 500), (20000, 500), (10000, 1000)],
    help="budget:n_cand pairs of the compressed index's approximate (score-at-a-time) mode",
  )
  p.add_argument("--legacy_approx", action="store_true", help="also the version-1 impact-ordered approx mode")
  p.add_argument("--seismic_threads", type=int, default=2, help="build threads")
  p.add_argument("--seismic_lv", action="store_true")
  p.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp") + "/laspar_bench")
  args = p.parse_args(argv)
  _OPTS.update(clock=args.clock, reps=args.reps)
  rows = []
  for d in [int(x) for x in args.dims.split(",")]:
    rows += run_dim(args, d)
  print(
    f"\nn_docs={args.n_docs} n_queries={args.n_queries} k={args.k}; single thread; {args.clock} time, min of "
    f"{args.reps} passes; mean/p99 = one query per call, batch = all queries in one call (PISA, Seismic: batch)"
  )
  print(
    f"{'engine':32s} {'D':>9s} {'mean ms':>8s} {'p99 ms':>8s} {'batch ms':>8s} {'R@' + str(args.k):>6s} {'R same':>6s}"
  )
  for r in rows:
    print(
      f"{r['engine']:32s} {r['dim']:9d} {r['mean_ms']:8.2f} {r['p99_ms']:8.2f} {r['batch_ms']:8.2f} {r['recall']:6.3f}"
      f" {r.get('recall_same', float('nan')):6.3f}"
    )
  print("R@k: against exact search over the raw float32 index; R same: against exact search over the same index")


if __name__ == "__main__":
  main()
