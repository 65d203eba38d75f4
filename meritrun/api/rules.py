"""The spec's cross-field rules, each in Python (for `meritrun validate`, the local runner and
the operator) and in CEL (for the API server at admission), side by side so they stay one rule.

Also which fields a live run may change (`MUTABLE_FIELDS`) and which it may not: the plan is
made from the others, so an edit would mix two runs' artifacts. `IMMUTABLE_FIELDS` feeds both
the CRD's transition rules (`self == oldSelf`) and `immutable_changes`, the same check for a
local rerun.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import limits as lim

if TYPE_CHECKING:
    from .spec import MeritRunSpec

# Spec-level CEL rules (rule, message). Sizes are bounded by limits, so their cost is too.
_SRC = "!has(self.data.sources) || self.data.sources.all(s, "
SPEC_CEL: list[tuple[str, str]] = [
    ("!has(self.mixtureSearch) || !has(self.mixtureSearch.enabled) || "
     "!self.mixtureSearch.enabled || has(self.data.heldOutUri)",
     "mixtureSearch.enabled needs data.heldOutUri to score mixtures"),
    ("!has(self.merge) || !has(self.merge.method) || self.merge.method != 'ota' || "
     "!has(self.training) || !has(self.training.method) || self.training.method != 'lora'",
     "merge.method ota needs full fine-tuning (training.method full)"),
    ("!has(self.merge) || !has(self.merge.method) || self.merge.method != 'ota' || "
     "!has(self.training) || !has(self.training.secondMoments) || "
     "self.training.secondMoments != 'none'",
     "merge.method ota needs training.secondMoments rank1 or full"),
    (_SRC + "!has(s.site) || (has(self.sites) && self.sites.exists(t, t.name == s.site)))",
     "every data.sources[].site must name an entry of spec.sites"),
    ("!has(self.sites) || self.sites.all(t, !has(t.sketches) || !t.sketches || "
     "(has(self.data.sources) && self.data.sources.exists(s, has(s.site) && s.site == t.name)))",
     "sites[].sketches: no source in data.sources lives at that site"),
    ("!has(self.partitioning) || !has(self.partitioning.strategy) || "
     "self.partitioning.strategy != 'conflictPCA' || !has(self.sites) || "
     + _SRC + "!has(s.site) || (has(s.uri) && self.sites.all(t, t.name != s.site || "
     "(has(t.mode) && t.mode == 'kubeconfig'))))",
     "conflictPCA needs every source's data at the hub: use partitioning.strategy bySite "
     "for sources at pull sites or without a uri"),
]

# What a live run may change: how long and how hard to keep going, and whether to keep the
# artifacts when it is deleted. Everything else is fixed once the run exists, since the plan,
# the partitions, their artifacts and the merge are made from it (a test checks that the two
# lists cover every spec field).
MUTABLE_FIELDS: tuple[str, ...] = ("suspend", "activeDeadlineSeconds", "backoffLimit",
                                   "deleteArtifacts")
IMMUTABLE_FIELDS: tuple[str, ...] = (
    "baseModel", "data", "storage", "profiling", "partitioning", "training", "template",
    "sites", "merge", "mixtureSearch",
)
MUTABLE_NOTE = f"only {', '.join(MUTABLE_FIELDS)} may change on a live run"


def _transition_rule(field: str) -> dict[str, str]:
    """`self == oldSelf` for spec.<field>, also when the field is added or removed."""
    parent, _, leaf = field.rpartition(".")
    new, old = ("self." + parent, "oldSelf." + parent) if parent else ("self", "oldSelf")
    rule = (f"has({new}.{leaf}) == has({old}.{leaf}) && "
            f"(!has({new}.{leaf}) || {new}.{leaf} == {old}.{leaf})")
    if parent:  # the parent object may be absent on either side
        rule = (f"(has({new}) && has({old})) ? ({rule}) : "
                f"(has({new}) == has({old}))")
    return {"rule": rule, "message": f"spec.{field} cannot change once the run exists "
                                     f"({MUTABLE_NOTE}); create a new MeritRun instead"}


def spec_validations() -> list[dict[str, str]]:
    """Every CEL rule on spec: the cross-field rules and the immutability transition rules."""
    return ([{"rule": r, "message": m} for r, m in SPEC_CEL]
            + [_transition_rule(f) for f in IMMUTABLE_FIELDS])


def _get(wire: dict[str, Any], dotted: str) -> Any:
    node: Any = wire
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def immutable_changes(old: MeritRunSpec, new: MeritRunSpec) -> list[str]:
    """The immutable fields (spec.<field>) that differ between two specs, in a fixed order."""
    a, b = old.to_wire(), new.to_wire()
    return [f"spec.{f}" for f in IMMUTABLE_FIELDS if _get(a, f) != _get(b, f)]


def check_spec(spec: MeritRunSpec) -> None:
    """The Python side of SPEC_CEL, plus what CEL cannot count; ValueError names the field."""
    if spec.mixture_search.enabled and not spec.data.held_out_uri:
        raise ValueError("mixtureSearch.enabled needs data.heldOutUri to score mixtures")
    if spec.merge.method == "ota" and spec.training.method == "lora":
        raise ValueError("merge.method ota needs full fine-tuning: LoRA partitions carry "
                         "no second moments of the merged weights")
    if spec.merge.method == "ota" and spec.training.second_moments == "none":
        raise ValueError("merge.method ota needs training.secondMoments rank1 or full")
    _check_sites(spec)
    _check_sources(spec)
    _check_search(spec)


def _check_sites(spec: MeritRunSpec) -> None:
    names = [s.name for s in spec.sites or []]
    sources = spec.data.sources or []
    for i, site in enumerate(spec.sites or []):
        if site.name in names[:i]:
            raise ValueError(f"sites[{i}].name {site.name!r} repeats sites"
                             f"[{names.index(site.name)}]")
        if site.sketches and site.mode != "pull":
            raise ValueError(f"sites[{i}].sketches: only pull sites upload sketches")
        if site.sketches and not any(src.site == site.name for src in sources):
            raise ValueError(f"sites[{i}].sketches: no source in data.sources lives at "
                             f"site {site.name!r}")
        if site.public_key and site.mode != "pull":
            raise ValueError(f"sites[{i}].publicKey: only pull sites sign their manifests "
                             "(a kubeconfig site runs the hub's own trainer Jobs)")


def _check_sources(spec: MeritRunSpec) -> None:
    sites = {s.name: s for s in spec.sites or []}
    for i, src in enumerate(spec.data.sources or []):
        if src.site and src.site not in sites:
            raise ValueError(f"data.sources[{i}].site {src.site!r} is not in spec.sites")
        site = sites.get(src.site or "")
        if spec.partitioning.strategy != "conflictPCA" or site is None:
            continue
        if site.mode == "pull":
            raise ValueError(f"data.sources[{i}] ({src.name}) stays at pull site "
                             f"{site.name!r}: conflictPCA could put it in a partition with "
                             "other sites' sources; use strategy bySite (with "
                             "sites[].sketches: true the split within each site follows "
                             "the conflicts)")
        if src.uri is None:
            raise ValueError(f"data.sources[{i}] ({src.name}) has no uri: conflictPCA "
                             "needs its gradients at the hub; use strategy bySite")
    assignments = spec.partitioning.assignments
    if spec.partitioning.strategy == "manual" and assignments and spec.data.sources:
        known = {s.name for s in spec.data.sources}
        for i, part in enumerate(assignments):
            for name in part:
                if name not in known:
                    raise ValueError(f"partitioning.assignments[{i}]: {name!r} is not a "
                                     "data.sources[].name")


def _check_search(spec: MeritRunSpec) -> None:
    search = spec.mixture_search
    if not search.enabled or search.dirichlet:
        return
    worst = lim.most_lattice_candidates(search.grid, spec.partitioning.partition_count())
    if worst > lim.MAX_SEARCH_CANDIDATES:
        raise ValueError(
            f"mixtureSearch.grid {search.grid} gives up to {worst} candidates for "
            f"{spec.partitioning.partition_count()} partitions (each one a merge and an "
            f"evaluation; at most {lim.MAX_SEARCH_CANDIDATES}): lower the grid or set "
            "mixtureSearch.dirichlet")
