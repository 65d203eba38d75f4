"""The profile stage with sources whose data stays at a pull site (issue 7, items 1 and 3).

Site b runs the real `meritrun contribute --sketch-only` on its own data file and uploads only
gradient sketches; the hub profiles from its one readable source plus those sketches. The
proof that the hub does not need the data: its scores, tokens and plan equal those of
profiling every source's data at the hub (the count sketch is seeded: same projection).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from merit_trainer.profiling import profile_to_dir, run_profile_stage
from meritrun.access import offer_assignment
from meritrun.api import MeritRunSpec, PartitioningSpec
from meritrun.artifacts import RunId, plan_prefix
from meritrun.assignment import build_sketch_assignment, sketch_output_prefix
from meritrun.data import group_by_source, iter_examples, write_examples
from meritrun.errors import DataError, SpecError, StageFailed
from meritrun.jobs import profile_job
from meritrun.partitioning import by_site_split
from meritrun.stages import ProfileParams, StorageParams
from meritrun.storage import open_storage

RUN, SITE, HUB = RunId("fed", "u1"), "b", ["copy"]
AT_SITE = ["sort", "reverse", "upper"]
PROFILING = {"projectionDim": 256, "calibrationSamples": 8, "stride": 5}
SKETCHES = sketch_output_prefix(RUN, SITE, 1)


def make_spec(root_uri: str, base: Path, hub_file: Path, *, partitioning: dict,
              endpoint: str | None = None) -> MeritRunSpec:
    """The run's spec. A spec may not ask conflictPCA of pull-site sources (a partition
    mixing sites could be trained nowhere), but the profile stage computes any strategy: the
    conflictPCA cases here check the profiling itself, so the strategy is set after
    validation."""
    spec = MeritRunSpec.model_validate({
        "baseModel": {"uri": str(base)}, "storage": {"uri": root_uri, "endpoint": endpoint},
        "data": {"sources": [{"name": n, "uri": str(hub_file)} for n in HUB]
                 + [{"name": n, "site": SITE} for n in AT_SITE]},
        "sites": [{"name": SITE, "mode": "pull", "sketches": True}],
        "profiling": PROFILING, "partitioning": {"strategy": "bySite"},
    })
    return spec.model_copy(update={"partitioning": PartitioningSpec.model_validate(partitioning)})


def hub_params(spec: MeritRunSpec, attempt: int = 1) -> ProfileParams:
    """What the pipeline hands the profile Job once site b's sketches are in."""
    return profile_job(RUN, spec, attempt, site_sketches={SITE: SKETCHES}).params


class Federation:
    """Hub data file, the run's storage (with site b's uploaded sketches), the reference."""

    def __init__(self, root: Path, base: Path, train: Path) -> None:
        groups = group_by_source(iter_examples(train))
        self.base, self.store = base, root / "store"
        self.hub_file, self.site_file = root / "hub.jsonl", root / "site-b.jsonl"
        write_examples(self.hub_file, [e for n in HUB for e in groups[n]])
        write_examples(self.site_file, [e for n in AT_SITE for e in groups[n]])
        self.groups = groups
        self.sketch_files = root / "site-upload"

    def spec(self, partitioning: dict) -> MeritRunSpec:
        return make_spec(self.store.as_uri(), self.base, self.hub_file, partitioning=partitioning)


@pytest.fixture(scope="module")
def fed(tiny_base, tiny_mixture, tmp_path_factory) -> Federation:
    """Site b sketches its sources with the real CLI, into the run's file:// storage."""
    from merit_trainer.contribute import main

    root = tmp_path_factory.mktemp("federation")
    fed = Federation(root, tiny_base, tiny_mixture.train)
    spec = fed.spec({"axes": 2})
    assignment = build_sketch_assignment(RUN, spec, SITE, attempt=1)
    grant = offer_assignment(assignment, storage=open_storage(fed.store.as_uri()), issuer=None,
                             expires=datetime.now(timezone.utc).replace(year=2100))
    (root / "grant.json").write_text(grant.bundle_json())
    level = logging.getLogger().level
    try:
        assert main(["--assignment", str(root / "grant.json"), "--data", str(fed.site_file),
                     "--workdir", str(root / "site-work"), "--sketch-only"]) == 0
    finally:
        logging.getLogger().setLevel(level)
    open_storage(fed.store.as_uri()).download_dir(SKETCHES, fed.sketch_files)
    return fed


