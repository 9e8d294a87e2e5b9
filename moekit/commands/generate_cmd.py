"""``moekit generate``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer


def generate_command(
    model: str = typer.Argument(..., help="Model directory (or hub id): an MoE moekit wrote, any MoE it can read, or a dense model."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt (default: read from --prompt-file, or from stdin, or ask interactively)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from this file."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Most tokens to generate."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as it is, without the tokenizer's chat template."),
    sample: bool = typer.Option(False, "--sample", help="Sample (default: greedy decoding)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (with --sample)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: smallest token set with this probability mass (with --sample)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens; 0: all (with --sample)."),
    random_seed: int = typer.Option(0, "--random-seed", help="Seed of the sampler."),
    routing: bool = typer.Option(False, "--routing", help="After the text, show each generated token coloured by its top expert."),
    routing_layer: Optional[int] = typer.Option(None, "--routing-layer", help="The MoE layer for --routing and --json (default: the majority over layers)."),
    scmoe: bool = typer.Option(False, "--scmoe", help="Self-contrast decoding (SCMoE, arXiv 2405.14507): contrast top-k routing with rank-k-only routing."),
    scmoe_beta: float = typer.Option(0.5, "--scmoe-beta", help="SCMoE strength: z = (1 + beta) z_strong - beta z_weak; 0 is plain decoding."),
    scmoe_alpha: float = typer.Option(0.1, "--scmoe-alpha", help="SCMoE plausibility: only tokens with p >= alpha x the top token's p."),
    scmoe_rank: int = typer.Option(2, "--scmoe-rank", help="The weak pass routes each token to its expert of this rank only."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float32 on a CPU, bfloat16 on a GPU), float32, bfloat16 or float16."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the result as JSON to this file ('-' for stdout, nothing streamed)."),
) -> None:
    """Generate text with a model, streaming it, and show which expert each token went to.

    \b
    Examples:
      moekit generate run/tuned --prompt "def fibonacci(n):" --raw --routing
      moekit generate run/tuned -p "12 + 35 =" --raw --scmoe --max-new-tokens 8
      moekit generate run/tuned                         (interactive: one prompt per line, Ctrl-D ends)
      echo "Once upon a time" | moekit generate run/tuned --raw --json -
    """
    from rich.console import Console

    from moekit.config import GenerateConfig
    from moekit.errors import InputNotFoundError, InvalidOptionError
    from moekit.io.atomic import write_text_atomic
    from moekit.progress import quiet_transformers
    from moekit.report.tables import render_generation_routing
    from moekit.steps.generate import Generator

    quiet_transformers()
    if prompt is not None and prompt_file is not None:
        raise InvalidOptionError("Both --prompt and --prompt-file were given.", "Give one of them.")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise InputNotFoundError(f"--prompt-file {prompt_file} does not exist.", "Give an existing text file.")
        prompt = prompt_file.read_text()
    elif prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().removesuffix("\n")  # the newline echo and editors end a piped prompt with
    if json_path not in (None, "-") and Path(json_path).is_dir():
        raise InvalidOptionError(f"--json {json_path} is a directory.", f"Give a file path such as {Path(json_path) / 'generation.json'}, or - for stdout.")
    if json_path is not None and prompt is None:
        raise InvalidOptionError("--json needs a prompt (--prompt, --prompt-file or stdin); interactive use prints text.", "Give --prompt.")
    cfg = GenerateConfig(model=model, max_new_tokens=max_new_tokens, raw=raw, sample=sample, temperature=temperature, top_p=top_p,
                         top_k=top_k, random_seed=random_seed, dtype=dtype, routing_layer=routing_layer, scmoe=scmoe,
                         scmoe_beta=scmoe_beta, scmoe_alpha=scmoe_alpha, scmoe_rank=scmoe_rank)
    generator = Generator(cfg)
    to_stdout = json_path == "-"
    console = Console(stderr=to_stdout, highlight=False)

    def run_one(text: str) -> Any:
        streamed = None if json_path is not None else (lambda piece: console.print(piece, end="", markup=False, soft_wrap=True))
        generation = generator.generate(text, streamed)
        if streamed is not None:
            console.print()
            console.print(f"[dim]{len(generation.tokens)} tokens in {generation.seconds:.2f} s"
                          + (" with SCMoE" if scmoe else "") + "[/]")
        if routing and json_path is None:
            render_generation_routing(console, generation, routing_layer)
        return generation

    if prompt is not None:
        generation = run_one(prompt)
        if json_path is not None:
            record = json.dumps(generation.as_dict(routing_layer), indent=1)
            if to_stdout:
                print(record)
            else:
                Path(json_path).parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(Path(json_path), record)
                console.print(f"wrote {json_path}")
        return
    console.print(f"[dim]{model}: type a prompt and Enter; Ctrl-D ends.[/]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            console.print()
            return
        if line.strip():
            run_one(line)
