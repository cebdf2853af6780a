"""Causal-LM track (``model.task = "causal-lm"``): a tiny random Llama with SmolLM2's real
tokenizer and chat template; answers scored and trained on exactly as an unpadded, one-row
computation says; Opacus' per-sample gradients over padded sequences equal one-row gradients;
a real federation whose adapter reloads with plain PEFT; the real SmolLM2 in one DP round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import QUESTIONS, batch, llm_flat, make_tiny_flat, simulate
from opacus import GradSampleModule
from peft import PeftModel
from privatune.cli.main import app
from privatune.common.config import ConfigError, resolve
from privatune.common.data import LabeledText
from privatune.common.model.build import build_model, encode, load_trained
from privatune.common.model.causal_lm import ANSWER_CUE, label_scores, prompt
from privatune.common.model.hub import load_tokenizer
from privatune.common.protocol import read_lines
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner


def one_row_log_likelihood(model, tokenizer, text: str, answer: str, chat: bool) -> float:
    """log p(answer | prompt) from one unpadded sequence, token by token."""
    head = tokenizer(prompt(tokenizer, text, chat), add_special_tokens=False)["input_ids"]
    tail = tokenizer(answer if chat else f" {answer}", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(head) - 1 + j, t]) for j, t in enumerate(tail))


@pytest.mark.parametrize(
    ("labels", "chat"),
    [("A,B,C,D", True), ("credit card,student loan,mortgage,debt collection", False)],
)
def test_answers_are_scored_as_one_unpadded_row_would_score_them(tiny_llama_dir, labels, chat):
    """Left padding, position ids and the answer's place: each padded row's score of every
    label equals the one-row computation (single-token letters take the one-pass path,
    product names the multi-token one)."""
    cfg = resolve(llm_flat(tiny_llama_dir, labels, **{"model.chat-template": chat}))
    model = build_model(cfg, torch.device("cpu")).eval()
    names = cfg.data.label_names
    ids, mask, y = batch(cfg, QUESTIONS, [0, 1, 2]).tensors
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # left-padded
    with torch.no_grad():
        scores = label_scores(model, ids, mask)
        own = label_scores(model, ids, mask, y)
        tokenizer = load_tokenizer(cfg)
        for i, text in enumerate(QUESTIONS):
            for k, name in enumerate(names):
                expected = one_row_log_likelihood(model, tokenizer, text, name, chat)
                assert float(scores[i, k]) == pytest.approx(expected, abs=1e-4)
    assert torch.allclose(own, scores[torch.arange(3), y])
    if not chat:
        assert tokenizer.decode(ids[0][mask[0].bool()]).endswith(ANSWER_CUE)


def test_label_texts_are_the_answers_and_names_are_said_as_words(tiny_llama_dir):
    """A causal LM answers with ``model.label-texts`` (the labels' names stay the data's),
    else with each name as words; a text count that does not fit is refused in one line."""
    texts = {"model.label-texts": "Credit card; Student loan ;Mortgage;Debt collection"}
    said = resolve(llm_flat(tiny_llama_dir, "cc,sl,mo,dc", **texts))
    worded = resolve(llm_flat(tiny_llama_dir, "credit_card,student-loan,mortgage,debt-collection"))
    ids, mask, _ = batch(said, QUESTIONS, [0, 1, 2]).tensors
    tokenizer = load_tokenizer(said)
    for cfg, answers in (
        (said, ["Credit card", "Student loan", "Mortgage", "Debt collection"]),
        (worded, ["credit card", "student loan", "mortgage", "debt collection"]),
    ):
        model = build_model(cfg, torch.device("cpu")).eval()
        with torch.no_grad():
            scores = label_scores(model, ids, mask)
        for k, answer in enumerate(answers):
            expected = one_row_log_likelihood(model, tokenizer, QUESTIONS[1], answer, True)
            assert float(scores[1, k]) == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ConfigError, match=r"model\.label-texts holds 2 texts for the 4 labels"):
        resolve(llm_flat(tiny_llama_dir, "cc,sl,mo,dc", **{"model.label-texts": "a;b"}))


def test_only_the_answer_carries_loss_and_prompts_are_cut_at_their_end(tiny_llama_dir):
    cfg = resolve(llm_flat(tiny_llama_dir, **{"model.max-length": 40}))
    tokenizer = load_tokenizer(cfg)
    long = "symptom " * 200 + "?\nA. x\nB. y\nC. z\nD. w"
    ids, mask, _ = batch(cfg, [long], [0]).tensors
    assert ids.shape[1] <= 40
    shown = tokenizer.decode(ids[0][mask[0].bool()])
    assert shown.startswith("<|im_start|>") and shown.endswith("<|im_start|>assistant\n")
    # the training loss of a row is minus its answer's log-likelihood, nothing else
    cfg = resolve(llm_flat(tiny_llama_dir))
    model = build_model(cfg, torch.device("cpu"))
    ids, mask, _ = batch(cfg, [QUESTIONS[0], QUESTIONS[1]], [0, 0]).tensors
    loss = -label_scores(model, ids[:1], mask[:1], torch.tensor([1])).mean()
    expected = one_row_log_likelihood(model, tokenizer, QUESTIONS[0], "B", True)
    assert float(loss) == pytest.approx(-expected, abs=1e-4)


def test_opacus_per_sample_gradients_over_padded_sequences_are_one_row_gradients(
    tiny_llama_dir,
):
    """What DP-SGD clips: Opacus' per-sample gradient of each padded row equals the
    gradient of that row's loss computed alone, for every LoRA factor."""
    labels = "credit card,student loan,mortgage,debt collection"
    cfg = resolve(llm_flat(tiny_llama_dir, labels))
    model = build_model(cfg, torch.device("cpu"))
    ids, mask, y = batch(cfg, QUESTIONS, [0, 3, 1]).tensors
    gsm = GradSampleModule(model)
    (-label_scores(gsm, ids, mask, y).mean()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    per_sample = {n: p.grad_sample.clone() for n, p in trainable.items()}
    gsm.zero_grad()
    for i in range(len(y)):
        keep = mask[i].bool()
        model.zero_grad()
        single = label_scores(gsm, ids[i : i + 1, keep], mask[i : i + 1, keep], y[i : i + 1])
        (-single.mean()).backward()  # Opacus' grad_sample: each row's own loss's gradient
        for n, p in trainable.items():
            torch.testing.assert_close(per_sample[n][i], p.grad_sample[0], atol=1e-5, rtol=1e-4)
        gsm.zero_grad()


def test_causal_lm_refuses_what_it_does_not_support_in_one_line(tiny_llama_dir):
    for key, value in (
        ("train.trainable", "head"),
        ("model.pooling", "mean"),
    ):
        with pytest.raises(ConfigError, match="causal-lm"):
            resolve(llm_flat(tiny_llama_dir, **{key: value}))


@pytest.fixture(scope="module")
def llm_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """Three hospitals, two DP rounds of the tiny Llama on real MedMCQA instructions."""
    from privatune.simulations.prepare import load_medmcqa_qa

    root = tmp_path_factory.mktemp("llm")
    train, test = load_medmcqa_qa(42)
    data = root / "data"
    data.mkdir()
    names = ["hospital-a", "hospital-b", "hospital-c"]
    for i, name in enumerate(names):
        rows = train.iloc[i * 24 : (i + 1) * 24][["text", "label"]]
        rows.to_csv(data / f"{name}.csv", index=False)
    test.head(30)[["text", "label"]].to_csv(data / "test.csv", index=False)
    (data / "manifest.json").write_text(json.dumps({"institutions": names}))
    flat = {
        **make_tiny_flat(tiny_llama_dir, data, root),
        **llm_flat(tiny_llama_dir),
        "train.batch-size": 8,
        "train.learning-rate": 0.05,
    }
    return simulate(flat)


@pytest.mark.simulation
def test_a_dp_federation_trains_the_adapter_and_plain_peft_reloads_it(llm_run, tiny_llama_dir):
    lines = read_lines(llm_run)
    assert [m["round"] for m in lines] == [0, 1, 2]
    assert all(0 < m["epsilon_max"] <= 8.0 + 1e-6 for m in lines[1:])
    rounds = [
        load_file(str(llm_run / "checkpoints" / f"round-{r:03d}" / "adapter_model.safetensors"))
        for r in (1, 2)
    ]
    assert rounds[0].keys() == rounds[1].keys() and all("lora_" in k for k in rounds[0])
    assert any(not torch.equal(rounds[0][k], rounds[1][k]) for k in rounds[0])  # it moved
    config = json.loads((llm_run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    cfg = resolve(llm_flat(tiny_llama_dir))
    ids, mask, _ = batch(cfg, QUESTIONS, [0, 1, 2]).tensors
    trained = load_trained(llm_run, torch.device("cpu"))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    plain = PeftModel.from_pretrained(base, llm_run / "adapter").eval()
    with torch.no_grad():
        ours = label_scores(trained, ids, mask)
        start = label_scores(build_model(cfg, torch.device("cpu")).eval(), ids, mask)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = plain(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert not torch.allclose(ours, start, atol=1e-5)
    # plain PEFT + AutoModelForCausalLM reads the same answer scores at the prompt's end
    letters = trained.answers.ids[:, 0]
    torch.testing.assert_close(torch.log_softmax(logits[:, -1], -1)[:, letters], ours)
    answer = CliRunner().invoke(
        app, ["generate", str(llm_run), "--prompt", QUESTIONS[0], "--max-tokens", "3"]
    )
    assert answer.exit_code == 0, answer.output
    # the answer is plain PEFT's own greedy decoding of the chat prompt, three new tokens
    tokenizer = load_tokenizer(cfg)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[0]}], tokenize=False, add_generation_prompt=True
    )
    head = tokenizer(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = plain.generate(
            input_ids=head, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert 0 < out.shape[1] - head.shape[1] <= 3
    expected = tokenizer.decode(out[0, head.shape[1] :], skip_special_tokens=True)
    assert answer.output == f"{expected}\n"


def test_generate_refuses_a_classifier_run_in_one_line(tmp_path, tiny_cfg):
    from privatune.common.config import write_toml

    write_toml(tiny_cfg, tmp_path / "config.toml")
    out = CliRunner().invoke(app, ["generate", str(tmp_path), "--prompt", "hi"])
    assert out.exit_code == 2 and "needs a causal-lm run" in out.output


@pytest.mark.slow
def test_the_real_smollm2_trains_one_dp_round(tmp_path):
    """SmolLM2-135M-Instruct, converted from its packaged GGUF file, trains one DP-SGD round
    on real instructions: the LoRA factors move, the mechanism is recorded."""
    from privatune.client.train import train_round
    from privatune.simulations.prepare import load_medmcqa_qa

    cfg = resolve(
        {
            **llm_flat(Path("SmolLM2-135M-Instruct")),
            "model.name": "SmolLM2-135M-Instruct",
            "train.batch-size": 4,
            "model.max-length": 96,
        }
    )
    model = build_model(cfg, torch.device("cpu"))
    assert model.training
    train, _ = load_medmcqa_qa(42)
    frame: pd.DataFrame = train.head(8)
    y = np.asarray([cfg.data.label_names.index(x) for x in frame["label"]])
    data = batch(cfg, list(frame["text"]), list(y))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train_round(model, data, cfg, noise_multiplier=1.0, device=torch.device("cpu"))
    moved = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert result.mechanism is not None and result.mechanism.noise_multiplier == 1.0
    assert any("lora_B" in n for n in moved)


def test_the_instruction_wraps_each_text_and_a_long_text_loses_its_end(tiny_llama_dir):
    """``model.instruction``: the question before ``{text}`` survives any cut, so the model
    is always asked; an instruction without ``{text}`` is refused in one line."""
    question = "Which product is this complaint about?"
    cfg = resolve(
        llm_flat(
            tiny_llama_dir,
            **{"model.max-length": 60, "model.instruction": f"{question}\nComplaint: {{text}}"},
        )
    )
    tokenizer = load_tokenizer(cfg)
    long = "my card was charged twice " * 50
    ids, mask, _ = encode(
        LabeledText(Path("c"), [long, "short"], np.asarray([0, 1]), ""), cfg
    ).tensors
    assert ids.shape[1] <= 60
    for row in range(2):
        shown = tokenizer.decode(ids[row][mask[row].bool()])
        assert f"{question}\nComplaint: " in shown and shown.endswith("<|im_start|>assistant\n")
    assert "short" in tokenizer.decode(ids[1])
    with pytest.raises(ConfigError, match=r"model\.instruction"):
        resolve(llm_flat(tiny_llama_dir, **{"model.instruction": "no placeholder"}))
