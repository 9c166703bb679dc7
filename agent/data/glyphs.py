"""Glyphs: an Omniglot-like data set rendered from the system's fonts.

Omniglot cannot be downloaded here, so this builds its analogue: characters of many writing
systems, each drawn several times with variation, split by script the way Omniglot is split by
alphabet. The ingredients:

* **Fonts**: Debian's ``fonts-noto-core`` and ``fonts-freefont-ttf`` (``Noto*``/``Free*`` files
  under ``/usr/share/fonts``; ``$META_AGENT_FONT_DIRS`` or ``font_dirs=`` override the search).
* **Characters**: each font's cmap (read with fontTools) gives the code points it covers. A
  code point's script is the part of its Unicode name before the role word (``TAI THAM`` in
  "TAI THAM LETTER HIGH KA", ``CHEROKEE`` in "CHEROKEE LETTER A"). Only letters and digits
  without a compatibility decomposition are kept (no accented Latin, presentation forms or
  mathematical alphanumerics), lower case is dropped when its capital exists, Latin and CJK
  are left out, and glyphs whose clean rendering is empty or duplicates another character of
  the script are skipped. Scripts with at least ``min_chars`` characters are kept, each capped
  at ``max_chars`` characters chosen at random (seeded).
* **Samples**: per character, ``samples`` images, each from a font covering it (weights and
  styles give the "drawers"), eroded, plain or dilated strokes, and a random affine map
  (rotation ±12°, shear, scale, translation) applied to a high-resolution master and
  box-filtered down to ``size``×``size``: white strokes on black, ``uint8``.

Everything is seeded per character (``default_rng([seed, codepoint])``), so a character looks
the same whichever other characters are generated with it, and the result is cached as an
``.npz`` keyed by the parameters, the font files and the Pillow version.

Examples
--------
>>> script_of("CHEROKEE LETTER A"), script_of("TAI THAM LETTER HIGH KA"), script_of("DIGIT ZERO")
('CHEROKEE', 'TAI THAM', None)
>>> cfg = GlyphConfig(samples=4, max_chars=5, max_scripts=6)
>>> cfg.size, cfg.rotation
(28, 12.0)
"""

from __future__ import annotations

import fnmatch
import math
import os
import unicodedata
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from agent.data.cache import cache_path, cached_npz
from agent.data.episodes import LabelledSet

__all__ = ["FONT_ENV_VAR", "GlyphConfig", "discover_fonts", "script_of", "font_coverage", "select_characters",
           "GlyphRenderer", "render_glyphs", "load_glyphs"]

FONT_ENV_VAR = "META_AGENT_FONT_DIRS"
_VERSION = 1
_FONT_ROOTS = ("/usr/share/fonts", "/usr/local/share/fonts")  # standard Debian font locations
_FONT_SUFFIXES = (".ttf", ".otf")
# Fonts whose code points are symbols, music or math rather than a writing system.
_FONT_EXCLUDE = ("*Emoji*", "NotoMusic*", "NotoSansSymbols*", "NotoSansMath*", "*MayanNumerals*",
                 "*IndicSiyaqNumbers*")
# The word that ends the script part of a character name.
_ROLE_WORDS = frozenset("""LETTER CAPITAL SMALL SYLLABLE DIGIT NUMBER CHARACTER IDEOGRAPH IDEOGRAM VOWEL
CONSONANT SIGN LIGATURE HIEROGLYPH LOGOGRAM FINAL SUBJOINED INDEPENDENT DEPENDENT NUMERAL FRACTION
MEDIAL INITIAL ISOLATED REDUP ARCHAIC TONE SYLLABICS""".split())
_SKIP_SCRIPTS = frozenset({"LATIN", "CJK", "MODIFIER", "FULLWIDTH", "HALFWIDTH", "MATHEMATICAL", "SUPERSCRIPT",
                           "SUBSCRIPT", "PARENTHESIZED", "CIRCLED", "SQUARED", "NEGATIVE", "TAG", "COMBINING"})
