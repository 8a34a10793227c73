"""Rendered KanjiVG glyphs: an Omniglot-like few-shot image benchmark built offline.

KanjiVG (Ulrich Apel and contributors, CC BY-SA 3.0, https://kanjivg.tagaini.net) draws 6,703
characters (kanji, kana, Latin letters, digits, a few punctuation marks) as SVG stroke paths;
the ``kanjivg`` pip package ships them as a ``kanji/`` folder. Every character is a class and
every instance is that character drawn with its own random stroke width, stroke and point
jitter and affine distortion, so a set has thousands of classes with few examples each, the
shape of Omniglot. These are rendered glyphs, not human handwriting: the variation is
synthetic, and accuracies on them are not comparable with Omniglot figures.

``parse_path`` is a small SVG path-data parser (M L H V C S Q T Z, absolute and relative,
implicit repeats, smooth curves); quadratic curves are stored as their exact cubic equivalents
so a path is only lines and cubic Béziers.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from autometa.errors import DataError

PACKAGE = "kanjivg"
INSTALL_HINT = 'pip install "autometa[kanjivg]"'
ATTRIBUTION = "KanjiVG © Ulrich Apel and contributors (https://kanjivg.tagaini.net)"
LICENCE = "CC BY-SA 3.0"
DEFAULT_VIEWBOX = (0.0, 0.0, 109.0, 109.0)  # what every KanjiVG file declares
MIN_SIZE, MAX_SIZE = 8, 512


# ---------------------------------------------------------------------------- SVG path data

_TOKEN = re.compile(
    r"""(?P<command>[MmLlHhVvCcSsQqTtZz])
      | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<separator>[\s,]+)
      | (?P<other>.)""",
    re.VERBOSE,
)
_ARITY = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Q": 4, "T": 2, "Z": 0}


@dataclass(eq=False)
class Subpath:
    """One continuous pen movement: a start point, then lines (degree 1) and cubics (degree 3).

    ``points`` holds the start and then each segment's points after its first, which is the
    previous segment's last: jittering ``points`` moves shared endpoints together, so a
    distorted stroke stays connected.
    """

    points: np.ndarray  # float [1 + sum(degrees), 2]
    degrees: tuple[int, ...]
    closed: bool = False

    def segments(self) -> list[np.ndarray]:
        """Each segment's points in absolute coordinates: [2, 2] for a line, [4, 2] for a cubic."""
        out, at = [], 0
        for degree in self.degrees:
            out.append(self.points[at: at + degree + 1])
            at += degree
        return out

    def polyline(self, samples: int = 8) -> np.ndarray:
        """The subpath as vertices; each cubic becomes ``samples`` straight pieces."""
        t = np.linspace(0.0, 1.0, samples + 1)[1:, None]
        bernstein = np.hstack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3])
        parts = [self.points[:1]]
        for segment in self.segments():
            parts.append(segment[1:] if len(segment) == 2 else bernstein @ segment)
        return np.concatenate(parts)


def _tokens(d: str) -> list[str | float]:
    out: list[str | float] = []
    for match in _TOKEN.finditer(d):
        kind = match.lastgroup
        if kind == "command":
            out.append(match.group())
        elif kind == "number":
            out.append(float(match.group()))
        elif kind == "other":
            char = match.group()
            what = "arcs (A/a) are not supported" if char in "Aa" else f"unexpected {char!r}"
            raise DataError(f"SVG path data: {what} at character {match.start()} of {d[:60]!r}")
    return out


