"""Every parameter is bounded and every parser is bounded: the rule is checked on every Params class
(not example by example), and generated hostile documents and overrides end in a ParamsError, never
in another exception, a long run or a large allocation."""
import importlib
import math
import os
import pkgutil
import tracemalloc
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field

import cdkit.steps
from cdkit.base.params import (MAX_PARAMS_BYTES, Params, ParamsError, load_params, parse_overrides, read_params_file,
                          unbounded_fields)
from cdkit.steps.pipeline import STEPS
from cdkit.steps.predict import PredictParams

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def all_params_classes():
    "Every Params class defined in cdkit.steps (the registry's and any other)"
    out = set()
    for m in pkgutil.iter_modules(cdkit.steps.__path__):
        mod = importlib.import_module(f"cdkit.steps.{m.name}")
        out |= {v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, Params) and v is not Params}
    return sorted(out, key=lambda c: c.__name__)


CLASSES = all_params_classes()
STEP_CLASSES = [s.params_class() for s in STEPS]


def test_the_walk_finds_every_step():
    assert set(STEP_CLASSES) <= set(CLASSES) and len(CLASSES) >= 11


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_number_has_an_upper_bound(cls):
    assert unbounded_fields(cls) == []


def test_the_rule_catches_an_unbounded_field():
    class Loose(Params):
        n: int = Field(1, ge=0)
        xs: list[int] = Field(default_factory=list)
        lr: Optional[float] = None
        ok: int = Field(1, ge=0, le=10)
        name: str = "a"
    bad = unbounded_fields(Loose)
    assert {b.split(":")[0] for b in bad} == {"n", "xs", "xs[]", "lr"}


def _number_fields(cls):
    "(name, type) of each plain int/float field (Optional allowed)"
    import typing
    for name, f in cls.model_fields.items():
        args = typing.get_args(f.annotation) or (f.annotation,)
        kinds = [a for a in args if a in (int, float)]
        if kinds and all(a in (int, float, type(None)) for a in args):
            yield name, kinds[0]


@pytest.mark.parametrize("cls", [c for c in STEP_CLASSES if list(_number_fields(c))], ids=lambda c: c.__name__)
def test_huge_and_non_finite_numbers_are_refused(cls):
    fields = list(_number_fields(cls))
    for name, kind in fields:
        for v in (10**30, 1e300, math.inf, -math.inf, math.nan):
            with pytest.raises(ParamsError, match=name) as e:
                load_params(cls, overrides={name: v})
            assert len(str(e.value)) < 1000


# ---- generated YAML documents ----

FIELDS = sorted({k for c in STEP_CLASSES for k in c.model_fields})
scalars = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.sampled_from(["1e400", "-1e400", ".inf", "-.inf", ".nan", "1.0e+20", "9" * 5000, "0x" + "f" * 40, "~", "yes",
                     "2020-01-01", "!!binary aGVsbG8=", "!!python/object:os.system {}", "!!set {a, b}", "'\\x00'",
                     "&a [1, 2]", "*nope", "[" * 30 + "]" * 30, "{" * 30 + "}" * 30]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30).map(
        lambda s: "'" + s.replace("'", "''") + "'"),
)
keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from(["1", "~", "true", "[a]", "{a: 1}", "? [x]", "1.5", "''"]),
                 st.text(alphabet="abcxyz_-.:", min_size=1, max_size=12))


def _bomb(depth, width=9):
    """The billion laughs inside one known parameter's value: each level refers `width` times to the one
    below, so the value holds width**depth strings (a message that printed it would be gigabytes)"""
    levels = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, depth)]
    return "models: [" + ", ".join(levels) + "]\n"


documents = st.one_of(
    st.lists(st.tuples(keys, scalars), max_size=6).map(lambda kv: "\n".join(f"{k}: {v}" for k, v in kv)),
    st.integers(min_value=2, max_value=12).map(_bomb),
    st.integers(min_value=1, max_value=20000).map(lambda n: "models: " + "[" * n + "]" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: "a:\n" + "".join(" " * i + "- \n" for i in range(1, n))),
    st.sampled_from(["- 1\n- 2", "just text", "", "a: 1\na: 2", "? [x]\n: 1", "1: 2", "null: 3", "[1, 2]: 3",
                     "\ufeffepochs: 2", "epochs: !!float 3", "%YAML 1.1\n---\nepochs: 2", "---\na: 1\n---\nb: 2"]),
)


@SETTINGS
@given(doc=documents, cls=st.sampled_from(STEP_CLASSES))
def test_generated_params_files_end_in_a_params_error(tmp_path, doc, cls):
    f = tmp_path / "p.yaml"
    f.write_text(doc, encoding="utf-8")
    tracemalloc.start()
    try:
        load_params(cls, [f])
    except ParamsError as e:
        assert len(str(e)) < 2000  # the message never prints the value whole
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 << 20  # a few MB at most, whatever the document (an alias bomb would take GBs)


@SETTINGS
@given(key=keys, value=scalars, cls=st.sampled_from(STEP_CLASSES))
def test_generated_overrides_end_in_a_params_error(key, value, cls):
    try:
        load_params(cls, overrides=[f"{key}={value}"])
    except ParamsError as e:
        assert len(str(e)) < 2000


def test_an_alias_bomb_stops_while_composing(tmp_path):
    with pytest.raises(ParamsError, match="aliases"):
        parse_overrides(["models=[&a x, " + ", ".join(["*a"] * 100) + "]"])
    tracemalloc.start()
    try:
        with pytest.raises(ParamsError, match="expanded"):
            load_params(PredictParams, [_write(tmp_path, _bomb(7))])  # 54 aliases, 4.8 million values expanded
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 16 << 20


def _write(tmp_path, text):
    p = tmp_path / "bomb.yaml"
    p.write_text(text)
    return p


def test_non_string_keys_are_refused_naming_the_file(tmp_path):
    for text in ("1: 2\n", "null: 3\n", "true: 1\n", "? [a]\n: 1\n", "1.5: x\n"):
        f = tmp_path / "odd.yaml"
        f.write_text(text)
        with pytest.raises(ParamsError, match="odd.yaml"):
            read_params_file(f)


def test_params_files_are_read_up_to_a_bound(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_PARAMS_BYTES + "\n")
    with pytest.raises(ParamsError, match="big.yaml.*larger than"):
        read_params_file(big)
    with pytest.raises(ParamsError, match="folder"):
        read_params_file(tmp_path)
    with pytest.raises(ParamsError, match="/dev/zero.*not a regular file"):
        read_params_file("/dev/zero")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would block until a writer comes: refused by its kind, unopened
    with pytest.raises(ParamsError, match="fifo.yaml.*not a regular file"):
        read_params_file(fifo)
