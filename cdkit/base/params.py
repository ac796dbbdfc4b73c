"""One parameter system for notebooks, params files and the command line.

Each step declares a `Params` class (pydantic, `extra="forbid"`, strict types, ranges and `Literal`
choices) whose defaults are the demo's. The same values reach it three ways, validated the same way
before any work starts or any file is written:

- a notebook's cell tagged `parameters` repeats the defaults; `take_params(Cls, globals())` right
  after it collects what papermill injected (papermill itself only warns on unknown keys);
- params/*.yaml files hold only the differences, layered left to right (`-f a.yaml -f b.yaml` in
  papermill, `--params a.yaml --params b.yaml` on the command line); a duplicate key is an error;
- `key=value` overrides on the command line, parsed as YAML scalars.

Two settings that contradict each other are refused by the class's validators, naming both.

Everything is bounded: every number that sizes work or memory has an upper bound in its Field (a
test walks every Params class), floats are finite, a params file is read up to `MAX_PARAMS_BYTES`
(devices, FIFOs and folders refused by name), YAML is composed by `BoundedLoader` (at most
`MAX_ALIASES` aliases, `MAX_DEPTH` levels, `MAX_NODES` nodes once aliases are expanded; keys are
strings), and a message never prints an unbounded value (`errors.shorten`). Any input ends in a
ParamsError, never another exception."""
from __future__ import annotations

import ast
import difflib
import json
import re
import os
import stat
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cdkit.base.errors import CdkitError, shorten

_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit"}
_LITERALS = (bool, int, float, str, type(None), list, tuple, dict)


MAX_PARAMS_BYTES = 1 << 20  # a params file holds a few dozen lines; more is not a params file
MAX_DEPTH = 16               # nesting of YAML collections (a parameter is a scalar or a flat list)
MAX_ALIASES = 64             # *alias references in one document
MAX_NODES = 100_000          # YAML nodes once aliases are expanded (an alias bomb expands exponentially)

# upper bounds shared by several steps' Fields
MAX_EPOCHS = 1000
MAX_SEED = 2**32 - 1         # numpy's seeds are 32-bit
MAX_IMAGES = 10**9           # the competition has 12.4 million training pictures
MAX_BATCH = 65536
MAX_WORKERS = 256
MAX_K = 10000                # classes kept per picture (the competition has 5,270)
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class PathMarker:
    "Metadata of a path-valued field: typed on the command line it is relative to the current folder"


# A path-valued parameter. In a params file or a notebook's parameters cell a relative path is taken
# from the repository root (`paths.resolve`); typed on the command line as key=value, from the
# current folder (the command line makes it absolute before validation).
PathStr = Annotated[str, PathMarker()]


class ParamsError(CdkitError, ValueError):
    "An unknown parameter, a value of the wrong type or out of range, or two that contradict each other"


class Params(BaseModel):
    "Base of every step's parameters: unknown keys and wrong types are errors, assignments are checked"
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, validate_default=True,
                              allow_inf_nan=False)  # a field that takes inf or nan says so: Field(allow_inf_nan=True)

    def replace(self, **changes):
        "A validated copy with `changes`"
        return make_params(type(self), {**self.model_dump(), **changes}, where=f"{type(self).__name__}.replace")

    def as_dict(self) -> dict:
        return self.model_dump()


class DataParams(Params):
    """Where the data set and its derived files are (every step after 01 reads both). In a Kaggle notebook
    the demo's folders stand for the competition's input and /kaggle/working (`paths.environment_default`)."""
    data_dir: PathStr = "data/demo"       # train.bson, test.bson, category_names.csv (synthetic or Kaggle)
    work_dir: PathStr = "data/demo_prepared"  # indices and the split of that data (step 02); the raw folder stays read-only

    @field_validator("data_dir", "work_dir", "run_dir", check_fields=False)
    @classmethod
    def _where(cls, v, info):
        from cdkit.base.paths import environment_default
        return environment_default(info.field_name, v)


class RunParams(DataParams):
    "A step that reads or writes the pipeline's run folder (models, stores, products, results)"
    run_dir: PathStr = "runs/demo"        # the run folder: models/, preds/, products/, results.json, report.md


def _cut(text: str, limit: int) -> str:
    "`text` (a message, not a value) cut to `limit` characters"
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _describe(err: dict, values: dict) -> str:
    loc = ".".join(shorten(x, 40) if not isinstance(x, (str, int)) else str(x) for x in err.get("loc", ())) or "(parameters)"
    name = err["loc"][0] if err.get("loc") else None
    msg = _cut(err.get("msg", "invalid"), 300)
    if name is not None and name in values:
        return f"parameter '{loc}' = {shorten(values[name])}: {msg}"
    return f"{msg}" if loc == "(parameters)" else f"parameter '{loc}': {msg}"


