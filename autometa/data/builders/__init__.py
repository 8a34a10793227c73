"""Benchmark datasets built from real data that ships inside pip packages (no downloads)."""

from autometa.data.builders.kanjivg import (
    Distortion,
    Glyph,
    KanjiVGSet,
    Subpath,
    build_kanjivg,
    kanji_folder,
    list_characters,
    load_glyph,
    parse_path,
    render_glyph,
    write_kanjivg,
)

__all__ = [
    "Distortion", "Glyph", "KanjiVGSet", "Subpath", "build_kanjivg", "kanji_folder", "list_characters",
    "load_glyph", "parse_path", "render_glyph", "write_kanjivg",
]
