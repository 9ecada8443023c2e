"""Rebuild the colour data shipped in this folder (run once, by hand; nothing here runs at train time).

    npm pack color-name-list@14.51.0                  # MIT, David Aerne: ~32k named colours
    pip download --no-deps matplotlib==3.11.2         # only for its CC0 copy of the xkcd colour survey
    python common/assets/build.py color-name-list-14.51.0.tgz matplotlib-3.11.2-*.whl

Writes colornames.csv.gz (name,hex,bestof), LICENSE.color-name-list and xkcd.csv (name,hex; the
survey's few names with 'shit' in them left out).
"""

import ast
import csv
import gzip
import io
import os
import sys
import tarfile
import zipfile

here = os.path.dirname(os.path.abspath(__file__))
npm_tgz, mpl_wheel = sys.argv[1], sys.argv[2]

with tarfile.open(npm_tgz) as tar:
    read = lambda name: tar.extractfile(f"package/{name}").read().decode()
    rows = list(csv.DictReader(io.StringIO(read("dist/colornames.csv"))))
    bestof = {r["name"] for r in csv.DictReader(io.StringIO(read("dist/colornames.bestof.csv")))}
    with open(os.path.join(here, "LICENSE.color-name-list"), "w") as f:
        f.write(read("LICENSE"))
with gzip.GzipFile(os.path.join(here, "colornames.csv.gz"), "wb", mtime=0) as gz:
    out = io.TextIOWrapper(gz, encoding="utf-8", newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "hex", "bestof"])
    for r in rows:
        writer.writerow([r["name"], r["hex"].lower(), int(r["name"] in bestof)])
    out.flush()

# matplotlib/_color_data.py holds XKCD_COLORS = {"cloudy blue": "#acc2d9", ...} (CC0, xkcd colour survey)
source = zipfile.ZipFile(mpl_wheel).read("matplotlib/_color_data.py").decode()
tree = ast.parse(source)
xkcd = next(
    ast.literal_eval(n.value)
    for n in tree.body
    if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "XKCD_COLORS"
)
with open(os.path.join(here, "xkcd.csv"), "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["name", "hex"])
    xkcd = {name: hex_ for name, hex_ in xkcd.items() if "shit" not in name}  # kept out of a demo model
    for name, hex_ in sorted(xkcd.items()):
        writer.writerow([name.removeprefix("xkcd:").title(), hex_.lower()])
print(f"{len(rows)} colour names ({len(bestof)} best-of), {len(xkcd)} xkcd names")