_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lo", "Nd"})


@dataclass(frozen=True)
class GlyphConfig:
    """What to render.

    Parameters
    ----------
    size
        Output side in pixels.
    samples
        Images per character (Omniglot has 20 drawers).
    min_chars, max_chars
        Scripts with fewer characters are dropped; larger ones are subsampled.
    max_scripts
        Keep at most this many scripts (a seeded random choice), for small test sets.
    scripts
        Keep only these script names (upper case, e.g. ``("RUNIC", "OGHAM")``).
    rotation, shear, translate, scale
        Affine ranges: degrees, shear factor, fraction of ``size``, relative glyph size.
    morphology
        Stroke changes to choose from uniformly: -1 erode, 0 none, 1 and 2 dilate.
    noise
        Standard deviation of Gaussian pixel noise (in [0, 255] units); 0 for none.
    seed
        Seed of the character choice and of every sample.
    """

    size: int = 28
    samples: int = 20
    min_chars: int = 10
    max_chars: int = 40
    max_scripts: int | None = None
    scripts: tuple[str, ...] | None = None
    rotation: float = 12.0
    shear: float = 0.2
    translate: float = 0.08
    scale: tuple[float, float] = (0.8, 1.05)
    morphology: tuple[int, ...] = (-1, 0, 0, 1)
    noise: float = 0.0
    seed: int = 0


def _font_dirs(font_dirs: Sequence[str | os.PathLike] | None) -> list[Path]:
    if font_dirs is None:
        env = os.environ.get(FONT_ENV_VAR)
        font_dirs = env.split(os.pathsep) if env else _FONT_ROOTS
    return [Path(d).expanduser() for d in font_dirs if d and Path(d).expanduser().is_dir()]


def discover_fonts(font_dirs: Sequence[str | os.PathLike] | None = None,
                   patterns: Sequence[str] = ("Noto*", "Free*"),
                   exclude: Sequence[str] = _FONT_EXCLUDE) -> list[Path]:
    """Font files under ``font_dirs`` (default ``$META_AGENT_FONT_DIRS`` or ``/usr/share/fonts``)
    whose names match ``patterns``, sorted by name; empty when none are installed."""
    found = {}
    for root in _font_dirs(font_dirs):
        for path in sorted(root.rglob("*")):
            name = path.name
            if (path.suffix.lower() in _FONT_SUFFIXES and path.is_file()
                    and any(fnmatch.fnmatch(name, p) for p in patterns)
                    and not any(fnmatch.fnmatch(name, p) for p in exclude)):
                found.setdefault(name, path)  # the same file installed twice counts once
    return [found[n] for n in sorted(found)]


@lru_cache(maxsize=None)
def _script_of_name(name: str) -> str | None:
    words = name.split()
    for i, w in enumerate(words):
        if w in _ROLE_WORDS:
            script = " ".join(words[:i])
            break
    else:
        script = words[0] if words else ""
    if not script or script.split()[0] in _SKIP_SCRIPTS:
        return None
    return script


def script_of(name_or_char: str) -> str | None:
    """The script of a character (or of its Unicode name); ``None`` for skipped ones."""
    if len(name_or_char) == 1:
        name_or_char = unicodedata.name(name_or_char, "")
    return _script_of_name(name_or_char)


def _usable(cp: int) -> str | None:
    """Script of a code point worth rendering, else None."""
    ch = chr(cp)
    cat = unicodedata.category(ch)
    if cat not in _CATEGORIES or unicodedata.decomposition(ch):
        return None
    if cat == "Ll":
        up = ch.upper()
        if len(up) == 1 and up != ch:  # keep the capital of a case pair only
            return None
    name = unicodedata.name(ch, "")
    return _script_of_name(name) if name else None


def font_coverage(fonts: Sequence[str | os.PathLike]) -> dict[int, list[str]]:
    """For each usable code point, the font files (as strings, in ``fonts`` order) covering it.

    Memoised per process on the files' paths, sizes and modification times (do not mutate).
    """
    signature = []
    for f in fonts:
        st = os.stat(f)
        signature.append((str(f), st.st_size, st.st_mtime_ns))
    return _coverage(tuple(signature))


