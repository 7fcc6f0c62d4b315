"""Property tests: no run config, however wrong, ends in a traceback.

Whatever is thrown at the parser — known keys with values of any type, unknown keys,
plausible combinations that trip the cross-key rules, raw ``-c`` override text — the result
is either a valid :class:`RunConfig` (every value within its documented type, range and
choices) or a :class:`ConfigError` whose message is one non-empty line.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedserver.cli import main as pollen_main
from fedserver.cli import resolve_run_config
from fedserver.config import ConfigError, RunConfig, key_specs, parse_overrides, parse_run_config

SPECS = {spec["name"]: spec for spec in key_specs()}
KEYS = sorted(SPECS)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["true", "False", "1e400", "-0", "nan", "inf", "0x10", " 3 ", "", "\0", "a/b", ".."]),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def plausible(spec: dict) -> st.SearchStrategy:
    """Values near what the key accepts: its choices, numbers around its bounds, strings."""
    if spec["choices"]:
        return st.one_of(st.sampled_from(spec["choices"]), st.text(max_size=8))
    kind = spec["type"]
    if kind == "bool":
        return st.one_of(st.booleans(), st.sampled_from(["true", "false", "TRUE", "yes", 1]))
    if kind == "str":
        return st.text(max_size=12)
    edges = [b for b in (spec["low"], spec["high"]) if b is not None] or [0]
    near = st.sampled_from(edges).flatmap(
        lambda b: st.sampled_from([b, b - 1, b + 1, b - 1e-9, b + 1e-9, b / 2, b * 2 + 1])
    )
    numbers = st.integers(-5, 50) if kind == "int" else st.floats(-5, 50, allow_nan=False)
    return st.one_of(near, numbers, numbers.map(str))


def _check(raw: dict) -> RunConfig | None:
    """Parse; a valid result must satisfy every key's documented constraints."""
    try:
        cfg = parse_run_config(raw)
    except ConfigError as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return None
    for name, value in cfg.to_dict().items():
        spec = SPECS[name]
        assert type(value).__name__ == spec["type"], (name, value)
        if spec["choices"]:
            assert value in spec["choices"], (name, value)
        if spec["type"] in ("int", "float"):
            assert math.isfinite(value), (name, value)
            low, high = spec["low"], spec["high"]
            assert low is None or value > low or (value == low and not spec["low_open"]), (name, value)
            assert high is None or value < high or (value == high and not spec["high_open"]), (name, value)
    assert parse_run_config(cfg.to_dict()) == cfg  # what config.json stores parses back the same
    return cfg


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), anything, max_size=6))
def test_known_keys_with_values_of_any_type(raw):
    _check(raw)


@FUZZ
@given(st.dictionaries(st.text(max_size=30), anything, max_size=4))
def test_random_keys(raw):
    cfg = _check(raw)
    assert cfg is not None or raw  # the empty config is valid
    if any(k not in SPECS for k in raw):
        assert cfg is None


@FUZZ
@given(st.data())
def test_plausible_combinations_pass_or_name_the_rule(data):
    keys = data.draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=14))
    raw = {k: data.draw(plausible(SPECS[k]), label=k) for k in keys}
    _check(raw)


def test_plausible_combinations_are_mostly_valid():
    """The generator above is not just producing errors: defaults plus one in-range value parse."""
    ok = 0
    for name, spec in SPECS.items():
        value = spec["choices"][-1] if spec["choices"] else spec["default"]
        ok += _check({name: value}) is not None
    assert ok >= len(SPECS) - 3  # a few keys need a partner key (e.g. data-path with files)


override_text = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=6)),
            st.one_of(
                st.text(max_size=10),
                st.sampled_from(['"x', "'", "[1, 2]", "{a=1}", "1979-05-27", "1e999", "~nouser/x",
                                 '"a\\u0000b"', "10" * 30, "true", "0.5", '"a\\nb"']),
            ),
        ),
        max_size=5,
    ).map(lambda pairs: " ".join(f"{k}={v}" for k, v in pairs)),
)


@FUZZ
@given(override_text)
def test_run_overrides_text_gives_a_config_or_one_config_error(text):
    """What ``pollen run -c TEXT`` does before launching anything."""
    try:
        overrides = resolve_run_config(text)
    except ConfigError as err:
        assert "\n" not in str(err), repr(str(err))
        return
    cfg = _check(overrides)
    assert cfg is not None and cfg.output_dir.startswith("/") and cfg.run_name


@settings(max_examples=40, deadline=None)
@given(override_text)
def test_pollen_config_check_answers_zero_or_two(text):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pollen_main(["config", "--check", text])
    assert code in (0, 2)
    if code == 2:
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pollen: error: ")
    else:
        assert parse_run_config(parse_overrides(text)) is not None
