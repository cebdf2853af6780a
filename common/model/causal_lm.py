"""Causal language models that answer in words (``model.task = "causal-lm"``).

An instruction goes in; the answer is one of the label names (an option letter, a product
name). The model is scored the way lm-evaluation-harness scores multiple choice: the
log-likelihood of each label's answer tokens after the prompt, the largest wins. It trains on
the answer tokens only: the loss is the negative log-likelihood of the true label's answer,
the prompt carries none. Per-sample clipping (Opacus) therefore clips the gradient of one
whole sequence, prompt and answer.

Both need each label's answer tokens: an :class:`AnswerTable` that ``build_model`` attaches
to the peft model as a submodule, so every caller that holds the model (Opacus' wrapper
included, which hands out submodules) scores the same way. Prompts are left-padded, so every
row's answer starts at the same position: the end of the batch.
"""

from __future__ import annotations

import torch
from privatune.common.data import LabeledText
from privatune.common.errors import ModelError
from torch.utils.data import TensorDataset

ANSWER_CUE = "\nAnswer:"  # ends a prompt when the chat template is off


class AnswerTable(torch.nn.Module):
    """Each label's answer tokens (K x L, right-padded) and their count; buffers only, so
    the adapter never carries them."""

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("lengths", lengths, persistent=False)


def answer_table(tokenizer, labels: list[str], chat: bool) -> AnswerTable:
    """The answers' tokens as they follow a prompt: right after the chat template's
    assistant header, or after ``ANSWER_CUE`` and a space."""
    tokens = [
        tokenizer(lab if chat else f" {lab}", add_special_tokens=False)["input_ids"]
        for lab in labels
    ]
    if any(not t for t in tokens) or len({tuple(t) for t in tokens}) < len(tokens):
        raise ModelError(f"data.labels {labels}: each label needs its own, non-empty tokens")
    width = max(len(t) for t in tokens)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([t + [pad] * (width - len(t)) for t in tokens])
    return AnswerTable(ids, torch.tensor([len(t) for t in tokens]))


def prompt(tokenizer, text: str, chat: bool) -> str:
    """The instruction as the model expects it."""
    if not chat:
        return f"{text}{ANSWER_CUE}"
    if tokenizer.chat_template is None:
        raise ModelError("model.chat-template = true, but the model's tokenizer has none")
    message = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)


def encode_prompts(
    data: LabeledText, tokenizer, max_length: int, chat: bool, instruction: str = "{text}"
) -> TensorDataset:
    """(prompt ids, mask, label), left-padded; each text goes into ``instruction`` at
    ``{text}``. A long text is cut at its end to fit ``max_length`` with the instruction and
    the template around it, so the question and the cue to answer are always there."""
    frame = prompt(tokenizer, instruction.replace("{text}", ""), chat)
    overhead = len(tokenizer(frame, add_special_tokens=False)["input_ids"])
    budget = max_length - overhead
    if budget < 8:
        raise ModelError(
            f"model.max-length {max_length}: the prompt template alone takes {overhead}"
        )
    tokens = tokenizer(data.texts, add_special_tokens=False)["input_ids"]
    texts = [
        prompt(
            tokenizer,
            instruction.replace(
                "{text}", tokenizer.decode(ids[:budget]) if len(ids) > budget else text
            ),
            chat,
        )
        for text, ids in zip(data.texts, tokens, strict=True)
    ]
    enc = tokenizer(
        texts, add_special_tokens=False, padding="longest", padding_side="left", return_tensors="pt"
    )
    return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.from_numpy(data.labels))


def answers_of(module: torch.nn.Module) -> AnswerTable | None:
    """The model's answer table: present exactly when it is a causal LM. The one test of a
    built model's task: :func:`common.model.build.build_model` reads ``model.task`` and
    attaches the table, and every step that differs by task (loss, scores, head) asks here."""
    table = getattr(module, "answers", None)
    return table if isinstance(table, AnswerTable) else None


def _answer_log_likelihood(
    module: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    answer: torch.Tensor,
    length: torch.Tensor,
) -> torch.Tensor:
    """log p(answer | prompt) per row; ``answer`` (B x L) right-padded to ``length``."""
    width = answer.shape[1]
    answer_mask = (torch.arange(width, device=ids.device) < length[:, None]).to(mask.dtype)
    seq = torch.cat([ids, answer], 1)
    full_mask = torch.cat([mask, answer_mask], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens
    out = module(
        input_ids=seq, attention_mask=full_mask, position_ids=positions, logits_to_keep=width + 1
    )
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)  # predicts each answer token
    token = logp.gather(-1, answer[..., None]).squeeze(-1)
    return (token * answer_mask).sum(-1)


def label_scores(
    module: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The log-likelihood of each label's answer (B x K), or with ``labels`` of each row's
    own label's answer only (B: the training loss's terms). Single-token answers, such as
    option letters, take one forward pass for all labels."""
    table = answers_of(module)
    if table is None:
        raise ModelError("label_scores needs a causal LM built with model.task = 'causal-lm'")
    if int(table.lengths.max()) == 1:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = module(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        logp = torch.log_softmax(out.logits[:, -1].float(), -1)[:, table.ids[:, 0]]
        return logp if labels is None else logp.gather(1, labels[:, None]).squeeze(1)
    if labels is not None:
        return _answer_log_likelihood(module, ids, mask, table.ids[labels], table.lengths[labels])
    return _every_answer_log_likelihood(module, ids, mask, table)


def _every_answer_log_likelihood(
    module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, table: AnswerTable
) -> torch.Tensor:
    """B x K: every label's multi-token answer after each prompt, for about the cost of one
    pass: the prompts run once, and all K answers continue from their cached keys and
    values (the batch repeated K times). Scoring only: training takes each row's own
    label in one pass (``_answer_log_likelihood``), the path Opacus' hooks clip."""
    rows, k = len(ids), len(table.ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = module(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    first = torch.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(k, 0)
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)
    answer, length = table.ids.repeat(rows, 1), table.lengths.repeat(rows)  # row b*K + label
    width = answer.shape[1]
    answer_mask = (torch.arange(width, device=ids.device) < length[:, None]).to(mask.dtype)
    token = first.gather(-1, answer[:, :1])
    if width > 1:
        after = positions[:, -1:].repeat_interleave(k, 0) + 1
        rest = module(
            input_ids=answer[:, :-1],
            attention_mask=torch.cat([mask.repeat_interleave(k, 0), answer_mask[:, :-1]], 1),
            position_ids=after + torch.arange(width - 1, device=ids.device),
            past_key_values=cache,
            use_cache=True,
        )
        logp = torch.log_softmax(rest.logits.float(), -1)  # token j predicts token j + 1
        token = torch.cat([token, logp.gather(-1, answer[:, 1:, None]).squeeze(-1)], 1)
    return (token * answer_mask).sum(-1).view(rows, k)


def class_scores(module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """B x K: a classifier's logits, or a causal LM's answer log-likelihoods (argmax: the
    prediction either way)."""
    if answers_of(module) is not None:
        return label_scores(module, ids, mask)
    return module(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def generate(model, tokenizer, text: str, chat: bool, max_new_tokens: int) -> str:
    """Greedy decoding of the answer to one instruction (``privatune generate``)."""
    ids = tokenizer(prompt(tokenizer, text, chat), add_special_tokens=False, return_tensors="pt")
    ids = {k: v.to(model.device) for k, v in ids.items()}
    out = model.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
