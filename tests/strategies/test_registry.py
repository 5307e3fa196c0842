"""The strategy registry: names, aliases, options, registration rules and entry-point plugins."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import gradsurg as gs
from gradsurg.errors import GradSurgWarning, InvalidOptionError, RegistrationError, UnknownStrategyError
from gradsurg.strategies import CAGrad, Mean, OrthoLoRA, PCGrad, Sum, registry
from gradsurg.strategies.base import Context, Property


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Whatever a test registers (directly or through plugins) is removed afterwards."""
    names, aliases, loaded = dict(registry._REGISTRY), dict(registry._ALIASES), registry._plugins_loaded
    modules = set(sys.modules)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(names)
    registry._ALIASES.clear()
    registry._ALIASES.update(aliases)
    registry._plugins_loaded = loaded
    for module in set(sys.modules) - modules:
        del sys.modules[module]


def _twice(grads: torch.Tensor) -> torch.Tensor:
    return 2 * grads.sum(dim=0)


# ---------------------------------------------------------------------------------- lookup
@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("PCGrad", PCGrad),
        ("pcgrad", PCGrad),
        ("PC-Grad", PCGrad),
        ("gradient_surgery", PCGrad),
        ("CAGrad", CAGrad),
        (" ca-grad ", CAGrad),
        ("Ortho-LoRA", OrthoLoRA),
        ("ortholora", OrthoLoRA),
        ("joint", Sum),
        ("Linear Scalarization", Sum),
        ("average", Mean),
    ],
)
def test_lookup_is_case_insensitive_and_reads_dashes_and_aliases(name: str, cls: type) -> None:
    assert type(gs.get_strategy(name)) is cls
    assert gs.strategy_info(name).cls is cls


def test_get_strategy_passes_options_and_repr_shows_them() -> None:
    strategy = gs.get_strategy("cagrad", c=0.5)
    assert isinstance(strategy, CAGrad)
    assert strategy.c == 0.5
    assert strategy.options["c"] == 0.5
    assert "c=0.5" in repr(strategy)
    assert repr(gs.get_strategy("pcgrad", shuffle=False)) == "PCGrad(reference='original', shuffle=False)"
    assert repr(gs.get_strategy("sum")) == "Sum()"


def test_strategy_info_describes_the_strategy() -> None:
    info = gs.strategy_info("Ortho-LoRA")
    assert info.name == "ortho_lora"
    assert info.cls is OrthoLoRA
    assert "2601.09684" in info.reference
    assert info.summary
    assert "lora_factor_groups" in info.requires
    assert "ortholora" in info.aliases
    assert Property.RANDOMIZED in info.properties


def test_list_strategies_is_sorted_and_canonical() -> None:
    names = gs.list_strategies()
    assert names == sorted(names)
    assert {"sum", "mean", "pcgrad", "cagrad", "ortho_lora"} <= set(names)
    assert "joint" not in names  # aliases are not listed


@pytest.mark.parametrize(
    ("typo", "closest"), [("pcgard", "pcgrad"), ("CA-Gard", "cagrad"), ("orto_lora", "ortho_lora"), ("jont", "sum")]
)
def test_unknown_name_suggests_the_closest_and_lists_the_known(typo: str, closest: str) -> None:
    with pytest.raises(UnknownStrategyError) as caught:
        gs.get_strategy(typo)
    message = str(caught.value)
    assert f"Did you mean {closest!r}?" in message
    assert all(name in message for name in gs.list_strategies())
    assert isinstance(caught.value, KeyError)


def test_unknown_name_without_close_match_still_lists_the_known() -> None:
    with pytest.raises(UnknownStrategyError, match="Known strategies: ") as caught:
        gs.strategy_info("zzzzzzzz")
    assert "Did you mean" not in str(caught.value)