@pytest.fixture(scope="module")
def reference(fed, tmp_path_factory):
    """Every source's data profiled at the hub: what the sketches must reproduce."""
    out = tmp_path_factory.mktemp("all-at-hub")
    spec = fed.spec({"axes": 2})
    plan = profile_to_dir(fed.groups, fed.base, out, profiling=spec.profiling,
                          partitioning=spec.partitioning)
    return plan, np.load(out / "conflict.npy")


def _assert_same_scores(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:  # principal coordinates of a PCA: float tolerance, same signs
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-9, err_msg=name)


def test_conflict_pca_profiles_site_sources_from_their_sketches(fed, reference):
    plan_ref, conflict_ref = reference
    params = hub_params(fed.spec({"axes": 2}))
    assert [s.uri for s in params.data.sources] == [str(fed.hub_file), None, None, None]
    plan = run_profile_stage(params, workdir=fed.store.parent / "hub-work")

    assert sorted(s for p in plan.partitions for s in p.sources) == sorted(HUB + AT_SITE)
    _assert_same_scores(plan.scores, plan_ref.scores)
    assert plan.source_tokens == plan_ref.source_tokens and min(plan.source_tokens.values()) > 0
    assert [(p.sources, p.tokens) for p in plan.partitions] == [
        (p.sources, p.tokens) for p in plan_ref.partitions]
    assert np.allclose(plan.explained_variance, plan_ref.explained_variance)
    s = plan.settings
    assert s["site_sketches"] == {SITE: AT_SITE} and "tokens_unknown" not in s
    assert "site_sketch_differences" not in s
    assert s["calibration"] == plan_ref.settings["calibration"]
    assert s["base"] == plan_ref.settings["base"]
    out = fed.store / plan_prefix(RUN, 1)
    assert np.allclose(np.load(out / "conflict.npy"), conflict_ref)  # same source order
    assert (out / "conflict.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "sketch.json").read_text())["names"] == HUB + AT_SITE


def test_by_site_with_sketches_splits_each_site_by_conflict(fed, reference):
    plan_ref, _ = reference
    params = hub_params(fed.spec({"strategy": "bySite", "partitions": 3}), attempt=2)
    plan = run_profile_stage(params, workdir=fed.store.parent / "hub-work-bysite")

    assert plan.settings["within_site"] == "conflict" and "tokens_unknown" not in plan.settings
    at = {p.site: set() for p in plan.partitions}
    for p in plan.partitions:
        at[p.site] |= set(p.sources)
    assert at == {None: set(HUB), SITE: set(AT_SITE)}
    assert [p.site for p in plan.partitions].count(SITE) == 2  # three sources, cut in two
    # exactly the within-site median split that the all-data scores give
    site_of = {n: SITE for n in AT_SITE}
    want = by_site_split(HUB + AT_SITE, plan_ref.source_tokens, site_of, 3,
                         scores=plan_ref.scores, seed=0)
    assert [p.sources for p in plan.partitions] == want
    _assert_same_scores(plan.scores, plan_ref.scores)


def _tampered(fed: Federation, root: Path, *, settings: dict | None = None,
              names: list[str] | None = None, dim: int | None = None,
              nan_row: int | None = None) -> ProfileParams:
    """The site's set, changed, in a fresh storage root; the params that read it."""
    meta = json.loads((fed.sketch_files / "sketch.json").read_text())
    matrix = np.load(fed.sketch_files / "sketch.npy")
    meta["settings"].update(settings or {})
    if dim is not None:
        matrix, meta["settings"]["dim"] = matrix[:, :dim].copy(), dim
    if names is not None:
        meta["names"] = names
        meta["tokens"] = {n: 100 for n in names}
        matrix = np.resize(matrix, (len(names), matrix.shape[1]))
    if nan_row is not None:
        matrix[nan_row, 3] = np.nan
    store = open_storage((root / "store").as_uri())
    store.put_bytes(f"{SKETCHES}/sketch.json", json.dumps(meta).encode())
    (root / "m.npy").parent.mkdir(parents=True, exist_ok=True)
    np.save(root / "m.npy", matrix)
    store.put_file(f"{SKETCHES}/sketch.npy", root / "m.npy")
    spec = make_spec(store.root_uri, fed.base, fed.hub_file, partitioning={"axes": 1})
    return hub_params(spec)


@pytest.mark.parametrize("change", [
    {"settings": {"seed": 7}}, {"dim": 128}, {"settings": {"parameters": "all"}},
    {"settings": {"base": "sha256:" + "0" * 64}}, {"settings": {"centered": False}},
])
def test_a_sketch_set_made_differently_is_refused_naming_the_field(fed, tmp_path, change):
    field = next(iter(change.get("settings", {"dim": 0})))
    params = _tampered(fed, tmp_path, **change)
    with pytest.raises(SpecError, match=rf"site 'b' sent sketches with {field}=") as info:
        run_profile_stage(params, workdir=tmp_path / "work")
    assert info.value.path == "sites[b].sketches"
    assert not (tmp_path / "store" / plan_prefix(RUN, 1)).exists()  # nothing published


@pytest.mark.parametrize(("names", "message"), [
    (["sort", "reverse", "upper", "copy"], r"source 'copy', which is a hub source"),
    (["sort", "reverse", "upper", "elsewhere"], r"'elsewhere', which is not a source of"),
    (["sort", "reverse"], r"no sketch of its source\(s\) upper"),
])
def test_a_set_that_is_not_exactly_the_sites_own_sources_is_refused(fed, tmp_path, names,
                                                                    message):
    params = _tampered(fed, tmp_path, names=names)
    with pytest.raises(SpecError, match=message):
        run_profile_stage(params, workdir=tmp_path / "work")


def test_a_non_finite_sketch_is_refused_and_other_settings_are_recorded(fed, reference,
                                                                       tmp_path):
    with pytest.raises(DataError, match=r"site 'b': the sketch of 'reverse' is zero or not"):
        run_profile_stage(_tampered(fed, tmp_path / "nan", nan_row=1), workdir=tmp_path / "w")
    # another stride changes the estimate, not the projection: used, warned and recorded
    plan = run_profile_stage(_tampered(fed, tmp_path / "stride", settings={"stride": 1}),
                             workdir=tmp_path / "w")
    assert plan.settings["site_sketch_differences"] == {SITE: {"stride": 1}}
    _assert_same_scores(plan.scores, reference[0].scores)


def test_site_sketches_through_seaweedfs(fed, reference, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_bucket.secret_key)
    store = s3_bucket.open()
    for name in ("sketch.npy", "sketch.json"):
        store.put_file(f"{SKETCHES}/{name}", fed.sketch_files / name)
    spec = make_spec(s3_bucket.root_uri, fed.base, fed.hub_file, partitioning={"axes": 2},
                     endpoint=s3_bucket.endpoint)
    plan = run_profile_stage(hub_params(spec), workdir=tmp_path / "work")
    _assert_same_scores(plan.scores, reference[0].scores)
    assert store.exists(f"{plan_prefix(RUN, 1)}/plan.json")

    absent = hub_params(spec).model_copy(update={"site_sketches": {SITE: "runs/fed/nowhere"}})
    with pytest.raises(StageFailed, match=r"site 'b': no sketches at s3://"):
        run_profile_stage(absent, workdir=tmp_path / "work2")


def test_without_sketches_conflict_pca_still_refuses_a_source_with_no_data(fed, tmp_path):
    spec = fed.spec({"axes": 1})
    params = hub_params(spec).model_copy(update={
        "site_sketches": {}, "storage": StorageParams(uri=(tmp_path / "s").as_uri())})
    with pytest.raises(SpecError, match=r"'sort' has no data and no sketches"):
        run_profile_stage(params, workdir=tmp_path / "work")
    bysite = params.model_copy(update={"partitioning": PartitioningSpec(strategy="bySite")})
    plan = run_profile_stage(bysite, workdir=tmp_path / "work")
    assert plan.settings["within_site"] == "tokens"
    assert plan.settings["tokens_unknown"] == AT_SITE
