"""metric_writers.MetricWriter: TensorBoard event files and WORKDIR/history.jsonl (appended across runs)."""

import json

from laspar_jax import metric_writers


def test_history_rows_append_and_event_file(tmp_path):
  w = metric_writers.MetricWriter(tmp_path)
  w.write_scalars(2, {"train/loss": 1.5, "train/lr": 1e-4})
  w.write_scalars(2, {"eval/nDCG@10": 0.5})
  w.close()
  events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(events) == 1 and b"eval/nDCG_at_10" in events[0].read_bytes()
  w = metric_writers.MetricWriter(tmp_path)  # a resumed run appends
  w.write_scalars(4, {"train/loss": 1.0})
  w.close()
  rows = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
  assert rows == [
    {"step": 2, "train/loss": 1.5, "train/lr": 1e-4},
    {"step": 2, "eval/nDCG@10": 0.5},
    {"step": 4, "train/loss": 1.0},
  ]
  assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_disabled_writer_writes_nothing(tmp_path):
  w = metric_writers.MetricWriter(tmp_path / "run", enabled=False)
  w.write_scalars(1, {"train/loss": 1.0})
  w.close()
  assert not (tmp_path / "run").exists()
