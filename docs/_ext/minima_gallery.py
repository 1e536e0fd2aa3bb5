"""The gallery's image scraper for figures made without pyplot.

minima's drawing functions build :class:`matplotlib.figure.Figure` objects directly (no pyplot state: a library
must not open windows or leak figures), which sphinx-gallery's matplotlib scraper, reading pyplot's figure list,
does not see. This scraper saves every such figure that an example's code block left in its globals, once.
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure


def figures_in_globals(block: Any, block_vars: dict[str, Any], gallery_conf: dict[str, Any]) -> str:
    """Save the Figures (not managed by pyplot) that first appear in the example's globals after this block."""
    from sphinx_gallery.scrapers import figure_rst

    seen = gallery_conf.setdefault("_minima_seen_figures", {}).setdefault(block_vars["src_file"], set())
    paths = []
    for value in list(block_vars["example_globals"].values()):
        if isinstance(value, Figure) and value.canvas.manager is None and id(value) not in seen:
            seen.add(id(value))
            path = next(block_vars["image_path_iterator"])
            value.savefig(path, dpi=110)
            paths.append(path)
    return figure_rst(paths, gallery_conf["src_dir"])
