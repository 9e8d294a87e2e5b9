"""Run by the transformers 4.57 reader venv (not collected by pytest): load models as older stacks do.

Usage: python reader_load.py JOBS.json RESULTS.json. Each job names a model directory, a file of
input ids and a file of reference logits (computed with transformers 5). For each it records the
loading info, the model class, the tokenizer class and the max |logit difference|.
"""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def check(job: dict) -> dict:
    remote = {"trust_remote_code": True} if job.get("remote_code") else {}  # moekit_moe: its code ships with it
    model, info = AutoModelForCausalLM.from_pretrained(
        job["model"], output_loading_info=True, torch_dtype=torch.float32, **remote
    )
    ids = torch.load(job["ids"])
    with torch.no_grad():
        logits = model(ids).logits
    reference = torch.load(job["logits"])
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    return {
        "model": job["model"],
        "class": type(model).__name__,
        "module": type(model).__module__,
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "max_abs_diff": float((logits - reference).abs().max()),
        "tokenizer": type(tokenizer).__name__,
        "token_ids": tokenizer(job["text"])["input_ids"],
    }


def main() -> None:
    jobs = json.load(open(sys.argv[1]))
    results = {"transformers": transformers.__version__, "models": []}
    for job in jobs:
        try:
            results["models"].append(check(job))
        except Exception as exc:  # report every model, not just the first failure
            results["models"].append({"model": job["model"], "error": f"{type(exc).__name__}: {exc}"})
    json.dump(results, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main()
