"""The README's Python examples run as written (on the embedded model)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE_MODEL = "~/.cache/soljax/models/smollm2-135m-instruct"


@pytest.mark.embedded
def test_python_examples_run(embedded_model):
    from soljax.data.embedded import embedded_model_dir

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python example"
    for code in blocks:
        # the example names the default cache; the tests may use another one
        exec(compile(code.replace(EXAMPLE_MODEL, str(embedded_model_dir())), "README.md", "exec"), {})
