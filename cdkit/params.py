"""Parameters: defaults in code -> params/*.yaml -> command line / papermill, validated before work.

Each step (train, predict, ...) declares a dataclass of flat scalar defaults. A notebook's
`parameters` cell repeats those literals; `take_params(Cls, globals())` right after it collects what
papermill injected and fails on an unknown key or a wrong type, naming it (papermill itself only
warns). `load_params` does the same for a YAML file and command-line overrides. The effective values
are saved beside a run's outputs with `save_params`."""
from __future__ import annotations

import ast
import dataclasses
import json
import typing
from pathlib import Path

import yaml

_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit"}
_LITERALS = (bool, int, float, str, type(None), list, tuple, dict)


class ParamsError(ValueError):
    "An unknown parameter, or a value of the wrong type; the message names it"


def _check_type(name, value, hint, where):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        errs = []
        for h in args:
            try:
                return _check_type(name, value, h, where)
            except ParamsError as e:
                errs.append(e)
        raise ParamsError(f"{where}: parameter '{name}' = {value!r} is not of type {_hint_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (str, bool):
        if isinstance(value, hint):
            return value
    elif origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else None
            return [(_check_type(f"{name}[{i}]", v, inner, where) if inner else v) for i, v in enumerate(value)]
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return dict(value)
    elif hint is typing.Any:
        return value
    raise ParamsError(f"{where}: parameter '{name}' = {value!r} is not of type {_hint_name(hint)}")


def _hint_name(hint):
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def make_params(cls, values: dict, where="params"):
    "An instance of the dataclass `cls` from `values`, refusing unknown keys and wrong types"
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib
        hint = "; ".join(f"'{k}' (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, known, 1)) else f"'{k}'"
                         for k in unknown)
        raise ParamsError(f"{where}: unknown parameter(s) {hint} for {cls.__name__}; known: {sorted(known)}")
    checked = {k: _check_type(k, v, hints[k], where) for k, v in values.items()}
    return cls(**checked)


def take_params(cls, namespace: dict, where="notebook parameters"):
    """Validated params from a notebook's globals (parameters cell + papermill's injected cell).

    Every public name holding a literal counts as a parameter, so a mistyped key that papermill
    injected is caught here, before any work starts."""
    values = {k: v for k, v in namespace.items()
              if not k.startswith("_") and k not in _IPYTHON_NAMES and type(v) in _LITERALS}
    return make_params(cls, values, where)


def load_params(cls, path=None, **overrides):
    "Defaults of `cls`, then the YAML file at `path` (only the differences), then `overrides`"
    values = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ParamsError(f"{path}: expected a mapping of parameter: value, got {type(data).__name__}")
        values.update(data)
    values.update(overrides)
    return make_params(cls, values, where=str(path) if path else "params")


def parse_overrides(pairs):
    "['lr=0.01', 'arch=resnet18'] -> {'lr': 0.01, 'arch': 'resnet18'} (values parsed as YAML scalars)"
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ParamsError(f"override '{p}' is not of the form key=value")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def as_dict(params):
    return dataclasses.asdict(params)


def save_params(params, path):
    "Write the effective parameters as YAML, atomically"
    from .io import atomic_write
    text = yaml.safe_dump(as_dict(params), sort_keys=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def notebook_parameters(notebook_path):
    "The literals of a notebook's cell tagged `parameters`, as a dict (for checks and tests)"
    nb = json.loads(Path(notebook_path).read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"])
            values = {}
            for node in ast.parse(src).body:
                if not (isinstance(node, (ast.Assign, ast.AnnAssign))):
                    raise ParamsError(f"{notebook_path}: the parameters cell may hold only assignments of literals")
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                values[target.id] = ast.literal_eval(node.value)
            return values
    raise ParamsError(f"{notebook_path}: no cell tagged 'parameters'")
