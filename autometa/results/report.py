"""``autometa report``: one self-contained HTML page (plus its figures as PNGs) about a search.

Everything comes from the study database, read only, so a report can be made on any machine
that can reach the database, with or without the plugins that ran the search: configurations
are rebuilt from the namespaced trial parameters, not from plugin classes.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import statistics
import sys
import warnings
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

from autometa.errors import first_line

if "matplotlib.pyplot" not in sys.modules and "MPLBACKEND" not in os.environ:
    # Optuna's plots draw through pyplot; a report is written, never shown, so it must not
    # need a display. A backend the user already chose (notebook, MPLBACKEND) is left alone.
    matplotlib.use("Agg")

import numpy as np
import optuna
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from autometa._version import __version__
from autometa.config import FIXED, configuration_label, is_component_key, label_suffix
from autometa.data.metafeatures import rank_by_meta_features
from autometa.data.scoring import INTERVALS, format_score
from autometa.results.artifacts import folder_name
from autometa.store import DEFAULT_DB, queries, schema
from autometa.store.knowledge import shipped_scales
from autometa.store.storage import load_study

SECTIONS = ("summary", "history", "leaderboard", "plugins", "importance", "trials", "dataset")
NEAREST = 10
logger = logging.getLogger("autometa.results.report")


def build_report(study: str, db: str = DEFAULT_DB, output: Path | str | None = None) -> Path:
    """Write ``OUTPUT/report.html`` (figures embedded) and one PNG per figure; return the HTML path.

    ``output`` defaults to ``report-<study>`` in the working directory.
    """
    storage = schema.read_storage(db)
    try:
        loaded = load_study(storage, study, db)
        folder = Path(output) if output is not None else Path(f"report-{folder_name(study)}")
        folder.mkdir(parents=True, exist_ok=True)
        page = _Report(loaded, storage, db, folder).render()
    finally:
        storage.engine.dispose()
    target = folder / "report.html"
    target.write_text(page, encoding="utf-8")
    return target


# --- configurations from trial parameters ---------------------------------------------------


def _entry_label(entry: Mapping[str, Any]) -> str:
    encoders = ", ".join(f"{m}={e}" for m, e in (entry.get("encoders") or {}).items())
    mapping = label_suffix(entry.get("crossmodal_weight") or 0.0)
    return f"{entry.get('meta_algorithm', '?')} + {entry.get('fusion', '?')} [{encoders}]{mapping}"


def _hyperparameters(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if not is_component_key(k)}


# --- figures --------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


def _optuna_figure(draw, title: str, max_legend: int = 20) -> bytes:
    """Render one of Optuna's pyplot-based plots without leaking its style or its figure."""
    import matplotlib.pyplot as plt

    # Optuna's plots switch the global style to ggplot; rc_context puts it back.
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib plots are flagged experimental
        ax = draw()
        try:
            ax.figure.set_size_inches(8.5, 4.2)  # Optuna's default is narrow beside its legend
            ax.set_title(title)
            ax.set_ylabel("validation accuracy")
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            legend = ax.get_legend()
            # One legend entry per trial outgrows the plot itself in a long search.
            if legend is not None and len(legend.get_texts()) > max_legend:
                legend.remove()
            return _png(ax.figure)
        finally:
            plt.close(ax.figure)


def _box_figure(title: str, groups: list[tuple[str, list[float]]]) -> bytes:
    fig = Figure(figsize=(max(4.5, 1.0 + 1.1 * len(groups)), 3.8))
    ax = fig.subplots()
    positions = list(range(1, len(groups) + 1))
    ax.boxplot([[100 * v for v in values] for _, values in groups], positions=positions, widths=0.55,
               medianprops={"color": "#c0392b", "linewidth": 2}, showfliers=False)
    # With a handful of trials per box the points themselves say more than the quartiles.
    rng = np.random.default_rng(0)
    for position, (_, values) in zip(positions, groups):
        ax.scatter(position + rng.uniform(-0.12, 0.12, len(values)), [100 * v for v in values],
                   s=16, color="#2c6fbb", alpha=0.7, zorder=3)
    ax.set_xticks(positions, [f"{name}\n(n={len(values)})" for name, values in groups],
                  rotation=30 if len(groups) > 5 else 0, ha="right" if len(groups) > 5 else "center")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _importance_figure(importances: list[tuple[str, float]]) -> bytes:
    shown = importances[::-1]  # barh draws bottom-up: most important on top
    fig = Figure(figsize=(7.0, 1.2 + 0.32 * len(shown)))
    ax = fig.subplots()
    ax.barh([k for k, _ in shown], [v for _, v in shown], color="#2c6fbb")
    for y, (_, v) in enumerate(shown):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("importance (fANOVA, share of validation-accuracy variance)")
    ax.set_xlim(0, max([v for _, v in shown] + [0.0]) * 1.15 or 1.0)
    ax.set_title("Hyperparameter importance")
    return _png(fig)


