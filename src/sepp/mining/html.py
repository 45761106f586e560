"""``pairs.html``: one self-contained page to browse what mining kept (thumbnails inline as base64 JPEG; no
server, no network, no script).

Three sections, capped so that the page opens fast on ImageNet (``EDGE + SAMPLE`` anchors, ``ALONE`` images):
the least similar pairs kept (anchors ordered by their least similar partner, lowest first: the edge of the
threshold, where wrong pairs live), a random sample of anchors, and images that got no partner. Partners are
shown least similar first with their cosine similarity. With labels (used here for display only), class
names are shown and wrong-class partners are framed red and marked "✗"; without labels the page has no
label-dependent element at all.
"""
from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from sepp.fileio import atomic_write
from sepp.mining.stats import pair_correct

EDGE, SAMPLE, ALONE = 150, 150, 60  # anchors at the edge, random anchors, images without a partner
PARTNERS = 8  # partners shown per anchor (least similar first)
THUMB = 88  # thumbnail side in pixels

STYLE = """body{font:13px sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:24px}p.note{color:#555;max-width:70em}
.row{display:inline-flex;gap:4px;margin:3px;padding:4px;background:#fff;border:1px solid #ddd;vertical-align:top}
figure{margin:0;width:%dpx;text-align:center}
figure img{width:%dpx;height:%dpx;object-fit:cover;display:block;border:3px solid transparent}
figure.anchor img{border-color:#333}
figcaption{font-size:11px;line-height:1.2;overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
.grid{display:flex;flex-wrap:wrap;gap:4px}""" % (THUMB + 6, THUMB, THUMB)
LABEL_STYLE = "figure.wrong img{border-color:#d62728}figure.wrong figcaption{color:#d62728}"  # with labels only


def thumbnail(image: Image.Image, size: int = THUMB) -> str:
    """``data:image/jpeg;base64,...`` of a centre-cropped square thumbnail."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    small = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Page:
    """Thumbnails (each image encoded once) and the figure markup of one page."""

    def __init__(self, load_image: Callable[[int], Image.Image], labels, classes, names):
        self.load_image, self.labels, self.classes, self.names = load_image, labels, classes, names
        self.thumbs: dict[int, str] = {}

    def label(self, t: int) -> str | None:
        if self.labels is None or self.labels[t] < 0:
            return None
        c = int(self.labels[t])
        return self.classes[c] if self.classes is not None and c < len(self.classes) else str(c)

    def figure(self, t: int, kind: str, caption: str, sim: float | None = None, anchor: int | None = None) -> str:
        if t not in self.thumbs:
            self.thumbs[t] = thumbnail(self.load_image(t))
        title = f"image {t}" + (f": {os.path.basename(str(self.names[t]))}" if self.names is not None else "")
        name = self.label(t)
        wrong = anchor is not None and name is not None and self.label(anchor) not in (None, name)
        classes = kind + (" wrong" if wrong else "")
        extra = f' data-sim="{sim:.4f}"' if sim is not None else ""
        label = f'<br><span class="label">{"✗ " if wrong else ""}{html.escape(name)}</span>' if name else ""
        return (f'<figure class="{classes}" data-index="{t}"{extra} title="{html.escape(title)}">'
                f'<img src="{self.thumbs[t]}" alt="{html.escape(title)}"><figcaption>{caption}{label}</figcaption>'
                "</figure>")

    def row(self, a: int, js: np.ndarray, sims: np.ndarray) -> str:
        cells = [self.figure(a, "anchor", f"#{a}")]
        cells += [self.figure(int(b), "partner", f"{s:.3f}", float(s), a) for b, s in zip(js, sims)]
        return f'<div class="row" data-anchor="{a}">' + "".join(cells) + "</div>"


def _groups(i, j, sim) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """anchor -> (partners, similarities), least similar first."""
    order = np.lexsort((sim, i))
    i, j, sim = i[order], j[order], sim[order]
    starts = np.flatnonzero(np.r_[True, i[1:] != i[:-1]]) if len(i) else np.array([], np.int64)
    ends = np.r_[starts[1:], len(i)]
    return {int(i[s]): (j[s:e], sim[s:e]) for s, e in zip(starts, ends)}


def _summary(n: int, i, j, sim, labels, shown: int) -> str:
    """The page's first paragraphs: sizes and similarity range; with labels, the precision and the legend."""
    anchors = len(np.unique(i))
    text = (f"{n} images, {len(i)} pairs; {anchors} images ({100 * anchors / max(n, 1):.1f} %) have a partner of "
            f"their own. Shown: {shown} anchors with up to {PARTNERS} partners each (least similar first).")
    if len(sim):
        text += f" Cosine similarity of kept pairs: {float(sim.min()):.3f} to {float(sim.max()):.3f}."
    out = f'<p class="note">{text}</p>'
    known, correct = pair_correct(i, j, labels)
    if known.any():
        out += (f'<p class="note precision">Label precision {100 * correct[known].mean():.1f} % of '
                f'{int(known.sum())} labelled pairs (labels are shown, never used for mining); wrong-class '
                'partners are framed red and marked ✗.</p>')
    return out


