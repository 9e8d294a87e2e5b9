"""The demo's own lm-evaluation-harness tasks, written as local files (no hub): its held-out arithmetic problems.

- ``moekit_arithmetic``: ``generate_until`` (greedy, up to a newline), exact match on the first
  number of the answer (lm-eval's regex filter);
- ``moekit_arithmetic_choice``: multiple choice between the answer and three near misses
  (answer + 1, - 1, + 10, in an order fixed per problem); accuracy and length-normalised accuracy.

The problems are :func:`moekit.tasks.arithmetic_problems`: drawn like the demo's math domain,
none of them a line the demo trains on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from moekit.tasks import arithmetic_problems

GENERATE_TASK = "moekit_arithmetic"
CHOICE_TASK = "moekit_arithmetic_choice"

_GENERATE_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 8
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

_CHOICE_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_arithmetic_tasks(folder: Path, count: int) -> list[str]:
    """Write both tasks (YAML and JSONL, absolute paths) for ``count`` problems into ``folder``; return their names."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    problems = arithmetic_problems(count)
    shuffle = random.Random(0)
    with (
        open(folder / "arithmetic.jsonl", "w", encoding="utf-8") as generate,
        open(folder / "arithmetic_choice.jsonl", "w", encoding="utf-8") as choice,
    ):
        for problem in problems:
            generate.write(json.dumps({"question": problem.prompt, "answer": problem.answer}) + "\n")
            answer = int(problem.answer)
            options = [answer, answer + 1, answer - 1, answer + 10]
            shuffle.shuffle(options)
            record = {"question": problem.prompt, "choices": [f" {o}" for o in options], "label": options.index(answer)}
            choice.write(json.dumps(record) + "\n")
    (folder / "arithmetic.yaml").write_text(
        _GENERATE_YAML.format(task=GENERATE_TASK, data=folder / "arithmetic.jsonl"), encoding="utf-8"
    )
    (folder / "arithmetic_choice.yaml").write_text(
        _CHOICE_YAML.format(task=CHOICE_TASK, data=folder / "arithmetic_choice.jsonl"), encoding="utf-8"
    )
    return [GENERATE_TASK, CHOICE_TASK]
