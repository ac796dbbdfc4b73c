"""One parameter system for notebooks, params files and the command line.

Each step declares a `Params` class (pydantic, `extra="forbid"`, strict types, ranges and `Literal`
choices) whose defaults are the demo's. The same values reach it three ways, validated the same way
before any work starts or any file is written:

- a notebook's cell tagged `parameters` repeats the defaults; `take_params(Cls, globals())` right
  after it collects what papermill injected (papermill itself only warns on unknown keys);
- params/*.yaml files hold only the differences, layered left to right (`-f a.yaml -f b.yaml` in
  papermill, `--params a.yaml --params b.yaml` on the command line); a duplicate key is an error;
- `key=value` overrides on the command line, parsed as YAML scalars.

Two settings that contradict each other are refused by the class's validators, naming both."""
from __future__ import annotations

import ast
import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit"}
_LITERALS = (bool, int, float, str, type(None), list, tuple, dict)


class ParamsError(ValueError):
    "An unknown parameter, a value of the wrong type or out of range, or two that contradict each other"


class Params(BaseModel):
    "Base of every step's parameters: unknown keys and wrong types are errors, assignments are checked"
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, validate_default=True)

    def replace(self, **changes):
        "A validated copy with `changes`"
        return make_params(type(self), {**self.model_dump(), **changes}, where=f"{type(self).__name__}.replace")

    def as_dict(self) -> dict:
        return self.model_dump()


class DataParams(Params):
    """Where the data set and its derived files are (every step after 01 reads both). In a Kaggle notebook
    the demo's folders stand for the competition's input and /kaggle/working (`paths.environment_default`)."""
    data_dir: str = "data/demo"           # train.bson, test.bson, category_names.csv (synthetic or Kaggle)
    work_dir: str = "data/demo_prepared"  # indices and the split of that data (step 02); the raw folder stays read-only

    @field_validator("data_dir", "work_dir", "run_dir", check_fields=False)
    @classmethod
    def _where(cls, v, info):
        from .paths import environment_default
        return environment_default(info.field_name, v)


class RunParams(DataParams):
    "A step that reads or writes the pipeline's run folder (models, stores, products, results)"
    run_dir: str = "runs/demo"            # the run folder: models/, preds/, products/, results.json, report.md


def _describe(err: dict, values: dict) -> str:
    loc = ".".join(str(x) for x in err.get("loc", ())) or "(parameters)"
    name = str(err["loc"][0]) if err.get("loc") else None
    msg = err.get("msg", "invalid")
    if name is not None and name in values:
        return f"parameter '{loc}' = {values[name]!r}: {msg}"
    return f"{msg}" if loc == "(parameters)" else f"parameter '{loc}': {msg}"


