"""python -m common.show: the page's JSON answers (each painter's name and its judges' scores, a group's
advantages equal to grpo.py's group_advantages and reinforce.py's RLOO on the same rewards, a run's collapse
by colour region, hand-worked), bad input as one line (page and console), and a page that fetches nothing
from outside the repository. In a real browser: tests/bench/show_browser.py."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch

import grpo
from common.show import JUDGES, collapse, parse_hex, region, serve
from common.task import get_judge
from conftest import ROOT, run_one_step, write_jsonl
from reinforce import baseline_advantages


def test_a_hex_is_read_and_placed_in_its_colour_region():
    assert parse_hex(" D48475") == parse_hex("#d48475") == "#d48475"
    with pytest.raises(ValueError, match="not a colour"):
        parse_hex("#d4847")
    # #d48475: hue 60 * (132 - 117) / (212 - 117) = 9.5 degrees, a red; #1f6357: 169 degrees, a cyan
    regions = [region(h) for h in ("#d48475", "#1f6357", "#2040c0", "#808080", "#fafafa", "#101010")]
    assert regions == ["reds", "cyans", "blues", "greys", "whites", "blacks"]


def test_a_collapse_is_the_distinct_share_per_eval_and_the_commonest_names_per_region(tmp_path):
    evals = [{"step": s, "eval/distinct": d} for s, d in [(0, 1.0), (100, 0.6), (200, 0.3)]]
    write_jsonl(tmp_path / "metrics.jsonl", evals[:2] + [{"step": 150, "train/loss": 0.1}] + evals[2:])
    ask = lambda step, hex_colour, name: {"step": step, "prompt": f"Name this paint color: {hex_colour}",
                                          "completion": name, "reward": 0.5}  # noqa: E731
    write_jsonl(tmp_path / "samples.jsonl", [
        ask(0, "#d48475", "Sunset Dust"), ask(200, "#d48475", "Blood Moon"),
        ask(200, "#c03030", "Blood Moon"), ask(200, "#e05050", "Rose"),
        ask(200, "#2040c0", "Blood Moon")])  # fmt: skip
    result = collapse(str(tmp_path))
    assert result["steps"] == [{"step": s, "distinct": d} for s, d in [(0, 1.0), (100, 0.6), (200, 0.3)]]
    assert result["last_step"] == 200
    assert result["regions"] == [
        {"region": "reds", "prompts": 3, "names": [("Blood Moon", 2), ("Rose", 1)]},
        {"region": "blues", "prompts": 1, "names": [("Blood Moon", 1)]},
    ]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The server on a free port with one short GRPO run of the painter; its address."""
    run_dir = run_one_step(grpo, tmp_path_factory.mktemp("runs"), eval_every=1)
    server = serve([run_dir], 0, runs=str(tmp_path_factory.mktemp("empty")))  # not the developer's runs/
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_each_painter_names_the_colour_with_every_judges_score(page):
    status, body = get(page + "/api/painters")
    assert status == 200 and len(body["painters"]) == 2 and body["painters"][0].startswith("the shipped")
    assert len(body["runs"]) == 1  # the run has evals: its collapse can be drawn
    status, body = get(page + "/api/name?hex=%23d48475")
    assert status == 200 and body["hex"] == "#d48475" and body["region"] == "reds"
    assert len(body["painters"]) == 2
    for row in body["painters"]:
        assert row["name"] and set(row["scores"]) == set(JUDGES)
        prompt = ["Name this paint color: #d48475"]
        expected = get_judge("correct")(prompt, [row["name"]])[0]
        assert row["scores"]["correct"] == pytest.approx(expected, abs=1e-4)


def test_a_group_gets_grpos_advantages_and_rloos_baseline_on_its_rewards(page):
    status, body = get(page + "/api/group?hex=%231f6357&painter=1&g=8&judge=correct&seed=3")
    assert status == 200 and len(body["names"]) == len(body["rewards"]) == 8
    prompts = ["Name this paint color: #1f6357"] * 8
    rewards = torch.tensor(get_judge("correct")(prompts, body["names"]))[None]
    assert body["rewards"] == pytest.approx(rewards[0].tolist())
    rewards = torch.tensor(body["rewards"])[None]
    assert body["advantages"] == grpo.group_advantages(rewards, "group")[0].tolist()
    assert body["advantages_unscaled"] == grpo.group_advantages(rewards, "none")[0].tolist()
    assert body["rloo"] == baseline_advantages(rewards, "rloo")[0][0].tolist()
    assert body["mean"] == pytest.approx(float(rewards.mean()))
    again = get(page + "/api/group?hex=%231f6357&painter=1&g=8&judge=correct&seed=4")[1]
    assert again["names"] != body["names"]  # a new group


def test_a_runs_collapse_is_read_from_its_folder(page):
    status, body = get(page + "/api/collapse?run=0")
    assert status == 200 and [s["step"] for s in body["steps"]] == [0, 1]
    assert sum(r["prompts"] for r in body["regions"]) == 4  # the eval's four prompts, each in one region


@pytest.mark.parametrize(
    "question, message",
    [("/api/name?hex=%23zz8475", "is not a colour"), ("/api/name", "is not a colour"),
     ("/api/group?hex=%23d48475&g=1", "pick 2 to 16"),
     ("/api/group?hex=%23d48475&painter=9", "does not exist"),
     ("/api/collapse?run=7", "does not exist"), ("/api/group?hex=%23d48475&g=two", "bad request"),
     ("/api/secrets", "not a question")],
)  # fmt: skip
def test_bad_input_is_one_line_on_the_page(page, question, message):
    status, body = get(page + question)
    assert status == 400 and message in body["error"] and "\n" not in body["error"]


def show(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.show", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_bad_input_is_one_line_on_the_console(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [((str(tmp_path / "missing"),), "does not exist"), ((str(tmp_path),), "is not a run folder"),
                 (("--port", str(taken.getsockname()[1])), "is in use")]  # fmt: skip
        for argv, message in cases:
            result = show(*argv)
            assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
            assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_page_fetches_nothing_from_outside_the_repository():
    html = open(os.path.join(ROOT, "common", "show.html"), encoding="utf-8").read()
    assert not re.search(r"https?:|//[a-z]", html.replace("http-equiv", ""))  # no address outside
    assert not re.search(r"<(link|img|iframe|script)[^>]*(src|href)=", html)  # no file of its own either
    questions = {"/api/painters", "/api/name", "/api/group", "/api/collapse"}
    assert set(re.findall(r'"(/api/\w+)', html)) == questions  # only its own server's