@lru_cache(maxsize=8)
def _coverage(signature: tuple) -> dict[int, list[str]]:
    from fontTools.ttLib import TTFont  # ships with matplotlib

    fonts = [s[0] for s in signature]

    cover: dict[int, list[str]] = {}
    usable: dict[int, str | None] = {}
    for path in fonts:
        try:
            tt = TTFont(str(path), lazy=True, fontNumber=0)
            cmap = tt.getBestCmap() or {}
            tt.close()
        except Exception:  # a broken font file must not stop the rest
            continue
        for cp in cmap:
            if cp not in usable:
                usable[cp] = _usable(cp)
            if usable[cp] is not None:
                cover.setdefault(cp, []).append(str(path))
    return cover


@lru_cache(maxsize=512)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def _dilate(img, level: int):
    from PIL import ImageFilter

    if level == 0:
        return img
    if level < 0:
        return img.filter(ImageFilter.MinFilter(3))
    return img.filter(ImageFilter.MaxFilter(2 * level + 1))


class GlyphRenderer:
    """Renders samples of characters: masters at high resolution, then seeded variations.

    A master is the glyph drawn once per (font, stroke level) at ``2·size`` scale, cropped to
    its ink; each sample is one affine warp of a master into a ``2·size`` canvas, box-filtered
    to ``size``.
    """

    def __init__(self, config: GlyphConfig = GlyphConfig()):
        self.config = config
        self.master_px = int(round(2 * config.size * 0.8))  # font size of the masters
        self._masters: dict[tuple[str, int, int], object] = {}

    def master(self, font: str, cp: int, level: int = 0):
        """The cropped master image (``PIL.Image``, mode L) or ``None`` when the glyph is empty."""
        key = (font, cp, level)
        if key not in self._masters:
            base = self._render(font, cp) if level == 0 else self.master(font, cp, 0)
            img = base
            if base is not None and level != 0:
                # Strokes change on the padded master so that dilation has room to grow.
                img = _dilate(base, level)
                if level < 0 and np.asarray(img).sum() < 0.4 * np.asarray(base).sum():
                    img = base  # erosion would erase thin strokes
            self._masters[key] = img
        return self._masters[key]

    def _render(self, font: str, cp: int):
        from PIL import Image, ImageDraw

        f = _font(font, self.master_px)
        ch = chr(cp)
        left, top, right, bottom = f.getbbox(ch)
        if right <= left or bottom <= top:
            return None
        pad = 4
        canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
        ImageDraw.Draw(canvas).text((pad - left, pad - top), ch, font=f, fill=255)
        box = canvas.getbbox()
        if box is None or (box[2] - box[0]) * (box[3] - box[1]) < 4:
            return None
        # Keep a margin for dilation; the warp centres on the ink box, not the canvas.
        box = (max(box[0] - 2, 0), max(box[1] - 2, 0), min(box[2] + 2, canvas.width), min(box[3] + 2, canvas.height))
        return canvas.crop(box)

    def clean(self, font: str, cp: int) -> np.ndarray | None:
        """The un-augmented ``size``×``size`` rendering, or ``None`` when empty."""
        m = self.master(font, cp, 0)
        return None if m is None else self._warp(m, 0.0, 0.0, 1.0, 0.0, 0.0)

    def _warp(self, master, angle: float, shear: float, scale: float, tx: float, ty: float) -> np.ndarray:
        from PIL import Image

        s = self.config.size
        big = 2 * s
        w, h = master.size
        k = scale * big * 0.78 / max(w, h)  # master pixels -> canvas pixels
        c, si = math.cos(angle), math.sin(angle)
        # forward map: R(angle) @ [[1, shear], [0, 1]] * k; PIL wants the inverse (canvas -> master)
        a, b, cc, d = c, c * shear - si, si, si * shear + c
        det = (a * d - b * cc) * k
        ia, ib, ic, id_ = d / det, -b / det, -cc / det, a / det
        ox, oy = big / 2 + tx * big, big / 2 + ty * big
        data = (ia, ib, w / 2 - ia * ox - ib * oy, ic, id_, h / 2 - ic * ox - id_ * oy)
        # Nearest sampling at twice the size, then a 2x2 box filter: 4-fold supersampling at a
        # third of the cost of bilinear sampling.
        out = master.transform((big, big), Image.AFFINE, data, resample=Image.NEAREST).reduce(2)
        return np.frombuffer(out.tobytes(), dtype=np.uint8).reshape(s, s)

    def samples(self, cp: int, fonts: Sequence[str], n: int | None = None) -> np.ndarray:
        """``n`` (default ``config.samples``) augmented images of ``cp``, ``(n, size, size)`` uint8."""
        cfg = self.config
        n = cfg.samples if n is None else int(n)
        rng = np.random.default_rng([cfg.seed, cp])  # per character: independent of the others
        font_i = rng.integers(len(fonts), size=n)
        level = np.asarray(cfg.morphology)[rng.integers(len(cfg.morphology), size=n)]
        angle = np.deg2rad(rng.uniform(-cfg.rotation, cfg.rotation, size=n))
        shear = rng.uniform(-cfg.shear, cfg.shear, size=n)
        scale = rng.uniform(*cfg.scale, size=n)
        shift = rng.uniform(-cfg.translate, cfg.translate, size=(n, 2))
        out = np.zeros((n, cfg.size, cfg.size), dtype=np.uint8)
        for i in range(n):
            m = self.master(fonts[font_i[i]], cp, int(level[i]))
            if m is None:  # this font's glyph is empty: fall back to one that is not
                m = next((self.master(f, cp, 0) for f in fonts if self.master(f, cp, 0) is not None), None)
                if m is None:
                    continue
            out[i] = self._warp(m, angle[i], shear[i], scale[i], shift[i, 0], shift[i, 1])
        if cfg.noise > 0:
            noisy = out + rng.normal(0.0, cfg.noise, size=out.shape)
            out = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        return out


