"""Config plumbing shared by every layer: the error type, path-field markers, and nested-dict helpers.

No pydantic, torch or Ray: ``results`` and ``report`` group rows with these
helpers without starting either. A spec tree is the ``model_dump(mode="json")``
of an ``ExperimentSpec``; a dotted path such as ``"method.lam"`` names a leaf.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Mapping, NamedTuple


class SpecError(ValueError):
    """A user-facing problem with a spec: says which field, what was wrong, what to do."""


# A name that becomes one folder or file under the storage root (an experiment, a trial id): no separators,
# no hidden prefix, no whitespace or control characters. Matched whole (``fullmatch``): "$" also accepts "abc\n".
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_name(kind: str, value: Any) -> str:
    """``value`` if it can be one folder or file name under the storage root; else ValueError naming ``kind``."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(f"{kind} {value!r} cannot be a folder or file name under the storage root; "
                         "use letters, digits, _ . - (starting with a letter or digit)")
    return value


class PathKind(NamedTuple):
    """Marks a spec field that may hold a local path (see :func:`resolve_paths`).

    ``kind``: ``"path"`` a plain path; ``"storage"`` a path or a URI; ``"weights"``
    a path, ``swav:PATH``, or a name that is not a path (a torchvision enum).
    """

    kind: str


LocalPath = Annotated[str, PathKind("path")]
StoragePath = Annotated[str, PathKind("storage")]
WeightsRef = Annotated[str, PathKind("weights")]



# Dict-valued fields whose keys are free-form (the rest of a dotted path is the key).
FREE_KEY_DICTS = {("sweep", "grid"), ("sweep", "search", "space")}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; ``sweep.grid`` stays one leaf (its keys are dotted paths)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        # a dict, not any Mapping: the ABC check on every leaf was a third of the cost of a trial id
        if isinstance(v, dict) and v and (tuple(key.split(".")) not in FREE_KEY_DICTS):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces, no NaN): equal values give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)


def digest(obj: Any) -> str:
    """12 hex of the sha256 of :func:`canonical`."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:12]


def set_path(tree: dict, path: str, value: Any) -> dict:
    """Set ``tree[a][b]... = value`` for ``path == "a.b..."``; unknown keys raise SpecError."""
    parts = path.split(".")
    node, walked = tree, []
    for i, key in enumerate(parts):
        if tuple(walked) in FREE_KEY_DICTS:
            node[".".join(parts[i:])] = value
            return tree
        if not isinstance(node, dict) or key not in node:
            where = ".".join(walked) or "<top level>"
            valid = ", ".join(sorted(node)) if isinstance(node, dict) else "(none: not a section)"
            raise SpecError(f"unknown field {path!r}: {key!r} is not a key of {where}; valid keys there: {valid}")
        if i == len(parts) - 1:
            node[key] = value
        else:
            node = node[key]
            walked.append(key)
    return tree


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    """``tree[a][b]...`` for ``path == "a.b..."`` (None where a key is absent)."""
    node: Any = tree
    for key in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node
