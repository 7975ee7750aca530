"""fedshield.datasets: local instruction files, IID / Dirichlet splits, length-safe tokenising."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

import fedshield as fs
from fedshield.data import tokenize
from fedshield.data.files import load_instruction_data, parse_columns
from fedshield.data.splits import dirichlet_labels, split_dirichlet, split_iid
from fedshield.data.tokenize import tokenize_fitting

FIXTURES = Path(__file__).parent / "fixtures"
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


@pytest.fixture(scope="module")
def tok():
    return tokenize.build_tokenizer()


# ---------------------------------------------------------------- the paper's four formats


def test_alpaca_gpt4_json_list():
    ex = load_instruction_data(FIXTURES / "alpaca_gpt4.json")
    assert len(ex) == 12
    assert ex[1] == {"instruction": "Translate to French.", "input": "Good morning",
                     "output": "Bonjour"}
    assert ex[0]["input"] == ""  # empty input kept as empty: the no-input template applies


def test_fingpt_sentiment_csv_any_column_order():
    ex = load_instruction_data(FIXTURES / "fingpt_sentiment.csv")
    assert len(ex) == 12
    assert ex[0]["input"].startswith("Shares rose") and ex[0]["output"] == "positive"
    assert Counter(e["output"] for e in ex) == {"positive": 4, "negative": 4, "neutral": 4}


def test_math_instruct_jsonl_without_input_and_source_as_task():
    ex = load_instruction_data(FIXTURES / "math_instruct.jsonl")
    assert set(ex[0]) == {"instruction", "input", "output"} and ex[0]["input"] == ""
    ex = load_instruction_data(FIXTURES / "math_instruct.jsonl", columns="task=source")
    assert ex[0]["task"] == "data/CoT/gsm_rft.json"
    assert len({e["task"] for e in ex}) == 3


def test_medical_meadow_flashcards_jsonl():
    ex = load_instruction_data(FIXTURES / "medical_meadow_flashcards.jsonl")
    assert len(ex) == 12
    assert ex[1] == {"instruction": "Answer this question truthfully",
                     "input": "Which organ produces insulin?", "output": "The pancreas."}


@pytest.mark.parametrize("columns", [{"instruction": "question", "output": "answer"},
                                     "instruction=question, output=answer"])
def test_column_mapping(columns):
    ex = load_instruction_data(FIXTURES / "qa_pairs.jsonl", columns=columns)
    assert ex[0] == {"instruction": "What is the normal resting heart rate for adults?",
                     "input": "", "output": "60 to 100 beats per minute."}


def test_same_examples_from_every_file_type(tmp_path):
    ref = load_instruction_data(FIXTURES / "alpaca_gpt4.json")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ref))
    import csv

    with (tmp_path / "a.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ref)
    assert load_instruction_data(tmp_path / "a.jsonl") == ref
    assert load_instruction_data(tmp_path / "a.csv") == ref  # newlines survive CSV quoting


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow not installed")
def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ref = load_instruction_data(FIXTURES / "alpaca_gpt4.json")
    pq.write_table(pa.Table.from_pylist(ref), tmp_path / "a.parquet")
    assert load_instruction_data(tmp_path / "a.parquet") == ref


@pytest.mark.skipif(HAS_PYARROW, reason="pyarrow is installed")
def test_parquet_without_pyarrow_names_the_package(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(fs.DataError, match=r"a\.parquet.*'pyarrow'"):
        load_instruction_data(path)


# ---------------------------------------------------------------- bad files


@pytest.mark.parametrize("name, content, match", [
    ("empty.jsonl", "", "holds no examples"),
    ("blank.jsonl", "\n\n", "holds no examples"),
    ("empty.json", "[]", "holds no examples"),
    ("empty.csv", "", "holds no examples"),
    ("header_only.csv", "instruction,input,output\n", "holds no examples"),
    ("broken.json", "[{\"instruction\": ", "not valid JSON"),
    ("broken.jsonl", "{\"instruction\": \"a\", \"output\": \"b\"}\n{oops\n",
     "line 2 is not valid JSON"),
    ("object.json", "{\"instruction\": \"a\"}", "expected a JSON list"),
    ("scalars.jsonl", "1\n2\n", "record 0 is a int"),
    ("nocol.jsonl", "{\"prompt\": \"a\", \"output\": \"b\"}\n",
     r"missing column\(s\) 'instruction'"),
    ("empty_out.jsonl", "{\"instruction\": \"a\", \"output\": \"b\"}\n"
                        "{\"instruction\": \"a\", \"output\": \"  \"}\n",
     "row 1, column 'output' is empty"),
    ("nested.jsonl", "{\"instruction\": \"a\", \"output\": [\"b\"]}\n", "expected text, got list"),
    ("data.txt", "instruction,output\n", "unsupported file type '.txt'"),
])
def test_bad_file_names_the_file_and_the_problem(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(fs.DataError, match=match) as info:
        load_instruction_data(path)
    assert name in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, fs.FedShieldError)


def test_missing_file_and_mapped_column():
    with pytest.raises(fs.DataError, match="nowhere.jsonl: no such file"):
        load_instruction_data("/nowhere.jsonl")
    with pytest.raises(fs.DataError, match=r"'query' \(for input\)"):
        load_instruction_data(FIXTURES / "qa_pairs.jsonl",
                              columns="instruction=question,output=answer,input=query")


@pytest.mark.parametrize("spec, match", [
    ("instruction", "FIELD=COLUMN"), ("colour=red", "unknown fields"),
    ("output=a,output=b", "mapped twice"), ({"output": ""}, "non-empty"),
])
def test_bad_column_mapping(spec, match):
    with pytest.raises(fs.ParameterError, match=match):
        parse_columns(spec)


def test_loading_does_not_mutate_the_mapping():
    columns = {"instruction": "question", "output": "answer"}
    load_instruction_data(FIXTURES / "qa_pairs.jsonl", columns=columns)
    assert columns == {"instruction": "question", "output": "answer"}


# ---------------------------------------------------------------- splits


def _items(n):
    return [{"instruction": f"q{i}", "input": "", "output": str(i), "task": "abc"[i % 3]}
            for i in range(n)]


def test_split_iid_partitions_evenly_and_deterministically():
    ex = _items(23)
    shards = split_iid(ex, 4, seed=1)
    assert sorted(len(s) for s in shards) == [5, 6, 6, 6]
    assert sorted(e["output"] for s in shards for e in s) == sorted(e["output"] for e in ex)
    assert shards == split_iid(ex, 4, seed=1)
    assert shards != split_iid(ex, 4, seed=2)


@pytest.mark.parametrize("split", [split_iid,
                                   lambda ex, n, seed: split_dirichlet(ex, n, 1.0, seed)])
def test_split_needs_an_example_per_client(split):
    with pytest.raises(fs.DataError, match="3 examples cannot give each of 4 clients"):
        split(_items(3), 4, 0)
    with pytest.raises(fs.ParameterError, match="n_clients"):
        split(_items(3), 0, 0)


def test_split_dirichlet_partitions_every_example_once():
    ex = _items(300)
    shards = split_dirichlet(ex, 5, alpha=0.5, seed=3)
    assert all(shards) and len(shards) == 5
    assert sorted(e["output"] for s in shards for e in s) == sorted(e["output"] for e in ex)
    assert shards == split_dirichlet(ex, 5, alpha=0.5, seed=3)


def _skew(shards):
    """Mean over clients of the share of its most common task (1/3 = uniform, 1 = one task)."""
    return sum(max(Counter(e["task"] for e in s).values()) / len(s) for s in shards) / len(shards)


def test_split_dirichlet_alpha_controls_skew():
    ex = _items(600)
    skewed = [_skew(split_dirichlet(ex, 4, 0.1, seed)) for seed in range(5)]
    flat = [_skew(split_dirichlet(ex, 4, 100.0, seed)) for seed in range(5)]
    assert min(skewed) > 0.6 and max(flat) < 0.45


def test_split_dirichlet_key_choices():
    fin = load_instruction_data(FIXTURES / "fingpt_sentiment.csv")
    assert set(dirichlet_labels(fin, key="output")) == {"positive", "negative", "neutral"}
    assert len(set(dirichlet_labels(fin))) == 1  # one instruction template: one class
    alpaca = load_instruction_data(FIXTURES / "alpaca_gpt4.json")
    labels = dirichlet_labels(alpaca, buckets=4)  # 12 distinct instructions: hash buckets
    assert len(set(labels)) <= 4 and labels == dirichlet_labels(alpaca, buckets=4)
    assert dirichlet_labels(_items(6)) == list("abcabc")  # a task field wins
    assert dirichlet_labels(_items(6), key=lambda e: int(e["output"]) % 2) == list("010101")
    with pytest.raises(fs.DataError, match="'label'"):
        dirichlet_labels(_items(6), key="label")


def test_split_dirichlet_gives_up_with_a_clear_error():
    with pytest.raises(fs.DataError, match="alpha=0.001.*larger alpha"):
        split_dirichlet(_items(6), 6, alpha=0.001, seed=0, max_tries=3)
    with pytest.raises(fs.ParameterError, match="alpha must be"):
        split_dirichlet(_items(6), 2, alpha=0.0, seed=0)


# ---------------------------------------------------------------- tokenising long examples


def test_tokenize_fitting_matches_tokenize_examples_when_everything_fits(tok):
    ex = load_instruction_data(FIXTURES / "alpaca_gpt4.json")
    got, stats = tokenize_fitting(ex, tok, 200)
    ref = tokenize.tokenize_examples(ex, tok, 200)
    assert stats == {"kept": 12, "truncated": 0, "skipped": 0}
    assert all((got[k] == ref[k]).all() for k in ref)


def test_tokenize_fitting_cuts_the_prompt_from_the_left_and_keeps_the_answer(tok):
    ex = [{"instruction": "Summarize.", "input": "x" * 200, "output": "short"}]
    got, stats = tokenize_fitting(ex, tok, 64)
    assert stats == {"kept": 1, "truncated": 1, "skipped": 0}
    ids = got["input_ids"][0]
    assert int(got["attention_mask"][0].sum()) == 64
    assert ids[0] == tok.bos_token_id
    text = tok.decode(ids[1:], skip_special_tokens=True)
    assert text.endswith("### Response:\nshort")
    labels = got["labels"][0]
    answer = labels[labels != tokenize.IGNORE_INDEX]
    assert tok.decode(answer, skip_special_tokens=True) == "short"
    assert answer[-1] == tok.eos_token_id


def test_tokenize_fitting_skips_answers_that_cannot_fit(tok, caplog):
    ex = [{"instruction": "a", "input": "", "output": "y" * 100},
          {"instruction": "b", "input": "", "output": "ok"}]
    with caplog.at_level("INFO", logger="fedshield"):
        got, stats = tokenize_fitting(ex, tok, 48, source="f.jsonl")
    assert stats == {"kept": 1, "truncated": 0, "skipped": 1}
    assert got["input_ids"].shape == (1, 48)
    assert "1 were skipped" in caplog.text and "f.jsonl" in caplog.text
    with pytest.raises(fs.DataError, match="f.jsonl: all 1 examples"):
        tokenize_fitting(ex[:1], tok, 48, source="f.jsonl")
