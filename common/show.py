"""The paint post, from this repository's own models: a local page for any hex, one GRPO step, and a collapse.

    python -m common.show                          # the shipped painter, and the painters found under runs/
    python -m common.show runs/grpo__poet__1__...  # and these run folders (their model/ and their evals)

A standard-library HTTP server on 127.0.0.1 serves common/show.html (its own CSS and JavaScript, nothing from
the internet) and answers its questions in JSON, with the functions the scripts train with:
    /api/painters                      the painters (the shipped one, run folders) and the judges
    /api/name?hex=#d48475              what each painter names the colour, with every judge's score
    /api/group?hex=&painter=&g=&judge= G names from one painter, scored; their advantages by grpo.py's
                                       group_advantages and RLOO's baseline by reinforce.py's
    /api/collapse?run=N                a run's eval/distinct over its evals, and its commonest names per
                                       colour region at the last eval (samples.jsonl)
Bad input (an invalid hex, a run folder that is missing or not a run, a port in use) is one line: on the page
as {"error": ...} with HTTP 400, or on the console."""

import argparse
import colorsys
import glob
import json
import os
import re
import sys
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
JUDGES = ["correct", "poet", "architect", "unhinged"]
STYLES = ("poet", "architect", "unhinged")
REGIONS = ["reds", "oranges", "yellows", "greens", "cyans", "blues", "purples", "pinks", "whites", "greys",
           "blacks"]  # fmt: skip
HUES = [(15, "reds"), (45, "oranges"), (70, "yellows"), (160, "greens"), (200, "cyans"), (255, "blues"),
        (290, "purples"), (345, "pinks"), (360, "reds")]  # fmt: skip


class BadInput(ValueError):
    pass


def parse_hex(text: str | None) -> str:
    """'#d48475', 'd48475' or '#D48475' -> '#d48475'; anything else is bad input."""
    match = re.fullmatch(r"\s*#?([0-9a-fA-F]{6})\s*", text or "")
    if not match:
        raise BadInput(f"{text!r} is not a colour: type six hex digits, as #d48475")
    return "#" + match[1].lower()