def test_non_string_name_is_an_unknown_strategy() -> None:
    with pytest.raises(UnknownStrategyError, match="must be a string"):
        gs.get_strategy(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- options
def test_unknown_option_lists_the_accepted_ones() -> None:
    with pytest.raises(InvalidOptionError, match=r"unknown option\(s\) \['alpha'\]") as caught:
        gs.get_strategy("cagrad", alpha=0.5)
    assert all(option in str(caught.value) for option in ("c", "rescale", "scale", "iterations"))
    with pytest.raises(InvalidOptionError, match="takes no options"):
        gs.get_strategy("sum", c=1.0)


@pytest.mark.parametrize(
    ("name", "options", "option", "found"),
    [
        ("cagrad", {"c": -0.5}, "c", "c=-0.5"),
        ("cagrad", {"c": float("nan")}, "c", "c=nan"),
        ("cagrad", {"c": float("inf")}, "c", "c=inf"),
        ("cagrad", {"c": "0.4"}, "c", "c='0.4'"),
        ("cagrad", {"rescale": 3}, "rescale", "rescale=3"),
        ("cagrad", {"rescale": True}, "rescale", "rescale=True"),
        ("cagrad", {"scale": "total"}, "scale", "scale='total'"),
        ("cagrad", {"iterations": 0}, "iterations", "iterations=0"),
        ("cagrad", {"iterations": 2.5}, "iterations", "iterations=2.5"),
        ("pcgrad", {"reference": "x"}, "reference", "reference='x'"),
        ("pcgrad", {"shuffle": "yes"}, "shuffle", "shuffle='yes'"),
        ("ortho_lora", {"reference": "projected"}, "reference", "reference='projected'"),
    ],
)
def test_bad_option_values_use_the_message_template(name: str, options: dict, option: str, found: str) -> None:
    """ "Option `c` of CAGrad must be ≥ 0; found c=-0.5." — the thing, the requirement, the value."""
    cls_name = gs.strategy_info(name).cls.__name__
    pattern = rf"^Option `{option}` of {cls_name} must be .+; found {re.escape(found)}\.$"
    with pytest.raises(InvalidOptionError, match=pattern) as caught:
        gs.get_strategy(name, **options)
    assert isinstance(caught.value, ValueError)


def test_strategies_are_immutable_values() -> None:
    strategy = gs.get_strategy("cagrad", c=0.5)
    with pytest.raises(AttributeError, match="immutable"):
        strategy.c = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del strategy.c
    with pytest.raises(AttributeError, match="immutable"):
        strategy.anything = 1  # type: ignore[attr-defined]
    strategy.options["c"] = 9.0  # a copy
    assert strategy.c == 0.5
    assert strategy.options["c"] == 0.5
    assert strategy == CAGrad(c=0.5)
    assert hash(strategy) == hash(CAGrad(c=0.5))
    assert strategy != CAGrad(c=0.4)
    assert strategy != PCGrad()


# ---------------------------------------------------------------------------------- registration
def _strategy_class(**attributes: object) -> type[gs.Strategy]:
    namespace = {"_combine": lambda self, grads, context: _twice(grads), **attributes}
    return type("Custom", (gs.Strategy,), namespace)


@pytest.mark.usefixtures("clean_registry")
def test_register_a_new_strategy_with_aliases() -> None:
    cls = gs.register_strategy("My-Method", aliases=("mine",))(_strategy_class(summary="Twice the sum."))
    assert cls.name == "my_method"
    assert "my_method" in gs.list_strategies()
    grads = torch.randn(3, 4)
    assert torch.equal(gs.get_strategy("MINE")(grads), _twice(grads))
    info = gs.strategy_info("my_method")
    assert (info.summary, info.aliases) == ("Twice the sum.", ("mine",))


@pytest.mark.usefixtures("clean_registry")
@pytest.mark.parametrize("name", ["", "1abc", "a.b", "a/b", "_private", "é"])
def test_register_rejects_malformed_names(name: str) -> None:
    with pytest.raises(RegistrationError, match="must start with a letter"):
        gs.register_strategy(name)
    with pytest.raises(RegistrationError, match="must start with a letter"):
        gs.register_strategy("fine", aliases=(name,))


@pytest.mark.usefixtures("clean_registry")
def test_register_rejects_non_string_names() -> None:
    with pytest.raises(RegistrationError, match="must be a string"):
        gs.register_strategy(7)  # type: ignore[arg-type]


@pytest.mark.usefixtures("clean_registry")
@pytest.mark.parametrize(("name", "aliases"), [("pcgrad", ()), ("PC-Grad", ()), ("joint", ()), ("fresh", ("sum",))])
def test_register_rejects_duplicates(name: str, aliases: tuple[str, ...]) -> None:
    with pytest.raises(RegistrationError, match="must be unique"):
        gs.register_strategy(name, aliases=aliases)(_strategy_class())


@pytest.mark.usefixtures("clean_registry")
def test_replace_allows_reregistering_the_same_name() -> None:
    gs.register_strategy("twice")(_strategy_class())
    replacement = gs.register_strategy("twice", replace=True)(_strategy_class(summary="Second."))
    assert gs.strategy_info("twice").cls is replacement


@pytest.mark.usefixtures("clean_registry")
@pytest.mark.parametrize(
    ("target", "match"),
    [
        (type("NotAStrategy", (), {}), "must decorate a subclass of gradsurg.Strategy"),
        (_twice, "must decorate a subclass of gradsurg.Strategy"),
        (_strategy_class(properties=frozenset({"fast"})), r"unknown properties \['fast'\]"),
        (_strategy_class(requires=frozenset({"gpu"})), r"unknown requirements \['gpu'\]"),
        (_strategy_class(needs=frozenset({"labels"})), r"unknown needs \['labels'\]"),
    ],
)
def test_register_rejects_bad_classes(target: object, match: str) -> None:
    with pytest.raises(RegistrationError, match=match):
        gs.register_strategy("bad_one")(target)  # type: ignore[type-var]
    assert "bad_one" not in gs.list_strategies()


# ---------------------------------------------------------------------------------- plugins
PLUGIN = '''
import gradsurg as gs


class MyPlugin(gs.Strategy):
    """A plugin strategy: three times the sum."""

    def _combine(self, grads, context):
        return 3 * grads.sum(dim=0)
'''

MODULE_PLUGIN = '''
import gradsurg as gs


@gs.register_strategy("module_plugin")
class ModulePlugin(gs.Strategy):
    """Registered by its own decorator when the entry point imports the module."""

    def _combine(self, grads, context):
        return -grads.sum(dim=0)
'''


def _install(site: Path, distribution: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """An installed distribution on ``site``: modules plus ``<dist>-0.1.dist-info`` with its entry points."""
    for module, source in modules.items():
        (site / module).mkdir()
        (site / module / "__init__.py").write_text(source)
    info = site / f"{distribution}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registry: None) -> Path:
    """An empty site directory on ``sys.path``, with plugins not loaded yet."""
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._plugins_loaded = False
    return tmp_path


def test_entry_point_plugins_are_loaded_lazily_on_first_lookup(site: Path) -> None:
    _install(
        site,
        "myplugin",
        {"my_plugin": "myplugin:MyPlugin", "module_plugin": "mymodule"},
        {"myplugin": PLUGIN, "mymodule": MODULE_PLUGIN},
    )
    assert "myplugin" not in sys.modules
    assert "my_plugin" not in registry._REGISTRY
    strategy = gs.get_strategy("My-Plugin")  # the first lookup loads every plugin
    assert "myplugin" in sys.modules
    assert type(strategy).__name__ == "MyPlugin"
    assert type(strategy).name == "my_plugin"
    grads = torch.randn(2, 3)
    assert torch.equal(strategy(grads), 3 * grads.sum(dim=0))
    assert torch.equal(gs.get_strategy("module_plugin")(grads), -grads.sum(dim=0))
    assert {"my_plugin", "module_plugin"} <= set(gs.list_strategies())
    assert gs.strategy_info("my_plugin").summary == "A plugin strategy: three times the sum."


def test_a_broken_plugin_warns_and_does_not_break_lookups(site: Path) -> None:
    _install(site, "brokenplugin", {"broken": "brokenplugin:Missing"}, {"brokenplugin": "raise ImportError('boom')\n"})
    _install(site, "myplugin", {"my_plugin": "myplugin:MyPlugin"}, {"myplugin": PLUGIN})
    with pytest.warns(GradSurgWarning, match=r"plugin 'broken' \(brokenplugin:Missing\).*ImportError: boom"):
        assert isinstance(gs.get_strategy("sum"), Sum)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded once: no second warning
        assert "my_plugin" in gs.list_strategies()
        assert "broken" not in gs.list_strategies()


def test_direct_context_call_of_a_registered_class() -> None:
    """A registered class can also be used without the registry (``_combine`` with a Context)."""
    grads = torch.randn(2, 5, dtype=torch.float64)
    assert torch.equal(Sum()._combine(grads, Context()), grads.sum(dim=0))
