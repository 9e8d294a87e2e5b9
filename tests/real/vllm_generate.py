"""Run by the vLLM venv (not collected by pytest): greedy generation and logprobs in vLLM.

Usage: python vllm_generate.py JOBS.json RESULTS.json. Each job names a model directory and
prompts as token ids (tokenized by the test, so both sides see the same ids). For each model it
records the class vLLM built, the greedy tokens of every prompt and the top logprobs of the
first generated token, or the error that stopped it. The engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), float32, eager, one model after another.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # no engine process: faster start
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for a few short prompts


def run(job: dict) -> dict:
    import vllm

    started = time.perf_counter()
    llm = vllm.LLM(
        model=job["model"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        seed=0,
        trust_remote_code=job.get("remote_code", False),
    )
    try:
        classes = llm.apply_model(lambda model: type(model).__name__)
        params = vllm.SamplingParams(temperature=0, max_tokens=job["max_tokens"], logprobs=job["logprobs"])
        prompts = [vllm.TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        del llm
    return {
        "model": job["model"],
        "class": classes[0],
        "tokens": [list(out.outputs[0].token_ids) for out in outputs],
        # the first generated token's top logprobs, {token id: logprob}
        "first_logprobs": [
            {str(token): entry.logprob for token, entry in out.outputs[0].logprobs[0].items()} for out in outputs
        ],
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    import vllm

    jobs = json.load(open(sys.argv[1]))
    results = {"vllm": vllm.__version__, "models": []}
    for job in jobs:
        try:
            results["models"].append(run(job))
        except Exception as exc:  # report every model, not just the first failure
            results["models"].append({"model": job["model"], "error": f"{type(exc).__name__}: {exc}"[:4000]})
        json.dump(results, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":  # vLLM may start workers by spawn, which re-imports this file
    main()
