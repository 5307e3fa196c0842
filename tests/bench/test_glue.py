"""Tests of the ``glue`` suite: the loader on tiny local GLUE-format files, and a tiny RoBERTa end to end."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import pytest

pytest.importorskip("datasets")

import datasets

from gradsurg.bench.suites.glue import GlueDataError, load_glue_task
from gradsurg.errors import InvalidOptionError

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "glue"


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    yield


def test_original_glue_tsv_with_string_labels() -> None:
    mnli = load_glue_task("mnli", data_dir=DATA)
    assert (mnli.metric, mnli.num_classes) == ("accuracy", 3)
    assert len(mnli.train_text) == len(mnli.train_pair or ()) == len(mnli.train_labels) == 12
    assert mnli.train_text[0] == "the cat sleeps on the warm mat"
    assert mnli.train_pair is not None and mnli.train_pair[0] == "a cat is sleeping"
    # entailment, neutral, contradiction -> the hub's class indices 0, 1, 2
    assert list(mnli.train_labels[:3]) == [0, 1, 2] and len(mnli.val_labels) == 6


def test_hub_style_csv_and_json_lines() -> None:
    qqp = load_glue_task("qqp", data_dir=DATA)
    assert (qqp.metric, len(qqp.train_text), len(qqp.val_text)) == ("f1", 8, 4)
    assert qqp.train_pair is not None and qqp.train_pair[5] == "Where can I buy shoes, cheap?"
    sst2 = load_glue_task("sst2", data_dir=DATA)
    assert sst2.train_pair is None and sst2.val_pair is None
    assert list(sst2.val_labels) == [1, 0, 1, 0] and sst2.val_text[1] == "painfully bad"


def test_subsamples_are_seeded() -> None:
    first = load_glue_task("qqp", data_dir=DATA, max_train=3, max_val=2, seed=1)
    again = load_glue_task("qqp", data_dir=DATA, max_train=3, max_val=2, seed=1)
    assert len(first.train_text) == 3 and len(first.val_text) == 2
    assert first == again


def test_missing_files_columns_and_bad_labels_are_named(tmp_path: pathlib.Path) -> None:
    with pytest.raises(GlueDataError, match=r"needs a file .*sst2/<stem><ext>"):
        load_glue_task("sst2", data_dir=tmp_path)
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.csv").write_text("text,label\nfine,1\n")
    (tmp_path / "sst2" / "dev.csv").write_text("sentence,label\nfine,1\n")
    with pytest.raises(GlueDataError, match=r"must have the columns \['sentence', 'label'\].*missing \['sentence'\]"):
        load_glue_task("sst2", data_dir=tmp_path)
    (tmp_path / "sst2" / "train.csv").write_text("sentence,label\nfine,7\n")
    with pytest.raises(GlueDataError, match=r"class indices in \[0, 2\); found 7"):
        load_glue_task("sst2", data_dir=tmp_path)
    with pytest.raises(InvalidOptionError, match="must be one of"):
        load_glue_task("cola", data_dir=DATA)


def _tiny_roberta(folder: pathlib.Path) -> None:
    """A 2-layer RoBERTa with a word-level tokenizer over the test files' vocabulary (no hub)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words: set[str] = set()
    for path in DATA.rglob("*.*"):
        words.update(path.read_text().lower().replace('"', " ").replace(",", " ").replace("\t", " ").split())
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate([*specials, *sorted(words)])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    config = transformers.RobertaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=140,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    transformers.RobertaModel(config).save_pretrained(folder)


def test_glue_suite_end_to_end_on_a_tiny_local_roberta(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("peft")
    from gradsurg import cli

    model = tmp_path / "tiny-roberta"
    _tiny_roberta(model)
    out = tmp_path / "out"
    arguments = [
        "compare",
        "--suite",
        "glue",
        "--model",
        str(model),
        "--data-dir",
        str(DATA),
        "--steps",
        "2",
        "--seeds",
        "1",
        "--strategies",
        "ortho_lora",
        "--no-plots",
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert cli.main(arguments) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"] == [
        {"name": "mnli", "metric": "accuracy"},
        {"name": "qqp", "metric": "f1"},
        {"name": "sst2", "metric": "accuracy"},
    ]
    encoder = data["config"]["encoder"]
    assert (encoder["lora_r"], encoder["lora_alpha"], encoder["lora_dropout"]) == (8, 16.0, 0.1)
    assert encoder["lora_targets"] == ["query", "value"] and encoder["trainable_layers"] is None
    assert (data["config"]["train"]["batch_size"], data["config"]["train"]["lr"]) == (32, 5e-4)
    assert len(data["runs"]) == 5 and not data["partial"]
    ortho = next(r for r in data["runs"] if r["method"] == "ortho_lora@layer")
    assert set(ortho["final"]) == {"mnli", "qqp", "sst2"} and len(ortho["conflict_share"]) > 0
