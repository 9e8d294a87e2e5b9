"""`moekit generate` and SCMoE decoding on tiny models.

Invariants: an MoE of identical branches decodes exactly like its seed; SCMoE with beta 0 is
plain greedy decoding; the weak pass routes each token to its k-th ranked expert only.
"""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import GenerateConfig, MixConfig
from moekit.errors import MoekitError
from moekit.routing.contrast import contrast_logits, rank_routing
from moekit.routing.control import find_routers
from moekit.steps.branch import branch
from moekit.steps.generate import Generator
from moekit.steps.mix import mix
from moekit.tiny import perturb_model

PROMPT = "def value(x): return x"


@pytest.fixture(scope="module")
def models(make_seed, tmp_path_factory):
    """A tiny seed, the MoE of three identical branches, and the MoE of three distinct ones (top-2 of 4)."""
    root = tmp_path_factory.mktemp("generate")
    seed = make_seed("llama")
    same = branch(str(seed), root / "same", ["code", "math", "prose"])
    identical = mix(MixConfig(out=root / "identical-moe", seed=str(seed), experts=list(same.branches.items()))).out
    diverse = branch(str(seed), root / "diverse", ["code", "math", "prose"], copy=True)
    for i, path in enumerate(diverse.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.5)
    distinct = mix(MixConfig(out=root / "distinct-moe", seed=str(seed), experts=list(diverse.branches.items()))).out
    return {"seed": seed, "identical": identical, "distinct": distinct}


def _tokens(model_dir, **options) -> list[int]:
    generation = Generator(GenerateConfig(model=str(model_dir), raw=True, max_new_tokens=12, **options)).generate(
        PROMPT
    )
    return [t.id for t in generation.tokens]


def test_identical_branches_decode_like_the_seed(models):
    assert _tokens(models["identical"]) == _tokens(models["seed"])
    assert len(_tokens(models["seed"])) == 12


def test_scmoe_beta_zero_is_greedy_decoding(models):
    assert _tokens(models["distinct"], scmoe=True, scmoe_beta=0.0) == _tokens(models["distinct"])


def _second_expert_only(router):
    """An independent weak routing for the oracle below: each token to its 2nd-ranked expert, gate 1."""
    native = type(router).forward

    def forward(hidden_states, *args, **kwargs):
        logits, weights, indices = native(router, hidden_states, *args, **kwargs)[:3]
        second = indices.gather(-1, weights.float().topk(2, dim=-1).indices[..., 1:2])
        return logits, torch.ones(second.shape, dtype=weights.dtype), second

    return forward


def test_scmoe_decodes_the_contrast_of_top2_and_2nd_expert_routing(models):
    """End to end, beta 0.5: each token is the argmax of 1.5 z_top2 - 0.5 z_2nd-only over the plausible tokens."""
    generator = Generator(GenerateConfig(model=str(models["distinct"]), raw=True, max_new_tokens=6))
    model, ids = generator.model, generator.prompt_ids(PROMPT)
    routers = [r for _, r in find_routers(model)]
    expected = []
    with torch.no_grad():
        for _ in range(6):  # greedy over the whole sequence each step: no cache involved in the oracle
            strong = model(input_ids=ids).logits[:, -1].float()
            for router in routers:
                router.forward = _second_expert_only(router)
            try:
                weak = model(input_ids=ids).logits[:, -1].float()
            finally:
                for router in routers:
                    del router.forward
            plausible = strong >= strong.max() + math.log(0.1)
            token = torch.where(plausible, 1.5 * strong - 0.5 * weak, -math.inf).argmax(dim=-1)
            expected.append(int(token))
            ids = torch.cat([ids, token[:, None]], dim=1)
    assert expected != _tokens(models["distinct"])[:6]  # the contrast changes the decoding of this model
    assert _tokens(models["distinct"], scmoe=True, scmoe_beta=0.5)[:6] == expected