def make_params(cls, values: dict, where="params"):
    "An instance of the Params class `cls` from `values`; ParamsError naming every bad parameter"
    where = str(where)
    known = set(cls.model_fields)
    odd = [k for k in values if not isinstance(k, str)]
    if odd:
        raise ParamsError(f"{where}: parameter names are words, not {shorten(odd[0], 40)} ({type(odd[0]).__name__})")
    unknown = sorted(set(values) - known)
    if unknown:
        hint = "; ".join(f"{shorten(k, 40)} (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k[:100], known, 1))
                         else shorten(k, 40) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ParamsError(f"{where}: unknown parameter(s) {hint} for {cls.__name__}; known: {sorted(known)}")
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    try:
        return cls(**values)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        problems = "; ".join(_describe(err, values) for err in errors[:5])
        more = f" (and {len(errors) - 5} more problems)" if len(errors) > 5 else ""
        raise ParamsError(f"{where}: {problems}{more}") from None


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with limits: nesting, aliases and the size of the expanded document are
    counted while composing, before anything is built; a mapping key given twice or a key that is not
    a string is refused (plain PyYAML keeps the last duplicate silently)"""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth, self._aliases = 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_ALIASES} aliases (*name)",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                              self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        _check_expanded_size(node)
        return super().construct_document(node)


def _check_expanded_size(root):
    "Refuse a document whose nodes, aliases expanded, exceed MAX_NODES (counted once per distinct node)"
    size, stack, order = {}, [root], []
    while stack:  # post-order without recursion: children's sizes before their parent's
        node = stack.pop()
        if id(node) in size:
            continue
        size[id(node)] = None
        order.append(node)
        for child in _children(node):
            if id(child) not in size:
                stack.append(child)
    for node in reversed(order):
        total = 1 + sum(size[id(c)] or 0 for c in _children(node))
        if total > MAX_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES} values once aliases are expanded",
                                              node.start_mark)
        size[id(node)] = total


def _children(node):
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, f"key {shorten(key, 40)} on line {key_node.start_mark.line + 1} is not a name (keys are "
                "parameter names)", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {shorten(key, 40)} (first on line {seen[key] + 1}, again on line "
                f"{key_node.start_mark.line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


BoundedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 (PyYAML) reads `1e-3` and `3e2` as strings (it wants a dot); people write lr=1e-3: numbers, as in YAML 1.2
BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))

# what parsing a bounded text may still raise besides YAMLError: an int of more than 4300 digits
# (ValueError), a float beyond the double range, an unhashable key (TypeError) and the like
_PARSE_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError)


def _yaml_value(text, name):
    "The value of the YAML text (bounded by BoundedLoader); `name` is what its error marks call it"
    loader = BoundedLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_bounded(path: Path) -> bytes:
    "At most MAX_PARAMS_BYTES of a regular file; ParamsError naming it for anything else"
    try:
        st = os.stat(path)
    except OSError as e:
        raise ParamsError(f"{path}: cannot read params file ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise ParamsError(f"{path}: a params file is a YAML file; this is {kind}")
    try:
        with open(path, "rb") as f:  # the size is read, not trusted: the file may grow
            raw = f.read(MAX_PARAMS_BYTES + 1)
    except OSError as e:
        raise ParamsError(f"{path}: cannot read params file ({e.strerror or e})") from None
    if len(raw) > MAX_PARAMS_BYTES:
        raise ParamsError(f"{path}: larger than {MAX_PARAMS_BYTES} bytes; a params file holds a few parameters")
    return raw


def read_params_file(path) -> dict:
    "The mapping in a params YAML file; ParamsError naming the file for anything else"
    path = Path(path)
    raw = _read_bounded(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParamsError(f"{path}: not a text file (params files are UTF-8 YAML)") from None
    if "\x00" in text:
        raise ParamsError(f"{path}: not a text file (params files are UTF-8 YAML)")
    try:
        data = _yaml_value(text, path.name)
    except _PARSE_ERRORS as e:
        raise ParamsError(f"{path}: invalid YAML: {_cut(e, 300)}") from None
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
    "['lr=0.01', 'arch=resnet18'] -> {'lr': 0.01, 'arch': 'resnet18'} (values parsed as YAML, bounded as in files)"
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ParamsError(f"override {shorten(p)} is not of the form key=value")
        k, v = p.split("=", 1)
        if len(v.encode("utf-8", "surrogatepass")) > MAX_PARAMS_BYTES:
            raise ParamsError(f"override '{_cut(k.strip(), 40)}': value larger than {MAX_PARAMS_BYTES} bytes")
        try:
            out[k.strip()] = _yaml_value(v, "the value")
        except _PARSE_ERRORS as e:
            raise ParamsError(f"override {shorten(p)}: invalid value ({_cut(e, 300)})") from None
    return out


def save_params(params: Params, path):
    "Write the effective parameters as YAML, atomically"
    from cdkit.base.io import atomic_write
    text = yaml.safe_dump(params.model_dump(), sort_keys=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


PATH_PARAMS = ("data_dir", "work_dir", "run_dir", "pretrained_file")  # compared by the file or folder they name


def _same_path(a, b) -> bool:
    "Two spellings of one file or folder (absolute or from the repository root, ./, .., symlinks)"
    from cdkit.base.paths import resolve
    if not (isinstance(a, str) and isinstance(b, str)): return a == b
    return a == b or resolve(a).resolve() == resolve(b).resolve()


def changed_params(saved: dict, now, keys) -> dict:
    """{key: (saved, now)} for the `keys` whose value differs between a saved run and `now` (Params or a
    dict of settings); the path-valued ones (PATH_PARAMS) differ when they name another file or folder,
    not another spelling"""
    cur = now if isinstance(now, dict) else now.model_dump()
    return {k: (saved.get(k), cur.get(k)) for k in keys if k in cur and not (
        _same_path(saved.get(k), cur.get(k)) if k in PATH_PARAMS else saved.get(k) == cur.get(k))}


def defaults(cls) -> dict[str, Any]:
    "The default of every field of a Params class"
    return {k: f.get_default(call_default_factory=True) for k, f in cls.model_fields.items()}


def field_comments(cls) -> dict:
    """The trailing comment of each field's line in the class source (base classes first): the one
    description of a parameter, shown by the notebooks' parameters cells and `cdkit <step> --help`"""
    import inspect
    out = {}
    for klass in reversed(cls.__mro__):
        if not hasattr(klass, "model_fields") or klass.__module__.startswith("pydantic"):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        lines = src.splitlines()
        for node in ast.parse(src).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = lines[node.lineno - 1]
                if "#" in line:
                    out[node.target.id] = line.split("#", 1)[1].strip()
    return out


def type_name(annotation) -> str:
    "A parameter's type as a reader says it: 'int', 'int or None', 'list of float', 'adam|sgd'"
    import types
    import typing
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return "|".join(str(a) if a != "" else "''" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    return getattr(annotation, "__name__", str(annotation))


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


def _metadata_bounds(metadata) -> tuple[bool, bool, bool]:
    "(has an upper bound, has a max_length, allows inf/nan) from a field's or a type's metadata"
    upper = any(getattr(m, "le", None) is not None or getattr(m, "lt", None) is not None for m in metadata)
    length = any(getattr(m, "max_length", None) is not None for m in metadata)
    nonfinite = any(getattr(m, "allow_inf_nan", None) for m in metadata)
    return upper, length, nonfinite


def unbounded_fields(cls) -> list[str]:
    """The fields of a Params class that break the rule "every number is bounded": a number (also
    inside a list, an Optional or a Union) without an upper bound, a list of numbers without a
    max_length, a float that allows inf/nan without saying so in its Field. Empty when the class obeys"""
    import typing
    import annotated_types  # noqa: F401  (pydantic's metadata types carry .le/.lt/.max_length)
    bad = []

    def walk(tp, metadata, where):
        origin = typing.get_origin(tp)
        if origin is Annotated:
            base, *extra = typing.get_args(tp)
            extra = [x for m in extra for x in (getattr(m, "metadata", None) or [m])]
            return walk(base, list(metadata) + extra, where)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            for a in typing.get_args(tp):
                walk(a, metadata, where)
            return
        if origin is typing.Literal or tp is type(None) or tp in (str, bool):
            return
        upper, length, _ = _metadata_bounds(metadata)
        if origin in (list, tuple, set):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            if any(_is_number(a) for a in args) and not length:
                bad.append(f"{where}: a list of numbers without max_length")
            for a in args:
                walk(a, [], f"{where}[]")
            return
        if tp in (int, float) and not upper:
            bad.append(f"{where}: {tp.__name__} without an upper bound (le= or lt=)")

    for name, f in cls.model_fields.items():
        walk(f.annotation, f.metadata, name)
    return bad


def _is_number(tp) -> bool:
    import typing
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_is_number(a) for a in typing.get_args(tp))
    return tp in (int, float)


def path_fields(cls) -> set[str]:
    "The fields of a Params class typed PathStr (alone, Optional or in a list)"
    import typing

    def is_path(tp, metadata=()):
        if any(isinstance(m, PathMarker) for m in metadata):
            return True
        if typing.get_origin(tp) is Annotated:
            base, *extra = typing.get_args(tp)
            return is_path(base, extra)
        return any(is_path(a) for a in typing.get_args(tp))

    return {name for name, f in cls.model_fields.items() if is_path(f.annotation, f.metadata)}
# ---- shared params files ----
# params/cdiscount.yaml holds what every step repeats on the real data (the data, work and run folders), but
# steps 01-02 have no run folder: from a shared file a step takes the keys it declares. A key that no step
# declares is still an error (a typo there is caught), and every other file, `-p` and key=value stay strict.
SHARED_FILES = ("cdiscount",)  # stems of the shared files, under params/


def is_shared_file(path) -> bool:
    return Path(path).stem in SHARED_FILES


def _declared_by_some_step() -> set:
    "the keys a shared file may hold: the folders every step shares, declared by the classes all steps derive from"
    return set(RunParams.model_fields)


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
    from cdkit.base.paths import PARAMS
    shared = {}
    for stem in SHARED_FILES:
        if (PARAMS / f"{stem}.yaml").exists():
            shared.update(read_params_file(PARAMS / f"{stem}.yaml"))
    anywhere = _declared_by_some_step()
    return {k: v for k, v in values.items()
            if not (k in extra and k in anywhere and k in shared and shared[k] == v)}