class _PathBuilder:
    """Pen state while reading path data: current point, subpath start, last control points."""

    def __init__(self):
        self.subpaths: list[Subpath] = []
        self.current = np.zeros(2)
        self.start = np.zeros(2)
        self.points: list[np.ndarray] | None = None  # None: no subpath open
        self.degrees: list[int] = []
        self.started = False
        # S and T reflect the previous curve's last control point, but only right after a
        # curve of their own kind; any other command resets it to the current point.
        self.cubic_control: np.ndarray | None = None
        self.quad_control: np.ndarray | None = None

    def move(self, p: np.ndarray) -> None:
        self.finish()
        self.started = True
        self.start = self.current = p
        self.points, self.degrees = [p], []

    def _open(self) -> None:
        # Drawing after Z without a new M continues from the closed subpath's start.
        if self.points is None:
            self.points, self.degrees = [self.current], []

    def line(self, p: np.ndarray) -> None:
        self._open()
        self.points.append(p)
        self.degrees.append(1)
        self.current = p

    def cubic(self, c1: np.ndarray, c2: np.ndarray, p: np.ndarray) -> None:
        self._open()
        self.points += [c1, c2, p]
        self.degrees.append(3)
        self.current = p

    def close(self) -> None:
        if self.points is None:
            return
        if not np.allclose(self.current, self.start):
            self.line(self.start)
        self.finish(closed=True)
        self.current = self.start

    def finish(self, closed: bool = False) -> None:
        # A lone moveto draws nothing (SVG), so it leaves no subpath.
        if self.points is not None and self.degrees:
            self.subpaths.append(Subpath(np.array(self.points, dtype=float), tuple(self.degrees), closed))
        self.points, self.degrees = None, []


def parse_path(d: str) -> list[Subpath]:
    """Parse SVG path data (the ``d`` attribute) into subpaths of lines and cubic Béziers."""
    tokens = _tokens(d)
    pen = _PathBuilder()
    command: str | None = None
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if isinstance(token, str):
            command = token
            i += 1
            if command in "Zz":
                pen.close()
                pen.cubic_control = pen.quad_control = None
                command = None  # numbers straight after Z have no command to repeat
                continue
            if not pen.started and command not in "Mm":
                raise DataError(f"SVG path data must start with M or m, not {command!r}: {d[:60]!r}")
        elif command is None:
            raise DataError(f"SVG path data: number {token:g} without a command before it in {d[:60]!r}")
        n = _ARITY[command.upper()]
        args = tokens[i: i + n]
        if len(args) < n or any(isinstance(a, str) for a in args):
            raise DataError(f"SVG path data: {command!r} takes {n} numbers, got {args!r} in {d[:60]!r}")
        i += n
        _apply(pen, command, np.array(args, dtype=float))
        # Extra coordinate pairs after a moveto are implicit linetos of the same relativity.
        if command == "M":
            command = "L"
        elif command == "m":
            command = "l"
    pen.finish()
    return pen.subpaths


def _apply(pen: _PathBuilder, command: str, a: np.ndarray) -> None:
    relative = command.islower()
    base = pen.current if relative else np.zeros(2)
    kind = command.upper()
    cubic_control = quad_control = None
    if kind == "M":
        pen.move(base + a)
    elif kind == "L":
        pen.line(base + a)
    elif kind == "H":
        pen.line(np.array([a[0] + base[0], pen.current[1]]))
    elif kind == "V":
        pen.line(np.array([pen.current[0], a[0] + base[1]]))
    elif kind in "CS":
        if kind == "C":
            c1, c2, p = base + a[0:2], base + a[2:4], base + a[4:6]
        else:
            c1 = 2 * pen.current - pen.cubic_control if pen.cubic_control is not None else pen.current
            c2, p = base + a[0:2], base + a[2:4]
        pen.cubic(c1, c2, p)
        cubic_control = c2
    else:  # Q, T: a quadratic is the cubic with controls 2/3 of the way to its one control
        if kind == "Q":
            q, p = base + a[0:2], base + a[2:4]
        else:
            q = 2 * pen.current - pen.quad_control if pen.quad_control is not None else pen.current
            p = base + a[0:2]
        p0 = pen.current
        pen.cubic(p0 + 2 / 3 * (q - p0), p + 2 / 3 * (q - p), p)
        quad_control = q
    pen.cubic_control, pen.quad_control = cubic_control, quad_control


# ---------------------------------------------------------------------------- KanjiVG files


@dataclass(eq=False)
class Glyph:
    """One character's strokes (one list of subpaths per SVG ``<path>``) in viewBox units."""

    code_point: int
    strokes: list[list[Subpath]]
    viewbox: tuple[float, float, float, float] = DEFAULT_VIEWBOX

    @property
    def label(self) -> str:
        return f"U+{self.code_point:04X}"

    @property
    def char(self) -> str:
        return chr(self.code_point)