def test_contrast_formula_and_plausibility_mask():
    strong = torch.tensor([[2.0, 1.0, -5.0, 1.9]])
    weak = torch.tensor([[1.0, 3.0, 0.0, -1.0]])
    out = contrast_logits(strong, weak, beta=0.5, alpha=0.1)
    # plausible: strong >= 2 + ln 0.1 = -0.303 -> tokens 0, 1, 3; token 2 is masked
    assert out[0, 2] == -math.inf
    assert torch.allclose(
        out[0, [0, 1, 3]], torch.tensor([1.5 * 2.0 - 0.5 * 1.0, 1.5 * 1.0 - 0.5 * 3.0, 1.5 * 1.9 + 0.5])
    )
    assert out.argmax() == 3  # the contrast prefers the token the weak routing does not like
    assert torch.equal(contrast_logits(strong, weak, beta=0.0, alpha=0.1)[0, [0, 1, 3]], strong[0, [0, 1, 3]])


def test_weak_pass_routes_each_token_to_its_kth_expert_only(models):
    generator = Generator(GenerateConfig(model=str(models["distinct"])))
    model = generator.model
    routers = [r for _, r in find_routers(model)]
    calls = []

    def hook(router, inputs, output):  # the weak output, and the router's own ranking of the same hidden states
        _, weights, indices = type(router).forward(router, inputs[0])
        calls.append((weights, indices, output[1], output[2]))

    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    handles = [r.register_forward_hook(hook) for r in routers]
    with torch.no_grad(), rank_routing(model, 2):
        model(ids)
    for h in handles:
        h.remove()
    assert len(calls) == len(routers)
    for weights, indices, weak_weights, weak_indices in calls:
        second = indices.gather(-1, weights.argsort(dim=-1, descending=True)[..., 1:2])
        assert weak_indices.shape[-1] == 1 and torch.equal(weak_indices, second)
        assert torch.equal(weak_weights, torch.ones_like(weak_weights))
    assert "forward" not in routers[0].__dict__  # the routers' own forward is back


def test_scmoe_refuses_dense_models_and_too_high_ranks(models):
    with pytest.raises(MoekitError, match="dense model"):
        Generator(GenerateConfig(model=str(models["seed"]), scmoe=True))
    with pytest.raises(MoekitError, match="routes each token to 2"):
        Generator(GenerateConfig(model=str(models["distinct"]), scmoe=True, scmoe_rank=3))


def test_cli_streams_text_and_writes_json(models, tmp_path):
    runner = CliRunner()
    app = build_app()
    streamed = runner.invoke(
        app, ["generate", str(models["distinct"]), "-p", PROMPT, "--raw", "--max-new-tokens", "8", "--routing"]
    )
    assert streamed.exit_code == 0, streamed.output
    assert "8 tokens in" in streamed.output and "top expert per generated token" in streamed.output
    out = runner.invoke(
        app, ["generate", str(models["distinct"]), "-p", PROMPT, "--raw", "--max-new-tokens", "8", "--json", "-"]
    )
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["new_tokens"] == 8 and len(record["tokens"]) == 8
    assert record["experts"] == ["code", "math", "prose", "seed"]
    assert all(t["expert"] in record["experts"] and len(t["experts_per_layer"]) == 2 for t in record["tokens"])
    text = Generator(GenerateConfig(model=str(models["distinct"]), raw=True, max_new_tokens=8)).generate(PROMPT).text
    assert record["text"] == text
    assert text.strip() and text.strip() in streamed.output.replace("\n", "")
    bad = runner.invoke(app, ["generate", str(models["seed"]), "-p", "x", "--scmoe"])
    assert bad.exit_code == 2 and "dense model" in bad.output


def test_arithmetic_problems_were_never_trained_on():
    from moekit.builtin_data import arithmetic_lines
    from moekit.tasks import arithmetic_problems

    problems = arithmetic_problems(300)
    trained = set(arithmetic_lines())
    assert len({p.prompt for p in problems}) == 300
    assert not any(f"{p.prompt} {p.answer}" in trained for p in problems)
    assert all(p.prompt.endswith(("=", "?")) and p.answer.lstrip("-").isdigit() for p in problems)


