"""The font-rendered glyph data set (skips without fonts, fails in CI)."""

import time

import numpy as np
import pytest
from conftest import require_system

from agent.data import glyphs, make_family, split_classes
from agent.data.glyphs import GlyphConfig, discover_fonts, load_glyphs, render_glyphs, script_of

TINY = GlyphConfig(samples=4, max_chars=5, max_scripts=6)


@pytest.fixture(scope="module")
def fonts():
    found = discover_fonts()
    require_system("fonts-noto-core / fonts-freefont-ttf", bool(found))
    pytest.importorskip("fontTools", reason="fontTools reads the font cmaps")
    return found


@pytest.fixture(scope="module")
def tiny(fonts):
    start = time.perf_counter()
    arrays = render_glyphs(TINY, fonts)
    return arrays, time.perf_counter() - start


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("META_AGENT_CACHE", str(tmp_path / "cache"))


def test_script_names():
    assert script_of("ARMENIAN CAPITAL LETTER AYB") == "ARMENIAN"
    assert script_of("NEW TAI LUE LETTER HIGH QA") == "NEW TAI LUE"
    assert script_of("CANADIAN SYLLABICS E") == "CANADIAN"
    assert script_of("LATIN CAPITAL LETTER A") is None and script_of("CJK UNIFIED IDEOGRAPH-4E00") is None
    assert script_of("ᚠ") == "RUNIC"
    assert glyphs._usable(ord("ä")) is None  # decomposes: accented Latin
    assert glyphs._usable(ord("б")) is None and glyphs._usable(ord("Б")) == "CYRILLIC"  # capitals only


def test_tiny_render(tiny):
    arrays, seconds = tiny
    x, y = arrays["images"], arrays["labels"]
    assert x.shape == (6 * 5 * 4, 28, 28) and x.dtype == np.uint8
    assert len(arrays["script_names"]) == 6 and len(np.unique(y)) == 30
    assert np.bincount(y).tolist() == [4] * 30
    assert (x.reshape(len(x), -1).max(axis=1) > 128).all()  # every image has ink
    assert (x[:, 0, :].mean() < 40) and x.mean() < 90  # dark background
    # a character keeps one script and one code point
    for lab in range(30):
        m = y == lab
        assert len(np.unique(arrays["script_ids"][m])) == 1 and len(np.unique(arrays["codepoints"][m])) == 1
    # samples of a character vary
    assert not np.array_equal(x[y == 0][0], x[y == 0][1])
    assert seconds < 20


def test_deterministic_and_independent_of_other_scripts(tiny, fonts):
    arrays, _ = tiny
    again = render_glyphs(TINY, fonts)
    np.testing.assert_array_equal(arrays["images"], again["images"])
    script = str(arrays["script_names"][0])
    alone = render_glyphs(GlyphConfig(samples=4, max_chars=5, scripts=(script,)), fonts)
    mask = arrays["script_ids"] == 0
    np.testing.assert_array_equal(alone["images"], arrays["images"][mask])
    np.testing.assert_array_equal(alone["codepoints"], arrays["codepoints"][mask])
    other = render_glyphs(GlyphConfig(samples=4, max_chars=5, scripts=(script,), seed=1), fonts)
    assert not np.array_equal(other["images"], alone["images"])


def test_cached_load_and_script_split(tiny, fonts, tmp_path, monkeypatch):
    data = load_glyphs(TINY, fonts)
    files = list((tmp_path / "cache").glob("glyphs-*.npz"))
    assert len(files) == 1
    np.testing.assert_array_equal(data.x, tiny[0]["images"])
    monkeypatch.setattr(glyphs, "render_glyphs", lambda *a, **k: pytest.fail("should come from the cache"))
    again = load_glyphs(TINY, fonts)
    np.testing.assert_array_equal(again.x, data.x)
    assert len(data.meta["codepoints"]) == 30 and data.group_names.tolist() == tiny[0]["script_names"].tolist()
    s = split_classes(data, by=True, seed=0)
    cg = data.class_groups()
    scripts = {k: {cg[int(c)] for c in v} for k, v in s.items()}
    assert [len(scripts[k]) for k in ("train", "val", "test")] == [4, 1, 1]
    assert not scripts["train"] & scripts["val"] and not scripts["train"] & scripts["test"]
    assert not scripts["val"] & scripts["test"]


def test_glyph_families_by_script(fonts):
    kw = dict(samples=4, max_chars=5, max_scripts=6, n_way=5, k_shot=1, k_query=3)
    fams = {split: make_family("glyphs", split=split, **kw) for split in ("train", "val", "test")}
    classes = {k: set(f.classes.tolist()) for k, f in fams.items()}
    assert not classes["train"] & classes["val"] and not classes["train"] & classes["test"]
    assert not classes["val"] & classes["test"]
    rng = np.random.default_rng(0)
    for split, fam in fams.items():
        for _ in range(5):
            s_idx, _, q_idx, _ = fam.sample_indices(rng)
            assert set(fam.dataset.y[np.r_[s_idx, q_idx]].tolist()) <= classes[split]
    task = fams["train"].sample(np.random.default_rng(1))
    assert task.support_x.shape == (5, 1, 28, 28) and task.query_x.shape == (15, 1, 28, 28)


def test_no_fonts_is_an_error(tmp_path):
    assert discover_fonts([tmp_path]) == []
    with pytest.raises(FileNotFoundError, match="no fonts"):
        load_glyphs(TINY, font_dirs=[tmp_path])


def test_font_dirs_from_env(fonts, monkeypatch):
    monkeypatch.setenv(glyphs.FONT_ENV_VAR, str(fonts[0].parent))
    assert fonts[0] in discover_fonts()
