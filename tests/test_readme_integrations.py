"""The python blocks of the README's "Use it with your trainer" section run as written."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _section_blocks(title="## Use it with your trainer"):
    text = open(README, encoding="utf-8").read()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    section = text[start:end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


BLOCKS = _section_blocks()


def test_section_has_hf_and_trl_snippets():
    assert len(BLOCKS) >= 3
    assert any("token_logprobs" in b for b in BLOCKS)
    assert any("GIFTTrainer" in b for b in BLOCKS) and any("use_gift_fast" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_runs(index):
    if "trl" in BLOCKS[index]:
        pytest.importorskip("trl")
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "readme"})
