"""`dvc plots show` renders offline: no script or style from the network, the Vega libraries
inlined, every Vega plot's spec renders with them (vl-convert's bundled Vega-Lite), and the page's
scripts parse as the classic scripts DVC's page loads them as. What is not checked here: a real
browser drawing the page (none is installed; checked by hand, README 'Plots')."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunery import dvc_plots

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("plots")
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "loss.csv").write_text(
        "step,loss\n" + "".join(f"{i},{1 / (i + 1)}\n" for i in range(9))
    )
    (root / "dvc.yaml").write_text("plots:\n  - loss.csv:\n      x: step\n      y: loss\n")
    dvc_plots.install(root)
    assert "tunery-plots.html" in (root / ".dvc" / "config.local").read_text()
    out = root / "shown"
    subprocess.run([BIN / "dvc", "plots", "show", "-o", out], cwd=root, check=True, timeout=120)
    return (out / "index.html").read_text(encoding="utf-8")


def test_the_page_loads_nothing_from_the_network(page):
    assert not re.findall(r"<script[^>]+src=", page), "scripts are inlined"
    assert "cdn.jsdelivr.net" not in page
    links = re.findall(r"<link[^>]+href=\"([^\"]+)\"", page)
    assert not [u for u in links if u.startswith(("http:", "https:", "//"))]
    assert "window.vegaEmbed=" in page.replace(" ", "")


def test_every_vega_plot_renders_with_the_inlined_vega_lite(page):
    import vl_convert

    specs = re.findall(r"var spec = (.*?);\s*vegaEmbed\(", page, flags=re.S)
    assert specs, "DVC wrote a Vega plot"
    for spec in specs:
        svg = vl_convert.vegalite_to_svg(json.loads(spec), vl_version=dvc_plots.VEGA_LITE)
        assert "<svg" in svg and "<path" in svg  # axes and the line were drawn


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to parse the scripts with")
def test_the_inlined_scripts_parse_as_classic_scripts(page, tmp_path):
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S)
    assert scripts
    for i, body in enumerate(scripts):
        (tmp_path / f"s{i}.js").write_text(body)
        done = subprocess.run(["node", "--check", tmp_path / f"s{i}.js"], capture_output=True)
        assert done.returncode == 0, done.stderr.decode()[-500:]
