"""`dpft.config.parse_arg` and the ``:ARG`` variants of every config in configs/."""

import importlib.util
import pathlib
import re

import pytest

from dpft.config import parse_arg

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def _parse(arg):
    return parse_arg(
        arg,
        config="configs/x.py",
        choices={"mode": ("head", "full"), "eps": ("3", "1")},
        defaults={"eps": None},
        flags=("smoke",),
        aliases={"run": ("full", "1")},
        numbers={"size": ("px", 32)},
    )


def test_defaults_choices_flags_aliases_and_numbers():
    a = _parse("")
    assert (a.mode, a.eps, a.size, a.smoke) == ("head", None, None, False)
    a = _parse(" smoke , 3,full,px96")
    assert (a.mode, a.eps, a.size, a.smoke) == ("full", "3", 96, True)
    a = _parse("run,smoke")
    assert (a.mode, a.eps, a.smoke) == ("full", "1", True)


@pytest.mark.parametrize(
    "arg, why",
    [
        ("bogus", "unknown config argument 'bogus'"),
        ("px8", "unknown config argument 'px8'"),
        ("head,full", "'head' and 'full' both set mode"),
        ("smoke,smoke", "'smoke' given twice"),
        ("run,full", "'full' given twice"),
    ],
)
def test_bad_parts_are_one_line_naming_config_part_and_accepted_values(arg, why):
    with pytest.raises(ValueError) as e:
        _parse(arg)
    message = str(e.value)
    assert "\n" not in message and message.startswith("configs/x.py: ")
    assert why in message
    assert "mode: head|full; eps: 3|1; size: pxN (N >= 32); run (= full,1); smoke" in message


def _module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_documented_variant_loads_and_a_bad_one_is_refused(path):
    module = _module(path)
    args = set(re.findall(rf"configs/{path.name}:([\w,]+)", module.__doc__))
    for arg in sorted(args | {""}):
        assert module.get_config(arg).name, arg
    with pytest.raises(ValueError, match=f"configs/{path.name}: unknown config argument 'bogus'"):
        module.get_config("bogus")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_docstring_has_a_command_and_one_expected_line(path):
    doc = _module(path).__doc__
    assert f"python -m dpft --config configs/{path.name}" in doc
    assert len(re.findall(r"^Expected:", doc, flags=re.M)) == 1, doc
