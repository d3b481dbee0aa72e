"""Property-based tests of parameter loading: any key, any value, any file text -> a Params or a ParamsError."""

from __future__ import annotations

import dataclasses
import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitprune as vp
from vitprune.errors import ParamsError
from vitprune.params import Params, parse_set_args


def dotted_keys(cls: type = Params, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        key = f"{prefix}{f.name}"
        sub = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        keys += dotted_keys(sub, key + ".") if sub else [key]
    return keys


KEYS = dotted_keys()
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["nan", ".inf", "-inf", "1e-4", "gates", "svd", "cpu"]))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=5), scalars, max_size=3))
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def get(p: Params, key: str):
    node = p
    for part in key.split("."):
        node = getattr(node, part)
    return node


@SETTINGS
@given(key=st.sampled_from(KEYS), value=values)
def test_any_value_for_any_key_is_taken_or_refused_naming_the_key(key, value):
    try:
        p = vp.load_params(None, {key: value})
    except ParamsError as err:
        leaf = key.split(".")[-1]
        assert leaf in str(err) or key.split(".")[0] in str(err), str(err)
        return
    got = get(p, key)
    if isinstance(got, float):
        assert math.isfinite(got)
    for number in got if isinstance(got, list) else [got]:
        assert not (isinstance(number, float) and not math.isfinite(number))


@SETTINGS
@given(key=st.sampled_from(KEYS), text=st.text(max_size=20))
def test_any_set_argument_is_parsed_or_refused_cleanly(key, text):
    try:
        vp.load_params(None, parse_set_args([f"{key}={text}"]))
    except ParamsError:
        pass


@SETTINGS
@given(document=st.text(max_size=200))
def test_any_file_text_loads_or_is_refused_cleanly(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("props") / "p.yaml"
    path.write_text(document)
    try:
        p = vp.load_params(path)
    except ParamsError as err:
        assert str(path) in str(err)
        return
    assert isinstance(p, Params)


@SETTINGS
@given(lr=st.floats(min_value=1e-9, max_value=10.0), form=st.sampled_from(["{:g}", "{:e}", "{!r}"]))
def test_numbers_written_as_text_are_read_as_numbers(lr, form):
    text = form.format(lr)
    p = vp.load_params(None, parse_set_args([f"train.lr={text}", "train.min_lr=0"]))  # min_lr <= lr
    assert p.train.lr == float(text)


@SETTINGS
@given(epochs=st.integers(0, 1000),  # ratios name their files to 0.0001 (names.ratio_label): so far apart at least
       ratios=st.lists(st.integers(0, 9900), min_size=1, max_size=4, unique=True).map(lambda r: [i / 1e4 for i in r]),
       name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True))
def test_a_valid_set_survives_a_round_trip_through_yaml(tmp_path_factory, epochs, ratios, name):
    p = vp.load_params(None, {"train.epochs": epochs, "prune.ratios": ratios, "name": name,
                              "prune.ablation_ratio": ratios[0], "decompose.source_ratio": ratios[0]})
    path = tmp_path_factory.mktemp("round") / "p.yaml"
    raw = {k: v for k, v in p.to_dict().items() if k != "source"}
    path.write_text(yaml.safe_dump(raw))
    again = vp.load_params(path)
    assert dataclasses.replace(again, source=None) == p