def select_characters(coverage: dict[int, list[str]], config: GlyphConfig = GlyphConfig(),
                      renderer: GlyphRenderer | None = None) -> dict[str, list[tuple[int, list[str]]]]:
    """Scripts and their characters to render: ``{script: [(codepoint, fonts), ...]}``.

    Characters are visited in a seeded random order per script and kept while their clean
    rendering is non-empty and not a near-copy of an already kept one, up to ``max_chars``.
    """
    renderer = renderer or GlyphRenderer(config)
    by_script: dict[str, list[int]] = {}
    for cp in sorted(coverage):
        by_script.setdefault(_usable(cp), []).append(cp)
    by_script.pop(None, None)
    wanted = None if config.scripts is None else {s.upper() for s in config.scripts}
    # Digits alone (ARABIC-INDIC DIGIT ...) do not make a writing system: count letters.
    names = sorted(s for s, cps in by_script.items()
                   if (wanted is None or s in wanted)
                   and sum(unicodedata.category(chr(c)) != "Nd" for c in cps) >= config.min_chars)
    rng = np.random.default_rng(config.seed)
    if config.max_scripts is not None and len(names) > config.max_scripts:
        names = sorted(rng.choice(names, size=config.max_scripts, replace=False).tolist())
    out = {}
    for script in names:
        cps = by_script[script]
        order = np.random.default_rng([config.seed, len(script), *script.encode()]).permutation(len(cps))
        kept, protos = [], []
        for j in order:
            cp = cps[j]
            proto = renderer.clean(coverage[cp][0], cp)
            if proto is None or proto.sum() < 255 * 3:
                continue
            v = proto.astype(np.float32).ravel()
            v = (v - v.mean()) / (v.std() + 1e-6)
            if any(float(v @ p) / v.size > 0.97 for p in protos):
                continue  # renders like a character already kept
            kept.append((cp, coverage[cp]))
            protos.append(v)
            if len(kept) >= config.max_chars:
                break
        if len(kept) >= min(config.min_chars, config.max_chars):
            out[script] = sorted(kept)
    return out