def kanji_folder() -> Path:
    """The installed ``kanjivg`` package's folder of SVG files."""
    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError as exc:
        raise DataError(f"KanjiVG is not installed; install it with: {INSTALL_HINT}") from exc
    folder = Path(str(dist.locate_file("kanji")))
    if not folder.is_dir():
        raise DataError(
            f"the installed kanjivg {dist.version} has no kanji/ folder of SVG files at {folder}; "
            f"reinstall it: {INSTALL_HINT}"
        )
    return folder


def _kanjivg_version() -> str:
    try:
        return distribution(PACKAGE).version
    except PackageNotFoundError:
        return "unknown"


def list_characters(folder: str | Path | None = None, *, variants: bool = False) -> dict[int, Path]:
    """Code point → SVG file. KanjiVG names files by hex code point; ``04e00-Kaisho.svg`` and
    the like are alternative forms of an existing character and are left out unless asked,
    so every class is one distinct character."""
    folder = Path(folder) if folder is not None else kanji_folder()
    out: dict[int, Path] = {}
    for path in sorted(folder.glob("*.svg")):
        stem, _, variant = path.stem.partition("-")
        if variant and not variants:
            continue
        try:
            code = int(stem, 16)
        except ValueError:
            continue  # not a KanjiVG character file
        out.setdefault(code, path)
    return out


