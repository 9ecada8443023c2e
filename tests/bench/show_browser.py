"""The page of `python -m common.show` in a real browser: headless Chromium (Debian's `chromium` package, not
a CI dependency) loads it, a hex is typed into the field and Enter pressed, the "Sample a new group" button is
clicked, and the page is checked and photographed after each, through the DevTools protocol (a small
WebSocket client below: the standard library only).

    apt-get install chromium                                   # once
    python tests/bench/show_browser.py [RUN_DIR ...]     # ~10 s; PASS/FAIL lines, exit status 1 on a FAIL
    python tests/bench/show_browser.py runs/grpo__poet__1__... --out tests/bench/results

Screenshots: show_hex.png (after typing the hex), show_group.png (after sampling a group), show.png (the
whole page), in --out (default: tests/bench/results).
"""

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from urllib.parse import urlparse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEX = "#1f6357"


class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: text frames out (masked), frames in."""

    def __init__(self, url: str):
        address = urlparse(url)
        self.sock = socket.create_connection((address.hostname, address.port), timeout=120)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {address.path} HTTP/1.1", f"Host: {address.netloc}", "Upgrade: websocket",
                   "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", "", "")
        self.sock.sendall("\r\n".join(request).encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self.sock.recv(1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            sys.exit(f"the browser refused the DevTools connection: {head[:200]!r}")

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        if n >= 65536:
            length = bytes([0x80 | 127]) + n.to_bytes(8, "big")
        self.sock.sendall(bytes([0x81]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                sys.exit("the browser closed the DevTools connection")
            data += chunk
        return data

    def receive(self) -> str:
        message = b""
        while True:
            first, second = self.exact(2)
            n = second & 0x7F
            n = int.from_bytes(self.exact(2 if n == 126 else 8), "big") if n in (126, 127) else n
            payload = self.exact(n)
            if first & 0x0F in (0x9, 0xA):  # ping, pong
                continue
            message += payload
            if first & 0x80:
                return message.decode()


class Browser:
    def __init__(self, url: str):
        self.ws, self.id = WebSocket(url), 0

    def call(self, method: str, **params) -> dict:
        self.id += 1
        self.ws.send(json.dumps({"id": self.id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.receive())
            if reply.get("id") == self.id:
                if "error" in reply:
                    sys.exit(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 120):
        end = time.time() + seconds
        while time.time() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.3)
        sys.exit(f"timed out waiting for: {expression}")

    def screenshot(self, path: str, whole: bool = False) -> None:
        params = dict(format="png", captureBeyondViewport=whole)
        if whole:
            height = self.js("document.documentElement.scrollHeight")
            params["clip"] = dict(x=0, y=0, width=1100, height=height, scale=1)
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("run_dirs", nargs="*")
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "bench", "results"))
    cli = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium here: apt-get install chromium (Debian's package)")
    port, debug = free_port(), free_port()
    page = subprocess.Popen([sys.executable, "-m", "common.show", "--port", str(port), *cli.run_dirs],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    profile = tempfile.mkdtemp(prefix="show_browser_")
    browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                "--hide-scrollbars", f"--remote-debugging-port={debug}", "--remote-allow-origins=*",
                                f"--user-data-dir={profile}", "--window-size=1100,1300", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checks = []
    try:
        line = page.stdout.readline()
        if "http://" not in line:
            sys.exit(f"python -m common.show did not start: {line}")
        url = line.split()[2]
        for _ in range(100):  # the browser's DevTools endpoint
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{debug}/json/list", timeout=5))
                break
            except OSError:
                time.sleep(0.2)
        target = next(t for t in targets if t["type"] == "page")
        b = Browser(target["webSocketDebuggerUrl"])
        b.call("Page.enable")
        b.call("Page.navigate", url=url + "?painter=1")  # the first run given or found (the poet's)
        t0 = time.time()
        b.wait_for("document.querySelectorAll('#group .rollout:not(.head)').length > 0")
        checks.append(("the page loads, names the default hex, samples a group", True, f"{time.time() - t0:.0f} s"))
        # type a hex into the field and press Enter, as a person would
        b.js("const f = document.getElementById('hex'); f.focus(); f.select(); true")
        b.call("Input.insertText", text=HEX)
        for kind in ("keyDown", "keyUp"):
            b.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
        region = b.wait_for(f"document.getElementById('region').textContent.startsWith('{HEX}') && "
                            "document.getElementById('region').textContent")  # fmt: skip
        rows = b.js("document.querySelectorAll('#names tbody tr').length")
        painters = b.js("document.getElementById('painter').options.length")
        checks.append(("typing a hex: every painter names it", rows == painters, f"{region}; {rows} painters"))
        b.screenshot(os.path.join(cli.out, "show_hex.png"))
        # click "Sample a new group"
        before = b.js("document.getElementById('group').textContent")
        box = b.js("JSON.stringify(document.getElementById('sample').getBoundingClientRect())")
        box = json.loads(box)
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        for kind in ("mousePressed", "mouseReleased"):
            b.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        b.wait_for(f"document.getElementById('group').textContent !== {json.dumps(before)} && "
                   f"document.getElementById('group').textContent.includes('{HEX}')")  # fmt: skip
        rows = b.js("[...document.querySelectorAll('#group .rollout:not(.head)')].map(r => [r.className, "
                    "Number(r.children[3].textContent)])")  # fmt: skip
        mean = float(b.js("document.querySelector('#group .legend').textContent.split('group mean ')[1]"))
        right = all(("above" in k) == (r > mean + 1e-3) and ("below" in k) == (r < mean - 1e-3)
                    for k, r in rows if abs(r - mean) > 1e-3)  # fmt: skip
        above = sum("above" in k for k, _ in rows)
        checks.append(("a new group: rollouts above the mean highlighted, below dimmed",
                       len(rows) == 8 and right, f"{len(rows)} rollouts, {above} above the mean {mean:.3f}"))
        b.js("document.getElementById('group').scrollIntoView(); true")
        b.screenshot(os.path.join(cli.out, "show_group.png"))
        b.js("window.scrollTo(0, 0); true")
        b.screenshot(os.path.join(cli.out, "show.png"), whole=True)
        error = b.js("document.getElementById('error').textContent")
        checks.append(("no error on the page", not error, error or "-"))
    finally:
        browser.terminate()
        page.terminate()
        shutil.rmtree(profile, ignore_errors=True)
    for what, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}  ({detail})")
    shots = [os.path.join(cli.out, name) for name in ("show_hex.png", "show_group.png", "show.png")]
    print(f"screenshots: {', '.join(shots)}")
    sys.exit(0 if all(ok for _, ok, _ in checks) else 1)


if __name__ == "__main__":
    main()
