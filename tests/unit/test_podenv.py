"""The node stand-in's env and command rules (support.podenv) against the kubelet's."""

from __future__ import annotations

import pytest
from support.podenv import FieldError, expand, field_value, resolve_pod_names

ENV = {"NODE_RANK": "1", "EMPTY": "", "A": "x"}
POD = {"metadata": {"name": "gang-p0-a1-1-abcde", "namespace": "ml", "uid": "u-1",
                    "labels": {"job-name": "gang-p0-a1"},
                    "annotations": {"batch.kubernetes.io/job-completion-index": "1"}},
       "spec": {"hostname": "gang-p0-a1-1", "subdomain": "gang-p0-a1", "nodeName": "n1"},
       "status": {}}


@pytest.mark.parametrize(("text", "expected"), [
    ("--node_rank=$(NODE_RANK)", "--node_rank=1"),
    ("$(A)$(A)-$(EMPTY)-", "xx--"),
    ("$(MISSING)", "$(MISSING)"),  # unknown references stay as written
    ("$$(NODE_RANK)", "$(NODE_RANK)"),  # $$ escapes
    ("cost $$5", "cost $5"),
    ("$$$(A)", "$x"),
    ("a $ b $", "a $ b $"),  # a lone $ stays
    ("$A", "$A"),
    ("$(A", "$(A"),  # unclosed
    ("$(A $(A)", "$(A $(A)"),  # the name runs to the first ')': "A $(A" is undefined
])
def test_expand_follows_the_kubelets_rules(text, expected):
    assert expand(text, ENV) == expected


@pytest.mark.parametrize(("path", "value"), [
    ("metadata.annotations['batch.kubernetes.io/job-completion-index']", "1"),
    ("metadata.labels['job-name']", "gang-p0-a1"),
    ("metadata.labels['absent']", ""),
    ("metadata.name", "gang-p0-a1-1-abcde"),
    ("metadata.namespace", "ml"),
    ("spec.nodeName", "n1"),
    ("status.podIP", "127.0.0.1"),
])
def test_field_refs_read_the_pod(path, value):
    assert field_value(POD, path) == value


def test_an_unknown_field_path_is_refused_by_name():
    with pytest.raises(FieldError, match="metadata.generation"):
        field_value(POD, "metadata.generation")


@pytest.mark.parametrize(("text", "expected"), [
    ("--master_addr=gang-p0-a1-0.gang-p0-a1", "--master_addr=127.0.0.1"),
    ("gang-p0-a1-0.gang-p0-a1.ml.svc.cluster.local:29500", "127.0.0.1:29500"),
    ("gang-p0-a1-0.gang-p0-a1.ml.svc", "127.0.0.1"),
    ("x.other-job", "x.other-job"),  # another subdomain: not this pod's to resolve
    ("gang-p0-a1-0.gang-p0-a1x", "gang-p0-a1-0.gang-p0-a1x"),
    ("gang-p0-a1-0.gang-p0-a1.example.com", "gang-p0-a1-0.gang-p0-a1.example.com"),
    ("/work", "/work"),
])
def test_pod_names_of_the_own_subdomain_resolve_to_the_pod_ip(text, expected):
    assert resolve_pod_names(text, POD) == expected


def test_a_pod_without_a_subdomain_resolves_nothing():
    assert resolve_pod_names("a.b", {"metadata": {}, "spec": {}}) == "a.b"
