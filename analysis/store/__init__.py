"""The artifact store: precomputed runs written atomically, checked for staleness, read by the pages.

No Streamlit and no torch here: pages read through :class:`RunStore`; ``analysis.precompute`` writes
through :class:`RunWriter`. One module per job:

* :mod:`~analysis.store.layout`: where runs live, names, routing column types and sort order;
* :mod:`~analysis.store.publish`: :class:`RunWriter`, atomic writes, locks and the symlink publish;
* :mod:`~analysis.store.status`: :func:`run_status` (missing / partial / stale / ready), rebuild checks,
  the manifest's inputs and the model's declaration (:func:`read_spec`);
* :mod:`~analysis.store.sink`: :func:`write_routing` / :class:`RoutingSink`, a routing table in the layout its
  experts call for ("wide"; "split" above 16 experts: E-wide arrays in a float16 side table);
* :mod:`~analysis.store.aggregates`: per-layer load counts, the entropy sample and co-selection counts,
  computed once at publish;
* :mod:`~analysis.store.reader`: :class:`RunStore`, DuckDB page queries over one published version.
"""

from analysis.store.aggregates import ENTROPY_SAMPLE_PER_LAYER, write_routing_aggregates, write_routing_with_aggregates
from analysis.store.layout import (
    DENSE_INLINE_MAX_EXPERTS,
    EXAMPLE_KEY,
    MANIFEST,
    ROUTING_GROUPS,
    ROUTING_SORT,
    ROUTING_TYPES,
    ROW_GROUP_SIZE,
    STORE_FORMAT,
    rebuild_command,
    resolve_root,
    runs_dir,
)
from analysis.store.publish import RunWriter
from analysis.store.reader import RunStore
from analysis.store.sink import RoutingSink, write_routing
from analysis.store.status import (
    DATASET_HASH_TTL_S,
    RunStatus,
    code_version,
    inputs_manifest,
    list_runs,
    needs_rebuild,
    read_spec,
    rebuild_reasons,
    run_status,
)

__all__ = [
    "RunWriter",
    "RunStore",
    "RunStatus",
    "list_runs",
    "run_status",
    "needs_rebuild",
    "rebuild_reasons",
    "inputs_manifest",
    "read_spec",
    "code_version",
    "resolve_root",
    "runs_dir",
    "write_routing_with_aggregates",
    "write_routing_aggregates",
    "rebuild_command",
    "ROUTING_TYPES",
    "ROUTING_SORT",
    "ROUTING_GROUPS",
    "MANIFEST",
    "ROW_GROUP_SIZE",
    "STORE_FORMAT",
    "EXAMPLE_KEY",
    "ENTROPY_SAMPLE_PER_LAYER",
    "DATASET_HASH_TTL_S",
    "RoutingSink",
    "write_routing",
    "DENSE_INLINE_MAX_EXPERTS",
]
