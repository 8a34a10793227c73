"""Loading tables into typed Datasets (autometa.data.loading) and turning them into features (autometa.data.preprocessing)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from autometa.data.loading import COLUMN_TYPES, load_dataset, parse_column_overrides
from autometa.data.preprocessing import MAX_TOKENS, TEXT_BUCKETS, build_features, tokenize
from autometa.errors import AutometaError, DataError

N = 8
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a completely different sentence about weather and rain",
    "machine learning models need plenty of varied training data",
    "tomorrow we will walk along the river towards the old mill",
    "her favourite book describes a journey across the northern sea",
    "seven small boats drifted slowly past the quiet harbour wall",
    "nobody expected the concert to finish before midnight again",
    "fresh bread and strong coffee make every morning much better",
]


# ---------------------------------------------------------------------------- helpers


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def grey_images(n: int = N, h: int = 10, w: int = 14, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w), dtype=np.uint8)


def mixed_frame(tmp_path: Path, *, vectors_as_lists: bool = False) -> pd.DataFrame:
    """A table with one column of each kind; image PNGs are written under tmp_path/imgs."""
    images = grey_images()
    for i in range(N):
        write_png(tmp_path / "imgs" / f"{i}.png", images[i])
    vectors = [[float(i), i + 0.5, -1.0] for i in range(N)]
    return pd.DataFrame(
        {
            "num": np.arange(N) * 1.5,
            "cat": ["red", "blue"] * (N // 2),
            "txt": SENTENCES,
            "img": [f"imgs/{i}.png" for i in range(N)],
            "vec": vectors if vectors_as_lists else [json.dumps(v) for v in vectors],
            "y": ["p", "q"] * (N // 2),
        }
    )


def kinds(dataset) -> dict[str, tuple[str, str]]:
    return {c.name: (c.modality, c.kind) for c in dataset.columns}


EXPECTED_KINDS = {
    "num": ("tabular", "numeric"),
    "cat": ("tabular", "categorical"),
    "txt": ("text", ""),
    "img": ("image", ""),
    "vec": ("vector", ""),
}


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------- 1. type inference


def test_infers_every_column_type_from_csv(tmp_path):
    path = write_csv(tmp_path / "mixed.csv", mixed_frame(tmp_path))
    ds = load_dataset(path, "y")
    assert kinds(ds) == EXPECTED_KINDS
    assert [c.name for c in ds.columns] == ["num", "cat", "txt", "img", "vec"]
    assert ds.modalities == ["tabular", "text", "image", "vector"]
    assert list(ds.frame.columns) == ["num", "cat", "txt", "img", "vec"]  # label is not a feature
    assert ds.label_column == "y"
    assert ds.labels.tolist() == ["p", "q"] * (N // 2)
    assert ds.classes == ["p", "q"]
    assert len(ds) == N
    assert ds.name == "mixed"
    # JSON-list strings are parsed into real lists
    assert ds.frame["vec"].iloc[3] == [3.0, 3.5, -1.0]
    assert ds.summary() == (
        "mixed: 8 rows, 2 classes of 'y'; tabular: num, cat; text: txt; image: img; vector: vec"
    )


def test_infers_vector_from_real_lists_in_json_lines(tmp_path):
    frame = mixed_frame(tmp_path, vectors_as_lists=True)
    path = tmp_path / "mixed.jsonl"
    frame.to_json(path, orient="records", lines=True)
    ds = load_dataset(path, "y")
    assert kinds(ds) == EXPECTED_KINDS
    assert list(ds.frame["vec"].iloc[2]) == [2.0, 2.5, -1.0]


def test_image_paths_need_existing_files(tmp_path):
    """Strings that merely look like image names (files absent) are not an image column."""
    frame = pd.DataFrame({"pic": [f"nowhere/{i}.png" for i in range(N)], "y": ["a", "b"] * (N // 2)})
    ds = load_dataset(write_csv(tmp_path / "t.csv", frame), "y")
    assert kinds(ds) == {"pic": ("tabular", "categorical")}
    assert ds.images == {}


def test_override_columns_argument(tmp_path):
    path = write_csv(tmp_path / "mixed.csv", mixed_frame(tmp_path))
    ds = load_dataset(path, "y", columns={"cat": "text", "num": "ignore", "vec": "ignore"})
    assert kinds(ds) == {"cat": ("text", ""), "txt": ("text", ""), "img": ("image", "")}
    assert "num" not in ds.frame.columns and "vec" not in ds.frame.columns
    # Overriding a text column to tabular makes it categorical.
    ds = load_dataset(path, "y", columns={"txt": "tabular", "img": "ignore"})
    assert kinds(ds)["txt"] == ("tabular", "categorical")
    assert ds.images == {}


def test_override_sidecar_toml(tmp_path):
    path = write_csv(tmp_path / "mixed.csv", mixed_frame(tmp_path))
    (tmp_path / "mixed.csv.toml").write_text('[columns]\ncat = "text"\nimg = "ignore"\n')
    ds = load_dataset(path, "y")
    assert kinds(ds) == {
        "num": ("tabular", "numeric"),
        "cat": ("text", ""),
        "txt": ("text", ""),
        "vec": ("vector", ""),
    }
    # Explicit columns= overrides win over the sidecar for the same column.
    ds = load_dataset(path, "y", columns={"cat": "tabular"})
    assert kinds(ds)["cat"] == ("tabular", "categorical")
    assert "img" not in kinds(ds)  # the sidecar's other entries still apply


def test_sidecar_toml_errors(tmp_path):
    path = write_csv(tmp_path / "t.csv", pd.DataFrame({"a": [1, 2, 3, 4], "y": list("abab")}))
    sidecar = tmp_path / "t.csv.toml"
    sidecar.write_text("[columns\n")
    with pytest.raises(DataError, match=r"t\.csv\.toml: not valid TOML"):
        load_dataset(path, "y")
    sidecar.write_text('[columns]\na = "bogus"\n')
    with pytest.raises(DataError, match=r"a:bogus: type must be one of tabular, text, image, vector, ignore"):
        load_dataset(path, "y")


def test_parse_column_overrides():
    assert parse_column_overrides(["a:text"]) == {"a": "text"}
    assert parse_column_overrides(["a:text", "b:ignore", "a:vector"]) == {"a": "vector", "b": "ignore"}
    # Only the last colon separates: column names may contain colons.
    assert parse_column_overrides(["time:stamp:tabular"]) == {"time:stamp": "tabular"}
    assert parse_column_overrides([]) == {}
    assert set(COLUMN_TYPES) == {"tabular", "text", "image", "vector", "ignore"}


@pytest.mark.parametrize("item", ["a:bogus", "nocolon", ":text", "a:"])
def test_parse_column_overrides_errors(item):
    with pytest.raises(DataError) as info:
        parse_column_overrides([item])
    message = str(info.value)
    assert message == (
        f"--column {item!r}: expected NAME:TYPE with TYPE one of tabular, text, image, vector, ignore"
    )
    assert isinstance(info.value, AutometaError)


# ---------------------------------------------------------------------------- 2. formats


def test_csv_parquet_jsonl_load_the_same_data(tmp_path):
    frame = mixed_frame(tmp_path)
    csv = write_csv(tmp_path / "d.csv", frame)
    listed = frame.assign(vec=[json.loads(v) for v in frame["vec"]])
    parquet = tmp_path / "d.parquet"
    listed.to_parquet(parquet)
    jsonl = tmp_path / "d.jsonl"
    listed.to_json(jsonl, orient="records", lines=True)

    loaded = [load_dataset(p, "y", image_size=(6, 9)) for p in (csv, parquet, jsonl)]
    for ds in loaded:
        assert kinds(ds) == EXPECTED_KINDS
        assert ds.labels.tolist() == ["p", "q"] * (N // 2)
        np.testing.assert_array_equal(ds.frame["num"].to_numpy(), np.arange(N) * 1.5)
        assert ds.frame["txt"].tolist() == SENTENCES
        np.testing.assert_array_equal(np.stack([np.asarray(v, float) for v in ds.frame["vec"]]),
                                      np.asarray(listed["vec"].tolist()))
        np.testing.assert_array_equal(ds.images["img"], loaded[0].images["img"])
        assert re.fullmatch(r"[0-9a-f]{64}", ds.fingerprint)
    assert loaded[0].fingerprint == loaded[1].fingerprint == loaded[2].fingerprint


def test_csv_and_parquet_fingerprints_match_with_missing_values(tmp_path):
    frame = pd.DataFrame(
        {
            "x": [0.1, np.nan, 2.5, 3.0],
            "c": ["u", None, "w", "u"],
            "t": [SENTENCES[0], SENTENCES[1], None, SENTENCES[3]],
            "y": list("abab"),
        }
    )
    write_csv(tmp_path / "f.csv", frame)
    frame.to_parquet(tmp_path / "f.parquet")
    a = load_dataset(tmp_path / "f.csv", "y")
    b = load_dataset(tmp_path / "f.parquet", "y")
    assert kinds(a) == kinds(b) == {"x": ("tabular", "numeric"), "c": ("tabular", "categorical"), "t": ("text", "")}
    assert a.fingerprint == b.fingerprint


def _change_num(f):
    f.loc[2, "num"] = 99.0


def _change_cat(f):
    f.loc[0, "cat"] = "blue"


def _change_txt(f):
    f.loc[5, "txt"] = "an entirely new sentence that was never here before"


def _change_vec(f):
    f.loc[1, "vec"] = json.dumps([1.0, 1.5, -2.0])


def _change_label(f):
    f.loc[7, "y"] = "p"


@pytest.mark.parametrize("change", [_change_num, _change_cat, _change_txt, _change_vec, _change_label])
def test_fingerprint_changes_when_one_cell_changes(tmp_path, change):
    frame = mixed_frame(tmp_path)
    base = load_dataset(write_csv(tmp_path / "a.csv", frame), "y")
    again = load_dataset(write_csv(tmp_path / "b.csv", frame), "y")
    assert base.fingerprint == again.fingerprint  # same content, different file name
    changed = frame.copy()
    change(changed)
    other = load_dataset(write_csv(tmp_path / "c.csv", changed), "y")
    assert other.fingerprint != base.fingerprint


def test_fingerprint_changes_with_image_pixels_and_group(tmp_path):
    frame = mixed_frame(tmp_path)
    path = write_csv(tmp_path / "a.csv", frame)
    before = load_dataset(path, "y")
    img = np.asarray(Image.open(tmp_path / "imgs" / "4.png")).copy()
    img[0, 0] = 255 - img[0, 0]
    write_png(tmp_path / "imgs" / "4.png", img)
    after = load_dataset(path, "y")
    assert after.fingerprint != before.fingerprint
    # Declaring a column as the group changes the fingerprint too.
    grouped = load_dataset(path, "y", group="cat")
    assert grouped.fingerprint != after.fingerprint


def test_npz_columns_labels_vectors_and_images(tmp_path):
    rng = np.random.default_rng(1)
    images = grey_images(4, 5, 6, seed=2)
    vec = rng.normal(size=(4, 3)).astype(np.float32)
    x = np.array([0.5, 1.25, -3.0, 7.0])
    labels = np.array(["a", "b", "a", "b"])
    np.savez(tmp_path / "a.npz", label=labels, x=x, vec=vec, img=images)
    ds = load_dataset(tmp_path / "a.npz", "label", image_size=(5, 6))
    assert kinds(ds) == {"x": ("tabular", "numeric"), "vec": ("vector", ""), "img": ("image", "")}
    assert ds.labels.tolist() == ["a", "b", "a", "b"]
    np.testing.assert_array_equal(ds.frame["x"].to_numpy(), x)
    np.testing.assert_array_equal(np.stack(ds.frame["vec"].tolist()), vec)
    assert ds.images["img"].shape == (4, 5, 6, 1)
    assert ds.images["img"].dtype == np.uint8
    np.testing.assert_array_equal(ds.images["img"][..., 0], images)  # same size: pixels unchanged

    # The same content as CSV + PNG files gives the same fingerprint.
    for i in range(4):
        write_png(tmp_path / "im" / f"{i}.png", images[i])
    frame = pd.DataFrame(
        {"x": x, "vec": [json.dumps(v.tolist()) for v in vec], "img": [f"im/{i}.png" for i in range(4)], "label": labels}
    )
    csv = load_dataset(write_csv(tmp_path / "a.csv", frame), "label", image_size=(5, 6))
    assert kinds(csv) == kinds(ds)
    assert csv.fingerprint == ds.fingerprint


def test_npz_integer_labels_and_rgb_chw_float_images(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "rgb.npz", label=np.array([0, 1, 0, 1]), img=rng.random((4, 3, 5, 6)))
    ds = load_dataset(tmp_path / "rgb.npz", "label", image_size=(7, 8))
    assert kinds(ds) == {"img": ("image", "")}
    assert ds.labels.tolist() == ["0", "1", "0", "1"]
    assert ds.images["img"].shape == (4, 7, 8, 3)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "len.npz", label=np.array([0, 1, 0, 1]), v=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"len\.npz: arrays have different lengths .*every array needs one entry per row"):
        load_dataset(tmp_path / "len.npz", "label")
    np.savez(tmp_path / "dims.npz", label=np.array([0, 1]), v=np.zeros((2, 2, 2, 2, 2)))
    with pytest.raises(DataError, match=r"dims\.npz: array 'v' has 5 dimensions; use 1 \(scalar\), 2 \(vector\) or 3-4"):
        load_dataset(tmp_path / "dims.npz", "label")


# ---------------------------------------------------------------------------- 3. bad input


def simple_frame(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame({"x": np.arange(n, dtype=float), "y": ["a", "b"] * (n // 2)})


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=rf"data file not found: {re.escape(str(missing))} \(check the path"):
        load_dataset(missing, "y")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))} is a folder; give the table file inside it"):
        load_dataset(tmp_path, "y")


@pytest.mark.parametrize("name, shown", [("t.xlsx", "'.xlsx'"), ("noext", "'(no extension)'")])
def test_unknown_extension(tmp_path, name, shown):
    (tmp_path / name).write_bytes(b"PK\x03\x04 not a table")
    with pytest.raises(DataError, match=rf"{name}: unknown format {re.escape(shown)}; use \.csv, \.parquet, \.jsonl/\.ndjson or \.npz"):
        load_dataset(tmp_path / name, "y")


def test_empty_csv(tmp_path):
    (tmp_path / "e.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"e\.csv is empty: add a header row and at least one data row"):
        load_dataset(tmp_path / "e.csv", "y")


def test_header_only_csv(tmp_path):
    (tmp_path / "h.csv").write_text("x,y\n")
    with pytest.raises(DataError, match=r"h\.csv has no data rows"):
        load_dataset(tmp_path / "h.csv", "y")


@pytest.mark.parametrize("content", [b"", b"x,y\n"])
def test_empty_file_errors_suggest_a_fix(tmp_path, content):
    (tmp_path / "e.csv").write_bytes(content)
    with pytest.raises(DataError, match=r"e\.csv.*(add|fill|give|check|use|pass)"):
        load_dataset(tmp_path / "e.csv", "y")


def test_missing_label_column_lists_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", simple_frame().assign(z=1))
    with pytest.raises(DataError, match=r"t\.csv: no label column 'label'; columns are x, y, z \(pass --label NAME\)"):
        load_dataset(path, "label")


def test_single_class(tmp_path):
    path = write_csv(tmp_path / "t.csv", simple_frame().assign(y="only"))
    with pytest.raises(DataError, match=r"t\.csv: label column 'y' has a single class 'only'; classification needs two or more"):
        load_dataset(path, "y")


def test_empty_label_column_and_dropped_unlabelled_rows(tmp_path):
    path = write_csv(tmp_path / "t.csv", simple_frame().assign(y=np.nan))
    with pytest.raises(DataError, match=r"t\.csv: label column 'y' is empty"):
        load_dataset(path, "y")
    frame = simple_frame().assign(y=["a", None, "b", "a", None, "b"])
    ds = load_dataset(write_csv(tmp_path / "u.csv", frame), "y")
    assert ds.labels.tolist() == ["a", "b", "a", "b"]
    assert ds.frame["x"].tolist() == [0.0, 2.0, 3.0, 5.0]
    assert ds.unlabelled == 2
    assert ds.summary() == "u: 4 rows (2 more without a label left out), 2 classes of 'y'; tabular: x"
    assert "without a label" not in load_dataset(write_csv(tmp_path / "v.csv", simple_frame()), "y").summary()


def test_all_nan_feature_column_suggests_ignore(tmp_path):
    path = write_csv(tmp_path / "t.csv", simple_frame().assign(blank=np.nan))
    with pytest.raises(DataError, match=r"t\.csv: column 'blank' is entirely empty \(NaN\); drop it or pass --column blank:ignore"):
        load_dataset(path, "y")
    # Overriding its type does not help; ignoring it does.
    with pytest.raises(DataError, match=r"--column blank:ignore"):
        load_dataset(path, "y", columns={"blank": "text"})
    assert kinds(load_dataset(path, "y", columns={"blank": "ignore"})) == {"x": ("tabular", "numeric")}


def test_no_feature_columns_left(tmp_path):
    path = write_csv(tmp_path / "t.csv", simple_frame())
    with pytest.raises(DataError, match=r"t\.csv: no feature columns left besides the label; check --column overrides"):
        load_dataset(path, "y", columns={"x": "ignore"})


def test_unreadable_images_counted_with_examples(tmp_path):
    rng = np.random.default_rng(0)
    write_png(tmp_path / "imgs" / "ok0.png", grey_images(1)[0])
    write_png(tmp_path / "imgs" / "ok1.png", grey_images(1, seed=1)[0])
    (tmp_path / "imgs" / "bad1.png").write_bytes(rng.bytes(200))
    (tmp_path / "imgs" / "bad2.png").write_bytes(rng.bytes(200))
    paths = ["imgs/ok0.png", "imgs/bad1.png", "imgs/missing.png", "imgs/ok1.png", "imgs/bad2.png"]
    path = write_csv(tmp_path / "pics.csv", pd.DataFrame({"img": paths, "y": list("ababa")}))
    with pytest.raises(DataError) as info:
        load_dataset(path, "y")
    message = str(info.value)
    assert message.startswith(f"{path}: 3 of 5 images in column 'img' cannot be read, e.g. ")
    assert "row 1: imgs/bad1.png (UnidentifiedImageError)" in message
    assert "row 2: imgs/missing.png (FileNotFoundError)" in message
    assert "row 4: imgs/bad2.png (UnidentifiedImageError)" in message
    assert message.endswith(f"Fix or remove those rows (paths are relative to {tmp_path})")


def test_two_image_columns(tmp_path):
    for i in range(2):
        write_png(tmp_path / "imgs" / f"{i}.png", grey_images(1, seed=i)[0])
    frame = pd.DataFrame(
        {"front": ["imgs/0.png", "imgs/1.png"] * 2, "back": ["imgs/1.png", "imgs/0.png"] * 2, "y": list("abab")}
    )
    path = write_csv(tmp_path / "two.csv", frame)
    with pytest.raises(
        DataError,
        match=r"two\.csv: several image columns \(front, back\); .*pass --column NAME:ignore for the others",
    ):
        load_dataset(path, "y")
    ds = load_dataset(path, "y", columns={"back": "ignore"})
    assert list(ds.images) == ["front"]


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("name,y\ncaf\u00e9,a\nna\u00efve,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: not valid UTF-8 text \(.*\); re-save it as UTF-8"):
        load_dataset(path, "y")


def test_vector_column_with_different_lengths(tmp_path):
    frame = pd.DataFrame({"v": ["[1, 2]", "[1, 2, 3]", "[1, 2]", "[3, 4]"], "y": list("abab")})
    path = write_csv(tmp_path / "v.csv", frame)
    with pytest.raises(
        DataError,
        match=r"v\.csv: vector column 'v' has cells of different lengths \(.*2.*3.*\); every vector needs the same size",
    ):
        load_dataset(path, "y")


def test_vector_length_message_shows_plain_numbers(tmp_path):
    frame = pd.DataFrame({"v": ["[1, 2]", "[1, 2, 3]", "[1, 2]", "[3, 4]"], "y": list("abab")})
    path = write_csv(tmp_path / "v.csv", frame)
    with pytest.raises(DataError, match=r"different lengths \(\[2, 3\]\)"):
        load_dataset(path, "y")


def test_missing_group_column(tmp_path):
    path = write_csv(tmp_path / "t.csv", simple_frame())
    with pytest.raises(DataError, match=r"t\.csv: no group column 'site'; columns are x, y"):
        load_dataset(path, "y", group="site")


def test_group_column_with_empty_cells(tmp_path):
    path = write_csv(tmp_path / "t.csv", simple_frame().assign(site=["s1", None, "s2", "s1", None, "s2"]))
    with pytest.raises(DataError, match=r"t\.csv: group column 'site' has 2 empty cells; fill or drop them"):
        load_dataset(path, "y", group="site")


def test_group_column_is_not_a_feature(tmp_path):
    path = write_csv(tmp_path / "t.csv", simple_frame().assign(site=["s1", "s2", "s3"] * 2))
    ds = load_dataset(path, "y", group="site")
    assert kinds(ds) == {"x": ("tabular", "numeric")}
    assert ds.groups.tolist() == ["s1", "s2", "s3"] * 2
    assert ds.group_column == "site"
    assert ds.summary().startswith("t: 6 rows, 2 classes of 'y', 3 groups of 'site'; ")


def test_unknown_override_column(tmp_path):
    path = write_csv(tmp_path / "t.csv", simple_frame())
    with pytest.raises(DataError, match=r"t\.csv: --column names unknown column\(s\) ghost, zombie"):
        load_dataset(path, "y", columns={"zombie": "text", "ghost": "ignore"})
    (tmp_path / "t.csv.toml").write_text('[columns]\nphantom = "text"\n')
    with pytest.raises(DataError, match=r"unknown column\(s\) phantom"):
        load_dataset(path, "y")


def test_unknown_override_column_suggests_a_fix(tmp_path):
    path = write_csv(tmp_path / "t.csv", simple_frame())
    with pytest.raises(DataError, match=r"unknown column\(s\) ghost.*columns are x, y"):
        load_dataset(path, "y", columns={"ghost": "text"})


def test_bad_override_type(tmp_path):
    path = write_csv(tmp_path / "t.csv", simple_frame())
    with pytest.raises(DataError, match=r"--column: type override x:picture: type must be one of tabular, text, image, vector, ignore"):
        load_dataset(path, "y", columns={"x": "picture"})


def test_vector_column_with_missing_cell(tmp_path):
    frame = pd.DataFrame({"v": ["[1, 2]", None, "[1, 3]", "[3, 4]"], "y": list("abab")})
    ds = load_dataset(write_csv(tmp_path / "v.csv", frame), "y")
    assert kinds(ds) == {"v": ("vector", "")}


# ---------------------------------------------------------------------------- 4. images


def rgb_images(n: int, h: int = 10, w: int = 14, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [(6, 9), (16, 4), (10, 14)])
def test_grey_images_resized_to_declared_size(tmp_path, size):
    images = grey_images(4)
    for i in range(4):
        write_png(tmp_path / "g" / f"{i}.png", images[i])
    frame = pd.DataFrame({"img": [f"g/{i}.png" for i in range(4)], "y": list("abab")})
    ds = load_dataset(write_csv(tmp_path / "t.csv", frame), "y", image_size=size)
    out = ds.images["img"]
    assert out.shape == (4, *size, 1)
    assert out.dtype == np.uint8
    if size == (10, 14):
        np.testing.assert_array_equal(out[..., 0], images)


def test_rgb_images_resized_and_colour_kept(tmp_path):
    colours = [(10, 20, 30), (200, 100, 50), (0, 255, 128), (90, 90, 90)]
    for i, c in enumerate(colours):
        write_png(tmp_path / "c" / f"{i}.png", np.tile(np.array(c, np.uint8), (12, 7, 1)))
    frame = pd.DataFrame({"img": [f"c/{i}.png" for i in range(4)], "y": list("abab")})
    ds = load_dataset(write_csv(tmp_path / "t.csv", frame), "y", image_size=(5, 8))
    out = ds.images["img"]
    assert out.shape == (4, 5, 8, 3)
    for i, c in enumerate(colours):
        assert (out[i] == np.array(c, np.uint8)).all()


def test_mixed_grey_and_rgb_become_rgb(tmp_path):
    write_png(tmp_path / "m" / "0.png", np.full((6, 6), 77, np.uint8))
    write_png(tmp_path / "m" / "1.png", rgb_images(1, 6, 6)[0])
    frame = pd.DataFrame({"img": ["m/0.png", "m/1.png"] * 2, "y": list("abab")})
    ds = load_dataset(write_csv(tmp_path / "t.csv", frame), "y", image_size=(3, 3))
    out = ds.images["img"]
    assert out.shape == (4, 3, 3, 3)
    assert (out[0] == 77).all()  # grey replicated to three channels


def test_default_image_size_is_28(tmp_path):
    write_png(tmp_path / "p" / "0.png", rgb_images(1, 40, 50)[0])
    frame = pd.DataFrame({"img": ["p/0.png"] * 4, "y": list("abab")})
    ds = load_dataset(write_csv(tmp_path / "t.csv", frame), "y")
    assert ds.images["img"].shape == (4, 28, 28, 3)


# ---------------------------------------------------------------------------- 5. features


def tabular_dataset(tmp_path: Path, x: np.ndarray, name: str = "t.csv", **extra):
    frame = pd.DataFrame({"x": x, **extra, "y": ["a", "b"] * (len(x) // 2)})
    return load_dataset(write_csv(tmp_path / name, frame), "y")


def test_numeric_standardisation_uses_fit_rows_only(tmp_path):
    x = np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 1e6, -1e6])
    fit_rows = np.arange(8)
    features = build_features(tabular_dataset(tmp_path, x), fit_rows)
    assert features.specs["tabular"].shape == (1,)
    table = features.inputs["tabular"].numpy()
    assert table.shape == (10, 1)
    mean, std = x[fit_rows].mean(), x[fit_rows].std(ddof=0)
    np.testing.assert_allclose(table[:, 0], (x - mean) / std, rtol=1e-5)
    # Fitted on the first 8 rows: they standardise to mean 0, std 1 whatever the other rows hold.
    np.testing.assert_allclose(table[fit_rows, 0].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(table[fit_rows, 0].std(), 1.0, rtol=1e-5)

    tame = x.copy()
    tame[8:] = [4.0, 5.0]
    other = build_features(tabular_dataset(tmp_path, tame, "u.csv"), fit_rows).inputs["tabular"].numpy()
    np.testing.assert_array_equal(other[fit_rows], table[fit_rows])


def test_numeric_imputation_uses_fit_rows_median_and_adds_indicator(tmp_path):
    x = np.array([1.0, np.nan, 3, 10, 5, 6, 100, np.nan])
    fit_rows = np.arange(6)
    features = build_features(tabular_dataset(tmp_path, x), fit_rows)
    table = features.inputs["tabular"].numpy()
    assert table.shape == (8, 2)  # value + missing indicator
    median = np.nanmedian(x[fit_rows])  # 5.0, not influenced by the 100 outside the fit rows
    filled = np.where(np.isnan(x), median, x)
    missing = np.isnan(x).astype(float)
    for column, raw in ((0, filled), (1, missing)):
        m, s = raw[fit_rows].mean(), raw[fit_rows].std()
        np.testing.assert_allclose(table[:, column], (raw - m) / s, rtol=1e-5, atol=1e-6)


def test_categorical_one_hot_width(tmp_path):
    x = np.arange(10, dtype=float)
    cats = ["a", "a", "b", "b", "c", "c", "a", "d", "z", "z"]
    fit_rows = np.arange(8)
    features = build_features(tabular_dataset(tmp_path, x, c=cats), fit_rows)
    table = features.inputs["tabular"].numpy()
    # 1 numeric + a, b, c (seen twice or more) + one bucket for infrequent 'd'
    assert table.shape == (10, 5)
    assert features.specs["tabular"].shape == (5,)
    one_hot = table[:, 1:]
    np.testing.assert_array_equal(one_hot[:8].sum(axis=1), np.ones(8))
    np.testing.assert_array_equal(one_hot[0], one_hot[1])  # both 'a'
    np.testing.assert_array_equal(one_hot[0], one_hot[6])
    assert not np.array_equal(one_hot[0], one_hot[2])
    # 'z' never appears in the fit rows: encoded as all zeros, not as a new column.
    np.testing.assert_array_equal(one_hot[8:], np.zeros((2, 4)))


def test_categorical_width_depends_on_fit_rows_only(tmp_path):
    cats = ["a", "a", "b", "b"] + [f"new{i}" for i in range(6)] * 1
    x = np.arange(len(cats), dtype=float)
    features = build_features(tabular_dataset(tmp_path, x, c=cats), np.arange(4))
    assert features.inputs["tabular"].shape == (10, 3)  # numeric + a + b


def test_an_id_column_with_no_repeated_value_is_one_rare_bucket(tmp_path):
    # A product id per row (the fine-food reviews): no category is frequent; this used to crash
    # the split with numpy's "need at least one array to stack".
    x = np.arange(8, dtype=float)
    ids = [f"B00{i}" for i in range(8)]
    table = build_features(tabular_dataset(tmp_path, x, product=ids), np.arange(6)).inputs["tabular"].numpy()
    assert table.shape == (8, 2)  # numeric + the shared bucket of rare ids
    np.testing.assert_array_equal(table[:, 1], [1, 1, 1, 1, 1, 1, 0, 0])  # ids unseen when fitting: all zeros


def test_tokenize_is_stable_and_in_range():
    first = tokenize("Hello world, hello again", "txt")
    assert first == tokenize("Hello world, hello again", "txt")
    assert first == tokenize("hello WORLD hello again!", "txt")  # lower-cased, punctuation dropped
    assert len(first) == 4 + 3  # words + bigrams
    assert first[0] == first[2]  # "hello" twice gives the same id
    assert all(1 <= i <= TEXT_BUCKETS - 1 for i in first)
    assert tokenize("hello world", "other") != tokenize("hello world", "txt")  # ids depend on the column
    small = tokenize(" ".join(f"w{i}" for i in range(300)), "c", buckets=5)
    assert len(small) == MAX_TOKENS
    assert set(small) <= {1, 2, 3, 4}
    assert tokenize("", "txt") == []
    assert tokenize("...", "txt") == []


def test_text_features_pad_with_zero_and_match_tokenize(tmp_path):
    texts = SENTENCES[:3] + ["short one", SENTENCES[4], "x", SENTENCES[6], SENTENCES[7]]
    frame = pd.DataFrame({"txt": texts, "y": ["a", "b"] * 4})
    ds = load_dataset(write_csv(tmp_path / "t.csv", frame), "y")
    assert kinds(ds) == {"txt": ("text", "")}
    features = build_features(ds, np.arange(4))
    ids = features.inputs["text"].numpy()
    expected = [tokenize(t, "txt") for t in texts]
    length = max(len(e) for e in expected)
    assert ids.shape == (8, length)
    assert features.specs["text"].shape == (length,)
    assert features.specs["text"].vocab_size == TEXT_BUCKETS
    for row, e in zip(ids, expected):
        assert row[: len(e)].tolist() == e
        assert (row[len(e):] == 0).all()
    assert ids.min() >= 0 and ids.max() <= TEXT_BUCKETS - 1
    again = build_features(ds, np.arange(8)).inputs["text"].numpy()
    np.testing.assert_array_equal(again, ids)  # no vocabulary is fitted


def test_vector_and_image_statistics_use_fit_rows_only(tmp_path):
    vec = np.array([[1.0, 10], [2, 20], [3, 30], [4, 40], [500, -5], [600, -6]])
    imgs = np.zeros((6, 4, 4), np.uint8)
    for i in range(4):
        imgs[i] = 20 * (i + 1)
    imgs[4:] = 255
    np.savez(tmp_path / "a.npz", label=np.array(list("ababab")), vec=vec, img=imgs)
    ds = load_dataset(tmp_path / "a.npz", "label", image_size=(4, 4))
    fit_rows = np.arange(4)
    features = build_features(ds, fit_rows)
    got = features.inputs["vector"].numpy()
    m, s = vec[fit_rows].mean(axis=0), vec[fit_rows].std(axis=0)
    np.testing.assert_allclose(got, (vec - m) / s, rtol=1e-5)
    pixels = imgs.astype(np.float64) / 255.0
    pm, ps = pixels[fit_rows].mean(), pixels[fit_rows].std()  # population std, as StandardScaler
    image = features.inputs["image"].numpy()
    assert image.shape == (6, 1, 4, 4)
    assert features.specs["image"].shape == (1, 4, 4)
    np.testing.assert_allclose(image[:, 0], (pixels - pm) / ps, rtol=1e-4)


def test_integer_labels_with_a_missing_cell_keep_their_names(tmp_path):
    (tmp_path / "t.csv").write_text("x,y\n1,0\n2,1\n3,\n4,1\n5,0\n")
    ds = load_dataset(tmp_path / "t.csv", "y")
    assert ds.classes == ["0", "1"]
