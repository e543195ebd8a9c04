"""configs/decoder/REFERENCE.md: every cell of both tables equals the row's config, every row is listed once."""

import dataclasses
import importlib
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TABLE = REPO / "configs" / "decoder" / "REFERENCE.md"
MODULES = {
  "rq1": importlib.import_module("configs.decoder.rq1_zeroshot"),
  "rq2": importlib.import_module("configs.decoder.rq2_backbones"),
  "rq3": importlib.import_module("configs.decoder.rq3_heads"),
  "rq4": importlib.import_module("configs.decoder.rq4_teachers"),
}
TRAINED_HEADER = ("module", "row", "reference", "backbone")
ZEROSHOT_HEADER = ("row", "reference", "backbone", "prompt")


def _tables(text: str) -> list[list[dict[str, str]]]:
  """Markdown tables of `text`: each a list of {column: full cell text}."""
  tables, header, rows = [], None, []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if header is None:
        header = cells
      elif set("".join(cells)) <= set("-: "):
        continue
      else:
        assert len(cells) == len(header), f"{TABLE}: {len(cells)} cells for {len(header)} columns: {line}"
        rows.append(dict(zip(header, cells)))
    elif header is not None:
      tables.append(rows)
      header, rows = None, []
  return tables


def _value(cell: str) -> str:
  """A cell's config value: the text before a `[ref ...]` annotation."""
  return cell.split(" [", 1)[0].strip()


def _table(header: tuple[str, ...]) -> list[dict[str, str]]:
  found = [t for t in _tables(TABLE.read_text()) if t and tuple(t[0])[: len(header)] == header]
  assert len(found) == 1, f"{TABLE}: expected one table with columns {header}, found {len(found)}"
  return found[0]


def _number(cell: str) -> float | None:
  v = _value(cell)
  return None if v == "-" else float(v)


def test_table_cells_parse():
  t = _tables("x\n| a | b |\n|---|---|\n| 1 [ref 2; ours] | - |\n\n| c |\n|---|\n| 3 |\n")
  assert t == [[{"a": "1 [ref 2; ours]", "b": "-"}], [{"c": "3"}]]
  assert _value("1e-6 [ref 1e-4; fix: x]") == "1e-6" and _number("-") is None


def test_every_row_listed_once():
  trained = _table(TRAINED_HEADER)
  listed = [(r["module"], r["row"]) for r in trained]
  expected = [(m, v) for m in ("rq2", "rq3", "rq4") for v in MODULES[m].ROWS]
  assert sorted(listed) == sorted(expected) and len(set(listed)) == len(listed)
  zeroshot = [r["row"] for r in _table(ZEROSHOT_HEADER)]
  assert sorted(zeroshot) == sorted(MODULES["rq1"].ROWS) and len(set(zeroshot)) == len(zeroshot)


@pytest.mark.parametrize("row", _table(TRAINED_HEADER), ids=lambda r: f"{r['module']}:{r['row']}")
def test_trained_row_matches_config(row):
  mod = MODULES[row["module"]]
  spec = mod.ROWS[row["row"]]
  c = mod.get_config(f"variant={row['row']}")
  m, o, loss = c.model, c.optim, c.loss
  assert _value(row["reference"]) == (spec.ref or "-")
  ours = spec.paper.startswith("ours")
  assert ours == (spec.ref == "") and ours == row["notes"].startswith("ours"), row["notes"]
  assert _value(row["backbone"]) == m.backbone
  assert _value(row["head q/d"]) == f"{m.head}/{m.doc_head or m.head}"
  assert _value(row["read-out"]) == m.decoding + (" bidirectional" if m.bidirectional else "")
  assert _value(row["towers"]) == m.towers
  prefixes = _value(row["prefixes"])
  assert (m.query_prefix, m.doc_prefix) == (
    ("", "") if prefixes == "-" else tuple(p + " " for p in prefixes.split("/"))
  )
  assert _number(row["lr"]) == o.lr and _value(row["schedule"]) == o.schedule
  assert _number(row["clip"]) == o.grad_clip and _number(row["warmup"]) == o.warmup_steps
  assert _number(row["batch"]) == o.batch_size * o.accum_steps and _number(row["steps"]) == c.train.total_steps
  regs = {k: r.weight for k, r in loss.regularizers.items()}
  assert (_number(row["flops q"]), _number(row["flops d"])) == (regs.get("q_flops"), regs.get("d_flops"))
  assert _number(row["flops T"]) == (loss.reg_warmup_steps if regs else None)
  assert _value(row["d reg pos/neg"]) == "/".join(f"{w:g}" for w in loss.doc_reg_weights)
  teacher = "rankllama" if "rankllama" in c.data.teacher_scores else "minilm"
  assert _value(row["teacher"]) == teacher and _value(row["calibration"]) == c.data.teacher_calibration
  lora = f"r{m.lora.rank} a{m.lora.alpha} d{m.lora.dropout:g}" if m.lora else "-"
  assert _value(row["lora"]) == lora
  assert _value(row["q/d len"]) == f"{m.query_max_len}/{m.doc_max_len}"


@pytest.mark.parametrize("row", _table(ZEROSHOT_HEADER), ids=lambda r: r["row"])
def test_zeroshot_row_matches_config(row):
  mod = MODULES["rq1"]
  spec = mod.ROWS[row["row"]]
  z = mod.get_config(f"variant={row['row']}").zeroshot
  assert _value(row["reference"]) == (spec.ref or "-")
  if spec.paper.startswith("ours"):
    assert spec.ref == "" and row["notes"].startswith("ours"), row["notes"]
  assert _value(row["backbone"]) == z.backbone and _value(row["prompt"]) == z.preset
  assert _value(row["read-out"]) == z.decoding and _value(row["pool"]) == z.prompt_pool
  assert _value(row["in-text"]) == str(z.in_text_filter).lower() and _value(row["match"]) == z.filter_match
  assert _number(row["term cap"]) == z.term_cap and _value(row["impacts"]) == z.impacts
  assert _value(row["q/d len"]) == f"{z.query_max_len}/{z.doc_max_len}"
  assert _value(row["q/d top-k"]) == f"{z.query_topk}/{z.topk}"


def test_a_drifted_config_is_caught(monkeypatch):
  """The check fails when a config changes and the table does not."""
  mod = MODULES["rq2"]
  row = next(r for r in _table(TRAINED_HEADER) if r["row"] == "opt_350m")
  monkeypatch.setitem(mod.ROWS, "opt_350m", dataclasses.replace(mod.ROWS["opt_350m"], steps=150_000))
  with pytest.raises(AssertionError):
    test_trained_row_matches_config(row)