def make_params(cls, values: dict, where="params"):
    "An instance of the Params class `cls` from `values`; ParamsError naming every bad parameter"
    known = set(cls.model_fields)
    unknown = sorted(set(values) - known)
    if unknown:
        hint = "; ".join(f"'{k}' (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, known, 1)) else f"'{k}'"
                         for k in unknown)
        raise ParamsError(f"{where}: unknown parameter(s) {hint} for {cls.__name__}; known: {sorted(known)}")
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    try:
        return cls(**values)
    except ValidationError as e:
        problems = "; ".join(_describe(err, values) for err in e.errors(include_url=False))
        raise ParamsError(f"{where}: {problems}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    "YAML that refuses a key given twice in one mapping (plain PyYAML keeps the last silently)"


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1}, again on line "
                f"{key_node.start_mark.line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_params_file(path) -> dict:
    "The mapping in a params YAML file; ParamsError naming the file for anything else"
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ParamsError(f"{path}: cannot read params file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParamsError(f"{path}: not a text file (params files are UTF-8 YAML)") from None
    if "\x00" in text:
        raise ParamsError(f"{path}: not a text file (params files are UTF-8 YAML)")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of parameter: value, got {type(data).__name__}")
    return data


def load_params(cls, files=None, overrides=None, where=None):
    """Defaults of `cls`, then each YAML file of `files` (only the differences, later files win), then
    `overrides` (a dict, or ['key=value', ...]); validated as a whole"""
    if isinstance(files, (str, Path)):
        files = [files]
    values, sources = {}, []
    for f in files or []:
        values.update(shared_subset(cls, f, read_params_file(f)))
        sources.append(str(f))
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    values.update(overrides or {})
    if overrides:
        sources.append("command line")
    return make_params(cls, values, where=where or (" + ".join(sources) if sources else cls.__name__))


def take_params(cls, namespace: dict, where="notebook parameters"):
    """Validated params from a notebook's globals (parameters cell + papermill's injected cell).

    Every public name holding a literal counts as a parameter, so a mistyped key that papermill
    injected is caught here, before any work starts."""
    values = {k: v for k, v in namespace.items()
              if not k.startswith("_") and k not in _IPYTHON_NAMES and type(v) in _LITERALS}
    return make_params(cls, drop_shared_values(cls, values), where)


def parse_overrides(pairs) -> dict:
    "['lr=0.01', 'arch=resnet18'] -> {'lr': 0.01, 'arch': 'resnet18'} (values parsed as YAML scalars)"
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ParamsError(f"override '{p}' is not of the form key=value")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ParamsError(f"override '{p}': invalid value ({' '.join(str(e).split())})") from None
    return out


def save_params(params: Params, path):
    "Write the effective parameters as YAML, atomically"
    from .io import atomic_write
    text = yaml.safe_dump(params.model_dump(), sort_keys=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def changed_params(saved: dict, now: Params, keys) -> dict:
    "{key: (saved, now)} for the `keys` whose value differs between a saved run and `now`"
    cur = now.model_dump()
    return {k: (saved.get(k), cur.get(k)) for k in keys if k in cur and saved.get(k) != cur.get(k)}


def defaults(cls) -> dict[str, Any]:
    "The default of every field of a Params class"
    return {k: f.get_default(call_default_factory=True) for k, f in cls.model_fields.items()}


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


# ---- shared params files ----
# params/cdiscount.yaml holds what every step repeats on the real data (the data, work and run folders), but
# steps 01-02 have no run folder: from a shared file a step takes the keys it declares. A key that no step
# declares is still an error (a typo there is caught), and every other file, `-p` and key=value stay strict.
SHARED_FILES = ("cdiscount",)  # stems of the shared files, under params/


def is_shared_file(path) -> bool:
    return Path(path).stem in SHARED_FILES


def _declared_by_some_step() -> set:
    from .pipeline import STEPS
    return set().union(*(s.params_class().model_fields for s in STEPS))


def shared_subset(cls, path, data: dict) -> dict:
    "`data` of the params file `path` as step `cls` takes it: all of it, or of a shared file what cls declares"
    if not is_shared_file(path) or set(data) <= set(cls.model_fields):
        return data
    anywhere = _declared_by_some_step()
    return {k: v for k, v in data.items() if k in cls.model_fields or k not in anywhere}


def drop_shared_values(cls, values: dict) -> dict:
    """A notebook's values without the names it does not declare that hold a shared file's value: papermill
    injects a -f file's keys without saying which file they came from, so `-f params/cdiscount.yaml` is
    recognised by its values (`-p run_dir elsewhere` in a notebook without run_dir is still refused)"""
    extra = set(values) - set(cls.model_fields)
    if not extra:
        return values
    from .paths import PARAMS
    shared = {}
    for stem in SHARED_FILES:
        if (PARAMS / f"{stem}.yaml").exists():
            shared.update(read_params_file(PARAMS / f"{stem}.yaml"))
    anywhere = _declared_by_some_step()
    return {k: v for k, v in values.items()
            if not (k in extra and k in anywhere and k in shared and shared[k] == v)}
