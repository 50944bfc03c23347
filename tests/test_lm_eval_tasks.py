"""The lm-eval task folder states its example counts, the command and the prompt convention.

(The harness run itself, offline on a tiny exported child, is `test_evaluate.py::
test_lm_eval_harness_reproduces_our_numbers`; `make test` installs lm-eval for it.)
"""

import yaml

from elasticmoe.data import build_default_corpus
from elasticmoe.evaluate import select_examples
from elasticmoe.lm_eval_tasks import write_lm_eval_tasks
from elasticmoe.tokenizer import PROMPT_CONVENTION


def test_task_folder_states_counts_command_and_convention(tmp_path):
    corpus = build_default_corpus(seed=0, scale=0.02, text_fraction=0.3)
    written = write_lm_eval_tasks(corpus, tmp_path, max_examples=7)
    readme = (tmp_path / "README.md").read_text()
    for name, path in written.items():
        task = name.removeprefix("elasticmoe_")
        n = len(select_examples(corpus.docs["test"][task], 7))
        assert yaml.safe_load(path.read_text())["metadata"]["examples"] == n
        assert f"| {name} | {n} |" in readme
    assert "`elasticmoe eval --examples 7` scores" in readme
    assert f"--include_path {tmp_path}" in readme and "lm-eval[hf]" in readme and "add_bos_token=False" in readme
    assert PROMPT_CONVENTION in readme