# --- the page -------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _chosen(params: Mapping[str, Any], key: str) -> Any:
    """The plugin a trial chose for ``key``: under ``key``, or ``fixed.`` + key for a fixed-features learner."""
    return params.get(key, params.get(FIXED + key))


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _score(entry: Mapping[str, Any]) -> str:
    """A stored test score (a leaderboard or baseline entry) as the leaderboard prints it."""
    columns = schema.score_columns(entry)
    return format_score(columns["test_mean"], columns["test_low"], columns["test_high"])


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = (), cls: str = "") -> str:
    """A table from already-escaped cells; ``numeric`` columns are right-aligned."""
    numeric = set(numeric)
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{c}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<table{f" class={cls}" if cls else ""}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv(rows: Iterable[tuple[str, str]]) -> str:
    """A two-column key/value table; values are already escaped."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class=kv><tbody>{body}</tbody></table>"


def _params_details(params: Mapping[str, Any]) -> str:
    tuned = _hyperparameters(params)
    if not tuned:
        return ""
    items = "".join(f"<tr><td><code>{_e(k)}</code></td><td class=num>{_e(_value(v))}</td></tr>" for k, v in tuned.items())
    return f"<details><summary>hyperparameters ({len(tuned)})</summary><table class=inner>{items}</table></details>"


def _note(text: str) -> str:
    return f"<p class=note>{_e(text)}</p>"


class _Report:
    def __init__(self, study: optuna.Study, storage: optuna.storages.RDBStorage, db: str, folder: Path):
        self.study = study
        self.storage = storage
        self.db_shown = make_url(db).render_as_string(hide_password=True)
        self.folder = folder
        self.attrs = study.user_attrs
        self.trials = study.get_trials(deepcopy=False)
        self.complete = [t for t in self.trials if t.state == TrialState.COMPLETE and t.value is not None]
        values = {t.number: t.value for t in self.trials}
        self.leaderboard = [{**e, "validation_accuracy": values.get(e.get("trial"), e.get("validation_accuracy"))}
                            for e in queries.finalists(db, study.study_name, self.attrs)]
        self.ensemble = queries.stored_ensemble(db, study.study_name)

    def figure(self, name: str, data: bytes, alt: str, caption: str = "") -> str:
        (self.folder / f"{name}.png").write_bytes(data)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
        return f'<figure><img src="{uri}" alt="{_e(alt)}" data-file="{_e(name)}.png">{cap}</figure>'

    def drawn(self, name: str, alt: str, caption: str, draw) -> str:
        """A figure, or a note saying why it could not be drawn: one bad plot must not lose the report."""
        try:
            return self.figure(name, draw(), alt, caption)
        except Exception as exc:  # noqa: BLE001 - reported on the page and in the log
            logger.warning("report figure %s failed: %s: %s", name, type(exc).__name__, exc)
            return _note(f"The {alt} figure could not be drawn: {type(exc).__name__}: {first_line(exc)}")

    def render(self) -> str:
        parts = {
            "summary": ("Summary", self.summary()),
            "history": ("Optimisation history", self.history()),
            "leaderboard": ("Leaderboard", self.leaderboard_section()),
            "plugins": ("Plugins compared", self.plugins()),
            "importance": ("Hyperparameter importance", self.importance()),
            "trials": ("All trials", self.trials_section()),
            "dataset": ("Dataset", self.dataset()),
        }
        nav = " · ".join(f'<a href="#{key}">{_e(title)}</a>' for key, (title, _) in parts.items())
        sections = "\n".join(
            f'<section id="{key}"><h2>{_e(title)}</h2>\n{body}\n</section>' for key, (title, body) in parts.items()
        )
        name = self.study.study_name
        when = datetime.now().astimezone().isoformat(timespec="seconds")
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>autometa report: {_e(name)}</title><style>{_CSS}</style></head><body>\n"
            f"<header><h1>autometa report: {_e(name)}</h1>"
            f"<p class=sub>{_e(self.db_shown)} · generated {_e(when)} by autometa {_e(__version__)}</p>"
            f"<nav>{nav}</nav></header>\n<main>{sections}</main>\n</body></html>\n"
        )

    # -- sections -------------------------------------------------------------------------

    def summary(self) -> str:
        a = self.attrs
        counts = Counter(t.state for t in self.trials)
        unfinished = counts[TrialState.RUNNING] + counts[TrialState.WAITING]
        budget = (f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
                  f"{counts[TrialState.FAIL]} failed ({len(self.trials)} in all"
                  + (f"; {unfinished} running or waiting)" if unfinished else ")"))
        walls = [w for t in self.trials if (w := _wall_time(t)) is not None]
        host = a.get("host")
        host_text = (" · ".join(f"{k} {v}" if k != "host" else str(v) for k, v in host.items())
                     if isinstance(host, Mapping) else str(host or "-"))
        devices = sorted({str(t.user_attrs["device"]) for t in self.trials if "device" in t.user_attrs})
        starts = [t.datetime_start for t in self.trials if t.datetime_start]
        ends = [t.datetime_complete for t in self.trials if t.datetime_complete]
        rows = [
            ("Study", f"<code>{_e(self.study.study_name)}</code>"),
            ("Dataset", _e(a.get("dataset", "-"))),
            ("Label", f"<code>{_e(a.get('label', '-'))}</code>"),
            ("Protocol", _e(a.get("protocol", "-"))),
            ("Fingerprint", f"<code>{_e(a.get('fingerprint', '-'))}</code>"),
            ("Trials", _e(budget)),
            ("Wall time", _e(f"{_seconds(sum(walls)) if walls else '-'} in all; "
                             f"median {_seconds(statistics.median(walls)) if walls else '-'} per trial")),
            ("Ran", _e(f"{min(starts):%Y-%m-%d %H:%M} to {max(ends):%Y-%m-%d %H:%M}" if starts and ends else "-")),
            ("Devices", _e(", ".join(devices) or "-")),
            ("Host", _e(host_text)),
            ("autometa version", _e(a.get("autometa_version", "-"))),
        ]
        out = [_kv(rows)]
        if not self.complete:
            out.append(_note("No trial completed, so there is no best configuration yet."))
            reasons = Counter(_reason(t) for t in self.trials if t.state in (TrialState.FAIL, TrialState.PRUNED))
            if reasons:
                items = "".join(f"<li>{_e(r or 'no reason recorded')} <span class=muted>({n}×)</span></li>"
                                for r, n in reasons.most_common(5))
                out.append(f"<p>Most common reasons trials stopped:</p><ul>{items}</ul>")
            return "\n".join(out)
        # The leaderboard's winner is the model the search saved; ties aside it is the top trial.
        numbers = {t.number: t for t in self.complete}
        top = self.leaderboard[0].get("trial") if self.leaderboard else None
        best = numbers[top] if top in numbers else max(self.complete, key=lambda t: t.value)
        finalist = next((e for e in self.leaderboard if e.get("trial") == best.number), None)
        test = f"; test {_score(finalist)}" if finalist else ""
        out.append(
            f"<h3>Best configuration</h3><p class=best><strong>{_e(configuration_label(best.params))}</strong>"
            f" <span class=muted>trial {best.number}: validation {_e(_pct(best.value))}{_e(test)}</span></p>"
        )
        tuned = _hyperparameters(best.params)
        if tuned:
            out.append(_table(("hyperparameter", "value"),
                              [(f"<code>{_e(k)}</code>", _e(_value(v))) for k, v in tuned.items()], numeric=(1,)))
        return "\n".join(out)

    def history(self) -> str:
        if not self.complete:
            return _note("No trial completed, so there is no optimisation history to plot.")
        from optuna.visualization.matplotlib import plot_intermediate_values, plot_optimization_history

        out = [self.drawn(
            "history", "optimisation history",
            "Validation accuracy of each complete trial (dots) and the best so far (line).",
            lambda: _optuna_figure(lambda: plot_optimization_history(self.study), "Optimisation history"),
        )]
        if any(t.intermediate_values for t in self.trials):
            out.append(self.drawn(
                "intermediate", "intermediate values",
                "Validation accuracy at each evaluation step of every trial; pruned trials stop early.",
                lambda: _optuna_figure(lambda: plot_intermediate_values(self.study), "Validation accuracy during training"),
            ))
        return "\n".join(out)

    def leaderboard_section(self) -> str:
        if not self.leaderboard:
            why = ("no trial completed" if not self.complete else
                   "the search stopped before its finalists were scored; run the same `autometa search` again to score them")
            return _note(f"No leaderboard is stored: {why}.")
        first = schema.score_columns(self.leaderboard[0])
        unit, units = first["test_unit"], first["test_units"]
        over = (f" over {units} test {unit} ({INTERVALS[unit]})" if unit in INTERVALS else
                f" over {units} test units" if units else "")
        params = {t.number: t.params for t in self.trials}
        rows = []
        for e in self.leaderboard:
            count = e.get("parameters")
            trial_params = params.get(e.get("trial"))
            rows.append((
                _e(e.get("rank", "")), _e(e.get("trial", "")),
                _e(configuration_label(trial_params) if trial_params else _entry_label(e))
                + _params_details(trial_params or {}),
                _e(_pct(e.get("validation_accuracy"))),
                _e(_score(e)),
                _e(f"{count:,}" if isinstance(count, int) else (count if count is not None else "-")),
            ))
        if self.ensemble is not None:
            e = self.ensemble
            members = ", ".join(f"{m['trial']}×{m['weight']:.2f}" for m in e["members"])
            kept = queries.ensemble_note(e["chosen"], e.get("best_member_validation"))
            rows.append(("", "", f"<em>ensemble of trials {_e(members)}</em> ({_e(kept)})", _e(_pct(e["validation"])),
                         _e(format_score(e["test_mean"], e["test_low"], e["test_high"])), "-"))
        for b in schema.attribute_baselines(self.attrs):
            rows.append(("", "", f"<em>baseline: {_e(b.get('label'))}</em>", "-", _e(_score(b)), "-"))
        notes = [w for w in self.attrs.get("test_warnings") or [] if isinstance(w, str)]
        return "\n".join([
            f"<p>The top {len(self.leaderboard)} distinct configurations by validation accuracy, scored once on the "
            f"held-out test data (mean and 95% confidence interval{_e(over)}), then the baselines: what a simple "
            "rule or a plain linear model scores on the same test data. <strong>Test data was used only for "
            "these rows</strong>; every other accuracy in this report is a validation score.</p>",
            _table(("rank", "trial", "configuration", "validation", "test [95% CI]", "parameters"), rows,
                   numeric=(0, 1, 3, 4, 5), cls="leaderboard"),
            *(_note(f"Note: {w}.") for w in notes),
        ])

    def plugins(self) -> str:
        # A fixed-features learner's choices (fixed.fusion, fixed.encoder.<m>) count with the others'.
        if not self.complete:
            return _note("No trial completed, so there are no validation accuracies to compare plugins by.")
        choices = self.attrs.get("choices") if isinstance(self.attrs.get("choices"), Mapping) else {}
        keys = list(choices) or sorted({k.removeprefix(FIXED) for t in self.trials for k in t.params if is_component_key(k)})
        keys = sorted(keys, key=lambda k: (k != "meta_algorithm", k != "fusion", k))
        out = [_note("Validation accuracy of the complete trials grouped by each plugin choice "
                     "(boxes: quartiles and median; dots: trials). Pruned and failed trials are counted in the tables.")]
        for key in keys:
            title = {"meta_algorithm": "Meta-algorithm", "fusion": "Fusion"}.get(key, f"Encoder for {key.split('.', 1)[-1]}")
            by_name: dict[str, list[float]] = defaultdict(list)
            for t in self.complete:
                if _chosen(t.params, key) is not None:
                    by_name[str(_chosen(t.params, key))].append(t.value)
            stopped = {state: Counter(str(_chosen(t.params, key)) for t in self.trials
                                      if t.state == state and _chosen(t.params, key) is not None)
                       for state in (TrialState.PRUNED, TrialState.FAIL)}
            groups = sorted(by_name.items(), key=lambda kv: -statistics.median(kv[1]))
            out.append(f"<h3>{_e(title)}</h3>")
            if len(groups) > 1:
                out.append(self.drawn(f"plugins_{folder_name(key)}", f"validation accuracy by {key}", "",
                                      lambda groups=groups, title=title: _box_figure(title, groups)))
            elif groups:
                out.append(_note(f"Every complete trial used {groups[0][0]}: nothing to compare."))
            names = [n for n, _ in groups] + sorted(
                {n for c in stopped.values() for n in c} - set(by_name))
            rows = [(
                f"<code>{_e(n)}</code>", _e(len(by_name.get(n, []))), _e(stopped[TrialState.PRUNED][n]),
                _e(stopped[TrialState.FAIL][n]),
                _e(_pct(statistics.median(by_name[n])) if n in by_name else "-"),
                _e(_pct(max(by_name[n])) if n in by_name else "-"),
            ) for n in names]
            out.append(_table(("plugin", "complete", "pruned", "failed", "median", "best"), rows, numeric=(1, 2, 3, 4, 5)))
            untried = [str(n) for n in choices.get(key, []) if str(n) not in names]
            if untried:
                out.append(_note(f"Available but not tried yet: {', '.join(untried)}."))
        return "\n".join(out)

    def importance(self) -> str:
        if len(self.complete) < 2:
            return _note(f"Hyperparameter importance needs at least two complete trials; this study has "
                         f"{len(self.complete)}.")
        from optuna.importance import FanovaImportanceEvaluator

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # Seeded: fANOVA's random forest would otherwise rank differently on every report.
                raw = optuna.importance.get_param_importances(self.study, evaluator=FanovaImportanceEvaluator(seed=0))
        except Exception as exc:  # noqa: BLE001 - explained on the page instead
            return _note(f"Optuna could not compute importances: {type(exc).__name__}: {first_line(exc)}")
        # A parameter that never changed explains nothing; listing it as 0 would only add noise.
        fixed = sorted(k for k in raw if len({repr(t.params.get(k)) for t in self.complete}) == 1)
        importances = [(k, float(v)) for k, v in raw.items() if k not in fixed and math.isfinite(float(v))]
        conditional = sorted({k for t in self.complete for k in t.params} - set(raw))
        notes = []
        if fixed:
            notes.append(_note(f"{len(fixed)} parameter(s) had the same value in every complete trial and are "
                               "not shown: " + ", ".join(fixed) + "."))
        if conditional:
            notes.append(_note(f"{len(conditional)} parameter(s) exist only in some trials (those of one plugin) "
                               "and are left out: " + ", ".join(conditional) + "."))
        if not importances:
            return "\n".join([_note("No parameter shared by every complete trial took more than one value, so "
                                     "there is nothing to rank."), *notes])
        out = [
            "<p>How much of the variance in validation accuracy each parameter explains (fANOVA over the "
            f"{len(self.complete)} complete trials). With few trials this is a rough guide.</p>",
            self.drawn("importance", "hyperparameter importance", "", lambda: _importance_figure(importances[:25])),
        ]
        return "\n".join(out + notes)

    def trials_section(self) -> str:
        if not self.trials:
            return _note("The study has no trials yet.")
        rows = [(
            _e(t.number), f"<span class='state {t.state.name.lower()}'>{_e(t.state.name.lower())}</span>",
            _e(_pct(t.value) if t.state == TrialState.COMPLETE else "-"),
            _e(_seconds(_wall_time(t))),
            _e(configuration_label(t.params)) + _params_details(t.params),
            _e(_reason(t)),
        ) for t in self.trials]
        return _table(("trial", "state", "validation", "duration", "configuration", "reason"), rows,
                      numeric=(0, 2, 3), cls="trials")

    def dataset(self) -> str:
        out = []
        columns = self.attrs.get("columns")
        if isinstance(columns, Mapping) and columns:
            by_modality: dict[str, list[str]] = defaultdict(list)
            for column, modality in columns.items():
                by_modality[str(modality)].append(str(column))
            rows = [(_e(m), _e(len(cs)), ", ".join(f"<code>{_e(c)}</code>" for c in cs)) for m, cs in by_modality.items()]
            label = self.attrs.get("label")
            if label is not None:
                rows.append(("<em>label</em>", "1", f"<code>{_e(label)}</code>"))
            out.append("<h3>Columns</h3>" + _table(("modality", "columns", "names"), rows, numeric=(1,), cls="columns"))
        else:
            out.append(_note("The study does not record its columns."))
        features = self.attrs.get("meta_features")
        if isinstance(features, Mapping) and features:
            out.append("<h3>Meta-features</h3>" + _table(
                ("feature", "value"), [(f"<code>{_e(k)}</code>", _e(_value(v))) for k, v in features.items()],
                numeric=(1,), cls="meta-features"))
        out.append("<h3>Nearest stored datasets</h3>")
        out.append(self.nearest(features if isinstance(features, Mapping) else None))
        return "\n".join(out)

    def nearest(self, features: Mapping[str, Any] | None) -> str:
        if not features:
            return _note("This study stores no meta-features (it predates them), so it cannot be compared "
                         "with other datasets.")
        others = {s.study_name: s for s in self.storage.get_all_studies()
                  if s.study_name != self.study.study_name and isinstance(s.user_attrs.get("meta_features"), Mapping)}
        ranked = rank_by_meta_features(features, {n: s.user_attrs["meta_features"] for n, s in others.items()},
                                       shipped_scales())
        if not ranked:
            return _note("No other study in this database has meta-features in common with this one.")
        rows = []
        for n in ranked[:NEAREST]:
            other = others[n.study]
            try:
                best = self.storage.get_best_trial(other._study_id)  # noqa: SLF001 - FrozenStudy has no public id
                best_text, config = _pct(best.value), configuration_label(best.params)
            except (ValueError, RuntimeError):
                best_text, config = "-", "no complete trial"
            same = other.user_attrs.get("fingerprint") == self.attrs.get("fingerprint")
            rows.append((
                f"<code>{_e(n.study)}</code>" + (" <span class=muted>(same data)</span>" if same else ""),
                _e(other.user_attrs.get("dataset", "-")), _e(other.user_attrs.get("protocol", "-")),
                _e(f"{n.distance:.3f}"), _e(n.shared), _e(best_text), _e(config),
            ))
        return "\n".join([
            "<p>Other studies in this database, nearest first, by warm start's distance: size, classes, "
            "per-modality statistics and landmarkers weighted equally, each feature on the shipped knowledge "
            "base's scale, a modality one side lacks counted as far apart.</p>",
            _table(("study", "dataset", "protocol", "distance", "shared features", "best validation",
                    "best configuration"), rows, numeric=(3, 4, 5), cls="nearest"),
        ])


def _wall_time(trial: FrozenTrial) -> float | None:
    value = trial.user_attrs.get("wall_time_s")
    if isinstance(value, (int, float)):
        return float(value)
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def _reason(trial: FrozenTrial) -> str:
    if trial.state == TrialState.FAIL:
        return str(trial.user_attrs.get("fail_reason", "failed (no reason recorded)"))
    if trial.state == TrialState.PRUNED:
        return str(trial.user_attrs.get("prune_reason", "pruned"))
    return ""


_CSS = """
:root { --fg: #1d2330; --muted: #6b7280; --line: #e3e6eb; --accent: #2c6fbb; --bg-alt: #f6f8fa; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0; background: #fff; }
header { background: #1d2330; color: #fff; padding: 1.2rem 2rem 0.8rem; }
header h1 { margin: 0; font-size: 1.45rem; font-weight: 600; word-break: break-all; }
header .sub { margin: 0.2rem 0 0.6rem; color: #b8c0cc; font-size: 0.85rem; }
header nav a { color: #cfe0f5; margin-right: 0.2rem; text-decoration: none; font-size: 0.9rem; }
header nav a:hover { text-decoration: underline; }
main { max-width: 1150px; margin: 0 auto; padding: 0 2rem 3rem; }
section { border-bottom: 1px solid var(--line); padding: 1rem 0 1.4rem; }
h2 { font-size: 1.25rem; margin: 0.6rem 0; color: var(--accent); }
h3 { font-size: 1.02rem; margin: 1.2rem 0 0.4rem; }
table { border-collapse: collapse; margin: 0.4rem 0 0.8rem; font-size: 0.88rem; }
th, td { padding: 0.3rem 0.65rem; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { background: var(--bg-alt); border-bottom: 2px solid var(--line); white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { background: none; color: var(--muted); font-weight: 500; white-space: nowrap; }
table.inner { margin: 0.3rem 0; font-size: 0.82rem; }
table.inner td { border: none; padding: 0.05rem 0.6rem 0.05rem 0; }
code { font: 0.85em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: break-word; }
details summary { cursor: pointer; color: var(--muted); font-size: 0.8rem; }
figure { margin: 0.6rem 0 1rem; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 0.85rem; }
.note { color: var(--muted); }
.muted { color: var(--muted); font-size: 0.9em; }
.best { font-size: 1.05rem; }
.state { padding: 0.05rem 0.45rem; border-radius: 0.7rem; font-size: 0.78rem; background: #eceff3; }
.state.complete { background: #dcf2e3; color: #17623a; }
.state.pruned { background: #fdf0d5; color: #855c00; }
.state.fail { background: #fbe0e0; color: #9b1c1c; }
"""
