"""pairs.html (sepp.mining.html): structure read back with html.parser; with and without labels; the caps."""
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from sepp.mining import html as page


class Figures(HTMLParser):
    """Every figure (its section, row anchor, classes, data-sim), every img src, and the classes used."""

    def __init__(self):
        super().__init__()
        self.section, self.anchor, self.figures, self.srcs, self.classes, self.links = None, None, [], [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.classes.update((a.get("class") or "").split())
        self.links += [v for k, v in attrs if k in ("href", "src") and v and not v.startswith(("#", "data:"))]
        if tag == "section":
            self.section = a["id"]
        elif tag == "div" and "data-anchor" in a:
            self.anchor = int(a["data-anchor"])
        elif tag == "figure":
            self.figures.append({"section": self.section, "row": self.anchor, "class": a["class"].split(),
                                 "index": int(a["data-index"]),
                                 "sim": float(a["data-sim"]) if "data-sim" in a else None})
        elif tag == "img":
            self.srcs.append(a["src"])


def _images(n):
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, (n, 3), dtype=np.uint8)
    return lambda t: Image.fromarray(np.broadcast_to(colours[t], (20, 30, 3)).copy())


def _write(tmp_path, i, j, sim, n, labels=None):
    path = tmp_path / "pairs.html"
    classes = ["cat", "dog"] if labels is not None else None
    page.pairs_page(_images(n), i, j, sim, path, n, labels=labels, classes=classes)
    parsed = Figures()
    text = path.read_text(encoding="utf-8")
    parsed.feed(text)
    return text, parsed


def test_edge_rows_come_least_similar_first_with_wrong_partners_marked(tmp_path):
    i = np.array([0, 0, 1, 2, 2, 3])
    j = np.array([1, 2, 0, 3, 0, 2])
    sim = np.array([0.9, 0.4, 0.9, 0.7, 0.4, 0.7], np.float32)
    labels = np.array([0, 0, 1, 1, 0, 0])  # pairs 0-2 and 2-0 are wrong-class; image 4, 5 get no partner
    text, p = _write(tmp_path, i, j, sim, 6, labels)
    edge = [f for f in p.figures if f["section"] == "edge"]
    anchors = [f["index"] for f in edge if "anchor" in f["class"]]
    assert anchors == [0, 2, 3, 1]  # by least similar partner: 0.4 (0), 0.4 (2), 0.7 (3), 0.9 (1)
    assert [(f["row"], f["index"], f["sim"]) for f in edge if "partner" in f["class"]] == \
        [(0, 2, np.float32(0.4)), (0, 1, np.float32(0.9)), (2, 0, np.float32(0.4)), (2, 3, np.float32(0.7)),
         (3, 2, np.float32(0.7)), (1, 0, np.float32(0.9))]
    wrong = [(f["row"], f["index"]) for f in p.figures if "wrong" in f["class"]]
    assert wrong == [(0, 2), (2, 0)]
    assert sorted(f["index"] for f in p.figures if f["section"] == "alone") == [4, 5]
    assert not [f for f in p.figures if f["section"] == "sample"]  # every anchor is already at the edge
    assert "label" in p.classes and "precision" in p.classes and "✗ cat" in text and "66.7 %" in text
    assert all(s.startswith("data:image/jpeg;base64,") for s in p.srcs) and not p.links and len(p.srcs) == 12


def test_without_labels_the_page_has_no_label_dependent_element(tmp_path):
    i, j = np.array([0, 1, 2]), np.array([1, 0, 0])
    text, p = _write(tmp_path, i, j, np.array([0.8, 0.8, 0.5], np.float32), 5)
    assert [f["index"] for f in p.figures if "anchor" in f["class"]] == [2, 0, 1]
    assert not {"label", "wrong", "precision"} & p.classes
    assert "✗" not in text and "precision" not in text.lower()


def test_page_is_capped_and_thumbnails_are_shared(tmp_path):
    n = 2000
    rng = np.random.default_rng(1)
    i = np.repeat(np.arange(0, n, 2), 3)  # 1000 anchors, 3 partners each; the odd images have none
    j = (i + 2 * rng.integers(1, 50, len(i)) + 1) % n
    text, p = _write(tmp_path, i, j, rng.random(len(i)).astype(np.float32), n, labels=np.arange(n) % 2)
    rows = {(f["section"], f["row"]) for f in p.figures if f["row"] is not None and f["section"] != "alone"}
    assert len(rows) == page.EDGE + page.SAMPLE
    edge_rows = [r for s, r in rows if s == "edge"]
    sample_rows = [r for s, r in rows if s == "sample"]
    assert not set(edge_rows) & set(sample_rows)
    assert len([f for f in p.figures if f["section"] == "alone"]) == page.ALONE
    assert len(text) < 4_000_000 and len(set(p.srcs)) < len(p.srcs)