def render_glyphs(config: GlyphConfig = GlyphConfig(), fonts: Sequence[str | os.PathLike] | None = None,
                  font_dirs: Sequence[str | os.PathLike] | None = None) -> dict[str, np.ndarray]:
    """Render the data set (no caching): the arrays that :func:`load_glyphs` stores.

    Returns ``images`` ``(n, size, size)`` uint8, ``labels`` (character index), ``script_ids``,
    ``codepoints`` (per sample), ``script_names`` and ``fonts`` (file names used).
    """
    fonts = [str(f) for f in (discover_fonts(font_dirs) if fonts is None else fonts)]
    if not fonts:
        raise FileNotFoundError("no fonts found (install fonts-noto-core / fonts-freefont-ttf, "
                                f"or set ${FONT_ENV_VAR})")
    renderer = GlyphRenderer(config)
    chars = select_characters(font_coverage(fonts), config, renderer)
    images, labels, scripts, cps = [], [], [], []
    label = 0
    for sid, (script, members) in enumerate(chars.items()):
        for cp, covering in members:
            images.append(renderer.samples(cp, covering))
            labels.append(np.full(config.samples, label, dtype=np.int32))
            scripts.append(np.full(config.samples, sid, dtype=np.int32))
            cps.append(np.full(config.samples, cp, dtype=np.int32))
            label += 1
    empty = lambda dt: np.zeros(0, dtype=dt)  # noqa: E731
    return {
        "images": np.concatenate(images) if images else np.zeros((0, config.size, config.size), np.uint8),
        "labels": np.concatenate(labels) if labels else empty(np.int32),
        "script_ids": np.concatenate(scripts) if scripts else empty(np.int32),
        "codepoints": np.concatenate(cps) if cps else empty(np.int32),
        "script_names": np.array(list(chars), dtype=str),
        "fonts": np.array([Path(f).name for f in fonts], dtype=str),
    }


def _font_signature(fonts: Iterable[str | os.PathLike]) -> list:
    return [(Path(f).name, Path(f).stat().st_size) for f in fonts]


def load_glyphs(config: GlyphConfig | None = None, fonts: Sequence[str | os.PathLike] | None = None,
                font_dirs: Sequence[str | os.PathLike] | None = None, cache: bool = True,
                cache_dir: str | os.PathLike | None = None, **overrides) -> LabelledSet:
    """The glyph data set as a :class:`LabelledSet` (groups = script ids), cached.

    ``overrides`` change fields of ``config`` (e.g. ``samples=5, max_scripts=6``). The set's
    ``meta`` holds ``codepoints`` (per class), ``script_names`` and the raw arrays' key.
    """
    import PIL

    config = replace(config or GlyphConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    fonts = [str(f) for f in (discover_fonts(font_dirs) if fonts is None else fonts)]
    if not fonts:
        raise FileNotFoundError("no fonts found (install fonts-noto-core / fonts-freefont-ttf, "
                                f"or set ${FONT_ENV_VAR})")
    build = lambda: render_glyphs(config, fonts)  # noqa: E731
    if cache:
        params = {"config": asdict(config), "fonts": _font_signature(fonts), "pillow": PIL.__version__}
        arrays = cached_npz(cache_path("glyphs", params, _VERSION, cache_dir), build)
    else:
        arrays = build()
    labels = arrays["labels"].astype(np.int64)
    first = np.unique(labels, return_index=True)[1]
    names = arrays["script_names"]
    return LabelledSet(arrays["images"], labels, arrays["script_ids"],
                       class_names=np.array([chr(c) for c in arrays["codepoints"][first]]), group_names=names,
                       meta={"codepoints": arrays["codepoints"][first], "script_names": names})
