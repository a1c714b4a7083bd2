"""Local lm-eval tasks over tests/eval/data, shared by the eval tests (no network)."""
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

TASKS = {
    "tiny_mc": """
task: tiny_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/mc.jsonl}}}}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
""",
    "tiny_ppl": """
task: tiny_ppl
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/ppl.jsonl}}}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
metadata: {{version: 1.0}}
""",
    "tiny_gen": """
task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/gen.jsonl}}}}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n", "."], max_gen_toks: 6, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
""",
}


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """A folder of task YAMLs for ``include_path``."""
    root = tmp_path_factory.mktemp("tasks")
    for name, text in TASKS.items():
        (root / f"{name}.yaml").write_text(text.format(data=DATA.resolve()))
    return root