def test_eval_task_scores_greedy_and_scmoe(models, tmp_path):
    runner = CliRunner()
    out = runner.invoke(
        build_app(),
        [
            "eval",
            str(models["seed"]),
            str(models["distinct"]),
            "--task",
            "arithmetic",
            "--problems",
            "6",
            "--scmoe",
            "--json",
            str(tmp_path / "task.json"),
        ],
    )
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "task.json").read_text())
    assert report["problems"] == 6 and set(report["results"]) == {"llama", "distinct-moe"}
    assert report["results"]["llama"]["scmoe"] is None  # dense: no SCMoE figure
    assert 0.0 <= report["results"]["distinct-moe"]["scmoe"] <= 1.0
    from moekit.tasks import task_problems

    # the scorer counts what it should: a model that answers every problem right scores 1, half right 0.5
    problems = task_problems("arithmetic", 6)
    tokenizer = Generator(GenerateConfig(model=str(models["seed"]), raw=True)).tokenizer
    assert _scored(problems, tokenizer, wrong=set()) == 1.0
    assert _scored(problems, tokenizer, wrong={p.prompt for p in problems[::2]}) == 0.5
    assert _scored(problems, tokenizer, wrong={p.prompt for p in problems}) == 0.0
    bad = runner.invoke(build_app(), ["eval", str(models["seed"]), "--scmoe", "--data", "x=y"])
    assert bad.exit_code == 2 and "--task" in bad.output


def _scored(problems, tokenizer, wrong: set[str]) -> float:
    """exact_match_accuracy of a scripted model that continues each prompt with its answer (or a wrong one)."""
    from moekit.tasks import exact_match_accuracy

    answers = {p.prompt: p.answer for p in problems}

    class Scripted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, max_new_tokens, pad_token_id, **kwargs):
            rows = []
            for row in input_ids:
                prompt = tokenizer.decode(row, skip_special_tokens=True)
                answer = "-1234567" if prompt in wrong else answers[prompt]
                new = tokenizer(f" {answer} and more", add_special_tokens=False).input_ids[:max_new_tokens]
                rows.append(torch.cat([row, torch.tensor(new)]))
            width = max(len(r) for r in rows)
            return torch.stack([torch.cat([r, torch.full((width - len(r),), pad_token_id)]) for r in rows])

    return exact_match_accuracy(Scripted(), tokenizer, problems, max_new_tokens=12)


CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def test_the_chat_template_wraps_the_prompt(models, tmp_path):
    """Without --raw a tokenizer's chat template is applied: the model sees the templated ids, generates after them."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "chat"
    shutil.copytree(models["distinct"], model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    templated = templated["input_ids"] if isinstance(templated, dict) or hasattr(templated, "keys") else templated
    runner = CliRunner()
    out = tmp_path / "chat.json"
    result = runner.invoke(
        build_app(), ["generate", str(model), "-p", PROMPT, "--max-new-tokens", "5", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    chat = json.loads(out.read_text())
    raw = Generator(GenerateConfig(model=str(model), raw=True)).prompt_ids(PROMPT)
    assert chat["prompt_tokens"] == len(templated) > raw.shape[1]
    # greedy from the templated ids, token for token
    generator = Generator(GenerateConfig(model=str(model), max_new_tokens=5))
    ids = torch.tensor([templated])
    with torch.no_grad():
        expected = generator.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )[0, ids.shape[1] :]
    assert [t["id"] for t in chat["tokens"]] == expected.tolist()


def test_sampling_is_reproducible_with_a_seed(models):
    sampled = [_tokens(models["distinct"], sample=True, random_seed=seed) for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # the same seed: the same tokens
    assert sampled[0] != sampled[2] and sampled[0] != _tokens(models["distinct"])  # another seed, and greedy, differ


def test_interactive_mode_answers_each_line_until_ctrl_d(models):
    """On a terminal without a prompt: '> ', a generation per line typed, and a clean end on Ctrl-D (EOF)."""
    import os
    import pty
    import subprocess
    import sys
    import time

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "moekit", "generate", str(models["distinct"]), "--raw", "--max-new-tokens", "3"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    os.close(follower)
    output = b""

    def read_until(marker: bytes, timeout: float = 120) -> None:
        """Read until ``marker`` appears in what arrives from now on."""
        nonlocal output
        start, deadline = len(output), time.monotonic() + timeout
        while marker not in output[start:] and time.monotonic() < deadline:
            try:
                output += os.read(leader, 4096)
            except OSError:
                break

    read_until(b"> ")
    os.write(leader, b"def value\n")
    read_until(b"> ")  # the answer, its timing line, and the next prompt
    os.write(leader, b"\x04")  # Ctrl-D: EOF at the prompt
    assert process.wait(timeout=60) == 0
    os.close(leader)
    text = output.decode(errors="replace")
    assert "type a prompt and Enter; Ctrl-D ends" in text and text.count("> ") >= 2
    assert "3 tokens in" in text
