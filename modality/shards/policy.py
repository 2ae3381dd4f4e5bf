"""The one leakage policy: the split names, which patient ids identify nobody, and how linked sources group.

Every command that decides whether two samples may sit on opposite sides of a split asks this module:
prepare's patient guard (:mod:`modality.shards.splits`), crossval's source groups
(:func:`modality.crossval.group_sources`), the shard audit (:mod:`modality.commands.audit`) and the IDC planner's
collection units and plan check (:func:`modality.sources.idc.plan.collection_units`,
:func:`~modality.sources.idc.plan.check_plan`). Before, each kept its own list of
placeholder ids and they disagreed, so whether ``"Anonymous"`` in two sources was a leak depended on which
command you ran. Consumers call these functions through the module (``policy.is_placeholder_patient_id``),
so a test can swap one and see every consumer follow.

Even capping is not here: prepare caps slices it has read (round-robin over patients, then evenly spaced
within each series, :mod:`modality.shards.sampling`), while the planner caps series it has not downloaded
yet by one common slice step per (collection, class) (:func:`modality.sources.idc.plan.sample_group`). The
two pick different slices from the same series, and each one's output (shards, plan manifests) is
pinned by tests, so they stay two algorithms.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from typing import TypeVar

#: The splits, in the order summaries, plans and tables list them.
SPLITS = ("train", "val", "test")

#: Patient ids (stripped, lower-cased) that identify nobody. Two samples sharing one of these share no
#: patient, so it links no sources and makes no leak. Erring towards the list is the unsafe direction (a true
#: link ignored; only the identical-image guard is left), so an entry needs a reason:
PLACEHOLDER_PATIENT_IDS = frozenset(
    {
        "",  # no PatientID at all (optional in many IODs; PNG/NIfTI sources rarely have one)
        "0",  # written for every patient by several sample repositories (FNNDSC+ami and cornerstone in the
        # shared corpus): it would fuse unrelated sources
        "none",  # Python's None turned into text on the way to a CSV or JSON
        "null",  # JSON null turned into text
        "nan",  # a missing value read by pandas and written back as text
        "n/a",  # "not available", written by export tools and hand-made metadata sheets
        "na",
        "unknown",  # what anonymisers and sample generators write when they blank the tag
        "anonymous",  # anonymisers' replacement for every patient ("Anonymous" in the shared corpus)
        "anon",
        "anonymize",  # "ANONYMIZE" in the shared corpus (ivmartel+dwv)
        "anonymized",
        "anonymised",
    }
)
#: Ids made only of x's are masks ("X", "XX", "XXXXXX" and a 64-character run in the shared corpus).
_MASK = re.compile(r"x+")


def is_placeholder_patient_id(patient_id: object) -> bool:
    """True when ``patient_id`` names nobody (see :data:`PLACEHOLDER_PATIENT_IDS`); None counts as empty.

    Case and surrounding whitespace are ignored: DICOM pads values with spaces, and anonymisers differ in
    case (``ANONYMOUS``, ``Anonymous``).
    """
    text = "" if patient_id is None else str(patient_id).strip().lower()
    return text in PLACEHOLDER_PATIENT_IDS or _MASK.fullmatch(text) is not None


Node = TypeVar("Node", bound=Hashable)


def connected_groups(nodes: Iterable[Node], shared: Iterable[tuple[Node, Hashable]]) -> dict[Node, Node]:
    """Each node -> the smallest node of its group; nodes that share a key, directly or through a chain of
    other nodes, form one group (union-find).

    ``shared`` holds ``(node, key)`` pairs: a source and a patient id or pixel hash it holds, a collection
    and a PatientID. Nodes need to be orderable (names); the result lists ``nodes`` first, in the given
    order, then any node seen only in ``shared``. Which keys count (placeholders do not) is the caller's
    choice, made with :func:`is_placeholder_patient_id`.
    """
    parent: dict[Node, Node] = {node: node for node in nodes}

    def find(node: Node) -> Node:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    first_holder: dict[Hashable, Node] = {}
    for node, key in shared:
        parent.setdefault(node, node)
        other = first_holder.setdefault(key, node)
        a, b = find(node), find(other)
        if a != b:
            low, high = sorted((a, b))  # type: ignore[type-var]
            parent[high] = low
    return {node: find(node) for node in parent}
