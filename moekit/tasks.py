"""Generation tasks scored by exact match (``moekit eval --task``), greedy and with SCMoE.

``arithmetic``: problems drawn like the demo's math domain (``builtin:arithmetic``: sums,
differences, products, linear equations, word problems, integer division) from a different
random stream, keeping only problems whose text is not one of the lines the demo trains on, so
no prompt was ever seen in training. A model is given the problem up to its answer (e.g.
``"417 + 38 ="``) and scores when the first word it generates is the answer.

Decoding is greedy; prompts of equal token length are batched together, so no padding enters
either pass of SCMoE.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

TASKS = ("arithmetic",)
_PROBLEM_STREAM_SEED = 20240507  # any seed but the training data's 0
_BATCH = 64


@dataclass(frozen=True)
class Problem:
    """A prompt and the exact answer expected as the first word of the continuation."""

    prompt: str
    answer: str


def arithmetic_problems(count: int) -> list[Problem]:
    """``count`` distinct arithmetic problems that are not lines of the demo's training data."""
    from moekit.builtin_data import arithmetic_lines

    trained = set(arithmetic_lines())
    problems: dict[str, Problem] = {}
    for line in arithmetic_lines(count=50 * count + 1000, seed=_PROBLEM_STREAM_SEED):
        if line in trained or line in problems:
            continue
        prompt, answer = line.rsplit(" ", 1)
        problems[line] = Problem(prompt, answer)
        if len(problems) == count:
            break
    return list(problems.values())


def task_problems(task: str, count: int) -> list[Problem]:
    """The problems of ``task`` (one of :data:`TASKS`)."""
    if task == "arithmetic":
        return arithmetic_problems(count)
    raise ValueError(f"unknown task {task}")


def first_word(text: str) -> str:
    """The first whitespace-separated word of ``text`` ('' if none)."""
    words = text.split()
    return words[0] if words else ""


def exact_match_accuracy(
    model: Any,
    tokenizer: Any,
    problems: list[Problem],
    max_new_tokens: int,
    processor: Callable[[Any], Any] | None = None,
    advance: Callable[[int], None] | None = None,
) -> float:
    """Share of ``problems`` whose greedy continuation starts with the answer.

    ``processor(model)`` builds a fresh logits processor per batch (SCMoE keeps a per-call
    cache). Each prompt starts after the tokenizer's end-of-text token where the tokenizer adds
    no begin-of-text token itself: that is how a document starts in moekit's training data.
    """
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    by_length: dict[int, list[tuple[list[int], Problem]]] = defaultdict(list)
    for problem in problems:
        ids = tokenizer(problem.prompt).input_ids
        if tokenizer.bos_token_id is None or not ids or ids[0] != tokenizer.bos_token_id:
            ids = [tokenizer.eos_token_id, *ids] if tokenizer.eos_token_id is not None else ids
        by_length[len(ids)].append((ids, problem))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct = 0
    for group in by_length.values():
        for start in range(0, len(group), _BATCH):
            batch = group[start : start + _BATCH]
            ids = torch.tensor([ids for ids, _ in batch], device=device)
            processors = LogitsProcessorList([processor(model)] if processor else [])
            with torch.no_grad():
                output = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    logits_processor=processors,
                    pad_token_id=pad,
                )
            for row, (_, problem) in zip(output[:, ids.shape[1] :], batch):
                correct += first_word(tokenizer.decode(row, skip_special_tokens=True)) == problem.answer
            if advance:
                advance(len(batch))
    return correct / max(1, len(problems))
