"""Storage: the one owner of database URLs and engines (storage.py), the autometa_ schema,
queries, and the knowledge base.

The two paths every layer above names are defined here, where reading them costs nothing (the
command line shows them as defaults without loading SQLAlchemy or Optuna).
"""

from pathlib import Path

DEFAULT_DB = "sqlite:///studies.db"
# The warm-start prior shipped with autometa (`autometa kb export` writes one).
PRIOR_PATH = Path(__file__).parents[1] / "prior" / "knowledge.json"
