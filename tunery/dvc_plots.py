"""`dvc plots show` offline: DVC's page, with Vega inlined instead of loaded from a CDN.

DVC renders the declared plots into one HTML page whose `<head>` loads Vega, Vega-Lite and
Vega-Embed from cdn.jsdelivr.net (dvc_render's `VegaRenderer.SCRIPTS`); offline, only the images
render and every Vega plot (the loss and validation curves, the confusion matrices) is silently
missing. DVC lets a project name its own page template (`plots.html_template`, `--html-template`):
`install` writes one with the three libraries inlined — bundled by vl-convert-python, a pinned
dependency, so nothing is fetched — and names it in `.dvc/config.local` (this clone's settings;
the template is git-ignored and rebuilt by `tunery init`). The template keeps DVC's page; only
its `{scripts}` placeholder (the CDN tags) is replaced.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunery.io import atomic_path

log = logging.getLogger("tunery.dvc_plots")

TEMPLATE = "tunery-plots.html"  # in .dvc/, where DVC resolves a relative plots.html_template
VEGA_LITE = "5.21"  # DVC's plot templates are Vega-Lite v5 specs ($schema .../vega-lite/v5.json)


def _marker() -> str:
    import vl_convert

    return (
        f"<!-- tunery: vega {vl_convert.get_vega_version()}, vega-lite {VEGA_LITE}, "
        f"vega-embed {vl_convert.get_vega_embed_version()} -->"
    )


def page() -> str:
    """DVC's page template with the libraries inlined; `{plot_divs}` is still DVC's to fill."""
    import vl_convert
    from dvc_render.html import HTML, PAGE_HTML

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)  # sets window.vegaEmbed & co.
    # HTML.embed replaces `{plot_divs}`, `{scripts}` and `{refresh_tag}` in the whole page: a
    # bundle containing one of them would be corrupted, so check rather than assume.
    for name in (HTML.PLOTS_PLACEHOLDER, HTML.SCRIPTS_PLACEHOLDER, HTML.REFRESH_PLACEHOLDER):
        if "{" + name + "}" in bundle:
            raise RuntimeError(f"the Vega bundle contains DVC's placeholder {{{name}}}")
    scripts = f"{_marker()}\n<script>\n{bundle}\n</script>"
    return PAGE_HTML.replace("{" + HTML.SCRIPTS_PLACEHOLDER + "}", scripts)


def install(root: Path) -> Path:
    """Write `.dvc/tunery-plots.html` (unless it is current) and name it in `.dvc/config.local`."""
    dvc_dir = root / ".dvc"
    path = dvc_dir / TEMPLATE
    if not (path.is_file() and _marker() in path.read_text(encoding="utf-8")):
        with atomic_path(path) as tmp:
            tmp.write_text(page(), encoding="utf-8")
    from dvc.config import Config

    with Config(dvc_dir=str(dvc_dir)).edit("local") as conf:
        conf.setdefault("plots", {})["html_template"] = TEMPLATE
    return path
