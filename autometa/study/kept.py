"""Trained models kept from the trials that trained them, so the leaderboard and the ensemble
load the finalists' weights instead of training them again.

A worker process saves a complete trial's tensors (safetensors, never pickle) to a per-study
folder when its validation accuracy is among the study's best ``KEPT`` there, and deletes the
ones that fall out. The folder lies beside an SQLite database (``studies.db-weights/STUDY``),
else in the system's temporary folder; where the weights are missing (a study from an earlier
run, a worker on another machine) the leaderboard retrains from the trial's seed.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from sqlalchemy.engine import make_url

from autometa.components import MetaAlgorithm
from autometa.results.artifacts import folder_name, load_module_tensors, module_tensors

KEPT = 8  # models kept per study: the finalists (--top-k 3) and the ensemble's candidates
_NAME = re.compile(r"^trial-(\d+)-(\d+\.\d+)\.safetensors$")


def weights_folder(db: str, study: str) -> Path:
    """Where the kept models of ``study`` in database ``db`` lie."""
    url = make_url(db)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" and not url.query.get("uri"):
        return Path(url.database + "-weights") / folder_name(study)
    where = hashlib.sha256(url.render_as_string(hide_password=True).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "autometa-weights" / where / folder_name(study)


class KeptModels:
    """The kept models of one study: ``keep`` after a trial, ``restore`` into a rebuilt model."""

    def __init__(self, db: str, study: str, kept: int = KEPT):
        self.folder, self.kept = weights_folder(db, study), kept

    def _listed(self) -> dict[int, tuple[float, Path]]:
        found = {}
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                match = _NAME.match(path.name)
                if match:
                    found[int(match[1])] = (float(match[2]), path)
        return found

    def keep(self, number: int, value: float, algorithm: MetaAlgorithm) -> bool:
        """Save trial ``number``'s model if its validation ``value`` is among the best kept;
        delete those that fall out. Whether it was kept."""
        listed = self._listed()
        best = sorted((v for n, (v, _) in listed.items() if n != number), reverse=True)[: self.kept]
        if len(best) == self.kept and value <= best[-1]:
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"trial-{number}-{value:.8f}.safetensors"
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        save_file(module_tensors(algorithm), str(partial))
        os.replace(partial, target)  # whole or not at all: another process may read it now
        listed[number] = (value, target)
        for stale in sorted(listed, key=lambda n: listed[n][0], reverse=True)[self.kept:]:
            listed[stale][1].unlink(missing_ok=True)  # another worker may have pruned it first
        return target.exists()

    def clear(self) -> None:
        """Delete every kept model: for a new study, whose name a study of a deleted database may
        have had (its files, numbered from trial 0 too, would be loaded as the new trials')."""
        for _, path in self._listed().values():
            path.unlink(missing_ok=True)

    def restore(self, number: int, algorithm: MetaAlgorithm) -> bool:
        """Load trial ``number``'s kept weights into ``algorithm`` (built for its configuration);
        False when they are missing or do not fit."""
        found = self._listed().get(number)
        if found is None:
            return False
        try:
            load_module_tensors(algorithm, load_file(str(found[1])))
        except (SafetensorError, OSError, RuntimeError, ValueError):
            return False
        return True
