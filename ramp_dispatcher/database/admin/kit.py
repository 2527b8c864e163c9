"""A ramp kit's ``problem.py`` and the workflow and file types it needs.

ramp-workflow (through the kit's ``problem.py``) is imported lazily, here only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from sqlalchemy import Connection, insert, select

from .. import ramp_schema as rs
from .lookup import AdminError

# ramp_database.testing.setup_files_extension_type, which ramp-utils' deploy
# runs before adding a problem: add_workflow refuses extensions not listed here.
DEFAULT_EXTENSIONS: tuple[str, ...] = ("py", "R", "txt", "csv")
DEFAULT_FILE_TYPES: tuple[tuple[str, bool, int], ...] = (
    ("code", True, 10**5),
    ("text", True, 10**5),
    ("data", False, 10**8),
)
DEFAULT_TYPE_EXTENSIONS: tuple[tuple[str, str], ...] = (
    ("code", "py"),
    ("code", "R"),
    ("text", "txt"),
    ("data", "csv"),
)


# --------------------------------------------------------------------------- kit


def load_problem_module(kit_dir: str | os.PathLike[str]) -> ModuleType:
    """Import ``<kit_dir>/problem.py`` from source, as ramp-database does."""
    path = Path(kit_dir) / "problem.py"
    if not path.is_file():
        raise AdminError(f"no problem.py in the kit folder {kit_dir} (looked for {path})")
    spec = importlib.util.spec_from_file_location("problem", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the kit's own code: any error is the kit's
        raise AdminError(
            f"{path}: cannot import the kit's problem.py: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _kit_attr(module: ModuleType, name: str) -> Any:
    try:
        return getattr(module, name)
    except AttributeError:
        raise AdminError(f"{module.__file__}: problem.py does not define '{name}'") from None


def _score_types(module: ModuleType) -> list[Any]:
    score_types = list(_kit_attr(module, "score_types"))
    if not score_types:
        raise AdminError(f"{module.__file__}: 'score_types' is empty")
    names = [st.name for st in score_types]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AdminError(f"{module.__file__}: score type names repeated: {', '.join(duplicates)}")
    return score_types


def _split_element_name(element_name: str) -> tuple[str, str]:
    # ramp-database: "name.ext" -> (name, ext); no extension means Python code.
    tokens = element_name.split(".")
    return tokens[0], ".".join(tokens[1:]) if len(tokens) > 1 else "py"


def _compute_folds(module: ModuleType, data_dir: str) -> list[tuple[Any, Any]]:
    get_train_data = _kit_attr(module, "get_train_data")
    get_cv = _kit_attr(module, "get_cv")
    try:
        X_train, y_train = get_train_data(path=data_dir)
    except Exception as exc:  # the kit's own code
        raise AdminError(
            f"{module.__file__}: get_train_data(path={data_dir!r}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        folds = [(train_is, test_is) for train_is, test_is in get_cv(X_train, y_train)]
    except Exception as exc:
        raise AdminError(
            f"{module.__file__}: get_cv failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not folds:
        raise AdminError(f"{module.__file__}: get_cv gave no folds")
    return folds


# --------------------------------------------------------------------------- file types, workflow


def ensure_file_types(conn: Connection) -> None:
    """Register ramp-board's default extensions and file types when absent."""
    for name in DEFAULT_EXTENSIONS:
        if _extension_id(conn, name) is None:
            conn.execute(insert(rs.extensions).values(name=name))
    for name, is_editable, max_size in DEFAULT_FILE_TYPES:
        if _file_type_id(conn, name) is None:
            conn.execute(
                insert(rs.submission_file_types).values(
                    name=name, is_editable=is_editable, max_size=max_size
                )
            )
    t = rs.submission_file_type_extensions
    for type_name, ext_name in DEFAULT_TYPE_EXTENSIONS:
        type_id, ext_id = _file_type_id(conn, type_name), _extension_id(conn, ext_name)
        exists = conn.execute(
            select(t.c.id).where(t.c.type_id == type_id, t.c.extension_id == ext_id)
        ).first()
        if exists is None:
            conn.execute(insert(t).values(type_id=type_id, extension_id=ext_id))


def _extension_id(conn: Connection, name: str) -> int | None:
    return conn.execute(select(rs.extensions.c.id).where(rs.extensions.c.name == name)).scalar()


def _file_type_id(conn: Connection, name: str) -> int | None:
    t = rs.submission_file_types
    return conn.execute(select(t.c.id).where(t.c.name == name)).scalar()


def _add_workflow(conn: Connection, workflow_object: Any) -> int:
    """ramp-database's add_workflow: reuse what exists, add what is missing."""
    name = type(workflow_object).__name__
    w = rs.workflows
    workflow_id = conn.execute(select(w.c.id).where(w.c.name == name)).scalar()
    try:
        element_names = list(workflow_object.element_names)
    except (AttributeError, TypeError):
        raise AdminError(f"workflow {name} of the kit has no 'element_names'") from None
    # Check every element before writing anything.
    resolved = []
    for element_name in element_names:
        type_name, ext_name = _split_element_name(element_name)
        ext_id = _extension_id(conn, ext_name)
        if ext_id is None:
            raise AdminError(
                f"workflow {name}: element {element_name!r} has the unknown extension "
                f"{ext_name!r} (known: {', '.join(DEFAULT_EXTENSIONS)})"
            )
        fte = rs.submission_file_type_extensions
        file_type_ids = conn.execute(select(fte.c.type_id).where(fte.c.extension_id == ext_id))
        file_type_ids = list(file_type_ids.scalars())
        if len(file_type_ids) != 1:
            raise AdminError(
                f"workflow {name}: extension {ext_name!r} of element {element_name!r} "
                f"belongs to {len(file_type_ids)} file types, expected one"
            )
        resolved.append((type_name, file_type_ids[0]))
    if workflow_id is None:
        workflow_id = conn.execute(insert(w).values(name=name)).inserted_primary_key[0]
    wet, we = rs.workflow_element_types, rs.workflow_elements
    for type_name, file_type_id in resolved:
        # Element types are global (unique name): an existing one is reused as is.
        type_id = conn.execute(select(wet.c.id).where(wet.c.name == type_name)).scalar()
        if type_id is None:
            type_id = conn.execute(
                insert(wet).values(name=type_name, type_id=file_type_id)
            ).inserted_primary_key[0]
        exists = conn.execute(
            select(we.c.id).where(
                we.c.workflow_id == workflow_id, we.c.workflow_element_type_id == type_id
            )
        ).first()
        if exists is None:
            conn.execute(
                insert(we).values(
                    name=type_name, workflow_id=workflow_id, workflow_element_type_id=type_id
                )
            )
    return workflow_id
