"""Local paths made absolute at the edge, against the user's working directory, before Ray sees them.

Ray Tune runs each trial in its own working directory, so a relative path
resolved on a worker means a folder inside Ray's session directory. Every
field marked path-like (:class:`~cgc_ray.config.base.PathKind`) is resolved
here, on the driver; URIs (``s3://``, ``gs://``, ``file://``) pass unchanged.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel

from cgc_ray.config.base import PathKind, get_path, set_path
from cgc_ray.config.model import TV_WEIGHTS_RE
from cgc_ray.config.spec import ExperimentSpec, validate_spec


def _path_kind(annotation: Any) -> str | None:
    """The :class:`PathKind` of a field annotation (through ``X | None`` and ``Annotated``)."""
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, PathKind):
            return meta.kind
    for arg in typing.get_args(annotation):
        kind = _path_kind(arg)
        if kind is not None:
            return kind
    return None


def path_fields(model: type[BaseModel] = None, prefix: str = "") -> dict[str, str]:
    """Dotted field path -> :class:`PathKind` kind of every path-like field of the spec."""
    model = model or ExperimentSpec
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        # pydantic moves the metadata of a bare Annotated[...] onto the FieldInfo
        kind = next((m.kind for m in info.metadata if isinstance(m, PathKind)), None) or _path_kind(info.annotation)
        if kind is not None:
            out[prefix + name] = kind
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out.update(path_fields(info.annotation, f"{prefix}{name}."))
    return out


def is_uri(value: str) -> bool:
    """``scheme://...`` (s3, gs, file, hdfs, ...): left as given, never resolved against a folder."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value) is not None


def resolve_path_value(value: str | None, kind: str, cwd: str | os.PathLike | None = None) -> str | None:
    """``value`` made absolute against ``cwd`` (default: the current directory), ``~`` expanded.

    URIs pass unchanged. For ``kind="weights"``: ``swav:PATH`` and
    ``experiment:SPEC.yaml`` resolve their path; a torchvision enum name (``ResNet50_Weights.IMAGENET1K_V1``) or a
    ``scheme:reference`` that is not a path stays as it is.
    """
    if value is None or is_uri(value):
        return value
    if kind == "weights":
        if value.startswith("swav:"):
            return "swav:" + resolve_path_value(value[len("swav:"):], "path", cwd)
        if value.startswith("experiment:") and value.endswith((".yaml", ".yml", ".json")):  # a pretraining spec file
            return "experiment:" + resolve_path_value(value[len("experiment:"):], "path", cwd)
        if re.match(r"^[A-Za-z]\w*:(?!\\|/)", value) or (
            TV_WEIGHTS_RE.match(value) and not Path(cwd or ".", value).exists()
        ):
            return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(cwd if cwd is not None else os.getcwd()) / path
    return os.path.normpath(path)


ENV_STORAGE = "CGC_RAY_STORAGE"  # a cluster sets it in its nodes' environment (cluster/gpu.yaml)


def storage_location(flag: str | None, spec_storage: str | None = None, cwd: str | os.PathLike | None = None) -> str:
    """The storage root a command uses, absolute: the one rule of every ``--storage`` flag.

    ``flag`` (the command line's ``--storage``), else a storage the spec sets
    itself (``spec_storage`` other than the spec's default), else
    ``$CGC_RAY_STORAGE``, else the spec's default (``./results``). A local path is
    resolved against ``cwd`` (default: the current directory); a URI passes.
    """
    default = ExperimentSpec.model_fields["storage"].default
    if flag:
        value = flag
    elif spec_storage and spec_storage != default:
        value = spec_storage
    else:
        value = os.environ.get(ENV_STORAGE) or default
    return resolve_path_value(value, "storage", cwd)


def resolve_paths(spec: ExperimentSpec | Mapping[str, Any], cwd: str | os.PathLike | None = None) -> ExperimentSpec:
    """The spec with every local path made absolute against ``cwd`` (default: the current directory).

    Resolve at the edge, on the driver, before the spec reaches Ray: Tune runs
    each trial in its own working directory, where ``./results`` would mean
    something else. Covers every field marked path-like (:func:`path_fields`:
    storage, data root, split file, weights) and the values of sweep axes over
    them. URIs (``s3://``, ``gs://``, ``file://``) pass unchanged. Idempotent.
    """
    tree = validate_spec(spec).model_dump(mode="json")
    fields = path_fields()
    for path, kind in fields.items():
        set_path(tree, path, resolve_path_value(get_path(tree, path), kind, cwd))
    grid = tree["sweep"]["grid"]
    for axis, values in grid.items():
        if axis in fields:
            grid[axis] = [resolve_path_value(v, fields[axis], cwd) for v in values]
    return validate_spec(tree)


def unresolved_paths(spec: ExperimentSpec) -> list[str]:
    """``field=value`` of every local path of ``spec`` that is not absolute (should be empty on a worker)."""
    out = []
    for path, kind in path_fields().items():
        value = get_path(spec.model_dump(mode="json"), path)
        if value is not None and resolve_path_value(value, kind, "/") != value:
            out.append(f"{path}={value!r}")
    return out