def load_glyph(path: str | Path, code_point: int | None = None) -> Glyph:
    """Read one KanjiVG SVG file; every ``<path d=...>`` in it is a stroke."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: not a readable SVG file ({exc}); reinstall kanjivg: {INSTALL_HINT}") from exc
    viewbox = DEFAULT_VIEWBOX
    if root.get("viewBox"):
        values = [float(v) for v in re.split(r"[\s,]+", root.get("viewBox").strip())]
        if len(values) == 4 and values[2] > 0 and values[3] > 0:
            viewbox = tuple(values)
    strokes = []
    for element in root.iter():
        if element.tag.rpartition("}")[2] != "path" or not element.get("d"):
            continue
        try:
            subpaths = parse_path(element.get("d"))
        except DataError as exc:
            raise DataError(f"{path}: stroke {element.get('id', '?')}: {exc}") from exc
        if subpaths:
            strokes.append(subpaths)
    if not strokes:
        raise DataError(f"{path}: no stroke paths (<path d=...>) found")
    if code_point is None:
        code_point = int(path.stem.partition("-")[0], 16)
    return Glyph(code_point, strokes, viewbox)


# ---------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Distortion:
    """Per-instance randomness. Lengths are in KanjiVG viewBox units (the box is 109 wide)."""

    width: tuple[float, float] = (4.0, 7.5)  # stroke width of an instance, uniform in this range
    stroke_width: float = 0.15  # each stroke's width varies by up to ± this fraction
    stroke_shift: float = 1.5  # standard deviation of each stroke's offset
    point_jitter: float = 1.5  # standard deviation of each end and control point's offset
    rotation: float = 8.0  # degrees, uniform in ±
    scale: tuple[float, float] = (0.85, 1.05)
    aspect: float = 0.08  # x and y scales differ by a factor up to exp(± 2 × this)
    shear: float = 0.15
    shift: float = 5.0  # translation, uniform in ± per axis

    def summary(self) -> str:
        return (
            f"stroke width {self.width[0]:g}–{self.width[1]:g} (±{100 * self.stroke_width:.0f}% per stroke), "
            f"stroke offsets σ={self.stroke_shift:g}, point jitter σ={self.point_jitter:g}, "
            f"rotation ±{self.rotation:g}°, scale {self.scale[0]:g}–{self.scale[1]:g} "
            f"(aspect ±{self.aspect:g} log), shear ±{self.shear:g}, translation ±{self.shift:g}"
        )


def _affine(rng: np.random.Generator, d: Distortion) -> tuple[np.ndarray, np.ndarray]:
    angle = math.radians(rng.uniform(-d.rotation, d.rotation))
    scale = rng.uniform(*d.scale)
    aspect = rng.uniform(-d.aspect, d.aspect)
    shear = rng.uniform(-d.shear, d.shear)
    rotate = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    stretch = np.diag([scale * math.exp(aspect), scale * math.exp(-aspect)])
    matrix = rotate @ np.array([[1.0, shear], [0.0, 1.0]]) @ stretch
    return matrix, rng.uniform(-d.shift, d.shift, size=2)


def render_glyph(
    glyph: Glyph,
    size: int = 28,
    rng: np.random.Generator | None = None,
    distortion: Distortion = Distortion(),
    *,
    supersample: int = 4,
    samples: int = 8,
) -> np.ndarray:
    """Draw ``glyph`` as a uint8 [size, size] image, white strokes on black.

    With ``rng`` None the glyph is drawn clean at the middle stroke width. Drawing at
    ``supersample`` × the size and box-averaging down gives anti-aliased edges that PIL's
    own line drawing lacks.
    """
    x0, y0, width_vb, height_vb = glyph.viewbox
    canvas = size * supersample
    to_pixels = np.array([canvas / width_vb, canvas / height_vb])
    centre = np.array([x0 + width_vb / 2, y0 + height_vb / 2])
    d = distortion
    if rng is None:
        matrix, shift, width = np.eye(2), np.zeros(2), sum(d.width) / 2
    else:
        matrix, shift = _affine(rng, d)
        width = rng.uniform(*d.width)
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    scale = float(to_pixels.mean())
    for stroke in glyph.strokes:
        stroke_width = width
        offset = np.zeros(2)
        if rng is not None:
            stroke_width *= 1 + rng.uniform(-d.stroke_width, d.stroke_width)
            offset = rng.normal(0.0, d.stroke_shift, size=2)
        for subpath in stroke:
            points = subpath.points + offset
            if rng is not None:
                points = points + rng.normal(0.0, d.point_jitter, size=points.shape)
                if subpath.closed:
                    points[-1] = points[0]
            line = Subpath(points, subpath.degrees, subpath.closed).polyline(samples)
            line = (line - centre) @ matrix.T + centre + shift
            _draw_stroke(draw, (line - (x0, y0)) * to_pixels, stroke_width * scale)
    return np.asarray(image.resize((size, size), Image.BOX))


def _draw_stroke(draw: ImageDraw.ImageDraw, points: np.ndarray, width: float) -> None:
    xy = [tuple(p) for p in points.tolist()]
    draw.line(xy, fill=255, width=max(1, round(width)), joint="curve")
    # PIL has round joins but square-cut ends; KanjiVG strokes are drawn with round caps.
    r = width / 2
    for x, y in (xy[0], xy[-1]):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)


# ---------------------------------------------------------------------------- the dataset


@dataclass(eq=False)
class KanjiVGSet:
    """Rendered instances of chosen characters, grouped by class in code-point order."""

    images: np.ndarray  # uint8 [classes * instances, size, size]
    labels: np.ndarray  # str [classes * instances]: "U+4E00"
    classes: int
    instances: int
    size: int
    seed: int
    available: int  # base characters the classes were drawn from
    distortion: Distortion = field(default_factory=Distortion)
    version: str = "unknown"

    @property
    def characters(self) -> str:
        return "".join(chr(int(label[2:], 16)) for label in self.labels[:: self.instances])

    def description(self, filename: str = "kanjivg.npz") -> str:
        """A README-ready Markdown paragraph: contents, how it was made, licence, use."""
        sample = self.characters[:20]
        return f"""\
## KanjiVG glyphs: {self.classes} classes × {self.instances} instances, {self.size}×{self.size}

`{filename}` holds {len(self.labels)} greyscale images (`image`: uint8 [{len(self.labels)}, {self.size}, \
{self.size}], white strokes on black) of {self.classes} characters from KanjiVG {self.version}, \
{self.instances} per character; `label` is the character's Unicode code point (e.g. `U+4E00` for 一). \
The characters were drawn at random (seed {self.seed}) from the {self.available} base characters \
(kanji, kana, Latin letters, digits; variant forms left out), e.g. {sample}.

