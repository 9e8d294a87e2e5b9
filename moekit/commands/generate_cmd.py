"""``moekit generate``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from moekit.commands.common import DEVICE_OPTION, fields_of
from moekit.config import GenerateConfig, default_of


def generate_command(
    model: str = typer.Argument(
        ..., help="Model directory (or hub id): an MoE moekit wrote, any MoE it can read, or a dense model."
    ),
    prompt: Optional[str] = typer.Option(
        None,
        "--prompt",
        "-p",
        help="The prompt (default: read from --prompt-file, or from stdin, or ask interactively).",
    ),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from this file."),
    max_new_tokens: int = typer.Option(
        default_of(GenerateConfig, "max_new_tokens"), "--max-new-tokens", help="Most tokens to generate."
    ),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as it is, without the tokenizer's chat template."),
    sample: bool = typer.Option(False, "--sample", help="Sample (default: greedy decoding)."),
    temperature: float = typer.Option(
        default_of(GenerateConfig, "temperature"), "--temperature", help="Sampling temperature (with --sample)."
    ),
    top_p: float = typer.Option(
        default_of(GenerateConfig, "top_p"),
        "--top-p",
        help="Nucleus sampling: smallest token set with this probability mass (with --sample).",
    ),
    top_k: int = typer.Option(
        default_of(GenerateConfig, "top_k"),
        "--top-k",
        help="Sample among the k most likely tokens; 0: all (with --sample).",
    ),
    random_seed: int = typer.Option(
        default_of(GenerateConfig, "random_seed"), "--random-seed", help="Seed of the sampler."
    ),
    routing: bool = typer.Option(
        False, "--routing", help="After the text, show each generated token coloured by its top expert."
    ),
    routing_layer: Optional[int] = typer.Option(
        None, "--routing-layer", help="The MoE layer for --routing and --json (default: the majority over layers)."
    ),
    scmoe: bool = typer.Option(
        False,
        "--scmoe",
        help="Self-contrast decoding (SCMoE, arXiv 2405.14507): contrast top-k routing with rank-k-only routing.",
    ),
    scmoe_beta: float = typer.Option(
        default_of(GenerateConfig, "scmoe_beta"),
        "--scmoe-beta",
        help="SCMoE strength: z = (1 + beta) z_strong - beta z_weak; 0 is plain decoding.",
    ),
    scmoe_alpha: float = typer.Option(
        default_of(GenerateConfig, "scmoe_alpha"),
        "--scmoe-alpha",
        help="SCMoE plausibility: only tokens with p >= alpha x the top token's p.",
    ),
    scmoe_rank: int = typer.Option(
        default_of(GenerateConfig, "scmoe_rank"),
        "--scmoe-rank",
        help="The weak pass routes each token to its expert of this rank only.",
    ),
    dtype: str = typer.Option(
        default_of(GenerateConfig, "dtype"),
        "--dtype",
        help="auto (float32 on a CPU, bfloat16 on a GPU), float32, bfloat16 or float16.",
    ),
    json_path: Optional[str] = typer.Option(
        None, "--json", help="Write the result as JSON to this file ('-' for stdout, nothing streamed)."
    ),
    device: Optional[str] = DEVICE_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace the --json file if it holds an earlier generation."),
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

    from moekit.errors import InvalidOptionError
    from moekit.progress import quiet_transformers
    from moekit.steps.generate import Generator, guard_generation_json, write_generation

    quiet_transformers()
    prompt = _read_prompt(prompt, prompt_file)
    if json_path not in (None, "-") and Path(json_path).is_dir():
        raise InvalidOptionError(
            f"--json {json_path} is a directory.",
            f"Give a file path such as {Path(json_path) / 'generation.json'}, or - for stdout.",
        )
    if json_path is not None and prompt is None:
        raise InvalidOptionError(
            "--json needs a prompt (--prompt, --prompt-file or stdin); interactive use prints text.", "Give --prompt."
        )
    if json_path not in (None, "-"):
        guard_generation_json(Path(json_path), force, model)
    cfg = GenerateConfig(**fields_of(GenerateConfig, locals()))
    generator = Generator(cfg)
    console = Console(stderr=json_path == "-", highlight=False)
    if prompt is None:
        _interactive(console, generator, model, routing)
    elif json_path is None:
        _show(console, generator, prompt, routing)
    elif json_path == "-":
        print(json.dumps(generator.generate(prompt).as_dict(routing_layer), indent=1))
    else:
        write_generation(generator.generate(prompt), Path(json_path), routing_layer, force)
        console.print(f"wrote {json_path}")


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> Optional[str]:
    """The prompt: --prompt, else --prompt-file, else piped stdin; None for interactive use."""
    from moekit.errors import InputNotFoundError, InvalidOptionError

    if prompt is not None and prompt_file is not None:
        raise InvalidOptionError("Both --prompt and --prompt-file were given.", "Give one of them.")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise InputNotFoundError(f"--prompt-file {prompt_file} does not exist.", "Give an existing text file.")
        try:
            return prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidOptionError(f"--prompt-file {prompt_file} is not UTF-8 text.", "Give a text file.") from None
    if prompt is None and not sys.stdin.isatty():
        return sys.stdin.read().removesuffix("\n")  # the newline echo and editors end a piped prompt with
    return prompt


def _show(console: Any, generator: Any, prompt: str, routing: bool) -> None:
    """Stream one generation to the terminal, then its timing (on stderr: redirected output holds only the text) and
    (with --routing) its tokens coloured by expert."""
    from rich.console import Console

    from moekit.report.tables import render_generation_routing

    generation = generator.generate(prompt, lambda piece: console.print(piece, end="", markup=False, soft_wrap=True))
    console.print()
    Console(stderr=True, highlight=False).print(
        f"[dim]{len(generation.tokens)} tokens in {generation.seconds:.2f} s"
        + (" with SCMoE" if generator.cfg.scmoe else "")
        + "[/]"
    )
    if routing:
        render_generation_routing(console, generation, generator.cfg.routing_layer)


def _interactive(console: Any, generator: Any, model: str, routing: bool) -> None:
    """One generation per line typed, until Ctrl-D."""
    console.print(f"[dim]{model}: type a prompt and Enter; Ctrl-D ends.[/]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            console.print()
            return
        if line.strip():
            _show(console, generator, line, routing)
