"""A contribution proves itself (issue 16, item 1): paths stay inside the artifact, files are
regular, headers are checked before use, the claim fits the plan, huge values are refused.

Each case is one hostile or careless artifact among honest ones: it must be refused with
its check named, and the honest ones must still pass (never a crash of the whole merge).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from support.experts import edit_state, make_experts, refresh_manifest, verify_artifacts

from merit_merger.checks import CHECKS, load_partition
from merit_merger.io import HeaderError, parse_header, read_header
from merit_merger.methods import get_method
from merit_merger.verification import flag_outliers, median_of_others, verify_partitions
from meritrun.artifacts import MANIFEST_NAME, PartitionManifest, TokenCounts, read_manifest
from meritrun.errors import ContributionRejected
from meritrun.stages import PartitionInput

WEIGHTS = "model/model.safetensors"


@pytest.fixture(scope="module")
def pristine(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    return make_experts(tmp_path_factory.mktemp("trust"), tiny_base, 3)


@pytest.fixture
def parts(pristine, tmp_path: Path) -> list[Path]:
    return [Path(shutil.copytree(a, tmp_path / a.name, symlinks=True))
            for a in pristine.artifacts]


def only_refusal(parts, base, partition: str, check: str, **kwargs) -> ContributionRejected:
    refused, result = verify_artifacts(parts, base, **kwargs)
    assert check in CHECKS
    assert [(r.partition, r.check) for r in refused] == [(partition, check)], refused
    assert len(result.accepted) == len(parts) - 1  # the others still pass
    return refused[0]


def rewrite_manifest(artifact: Path, **fields: object) -> None:
    """Edit manifest.json as raw JSON (a site can write anything, valid or not)."""
    path = artifact / MANIFEST_NAME
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


# --- paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("model_dir", "/hub/runs/r/partitions/p0/attempt-1/model"),
    ("model_dir", "../p0/model"),
    ("model_dir", "model/../../p0/model"),
    ("model_dir", "./model"),
    ("second_moments", {"file": "/etc/hostname", "kind": "rank1", "beta2": 0.9, "step": 1}),
    ("second_moments", {"file": "../p0/optimizer_v.safetensors", "kind": "rank1",
                        "beta2": 0.9, "step": 1}),
])
def test_a_path_out_of_the_artifact_is_refused_as_format(parts, tiny_base, field, value):
    rewrite_manifest(parts[1], **{field: value})
    r = only_refusal(parts, tiny_base, "p1", "format")
    assert "normalized" in r.detail or "relative" in r.detail


@pytest.mark.parametrize("key", ["/etc/hostname", "../p0/model/model.safetensors", "a//b",
                                 "model/./config.json", "model\\config.json"])
def test_manifest_model_refuses_file_keys_outside(pristine, key):
    data = read_manifest(pristine.artifacts[0]).model_dump()
    data["files"][key] = {"sha256": "0" * 64, "bytes": 1}
    with pytest.raises(ValidationError, match="path"):
        PartitionManifest.model_validate(data)


def link_to_other_weights(parts: list[Path]) -> None:
    target = parts[1] / WEIGHTS
    target.unlink()
    target.symlink_to(parts[0] / WEIGHTS)


def link_model_dir(parts: list[Path]) -> None:
    shutil.rmtree(parts[1] / "model")
    (parts[1] / "model").symlink_to(parts[0] / "model", target_is_directory=True)


def link_to_host_file(parts: list[Path]) -> None:
    (parts[1] / "model" / "notes.txt").symlink_to("/etc/hostname")


def fifo(parts: list[Path]) -> None:
    os.mkfifo(parts[1] / "model" / "pipe")


@pytest.mark.parametrize("damage", [link_to_other_weights, link_model_dir, link_to_host_file,
                                    fifo])
def test_symlinks_and_special_files_are_refused(parts, tiny_base, damage):
    damage(parts)
    refresh_manifest(parts[1]) if damage is not fifo else None  # the site lists what it made
    r = only_refusal(parts, tiny_base, "p1", "file-type")
    assert "symbolic link" in r.detail or "not a regular file" in r.detail


def test_a_manifest_that_lists_no_model_file_is_refused(parts, tiny_base):
    data = json.loads((parts[2] / MANIFEST_NAME).read_text())
    data["model_dir"] = "weights"  # nothing listed there
    (parts[2] / MANIFEST_NAME).write_text(json.dumps(data))
    assert "no file of weights/" in only_refusal(parts, tiny_base, "p2", "missing-file").detail


# --- safetensors headers -------------------------------------------------------------------

def forge(path: Path, edit) -> None:
    """Rewrite a safetensors file's header through `edit(header) -> header or bytes`."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    new = edit(header)
    body = new if isinstance(new, bytes) else json.dumps(new).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def first(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


def short(h):
    first(h)["data_offsets"][1] -= 4
    return h


def reversed_(h):
    first(h)["data_offsets"].reverse()
    return h


def huge(h):
    first(h)["data_offsets"][1] = 10**15
    return h


def no_dtype(h):
    del first(h)["dtype"]
    return h


def negative_shape(h):
    first(h)["shape"] = [-1, 4]
    return h


def bad_metadata(h):
    h["__metadata__"] = {"format": 3}
    return h


def overlap(h):
    entries = sorted((v for k, v in h.items() if k != "__metadata__"),
                     key=lambda e: e["data_offsets"][0])
    entries[1]["data_offsets"] = list(entries[0]["data_offsets"])
    entries[1]["shape"], entries[1]["dtype"] = entries[0]["shape"], entries[0]["dtype"]
    return h


HEADERS = {
    "offsets short": (short, "data bytes"),
    "offsets reversed": (reversed_, "data_offsets"),
    "offsets 1e15": (huge, "data"),
    "a list": (lambda h: b"[1, 2, 3]", "not an object"),
    "entry without dtype": (no_dtype, "exactly dtype"),
    "negative shape": (negative_shape, "shape"),
    "metadata not strings": (bad_metadata, "__metadata__"),
    "overlapping tensors": (overlap, "overlaps"),
    "duplicate key": (lambda h: b'{"a": {}, "a": {}}', "duplicate"),
    "not json": (lambda h: b"\xff\xfe{", "JSON"),
}


@pytest.mark.parametrize("case", HEADERS)
def test_a_lying_header_is_refused_naming_the_file(parts, tiny_base, case):
    edit, words = HEADERS[case]
    forge(parts[2] / WEIGHTS, edit)
    refresh_manifest(parts[2])  # hashed by the site: only the header check can catch it
    r = only_refusal(parts, tiny_base, "p2", "safetensors-header")
    assert WEIGHTS in r.detail and words in r.detail, r.detail


def test_truncated_file_and_implausible_length_are_refused(parts, tiny_base):
    path = parts[0] / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    refresh_manifest(parts[0])
    assert "data area" in only_refusal(parts, tiny_base, "p0", "safetensors-header").detail
    path.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    refresh_manifest(parts[0])
    assert "implausible" in only_refusal(parts, tiny_base, "p0", "safetensors-header").detail


def test_a_moments_file_with_a_bad_header_is_refused(parts, tiny_base):
    forge(parts[1] / "optimizer_v.safetensors", short)
    refresh_manifest(parts[1])
    sources = [load_partition(p, p.name) for p in parts]
    result = verify_partitions(sources, base_dir=tiny_base, method=get_method("ota"))
    assert [(r.partition, r.check) for r in result.refused] == [("p1", "safetensors-header")]
    assert "optimizer_v.safetensors" in result.refused[0].detail


def test_the_parser_accepts_the_reference_writer(pristine):
    metas, metadata = read_header(pristine.artifacts[0] / WEIGHTS)
    assert metadata == {"format": "pt"} and metas
    with pytest.raises(HeaderError, match="gap"):
        parse_header(json.dumps({"a": {"dtype": "F32", "shape": [1],
                                       "data_offsets": [4, 8]}}).encode(), 8 + 47 + 8,
                     Path("x.safetensors"))


# --- the plan ------------------------------------------------------------------------------

def expected(part: Path, **updates) -> PartitionInput:
    m = read_manifest(part)
    values = {"name": part.name, "prefix": f"x/{part.name}", "attempt": 1,
              "sources": m.sources, "source_tokens": m.tokens.supervised, "epochs": 1.0}
    return PartitionInput(**(values | updates))


def test_a_claim_the_plan_cannot_give_is_refused_with_the_bound(parts, tiny_base):
    refresh_manifest(parts[0], tokens=TokenCounts(supervised=10**12, total=10**12))
    want = {p.name: expected(p) for p in parts}
    want["p0"] = expected(parts[0], source_tokens=1000, epochs=2.5)
    r = only_refusal(parts, tiny_base, "p0", "tokens", expected=want)
    assert "at most 3000" in r.detail and "1000 per epoch x 3 epochs" in r.detail


@pytest.mark.parametrize("field, value", [("partition", "p2"), ("attempt", 2),
                                          ("sources", ["src-p0", "src-p1"])])
def test_another_partition_attempt_or_sources_is_refused_as_plan(parts, tiny_base, field, value):
    want = {p.name: expected(p) for p in parts}
    refresh_manifest(parts[1], **{field: value})
    r = only_refusal(parts, tiny_base, "p1", "plan", expected=want)
    assert field in r.detail and "the plan has" in r.detail


def test_within_the_plan_everything_is_accepted(parts, tiny_base):
    want = {p.name: expected(p, epochs=0.5) for p in parts}  # a partial epoch: one epoch bound
    refused, result = verify_artifacts(parts, tiny_base, expected=want)
    assert refused == [] and len(result.accepted) == 3


# --- huge finite values ---------------------------------------------------------------------

@pytest.mark.parametrize("k, value", [(3, 3e38), (2, 1.5e38), (3, -2e20)])
def test_huge_finite_values_are_refused_not_overflowed(parts, tiny_base, k, value):
    def poison(state):
        state["model.layers.0.mlp.up_proj.weight"][1, 2] = value
    edit_state(parts[0], poison)
    r = only_refusal(parts[:k], tiny_base, "p0", "magnitude")
    assert "model.layers.0.mlp.up_proj.weight" in r.detail


def test_outlier_rule_takes_zero_and_infinite_norms():
    assert median_of_others(0.0, [0.0, 1.0]) == 0.0
    assert median_of_others(float("inf"), [1.0, 2.0]) == 2.0
    flags = flag_outliers({"a": 0.0, "b": 1.0, "c": 1.1}, 5.0, refuse=True)
    assert [f.partition for f in flags] == ["a"]


def test_weights_from_huge_values_cannot_overflow_the_norm(parts, tiny_base):
    def big(state):
        state["model.norm.weight"][0] = 9e14  # below the bound: accepted, norm finite
    edit_state(parts[1], big)
    refused, result = verify_artifacts(parts, tiny_base)
    assert refused == [] and all(n < float("inf") for n in result.update_norms.values())
    assert torch.isfinite(torch.tensor(result.update_norms["p1"]))