**These are rendered glyphs, not human handwriting.** Each instance draws the character's \
KanjiVG stroke paths with its own random distortion ({self.distortion.summary()}; lengths in \
units of the 109-wide KanjiVG box), at 4× the size and box-averaged down for anti-aliasing. \
The variation is synthetic: accuracies are not comparable with Omniglot's. A few classes \
look alike by nature (e.g. katakana ロ and kanji 口, O and o).

Use it: `autometa search {filename} --label label --protocol fewshot`. \
Rebuild it: `autometa datasets kanjivg {filename} --classes {self.classes} --instances \
{self.instances} --size {self.size} --seed {self.seed}`.

Licence: derived from {ATTRIBUTION}, {LICENCE} (https://creativecommons.org/licenses/by-sa/3.0/). \
These images are an adaptation of KanjiVG: share them under {LICENCE} with this attribution.
"""

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write the ``.npz`` (atomically) and a ``<name>.README.md`` beside it."""
        path = _check_output(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A half-written file would look complete to anything that reuses it (benchmark caches).
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(fh, image=self.images, label=self.labels)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        readme = path.with_name(path.stem + ".README.md")
        readme.write_text(self.description(path.name), encoding="utf-8")
        return path, readme


def _check_output(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise DataError(f"{path}: the output must be a .npz file (autometa loads image arrays from .npz)")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a file name ending in .npz")
    return path


def _check_counts(classes: int, instances: int, size: int, seed: int) -> None:
    if not isinstance(classes, numbers.Integral) or classes < 2:
        raise DataError(f"--classes must be at least 2 (a classification task needs two classes), got {classes!r}")
    if not isinstance(instances, numbers.Integral) or instances < 1:
        raise DataError(
            f"--instances must be at least 1, got {instances!r} "
            "(few-shot episodes need shots + queries per class, e.g. 20)"
        )
    if not isinstance(size, numbers.Integral) or not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size!r}")
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise DataError(f"--seed must be a non-negative integer, got {seed!r}")


def build_kanjivg(
    classes: int = 1000,
    instances: int = 20,
    *,
    size: int = 28,
    seed: int = 0,
    distortion: Distortion = Distortion(),
    folder: str | Path | None = None,
    progress: Callable[[int], object] | None = None,
) -> KanjiVGSet:
    """Render ``instances`` distorted images of each of ``classes`` characters chosen by ``seed``.

    Each character's renders come from a generator seeded by (seed, code point), so a
    character looks the same whichever other characters are chosen with it. ``progress`` is
    called with 1 after each class (e.g. ``tqdm.update``). ``folder`` replaces the installed
    package's SVG folder (tests).
    """
    _check_counts(classes, instances, size, seed)
    classes, instances, size, seed = int(classes), int(instances), int(size), int(seed)
    files = list_characters(folder)
    if classes > len(files):
        raise DataError(
            f"--classes {classes} is more than the {len(files)} characters KanjiVG has; use at most {len(files)}"
        )
    codes = sorted(files)
    picked = sorted(codes[i] for i in np.random.default_rng(seed).permutation(len(codes))[:classes])
    images = np.empty((classes * instances, size, size), dtype=np.uint8)
    labels = []
    for c, code in enumerate(picked):
        glyph = load_glyph(files[code], code)
        rng = np.random.default_rng([seed, code])
        for k in range(instances):
            images[c * instances + k] = render_glyph(glyph, size, rng, distortion)
        labels += [glyph.label] * instances
        if progress is not None:
            progress(1)
    return KanjiVGSet(
        images, np.array(labels), classes, instances, size, seed, len(files), distortion,
        _kanjivg_version() if folder is None else "unknown",
    )


def write_kanjivg(
    output: str | Path, classes: int = 1000, instances: int = 20, **options
) -> tuple[KanjiVGSet, Path, Path]:
    """``build_kanjivg`` then ``save``, with the output name checked before the slow part."""
    _check_output(output)
    rendered = build_kanjivg(classes, instances, **options)
    return (rendered, *rendered.save(output))