def _sections(page: _Page, groups: dict, n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """``(id, title, note, markup)`` of the three sections."""
    rng = np.random.default_rng(seed)
    by_edge = sorted(groups, key=lambda a: (float(groups[a][1][0]), a))
    edge = by_edge[:EDGE]
    rest = np.array(by_edge[EDGE:], np.int64)
    sample = sorted(rng.choice(rest, size=min(SAMPLE, len(rest)), replace=False).tolist()) if len(rest) else []
    lonely = np.setdiff1d(np.arange(n), np.fromiter(groups, np.int64, len(groups)))
    alone = sorted(rng.choice(lonely, size=min(ALONE, len(lonely)), replace=False).tolist()) if len(lonely) else []

    def rows(anchors) -> str:
        return "".join(page.row(a, groups[a][0][:PARTNERS], groups[a][1][:PARTNERS]) for a in anchors)

    return [
        ("edge", f"Least similar pairs kept ({len(edge)} of {len(groups)} anchors)",
         "Anchors ordered by their least similar partner, lowest first: the edge of the threshold, where "
         "wrong pairs are most likely.", rows(edge)),
        ("sample", f"Random sample ({len(sample)} further anchors)", "Anchors drawn at random (seeded) from the "
         "rest.", rows(sample)),
        ("alone", f"Images with no partner ({len(alone)} of {len(lonely)})", "Images drawn at random among those "
         "that got no partner of their own.",
         '<div class="grid">' + "".join(page.figure(int(t), "alone", f"#{t}") for t in alone) + "</div>"),
    ]


def pairs_page(load_image: Callable[[int], Image.Image], i, j, sim, path: str | os.PathLike, num_images: int,
               labels=None, classes: Sequence[str] | None = None, names: Sequence[str] | None = None,
               seed: int = 0) -> None:
    """Write ``path`` (``pairs.html``) for the pairs ``(i, j, sim)`` over ``num_images`` images;
    ``load_image(t)`` returns image ``t`` (PIL), ``names`` (e.g. file paths) become tooltips."""
    i, j, sim = np.asarray(i, np.int64), np.asarray(j, np.int64), np.asarray(sim, np.float32)
    labels = None if labels is None else np.asarray(labels, np.int64)
    page = _Page(load_image, labels, classes, names)
    sections = _sections(page, _groups(i, j, sim), num_images, seed)
    shown = sum(body.count('class="row"') for _, _, _, body in sections)
    nav = " · ".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _, _ in sections)
    style = STYLE + (LABEL_STYLE if labels is not None else "")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>Mined pairs</title>',
             f"<style>{style}</style></head><body>", "<h1>Mined semantic pairs</h1>",
             _summary(num_images, i, j, sim, labels, shown), f"<nav>{nav}</nav>"]
    for sid, title, note, body in sections:
        parts += [f'<section id="{sid}"><h2>{html.escape(title)}</h2><p class="note">{note}</p>', body, "</section>"]
    parts.append("</body></html>")
    text = "\n".join(parts).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))