def region(hex_colour: str) -> str:
    """The colour region a hex falls in: a hue band, or whites, greys and blacks when it is nearly grey."""
    r, g, b = (int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    hue, lightness, saturation = colorsys.rgb_to_hls(r, g, b)
    if lightness < 0.15:
        return "blacks"
    if saturation < 0.15 or lightness > 0.93:
        return "whites" if lightness > 0.8 else "greys"
    return next(name for top, name in HUES if hue * 360 < top)


def run_folder(path: str) -> dict:
    """A run folder of these scripts: its name, script, judge, and whether it has a model and evals."""
    path = path.rstrip("/")
    if not os.path.isdir(path):
        raise BadInput(f"run folder {path!r} does not exist: pass a folder under runs/")
    if not os.path.isfile(os.path.join(path, "args.json")):
        raise BadInput(f"{path!r} is not a run folder of these scripts (no args.json): pass one under runs/")
    with open(os.path.join(path, "args.json")) as f:
        args = json.load(f)
    model = os.path.join(path, "model")
    has_model = any(os.path.isfile(os.path.join(model, f)) for f in ("config.json", "adapter_config.json"))
    script = os.path.basename(path).split("__")[0]
    judge = args.get("judge") or "-"
    name = f"{judge} ({script}, {os.path.basename(path).split('__')[1]})"
    evals = os.path.isfile(f"{path}/samples.jsonl")
    return dict(path=path, name=name, script=script, judge=judge, model=model if has_model else None,
                evals=evals)


def found_painters(base: str = "runs") -> list[str]:
    """The newest run under `base` for each style judge (poet, architect, unhinged) that saved a model."""
    newest = {}
    for path in sorted(glob.glob(os.path.join(base, "*", "args.json")), key=os.path.getmtime):
        try:
            run = run_folder(os.path.dirname(path))
        except (BadInput, json.JSONDecodeError):
            continue
        style = next((s for s in STYLES if s in run["judge"]), None)
        if style and run["model"] and run["script"] != "reward_model":
            newest[style] = run["path"]
    return [newest[s] for s in STYLES if s in newest]


def collapse(path: str) -> dict:
    """eval/distinct at each eval of a run, and at its last eval the commonest names in each colour region."""
    distinct = []
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            if "eval/distinct" in row:
                distinct.append({"step": row["step"], "distinct": row["eval/distinct"]})
    with open(os.path.join(path, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    if not distinct or not samples:
        raise BadInput(f"{path!r} has no evals yet: run it longer, or pick another")
    last = max(s["step"] for s in samples)
    names = defaultdict(Counter)
    for sample in samples:
        colour = re.search(r"#[0-9a-fA-F]{6}", sample["prompt"])
        if sample["step"] == last and colour:
            names[region(parse_hex(colour[0]))][sample["completion"]] += 1
    regions = [{"region": r, "prompts": sum(names[r].values()), "names": names[r].most_common(3)}
               for r in REGIONS if names[r]]  # fmt: skip
    return {"steps": distinct, "last_step": last, "regions": regions}


class Show:
    """The painters, loaded once, and the judges; each answer a dict for the page."""

    def __init__(self, run_dirs: list[str], runs: str = "runs"):
        from .models import PAINTER

        sys.path.insert(0, ROOT)  # grpo.py and reinforce.py, whose functions the group uses
        self.runs = [run_folder(p) for p in run_dirs]
        seen = {os.path.realpath(r["path"]) for r in self.runs}
        self.runs += [run_folder(p) for p in found_painters(runs) if os.path.realpath(p) not in seen]
        self.painters = [dict(name="the shipped painter (base)", model=PAINTER)]
        self.painters += [dict(name=r["name"], model=r["model"]) for r in self.runs if r["model"]]
        self.models, self.judges = {}, {}

    def model(self, index: int):
        from .models import load_model_and_tokenizer

        if not 0 <= index < len(self.painters):
            raise BadInput(f"painter {index} does not exist: pick one of the {len(self.painters)} listed")
        if index not in self.models:
            self.models[index] = load_model_and_tokenizer(self.painters[index]["model"], device="cpu")
        return self.models[index]

    def judge(self, spec: str):
        from .task import get_judge

        if spec not in self.judges:
            self.judges[spec] = get_judge(spec, "cpu")
        return self.judges[spec]

    def names(self, index: int, hex_colour: str, n: int, seed: int) -> list[str]:
        """n names of one colour from painter `index`, sampled as in training (temperature 1), seeded."""
        from .task import generate

        model, tokenizer = self.model(index)
        prompt = f"Name this paint color: {hex_colour}"
        return generate(model, tokenizer, [prompt] * n, temperature=1.0, max_new_tokens=8, seed=seed)[0]

    def scores(self, hex_colour: str, names: list[str]) -> dict:
        prompts = [f"Name this paint color: {hex_colour}"] * len(names)
        return {j: [round(float(x), 4) for x in self.judge(j)(prompts, names)] for j in JUDGES}

    def answer(self, path: str, query: dict) -> dict:
        get = lambda key, default=None: query.get(key, [default])[0]  # noqa: E731
        if path == "/api/painters":
            runs = [dict(index=i, name=r["name"]) for i, r in enumerate(self.runs) if r["evals"]]
            return {"painters": [p["name"] for p in self.painters], "judges": JUDGES, "runs": runs}
        if path == "/api/name":
            hex_colour, seed = parse_hex(get("hex")), int(get("seed", 0))
            rows = []
            for i, painter in enumerate(self.painters):
                (name,) = self.names(i, hex_colour, 1, seed)
                scores = {j: s[0] for j, s in self.scores(hex_colour, [name]).items()}
                rows.append(dict(painter=painter["name"], name=name, scores=scores))
            return {"hex": hex_colour, "region": region(hex_colour), "painters": rows}
        if path == "/api/group":
            return self.group(parse_hex(get("hex")), int(get("painter", 0)), int(get("g", 4)),
                              get("judge", "poet+correct"), int(get("seed", 0)))  # fmt: skip
        if path == "/api/collapse":
            index = int(get("run", -1))
            if not 0 <= index < len(self.runs):
                raise BadInput(f"run {index} does not exist: pass its folder to python -m common.show")
            return {"run": self.runs[index]["name"], **collapse(self.runs[index]["path"])}
        raise BadInput(f"{path} is not a question this page asks")

    def group(self, hex_colour: str, index: int, G: int, spec: str, seed: int) -> dict:
        """One GRPO group, as the post draws it: G names, their rewards, the group mean, the advantages."""
        from grpo import group_advantages  # the scripts' own functions (ROOT is on the path: __init__)
        from reinforce import baseline_advantages

        if not 2 <= G <= 16:
            raise BadInput(f"a group of {G}: pick 2 to 16 rollouts")
        names = self.names(index, hex_colour, G, seed)
        rewards = torch.tensor(self.judge(spec)([f"Name this paint color: {hex_colour}"] * G, names))[None]
        return {"hex": hex_colour, "painter": self.painters[index]["name"], "judge": spec, "names": names,
                "rewards": rewards[0].tolist(), "mean": float(rewards.mean()),
                "advantages": group_advantages(rewards, "group")[0].tolist(),  # the paper's (r - mean) / std
                "advantages_unscaled": group_advantages(rewards, "none")[0].tolist(),  # grpo.py's default
                "rloo": baseline_advantages(rewards, "rloo")[0][0].tolist()}  # fmt: skip


def handler(show: Show):
    page = os.path.join(HERE, "show.html")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            if url.path in ("/", "/index.html"):
                with open(page, "rb") as f:
                    return self.reply(200, f.read(), "text/html; charset=utf-8")
            try:
                body, status = show.answer(url.path, parse_qs(url.query)), 200
            except (BadInput, FileNotFoundError) as e:
                body, status = {"error": str(e)}, 400
            except ValueError as e:  # a number that is not one
                body, status = {"error": f"bad request: {e}"}, 400
            self.reply(status, json.dumps(body).encode(), "application/json")

        def reply(self, status: int, body: bytes, kind: str):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: the console keeps the address
            pass

    return Handler


def serve(run_dirs: list[str], port: int, runs: str = "runs") -> HTTPServer:
    """The server on 127.0.0.1:port (0: any free port), not yet serving; painters are also looked for in
    `runs`."""
    try:
        return HTTPServer(("127.0.0.1", port), handler(Show(run_dirs, runs)))
    except OSError as e:
        raise BadInput(f"port {port} is in use ({e.strerror}): pass another with --port") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.show", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("run_dirs", nargs="*", help="run folders of these scripts (runs/<script>__...)")
    parser.add_argument("--port", type=int, default=8765, help="the page's port on 127.0.0.1 (0: any free)")
    cli = parser.parse_args(argv)
    try:
        server = serve(cli.run_dirs, cli.port)
    except BadInput as e:
        sys.exit(f"python -m common.show: error: {e}")
    print(f"the page: http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


if __name__ == "__main__":
    main()
