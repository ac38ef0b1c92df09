"""Importing a program does no work (DESIGN.md: tests import train_gpt2, fineweb, hellaswag): no tokenizer, no
device, and none of the heavy or circular imports that only a command needs. Each in a fresh interpreter, as a
user's `import` would be."""
import subprocess
import sys

import pytest
from conftest import ROOT

# module -> what importing it must not load. hellaswag.py must not load train_gpt2: under `python train_gpt2.py` a
# second copy would be loaded, with classes of its own.
NOT_AT_IMPORT = {
    "train_gpt2": {"transformers", "tiktoken"},
    "fineweb": {"tiktoken", "datasets", "pyarrow"},
    "hellaswag": {"train_gpt2", "transformers", "tiktoken"},
    "plot": {"matplotlib"},
}


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(NOT_AT_IMPORT))
def test_importing_does_no_work(module):
    code = (f"import sys, torch, common, {module}\n"
            f"loaded = {sorted(NOT_AT_IMPORT[module])!r}\n"
            "assert not set(loaded) & set(sys.modules), set(loaded) & set(sys.modules)\n"
            "assert common.get_tokenizer.cache_info().currsize == 0, 'a tokenizer was made'\n"
            "assert not torch.cuda.is_initialized(), 'a device was queried'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
