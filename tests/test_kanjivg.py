"""The KanjiVG few-shot builder (autometa.data.builders.kanjivg): SVG path parsing, rendering,
building a file that autometa loads, and the errors users meet."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import requires

from autometa.cli.main import cli
from autometa.data.builders import kanjivg
from autometa.data.builders.kanjivg import (
    Distortion,
    Glyph,
    build_kanjivg,
    list_characters,
    load_glyph,
    parse_path,
    render_glyph,
)
from autometa.data.loading import load_dataset
from autometa.data.protocols import make_split
from autometa.errors import DataError


requires_kanjivg = requires("kanjivg", "kanjivg")  # a data-only wheel: no module to importorskip


def segments(d: str) -> list[list[list[list[float]]]]:
    return [[seg.tolist() for seg in sub.segments()] for sub in parse_path(d)]


# ---------------------------------------------------------------------------- path parser


def test_lines_absolute_relative_horizontal_vertical_and_close():
    (sub,) = parse_path("M10 20 L30 40 l5 -5 H0 h2 V1 v-1 Z")
    assert sub.points.tolist() == [[10, 20], [30, 40], [35, 35], [0, 35], [2, 35], [2, 1], [2, 0], [10, 20]]
    assert sub.degrees == (1,) * 7
    assert sub.closed


def test_implicit_repeats_after_moveto_are_lines_of_the_same_relativity():
    assert segments("M0 0 10 0 10 10") == [[[[0, 0], [10, 0]], [[10, 0], [10, 10]]]]
    (sub,) = parse_path("m1 1 2 2 3 3")
    assert sub.points.tolist() == [[1, 1], [3, 3], [6, 6]]


def test_implicit_repeats_of_curves_absolute_and_relative():
    assert segments("M0,0 C 1,2 3,4 5,6 7,8 9,10 11,12") == [
        [[[0, 0], [1, 2], [3, 4], [5, 6]], [[5, 6], [7, 8], [9, 10], [11, 12]]]
    ]
    # Each repeated relative curve is relative to the end of the previous one.
    assert segments("m0 0 c1 1 2 2 3 3 1 1 2 2 3 3")[0][1] == [[3, 3], [4, 4], [5, 5], [6, 6]]


def test_compact_numbers_signs_decimals_and_exponents():
    (sub,) = parse_path("M.5.5-1-1")
    assert sub.points.tolist() == [[0.5, 0.5], [-1, -1]]
    (sub,) = parse_path("M1e1,2E-1l-.5-0.25")
    np.testing.assert_allclose(sub.points, [[10, 0.2], [9.5, -0.05]])


def test_kanjivg_style_relative_cubics():
    # The stroke of 一 (U+4E00) as KanjiVG writes it: relative curves with no separators.
    (sub,) = parse_path("M11,54.25c3.19,0.62,6.25,0.75,9.73,0.5c20.64-1.5,50.39-5.12,68.58-5.24")
    first, second = sub.segments()
    np.testing.assert_allclose(first, [[11, 54.25], [14.19, 54.87], [17.25, 55], [20.73, 54.75]])
    np.testing.assert_allclose(second, [[20.73, 54.75], [41.37, 53.25], [71.12, 49.63], [89.31, 49.51]])


def test_smooth_curves_reflect_the_previous_control_point():
    expected = [[10, 0], [10, -10], [20, -10], [20, 0]]
    assert segments("M0 0 C0 10 10 10 10 0 S20 -10 20 0")[0][1] == expected
    assert segments("M0 0 C0 10 10 10 10 0 s10 -10 10 0")[0][1] == expected
    # Chained: the second S reflects the first S's control point (2, -1) about (2, 0).
    assert segments("M0 0 C0 1 1 1 1 0 S2 -1 2 0 S3 1 3 0")[0][2] == [[2, 0], [2, 1], [3, 1], [3, 0]]
    # After a non-curve the first control point is the current point.
    assert segments("M0 0 L5 0 S10 5 10 0")[0][1] == [[5, 0], [5, 0], [10, 5], [10, 0]]
    # Implicit S repeats reflect too.
    assert segments("M0 0 S1 1 2 0 3 -1 4 0")[0][1] == [[2, 0], [3, -1], [3, -1], [4, 0]]


def test_quadratics_become_exact_cubics():
    first, second = segments("M0 0 Q3 3 6 0 T12 0")[0]
    np.testing.assert_allclose(first, [[0, 0], [2, 2], [4, 2], [6, 0]])
    # T reflects (3, 3) about (6, 0) to (9, -3).
    np.testing.assert_allclose(second, [[6, 0], [8, -2], [10, -2], [12, 0]])


def test_subpaths_moveto_close_and_relative_moves():
    subs = parse_path("M0 0 L1 0 M5 5 L6 5")
    assert [s.points.tolist() for s in subs] == [[[0, 0], [1, 0]], [[5, 5], [6, 5]]]
    subs = parse_path("m1 1 l1 0 m1 1 l1 0")
    assert subs[1].points.tolist() == [[3, 2], [4, 2]]
    # After z the current point is the subpath's start, so m is relative to it.
    subs = parse_path("M10 10 l5 0 l0 5 z m1 1 l1 0")
    assert subs[0].points.tolist()[-1] == [10, 10] and subs[0].closed
    assert subs[1].points.tolist() == [[11, 11], [12, 11]]
    # Drawing straight after Z starts a new subpath at the closed one's start.
    assert parse_path("M0 0 L1 0 Z L0 1")[1].points.tolist() == [[0, 0], [0, 1]]
    # A lone moveto draws nothing.
    assert [s.points.tolist() for s in parse_path("M0 0 M1 1 L2 2")] == [[[1, 1], [2, 2]]]
    assert parse_path("") == []


def test_polyline_samples_bezier_points():
    (sub,) = parse_path("M0 0 C0 10 10 10 10 0 L20 0")
    # B(1/2) = (P0 + 3 C1 + 3 C2 + P3) / 8 = (5, 7.5)
    np.testing.assert_allclose(sub.polyline(samples=2), [[0, 0], [5, 7.5], [10, 0], [20, 0]])
    line = sub.polyline(samples=8)
    assert len(line) == 1 + 8 + 1
    # B(1/8) = 3 (7/8)² (1/8) C1 + 3 (7/8) (1/8)² C2 + (1/8)³ P3 = (220, 1680) / 512
    np.testing.assert_allclose(line[1], [220 / 512, 1680 / 512])


@pytest.mark.parametrize(
    "d, message",
    [
        ("L1 1", "must start with M"),
        ("M0 0 A1 1 0 0 1 2 2", "arcs"),
        ("M0 0 L1", "takes 2 numbers"),
        ("M0 0 C1 1 2 2 L3 3", "takes 6 numbers"),
        ("M0 0 L1 1 Z 2 2", "without a command"),
        ("M0 0 L1 x", "unexpected 'x'"),
    ],
)
def test_malformed_path_data_is_a_data_error(d, message):
    with pytest.raises(DataError, match=message):
        parse_path(d)


# ---------------------------------------------------------------------------- rendering


def square_glyph() -> Glyph:
    return Glyph(0x53E3, [parse_path("M20 20 H89 V89 H20 Z"), parse_path("M30 55 C40 30 70 80 80 55")])


def test_clean_render_is_a_deterministic_non_empty_uint8_image():
    image = render_glyph(square_glyph(), 28)
    assert image.shape == (28, 28) and image.dtype == np.uint8
    assert image.max() == 255 and 0.05 < (image > 0).mean() < 0.6
    # Anti-aliased: grey edge pixels, not only 0 and 255.
    assert ((image > 0) & (image < 255)).any()
    np.testing.assert_array_equal(image, render_glyph(square_glyph(), 28))
    assert render_glyph(square_glyph(), 40).shape == (40, 40)


def test_random_renders_are_seeded_and_instances_differ():
    glyph = square_glyph()
    a = [render_glyph(glyph, 28, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    rng = np.random.default_rng(7)
    first, second = render_glyph(glyph, 28, rng), render_glyph(glyph, 28, rng)
    np.testing.assert_array_equal(first, a[0])
    assert np.abs(first.astype(int) - second.astype(int)).sum() > 1000
    assert second.max() > 0


def test_no_distortion_matches_the_clean_render_in_shape():
    still = Distortion(width=(6.25, 6.25), stroke_width=0, stroke_shift=0, point_jitter=0, rotation=0,
                       scale=(1, 1), aspect=0, shear=0, shift=0)
    np.testing.assert_array_equal(
        render_glyph(square_glyph(), 28, np.random.default_rng(0), still),
        render_glyph(square_glyph(), 28, None, Distortion(width=(6.0, 6.5))),
    )


def test_load_glyph_reads_stroke_paths_from_svg(tmp_path):
    svg = tmp_path / "053e3.svg"
    svg.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 109 109"><g>'
        '<path id="s1" d="M20 20 V89"/><path id="s2" d="M20,20h69v69"/></g>'
        '<g><text>1</text></g></svg>'
    )
    glyph = load_glyph(svg)
    assert glyph.label == "U+53E3" and glyph.char == "口" and len(glyph.strokes) == 2
    bad = tmp_path / "04e00.svg"
    bad.write_text('<svg xmlns="http://www.w3.org/2000/svg"><path id="s1" d="M0 0 A1 1 0 0 1 2 2"/></svg>')
    with pytest.raises(DataError, match=r"04e00\.svg: stroke s1: .*arcs"):
        load_glyph(bad)


# ---------------------------------------------------------------------------- errors


def test_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(kanjivg, "distribution", missing)
    with pytest.raises(DataError, match=r'pip install "autometa\[kanjivg\]"'):
        build_kanjivg(12, 4)
    result = CliRunner().invoke(cli, ["datasets", "kanjivg", "out.npz", "--classes", "12", "--no-progress"])
    assert result.exit_code == 1
    assert 'pip install "autometa[kanjivg]"' in result.output


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": 1}, "--classes must be at least 2"),
        ({"instances": 0}, "--instances must be at least 1"),
        ({"size": 4}, "--size must be between"),
        ({"seed": -1}, "--seed must be"),
    ],
)
def test_invalid_counts_are_data_errors(kwargs, message, monkeypatch):
    monkeypatch.setattr(kanjivg, "distribution", lambda name: pytest.fail("counts are checked first"))
    with pytest.raises(DataError, match=message):
        build_kanjivg(**{"classes": 12, "instances": 4, **kwargs})


def test_output_must_be_npz(tmp_path):
    with pytest.raises(DataError, match=r"must be a \.npz file"):
        kanjivg.write_kanjivg(tmp_path / "out.csv", 12, 4)


# ---------------------------------------------------------------------------- the real package


@requires_kanjivg
def test_character_list_leaves_variants_out():
    base = list_characters()
    assert len(base) > 6000 and 0x4E00 in base
    assert all("-" not in p.stem for p in base.values())
    with_variants = list_characters(variants=True)
    assert set(with_variants) == set(base)  # variants are extra drawings, never extra characters
    with pytest.raises(DataError, match="more than the"):
        build_kanjivg(len(base) + 1, 1)


@requires_kanjivg
def test_every_real_svg_in_a_sample_parses_and_renders():
    files = list_characters()
    for code in sorted(files)[::400]:
        image = render_glyph(load_glyph(files[code]), 28, np.random.default_rng(code))
        assert image.max() > 100, hex(code)


@requires_kanjivg
def test_built_file_loads_and_splits_into_disjoint_fewshot_classes(tmp_path):
    rendered, path, readme = kanjivg.write_kanjivg(tmp_path / "kanji.npz", 12, 4, seed=3)
    with np.load(path) as arrays:
        assert sorted(arrays.files) == ["image", "label"]
        assert arrays["image"].shape == (48, 28, 28) and arrays["image"].dtype == np.uint8
        assert arrays["label"][0].startswith("U+")
    text = readme.read_text(encoding="utf-8")
    assert "not human handwriting" in text and "CC BY-SA" in text and "--label label" in text

    dataset = load_dataset(path, "label")
    assert [c.modality for c in dataset.columns] == ["image"]
    assert len(dataset) == 48 and len(dataset.classes) == 12
    assert dataset.images["image"].shape == (48, 28, 28, 1)
    split = make_split(dataset, "fewshot", ways=2, shots=1, queries=2, validation_tasks=3, test_tasks=3)
    parts = [set(split.class_splits[k]) for k in ("train", "validation", "test")]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(dataset.classes)

    # Same seed, same file; a character renders the same whichever others are chosen with it.
    again = build_kanjivg(12, 4, seed=3)
    np.testing.assert_array_equal(again.images, rendered.images)
    other = build_kanjivg(12, 4, seed=4)
    assert list(other.labels) != list(rendered.labels)
    # Instances of one class differ from each other.
    assert np.abs(rendered.images[0].astype(int) - rendered.images[1].astype(int)).sum() > 1000


@requires_kanjivg
def test_cli_builds_a_file_and_names_the_licence(tmp_path):
    out = tmp_path / "sub" / "k.npz"
    result = CliRunner().invoke(
        cli, ["datasets", "kanjivg", str(out), "--classes", "3", "--instances", "2", "--size", "16", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "6 images (3 classes × 2 instances, 16×16)" in result.output and "CC BY-SA" in result.output
    with np.load(out) as arrays:
        assert arrays["image"].shape == (6, 16, 16)
    assert (tmp_path / "sub" / "k.README.md").exists()
    assert not list(Path(out.parent).glob("*.tmp"))
