"""Tests for medfed.strategies.registry: names and import paths to Flower strategies."""

import warnings

import pytest
from flwr.serverapp import strategy as flwr_strategy

import medfed.strategies as strategies
from medfed.strategies import (
    FedAvg,
    MedfedStrategy,
    StrategyError,
    create_strategy,
    list_strategies,
    register_strategy,
)
from medfed.strategies import registry as registry_module


class LocalAvg(flwr_strategy.FedAvg):
    """A user strategy with an extra parameter, reached by its import path."""

    def __init__(self, *, fraction_train: float = 1.0, min_available_nodes: int = 2, alpha: float = 0.5):
        super().__init__(fraction_train=fraction_train, min_available_nodes=min_available_nodes)
        self.alpha = alpha


class NotAStrategy:
    pass


class AssertsGamma(flwr_strategy.FedAvg):
    """A user strategy whose check raises an AssertionError without a message."""

    def __init__(self, gamma: float = 1.0, **kwargs):
        if gamma <= 0:
            raise AssertionError
        super().__init__(**kwargs)


class NeedsBeta(flwr_strategy.FedAvg):
    def __init__(self, beta: float, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta


@pytest.fixture
def clean_registry(monkeypatch):
    """Registry changes made by a test are undone afterwards."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("fedavg", FedAvg),
        ("fedprox", flwr_strategy.FedProx),
        ("fedadam", flwr_strategy.FedAdam),
        ("fedyogi", flwr_strategy.FedYogi),
        ("fedadagrad", flwr_strategy.FedAdagrad),
        ("fedavgm", flwr_strategy.FedAvgM),
        ("fedmedian", flwr_strategy.FedMedian),
        ("fedbn", strategies.FedBN),
        ("fedld", strategies.FedLD),  # takes **kwargs: the sizes must still reach FedAvg
        ("fairlora", strategies.FairLoRA),
        ("local", strategies.local.LocalOnly),
    ],
)
def test_each_name_builds_its_class_sized_for_the_federation(name, cls):
    # Execute
    strategy = create_strategy(name, {}, num_sites=7, fraction_train=0.5, fraction_evaluate=0.25)

    # Assert: ceil(0.5 * 7) = 4, ceil(0.25 * 7) = 2; Flower's classes get medfed's reply checks.
    assert isinstance(strategy, cls) and isinstance(strategy, MedfedStrategy)
    assert strategy.min_available_nodes == 7
    assert strategy.min_train_nodes == 4
    assert strategy.min_evaluate_nodes == 2
    assert strategy.fraction_train == 0.5
    assert strategy.fraction_evaluate == 0.25
    assert strategy.weighted_by_key == "num-examples"
    assert strategy.evaluate_metrics_aggr_fn is registry_module.aggregate_site_metrics


def test_list_strategies_is_sorted_and_complete():
    names = list_strategies()

    assert names == sorted(names)
    assert {"fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian"} <= set(names)


def test_small_fractions_still_sample_one_site_and_zero_turns_evaluation_off():
    strategy = create_strategy("fedavg", {}, num_sites=3, fraction_train=0.1, fraction_evaluate=0.0)

    assert strategy.min_train_nodes == 1
    assert strategy.min_evaluate_nodes == 0


def test_params_reach_the_constructor_and_ints_become_floats():
    strategy = create_strategy("fedadam", {"eta": 1, "beta_1": 0.5}, num_sites=2)

    assert strategy.eta == 1.0
    assert isinstance(strategy.eta, float)
    assert strategy.beta_1 == 0.5


@pytest.mark.parametrize(("name", "key", "value", "instead"), [
    ("fedprox", "min_available_nodes", 2, "federation.num_sites"),  # the quorum lowered it anyway
    ("fedavg", "min_train_nodes", 3, "federation.fraction_train and federation.min_sites"),
    ("fedadam", "eta_l", 0.9, "train.lr"),  # Flower's FedOpt only logs it
    ("fedavg", "arrayrecord_key", "foo", "medfed's sites send and read the arrays"),  # every site failed
    ("fedavg", "configrecord_key", "foo", "read their instructions"),
    ("fedavg", "weighted_by_key", "foo", "weighted by their num-examples"),  # every reply dropped
    ("fedavg", "train_metrics_aggr_fn", "foo", "NaN-aware weighted mean"),  # a traceback after round 1
])
def test_flower_params_that_medfed_sets_are_refused_with_what_to_set(name, key, value, instead):
    with pytest.raises(StrategyError) as info:
        create_strategy(name, {key: value}, num_sites=5)
    assert str(info.value).startswith(f"Strategy parameter {key!r} is set by medfed; remove it from strategy.params")
    assert instead in str(info.value)


def test_import_path_builds_a_user_class_with_the_arguments_it_accepts():
    # Prepare
    path = f"{__name__}:LocalAvg"

    # Execute
    strategy = create_strategy(path, {"alpha": 2}, num_sites=4, fraction_train=0.5)

    # Assert: min_train_nodes/min_evaluate_nodes are not in LocalAvg's signature; the
    # user's class gets medfed's reply checks.
    assert isinstance(strategy, LocalAvg) and isinstance(strategy, MedfedStrategy)
    assert strategy.alpha == 2.0
    assert strategy.min_available_nodes == 4
    assert strategy.fraction_train == 0.5
    assert strategy.min_train_nodes == 2  # Flower's default, untouched


def test_import_path_passes_any_params_to_a_kwargs_constructor():
    strategy = create_strategy(f"{__name__}:NeedsBeta", {"beta": 0.3}, num_sites=3)

    assert strategy.beta == 0.3


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        (
            "fedavgg",
            {},
            "Unknown strategy 'fedavgg' (did you mean 'fedavg'?). Registered: ",
        ),
        (
            "fedadam",
            {"etaa": 0.1},
            "Strategy 'fedadam' has no parameter 'etaa'; did you mean 'eta'? (accepted: "
            "eta, beta_1, beta_2, tau)",
        ),
        (
            "fedprox",
            {"proximal_mu": "big"},
            "The 'proximal_mu' parameter of strategy 'fedprox' (strategy.params.proximal_mu) must be a float. "
            "Got 'big' instead.",
        ),
        (
            "fedprox",
            {"proximal_mu": True},
            "The 'proximal_mu' parameter of strategy 'fedprox' (strategy.params.proximal_mu) must be a float. "
            "Got True instead.",
        ),
        (
            "fedavgm",
            {"server_momentum": "high"},
            "The 'server_momentum' parameter of strategy 'fedavgm' (strategy.params.server_momentum) must be a float. "
            "Got 'high' instead.",
        ),
        (
            "fedavg",
            {"fraction_train": 0.5},
            "Strategy parameter 'fraction_train' is set from federation.fraction_train; "
            "remove it from strategy.params.",
        ),
        (
            "no_such_module_xyz:Thing",
            {},
            "Cannot import module 'no_such_module_xyz' for strategy 'no_such_module_xyz:Thing': "
            "ModuleNotFoundError: No module named 'no_such_module_xyz'; install it, or put the folder that holds it "
            "on PYTHONPATH (in simulation, at every site too).",
        ),
        (
            f"{__name__}:Missing",
            {},
            f"Module '{__name__}' has no attribute 'Missing' (strategy '{__name__}:Missing').",
        ),
        (
            f"{__name__}:NotAStrategy",
            {},
            f"Strategy '{__name__}:NotAStrategy' must name a subclass of "
            "flwr.serverapp.strategy.Strategy. Got ",
        ),
        (
            "flwr.serverapp.strategy:Strategy",
            {},
            "Strategy 'flwr.serverapp.strategy:Strategy' is abstract: it does not implement "
            "aggregate_evaluate, aggregate_train, configure_evaluate, configure_train, summary.",
        ),
        (
            f"{__name__}:NeedsBeta",
            {},
            f"Strategy '{__name__}:NeedsBeta' needs the parameter(s) beta; set them in "
            "strategy.params.",
        ),
        (":Thing", {}, "Strategy path ':Thing' must have the form 'package.module:ClassName'."),
        (
            # Flower's constructor raises ValueError; it must fail here (preflight), as one line.
            "fedtrimmedavg",
            {"beta": 0.9},
            "Strategy 'fedtrimmedavg' refused its parameters (strategy.params: beta=0.9): "
            "`beta` must be in the range [0, 0.5).",
        ),
        (
            f"{__name__}:AssertsGamma",
            {"gamma": -1},
            f"Strategy '{__name__}:AssertsGamma' refused its parameters (strategy.params: gamma=-1): "
            "AssertionError without a message",
        ),
    ],
)
def test_bad_names_and_params_raise_one_line_errors(name, params, message):
    with pytest.raises(StrategyError) as info:
        create_strategy(name, params, num_sites=3)

    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_sites": 0},
            "The 'num_sites' argument of create_strategy must be an int >= 1. Got 0 instead.",
        ),
        (
            {"num_sites": 3, "fraction_train": 0.0},
            "The 'fraction_train' argument of create_strategy must be a float in the range "
            "(0, 1]. Got 0.0 instead.",
        ),
        (
            {"num_sites": 3, "fraction_evaluate": 1.5},
            "The 'fraction_evaluate' argument of create_strategy must be a float in the range "
            "[0, 1]. Got 1.5 instead.",
        ),
    ],
)
def test_bad_federation_arguments_are_refused(kwargs, message):
    with pytest.raises(StrategyError) as info:
        create_strategy("fedavg", {}, **kwargs)

    assert str(info.value) == message


@pytest.mark.usefixtures("clean_registry")
def test_registered_factory_function_is_used_and_its_result_checked():
    # Prepare
    @register_strategy("average_of_three")
    def average_of_three(*, min_available_nodes: int = 2):
        return FedAvg(min_available_nodes=min_available_nodes)

    @register_strategy("unchecked_median")
    def unchecked_median():
        return flwr_strategy.FedMedian()

    @register_strategy("broken")
    def broken():
        return object()

    # Execute
    strategy = create_strategy("average_of_three", {}, num_sites=3)

    # Assert: a factory's strategy must carry medfed's reply checks.
    assert type(strategy) is FedAvg
    assert strategy.min_available_nodes == 3
    assert "average_of_three" in list_strategies()
    with pytest.raises(StrategyError, match="^Strategy 'broken' must build a flwr"):
        create_strategy("broken", {}, num_sites=3)
    with pytest.raises(StrategyError, match="^Strategy 'unchecked_median' is a function that built a FedMedian"):
        create_strategy("unchecked_median", {}, num_sites=3)


@pytest.mark.usefixtures("clean_registry")
def test_registering_a_name_twice_warns_and_replaces():
    # Prepare
    register_strategy("twice")(LocalAvg)

    # Execute
    with pytest.warns(UserWarning, match="^Strategy 'twice' is already registered"):
        register_strategy("twice")(NeedsBeta)

    # Assert
    assert registry_module._REGISTRY["twice"] is NeedsBeta


@pytest.mark.usefixtures("clean_registry")
def test_registering_the_same_object_again_is_silent():
    register_strategy("same")(LocalAvg)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_strategy("same")(LocalAvg)


@pytest.mark.parametrize("name", ["", "pkg.mod:Cls", None])
def test_register_refuses_bad_names(name):
    with pytest.raises(StrategyError, match="^A strategy name must be a non-empty str without ':'"):
        register_strategy(name)


def test_package_exports_the_agreed_api():
    assert set(strategies.__all__) >= {
        "create_strategy",
        "register_strategy",
        "list_strategies",
        "strategy_state",
        "load_strategy_state",
        "FedAvg",
    }


def test_num_rounds_reaches_only_strategies_that_name_it():
    fairlora = create_strategy("fairlora", {}, num_sites=3, num_rounds=7)
    fedld = create_strategy("fedld", {}, num_sites=3, num_rounds=7)  # would fail if passed on
    assert fairlora.num_rounds == 7 and not hasattr(fedld, "num_rounds")


def test_num_groups_follows_the_federations_groups_and_a_different_one_is_an_error():
    fairlora = create_strategy("fairlora", {}, num_sites=3, num_groups=3)
    fedavg = create_strategy("fedavg", {}, num_sites=3, num_groups=3)  # would fail if passed on
    assert fairlora.num_groups == 3 and not hasattr(fedavg, "num_groups")
    assert create_strategy("fairlora", {"num_groups": 3}, num_sites=3, num_groups=3).num_groups == 3
    with pytest.raises(StrategyError, match=r"^strategy.params.num_groups is 2, but federation.groups declares 3 "):
        create_strategy("fairlora", {"num_groups": 2}, num_sites=3, num_groups=3)


def test_the_studys_group_count_is_the_federations_groups_else_the_strategys_num_groups():
    from medfed.strategies.registry import study_group_count

    assert study_group_count(["young", "old", "unknown"], "fedavg", {}) == 3
    assert study_group_count(["young", "old", "unknown"], "fairlora", {}) == 3
    assert study_group_count([], "fairlora", {}) == create_strategy("fairlora", {}, num_sites=2).num_groups
    assert study_group_count([], "fairlora", {"num_groups": 4}) == 4
    assert study_group_count([], "fedavg", {}) == 0


def test_a_parameter_of_a_strategy_that_takes_none_says_so():
    # It read "(accepted: )".
    with pytest.raises(StrategyError, match=r"^Strategy 'fedavg' has no parameter 'proximal_mu' \(it takes none in "
                                            r"strategy.params\)\.$"):
        create_strategy("fedavg", {"proximal_mu": 0.1}, num_sites=2)


@pytest.mark.parametrize("name, key, value", [
    ("fedadam", "eta", -1.0), ("fedyogi", "tau", 0.0), ("fedadam", "beta_1", 1.0), ("fedavgm", "server_momentum", 1.5),
])
def test_flowers_arguments_out_of_range_are_refused_before_the_run(name, key, value):
    # Flower's constructors take any number: eta=-1 ran a whole study backwards (exit 0).
    with pytest.raises(StrategyError, match=rf"^The '{key}' parameter of strategy '{name}' \(strategy.params.{key}\) "
                                            r"must be a number"):
        create_strategy(name, {key: value}, num_sites=2)
    create_strategy("fedadam", {"eta": 0.01, "beta_1": 0.9}, num_sites=2)
