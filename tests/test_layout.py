"""The shape every algorithm file keeps (STYLE): docstring, imports, Args, the algorithm's functions, main
last; at most 450 lines (ppo_rlhf.py 520) at the formatter's 110 columns (.ruff.toml; common/, tests/ too)."""

import ast
import glob
import os

import pytest

from conftest import ROOT

SCRIPTS = ["sft.py", "reward_model.py", "dpo.py", "grpo.py", "reinforce.py", "ppo_rlhf.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_algorithm_file_reads_docstring_imports_args_functions_main(script):
    source = open(os.path.join(ROOT, script), encoding="utf-8").read()
    body = ast.parse(source).body
    assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)  # the docstring
    kinds = [type(node).__name__ for node in body[1:]]
    first_class = kinds.index("ClassDef")
    assert set(kinds[:first_class]) <= {"Import", "ImportFrom"} and body[1 + first_class].name == "Args"
    functions = [node.name for node in body if isinstance(node, ast.FunctionDef)]
    assert functions[-1] == "main" and isinstance(body[-1], ast.If)  # if __name__ == "__main__": main(...)
    assert len(source.splitlines()) <= (520 if script == "ppo_rlhf.py" else 450)
    assert "# ALGO" in source


def test_no_line_is_wider_than_the_formatter_allows():
    paths = SCRIPTS + glob.glob("common/*.py") + glob.glob("tests/*.py")
    wide = [
        f"{path}:{number}"
        for path in paths
        for number, line in enumerate(open(os.path.join(ROOT, path), encoding="utf-8"), 1)
        if len(line.rstrip("\n")) > 110 and "http" not in line
    ]
    assert not wide, wide
