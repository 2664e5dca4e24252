"""Named sources: the real shared files load with ASSETS.md's row counts; bad files give errors that
name the file, line and field; duplicates are counted; the hub path maps rows (no network)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from refjax.data import paths, sources
from refjax.data.records import DataError, FieldMap, read_examples
from refjax.data.sources import load_source, load_source_with_report

# (source, split, rows) from shared/ASSETS.md
ASSET_ROWS = [
  ("beavertails_alignment", None, 2480), ("safety_tuned_llamas_alignment", None, 2482),
  ("alpaca_helpful", None, 990), ("alpaca_gpt4_helpful", None, 985),
  ("beavertails_harmful_qa", None, 1491), ("harmful_train", None, 257), ("harmful_val", None, 39),
  ("harmless_train", None, 18792), ("harmless_val", None, 6264), ("harmless_test", None, 5666),
  ("advbench", None, 483), ("harmbench", None, 39), ("malicious_instruct", None, 88),
  ("tdc2023", None, 60), ("beavertails_eval", None, 513), ("derta_eval", None, 136),
  ("safety_tuned_llamas_eval", None, 666), ("sst2_train", None, 10000), ("sst2_test", None, 872),
  ("ag_news_train", None, 950), ("ag_news_train", "alps_random10k", 10001),
  ("ag_news_test", None, 7600), ("gsm8k_train", None, 7473), ("gsm8k_test", None, 1319),
  ("alpaca_eval", None, 805),
]
REQUIRED_NAMES = {
  "beavertails_alignment", "beavertails_harmful_qa", "beavertails_eval",
  "safety_tuned_llamas_alignment", "alpaca_helpful", "alpaca_gpt4_helpful", "harmful_train",
  "harmful_val", "harmless_train", "harmless_val", "harmless_test", "sst2_train", "sst2_test",
  "ag_news_train", "ag_news_test", "gsm8k_train", "gsm8k_test", "advbench", "harmbench",
  "strongreject", "derta_eval", "alpaca_eval"}


def test_registry_has_every_required_name():
  assert REQUIRED_NAMES <= set(sources.SOURCES)
  for spec in sources.SOURCES.values():
    assert spec.local or spec.hub, spec.name
    if spec.local:
      assert spec.split in spec.local, spec.name


@pytest.mark.parametrize("name,split,rows", ASSET_ROWS,
                         ids=[f"{n}-{s or 'default'}" for n, s, _ in ASSET_ROWS])
def test_shared_files_load_with_asset_row_counts(shared_data_dir, name, split, rows):
  examples, report = load_source_with_report(name, split=split)
  assert len(examples) == rows == report.returned == report.rows_scanned
  assert len({e.id for e in examples}) == rows
  assert all(e.source == name and e.instruction.strip() and e.provenance == "" for e in examples)


def test_ids_trace_back_to_file_and_idx(shared_data_dir):
  sst2 = load_source("sst2_test")
  assert sst2[17].id == "sst2/validation:17"
  assert load_source("beavertails_harmful_qa")[0].id.startswith(
    "beavertails_refusals_spard/harmful_qa:")
  assert load_source("ag_news_train")[3].id == "ag_news/train_hf_first950:3"  # no idx: row number
  assert load_source("safety_tuned_llamas_eval")[0].id.startswith(
    "safety_tuned_llamas/eval_prompts:I-")  # set + idx


def test_field_mappings(shared_data_dir):
  sst2 = load_source("sst2_test")
  assert Counter(e.label for e in sst2) == {"positive": 444, "negative": 428}
  assert {e.instruction for e in sst2} == {sources.SST2_INSTRUCTION}
  assert all(e.input for e in sst2)
  ag = load_source("ag_news_test", limit=50)
  assert {e.instruction for e in ag} == {sources.AGNEWS_INSTRUCTION}
  assert {e.label for e in ag} <= set(sources.AGNEWS_LABELS)
  for e in load_source("gsm8k_test", limit=50):
    assert e.response.split("####")[-1].strip() == e.label
  for name, label in (("harmful_val", "harmful"), ("harmless_val", "harmless")):
    exs = load_source(name, limit=20)
    assert all(e.label == label and e.response == "" and e.input == "" for e in exs)
  qa = load_source("beavertails_harmful_qa", limit=20)
  assert all(e.label == "harmful" and e.response for e in qa)
  stl = load_source("safety_tuned_llamas_eval")
  assert Counter(e.label for e in stl)["harmful"] == 516


def test_limit_and_shortfall(shared_data_dir):
  assert len(load_source("harmful_val", limit=5)) == 5
  examples, report = load_source_with_report("harmful_val", limit=100)
  assert len(examples) == 39 and report.short_by == 61
  assert load_source("harmful_val", limit=0) == []
  with pytest.raises(ValueError, match="limit"):
    load_source("harmful_val", limit=-1)


def test_unknown_source_and_missing_forms(shared_data_dir):
  with pytest.raises(KeyError, match="unknown data source 'nope'"):
    load_source("nope")
  with pytest.raises(DataError, match="strongreject.*no local copy"):
    load_source("strongreject")
  with pytest.raises(DataError, match="'harmful_val' has no hub form"):
    load_source("harmful_val", backend="hub")
  with pytest.raises(DataError, match="no local split 'dev'.*train"):
    load_source("sst2_train", split="dev")
  with pytest.raises(ValueError, match="backend='ftp'"):
    load_source("sst2_train", backend="ftp")


# ---------------------------------------------------------------------------------------------
# Bad input: errors name the file, the line and the field.

def _write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def test_malformed_json_line_names_file_and_line(tmp_path):
  f = _write_lines(tmp_path / "bad.jsonl", [json.dumps({"idx": 0, "prompt": "a", "label": "x"}),
                                            json.dumps({"idx": 1, "prompt": "b", "label": "x"}),
                                            '{"idx": 2, "prompt": "c", '])
  with pytest.raises(DataError) as e:
    load_source("harmful_val", path=f)
  assert str(f) in str(e.value) and "line 3" in str(e.value) and "malformed JSON" in str(e.value)


def test_missing_field_names_file_line_and_field(tmp_path):
  f = _write_lines(tmp_path / "missing.jsonl", [json.dumps({"idx": 0, "prompt": "a", "label": "x"}),
                                                json.dumps({"idx": 1, "label": "x"})])
  with pytest.raises(DataError) as e:
    load_source("harmful_val", path=f)
  msg = str(e.value)
  assert str(f) in msg and "line 2" in msg and "'prompt'" in msg


def test_wrong_type_and_empty_instruction(tmp_path):
  f = _write_lines(tmp_path / "typed.jsonl", [json.dumps({"idx": 0, "prompt": 7, "label": "x"})])
  with pytest.raises(DataError, match=r"line 1: field 'prompt' \(instruction\) is int"):
    load_source("harmful_val", path=f)
  f = _write_lines(tmp_path / "blank.jsonl", [json.dumps({"idx": 0, "prompt": " ", "label": "x"})])
  with pytest.raises(DataError, match="line 1: field 'prompt' .*empty"):
    load_source("harmful_val", path=f)


def test_non_object_line_and_repeated_id(tmp_path):
  f = _write_lines(tmp_path / "list.jsonl", ["[1, 2]"])
  with pytest.raises(DataError, match="line 1: expected a JSON object"):
    load_source("harmful_val", path=f)
  f = _write_lines(tmp_path / "ids.jsonl", [json.dumps({"idx": 4, "prompt": "a", "label": "x"}),
                                            json.dumps({"idx": 4, "prompt": "b", "label": "x"})])
  with pytest.raises(DataError, match="line 2: id 'ids:4' repeats"):
    load_source("harmful_val", path=f)


def test_empty_split_names_the_source(tmp_path):
  f = tmp_path / "empty.jsonl"
  f.write_text("", encoding="utf-8")
  with pytest.raises(DataError, match="source 'harmful_val' split 'validation' is empty"):
    load_source("harmful_val", path=f)


def test_csv_json_parquet_readers(tmp_path):
  fields = FieldMap(instruction="prompt", label="label")
  csv_file = tmp_path / "p.csv"
  csv_file.write_text("prompt,label\nhello,harmless\n,harmless\n", encoding="utf-8")
  with pytest.raises(DataError, match=r"p.csv, line 3: field 'prompt' .*empty"):
    read_examples(csv_file, fields, source="t")
  csv_file.write_text("prompt,label\nhello,harmless\nbye,harmless\n", encoding="utf-8")
  exs, _ = read_examples(csv_file, fields, source="t")
  assert [e.id for e in exs] == ["p:0", "p:1"] and exs[1].instruction == "bye"

  json_file = tmp_path / "p.json"
  json_file.write_text(json.dumps([{"prompt": "a", "label": "harmless"}, {"label": "harmless"}]))
  with pytest.raises(DataError, match=r"p.json, record 1: missing field 'prompt'"):
    read_examples(json_file, fields, source="t")

  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"prompt": ["a", "b"], "label": ["harmless", "harmless"]}),
                 tmp_path / "p.parquet")
  exs, _ = read_examples(tmp_path / "p.parquet", fields, source="t")
  assert [e.instruction for e in exs] == ["a", "b"]
  with pytest.raises(DataError, match="unsupported file type '.txt'"):
    (tmp_path / "p.txt").write_text("x")
    read_examples(tmp_path / "p.txt", fields, source="t")


def test_duplicate_policies_count_and_act(tmp_path):
  rows = [("a", "r1"), ("b", "r2"), ("a", "r1"), ("a", "r3"), ("c", "r4")]
  f = _write_lines(tmp_path / "dup.jsonl", [json.dumps({"idx": i, "prompt": p, "response": r,
                                                        "label": "harmful"})
                                            for i, (p, r) in enumerate(rows)])
  kept, rep = load_source_with_report("beavertails_harmful_qa", path=f)
  assert len(kept) == 5 and (rep.duplicate_prompts, rep.duplicate_rows, rep.dropped) == (2, 1, 0)
  kept, rep = load_source_with_report("beavertails_harmful_qa", path=f, duplicates="drop")
  assert [e.id for e in kept] == ["dup:0", "dup:1", "dup:4"] and rep.dropped == 2
  with pytest.raises(DataError, match="line 3: duplicate prompt .*dup:2"):
    load_source("beavertails_harmful_qa", path=f, duplicates="error")
  with pytest.raises(ValueError, match="duplicates='maybe'"):
    load_source("beavertails_harmful_qa", path=f, duplicates="maybe")
  # drop + limit: the limit counts kept examples
  kept, _ = load_source_with_report("beavertails_harmful_qa", path=f, duplicates="drop", limit=3)
  assert [e.id for e in kept] == ["dup:0", "dup:1", "dup:4"]


def test_data_root_from_env_and_config(tmp_path, monkeypatch):
  data = tmp_path / "data" / "refusal_direction"
  data.mkdir(parents=True)
  row = {"idx": 9, "prompt": "p", "label": "harmful"}
  _write_lines(data / "harmful_val.jsonl", [json.dumps(row)])
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "data"))
  assert paths.data_dir() == (tmp_path / "data").resolve()
  assert [e.id for e in load_source("harmful_val")] == ["refusal_direction/harmful_val:9"]
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match=r"REFJAX_DATA.*absent|absent.*REFJAX_DATA") as e:
    paths.data_dir()
  assert "config.data.root" in str(e.value)  # the error names both ways to set it
  try:  # the config field wins over the environment
    paths.set_data_root(tmp_path / "data")
    assert paths.data_dir() == (tmp_path / "data").resolve()
    paths.set_data_root(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.data.root='.*nowhere'"):
      paths.data_dir()
  finally:
    paths.set_data_root(None)


# ---------------------------------------------------------------------------------------------
# Hub backend: real code, exercised with a stand-in for datasets.load_dataset (no network).

def _fake_hub(monkeypatch, rows_by_key):
  import datasets

  calls = []

  def fake_load_dataset(path, name=None, split=None, **kw):
    calls.append((path, name, split))
    return rows_by_key[(path, name, split)]

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  return calls


def test_hub_sst2_maps_label_ids_to_words(monkeypatch):
  rows = [{"idx": 10, "sentence": "good film ", "label": 1},
          {"idx": 11, "sentence": "bad film ", "label": 0}]
  calls = _fake_hub(monkeypatch, {("stanfordnlp/sst2", None, "validation"): rows})
  exs = load_source("sst2_test", backend="hub")
  assert calls == [("stanfordnlp/sst2", None, "validation")]
  assert [(e.id, e.input, e.label, e.response) for e in exs] == [
    ("stanfordnlp/sst2/validation:10", "good film ", "positive", "positive"),
    ("stanfordnlp/sst2/validation:11", "bad film ", "negative", "negative")]
  assert exs[0].instruction == sources.SST2_INSTRUCTION


def test_hub_beavertails_filters_unsafe_and_keeps_row_index(monkeypatch):
  rows = [{"prompt": f"q{i}", "response": f"a{i}", "category": {}, "is_safe": i % 2 == 0}
          for i in range(6)]
  _fake_hub(monkeypatch, {("PKU-Alignment/BeaverTails", None, "30k_test"): rows})
  exs, rep = load_source_with_report("beavertails_eval", backend="hub", limit=2)
  assert [e.id for e in exs] == ["PKU-Alignment/BeaverTails/30k_test:1",
                                 "PKU-Alignment/BeaverTails/30k_test:3"]
  assert all(e.label == "harmful" for e in exs) and rep.backend == "hub"


def test_hub_gsm8k_label_and_missing_marker(monkeypatch):
  good = [{"question": "q", "answer": "work <<1+1=2>>\n#### 2"}]
  bad = [{"question": "q", "answer": "no marker"}]
  _fake_hub(monkeypatch, {("openai/gsm8k", "main", "test"): good,
                          ("openai/gsm8k", "main", "train"): bad})
  assert load_source("gsm8k_test", backend="hub")[0].label == "2"
  with pytest.raises(DataError, match=r"openai/gsm8k\[main\]/train, row 0: cannot compute label"):
    load_source("gsm8k_train", backend="hub")
