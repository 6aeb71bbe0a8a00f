"""Tests for medfed.config: defaults, validation messages, overrides, YAML and run config."""

import dataclasses
import json

import pytest
import yaml

from medfed.config import (
    ConfigError,
    ConfigFileNotFoundError,
    DataConfig,
    ExperimentConfig,
    StrategyConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    from_run_config,
    load_config,
    save_config,
    to_run_config,
)


def _write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults -------------------------------------------------------------------------
def test_defaults_are_the_small_cpu_federation():
    cfg = load_config()

    assert cfg == ExperimentConfig()
    assert (cfg.name, cfg.seed, cfg.output_dir, cfg.rounds) == ("breastmnist-fedavg", 0, "runs", 20)
    assert cfg.data == DataConfig(dataset="breastmnist", root=None, img_size=28)
    assert cfg.model.name == "medvit_v2_nano"
    assert cfg.train == TrainConfig(
        local_epochs=2, batch_size=32, optimizer="adamw", lr=0.001, weight_decay=0.05, momentum=0.9
    )
    assert cfg.strategy == StrategyConfig(name="fedavg", params={})
    assert (cfg.federation.num_sites, cfg.federation.partition) == (3, "iid")
    assert (cfg.federation.fraction_train, cfg.federation.fraction_evaluate) == (1.0, 1.0)
    assert (cfg.simulation.cpus_per_site, cfg.simulation.gpus_per_site) == (1.0, 0.0)
    assert cfg.simulation.ray_address is None


def test_config_is_frozen_and_replace_revalidates():
    cfg = load_config()

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 5  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"^Config key 'train\.lr' must be a float > 0\. Got 0\.0\.$"):
        dataclasses.replace(cfg.train, lr=0.0)
    assert dataclasses.replace(cfg, rounds=7).rounds == 7


def test_sections_must_have_their_type():
    with pytest.raises(ConfigError, match="^Config key 'train' must be a TrainConfig. Got {'lr': 1}.$"):
        ExperimentConfig(train={"lr": 1})  # type: ignore[arg-type]


# --- every constraint kind ------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rounds=0", "Config key 'rounds' must be an int >= 1. Got 0"),
        ("rounds=2.0", "Config key 'rounds' must be an int >= 1. Got 2.0"),
        ("seed=-1", "Config key 'seed' must be an int in the range [0, 4294967295]. Got -1"),
        ("seed=true", "Config key 'seed' must be an int in the range [0, 4294967295]. Got True"),
        ("train.lr=-1", "Config key 'train.lr' must be a float > 0. Got -1"),
        ("train.lr=0", "Config key 'train.lr' must be a float > 0. Got 0"),
        (
            "train.lr=.inf",
            "Config key 'train.lr' must be a number written in plain decimal (such as 10, -2.5 or "
            "1e-3). Got '.inf', which YAML would read as inf",
        ),
        ("train.lr=fast", "Config key 'train.lr' must be a float > 0. Got 'fast'"),
        ("train.lr=true", "Config key 'train.lr' must be a float > 0. Got True"),
        ("train.weight_decay=-0.1", "Config key 'train.weight_decay' must be a float >= 0. Got -0.1"),
        ("train.momentum=1", "Config key 'train.momentum' must be a float in the range [0, 1). Got 1"),
        ("train.optimizer=adam", "Config key 'train.optimizer' must be one of 'adamw', 'sgd'. Got 'adam'"),
        ("train.batch_size=0", "Config key 'train.batch_size' must be an int >= 1. Got 0"),
        ("data.img_size=32", "Config key 'data.img_size' must be one of 28, 64, 128, 224. Got 32"),
        ("data.img_size=28.0", "Config key 'data.img_size' must be one of 28, 64, 128, 224. Got 28.0"),
        ("data.root=''", "Config key 'data.root' must be a non-empty str or null. Got ''"),
        ("data.root=' '", "Config key 'data.root' must be a non-empty str or null. Got ' '"),
        ("model.name=''", "Config key 'model.name' must be a non-empty str. Got ''"),
        ("strategy.name=", "Config key 'strategy.name' must be a non-empty str. Got ''"),
        (
            "name=../escape",
            "Config key 'name' must be a str of letters, digits, '.', '_' or '-' that does not "
            "start with '.' or '-'. Got '../escape'",
        ),
        ("federation.num_sites=0", "Config key 'federation.num_sites' must be an int >= 1. Got 0"),
        (
            "federation.partition=label",
            "Config key 'federation.partition' must be one of 'iid', 'dirichlet'. Got 'label'",
        ),
        ("federation.dirichlet_alpha=0", "Config key 'federation.dirichlet_alpha' must be a float > 0. Got 0"),
        (
            "federation.fraction_train=0",
            "Config key 'federation.fraction_train' must be a float in the range (0, 1]. Got 0",
        ),
        (
            "federation.fraction_evaluate=1.5",
            "Config key 'federation.fraction_evaluate' must be a float in the range [0, 1]. Got 1.5",
        ),
        ("simulation.cpus_per_site=0", "Config key 'simulation.cpus_per_site' must be a float > 0. Got 0"),
        ("simulation.gpus_per_site=-1", "Config key 'simulation.gpus_per_site' must be a float >= 0. Got -1"),
        ("simulation.engine=dask",
         "Config key 'simulation.engine' must be one of 'auto', 'inprocess', 'ray'. Got 'dask'"),
        (
            "strategy.params=[1, 2]",
            "Config key 'strategy.params' must be a mapping from parameter names (str) to null, "
            "bool, int, float, str or lists/mappings of those. Got [1, 2]",
        ),
        ("train=5", "Config key 'train' must be a mapping of config keys. Got 5"),
    ],
)
def test_each_invalid_value_names_key_expectation_value_and_source(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])

    assert str(info.value) == f"{message} (from --set {override})."


def test_seed_stops_at_numpys_largest_seed():
    # numpy.random.seed refuses 2**32 with a traceback in the ServerApp; refuse it here.
    assert load_config(overrides=["seed=4294967295"]).seed == 2**32 - 1
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["seed=4294967296"])

    assert str(info.value) == (
        "Config key 'seed' must be an int in the range [0, 4294967295]. Got 4294967296 "
        "(from --set seed=4294967296)."
    )


def test_dataset_must_be_a_2d_medmnist_flag():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["data.dataset=organmnist3d"])

    text = str(info.value)
    assert text.startswith("Config key 'data.dataset' must be a MedMNIST 2D dataset flag (one of ")
    assert "'pneumoniamnist'" in text and "'breastmnist'" in text
    assert "3d'" not in text.split("Got")[0]
    assert text.endswith("Got 'organmnist3d' (from --set data.dataset=organmnist3d).")


def test_other_2d_datasets_and_sizes_are_accepted():
    cfg = load_config(overrides=["data.dataset=pneumoniamnist", "data.img_size=224", "data.root=/data"])

    assert (cfg.data.dataset, cfg.data.img_size, cfg.data.root) == ("pneumoniamnist", 224, "/data")


def test_ints_are_accepted_and_converted_where_floats_are_expected():
    cfg = load_config(overrides=["train.lr=1", "simulation.cpus_per_site=2", "train.momentum=0"])

    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert type(cfg.simulation.cpus_per_site) is float
    assert type(cfg.train.momentum) is float


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # PyYAML alone (YAML 1.1) reads 1e-3 as a string.
    path = _write(tmp_path, "train:\n  lr: 1e-3\nstrategy:\n  params:\n    eta: 5E-2\n")

    cfg = load_config(path, overrides=["train.weight_decay=1e-4"])

    assert cfg.train.lr == 0.001
    assert cfg.train.weight_decay == 0.0001
    assert cfg.strategy.params == {"eta": 0.05}


# --- unknown keys ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", "Unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("lr=0.1", "Unknown config key 'lr' (did you mean 'train.lr'?)"),
        ("train.num_sites=2", "Unknown config key 'train.num_sites' (did you mean 'federation.num_sites'?)"),
        ("federaton.num_sites=2", "Unknown config key 'federaton' (did you mean 'federation'?)"),
        (
            "train.foo=1",
            "Unknown config key 'train.foo' (valid keys under 'train': local_epochs, batch_size, "
            "optimizer, lr, weight_decay, momentum, precision, channels_last, compile, data_on_device)",
        ),
        ("train.lr.x=1", "Unknown config key 'train.lr.x' ('train.lr' holds a value, not keys)"),
    ],
)
def test_unknown_override_keys_get_a_hint(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])

    assert str(info.value) == f"{message} in --set {override}."


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("train.LR", "train.lr"),  # case
        ("Rounds", "rounds"),
        ("TRAIN", "train"),
        ("train.Batch_Size", "train.batch_size"),
        ("train.learning_rate", "train.lr"),  # other frameworks' names
        ("learning_rate", "train.lr"),
        ("federation.num_clients", "federation.num_sites"),
        ("federation.min_clients", "federation.min_sites"),
        ("federation.min_available_clients", "federation.min_sites"),
        ("epochs", "train.local_epochs"),
        ("train.epochs", "train.local_epochs"),
        ("num_rounds", "rounds"),
        ("federation.fraction_fit", "federation.fraction_train"),
        ("strategy.proximal_mu", "strategy.params.proximal_mu"),
        ("proximal_mu", "strategy.params.proximal_mu"),
        ("strategy.margin_lambda", "strategy.params.margin_lambda"),  # any strategy parameter
        ("strategy.nmae", "strategy.name"),
    ],
)
def test_unknown_keys_get_a_hint_regardless_of_case_and_for_other_frameworks_names(tmp_path, key, hint):
    section, _, name = key.rpartition(".")
    path = _write(tmp_path, f"{section}:\n  {name}: 1\n" if section else f"{name}: 1\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value) == f"Unknown config key {key!r} (did you mean {hint!r}?) in {path}."


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = _write(tmp_path, "rounds: 2\ntrain:\n  lrr: 0.1\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value) == f"Unknown config key 'train.lrr' (did you mean 'train.lr'?) in {path}."


# --- files ------------------------------------------------------------------------------
def test_file_values_override_defaults_and_keep_the_rest(tmp_path):
    path = _write(tmp_path, "rounds: 5\nstrategy:\n  name: fedprox\n  params:\n    proximal_mu: 0.1\n")

    cfg = load_config(path)

    assert cfg.rounds == 5
    assert cfg.strategy == StrategyConfig(name="fedprox", params={"proximal_mu": 0.1})
    assert cfg.train == TrainConfig()


def test_invalid_value_in_a_file_names_the_file(tmp_path):
    path = _write(tmp_path, "train:\n  lr: -1\n", name="runs.yaml")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value) == f"Config key 'train.lr' must be a float > 0. Got -1 (from {path})."


def test_yaml_syntax_error_gives_file_line_and_column(tmp_path):
    path = _write(tmp_path, "rounds: 3\ntrain:\n  lr: 0.1\n  batch_size: 32: 4\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value) == (
        f"Cannot parse config file '{path}' at line 4, column 17: mapping values are not "
        "allowed here."
    )


def test_duplicate_keys_are_refused_with_their_line(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value) == (
        f"Config file '{path}' sets key 'lr' twice (second time at line 3); keep one."
    )


@pytest.mark.parametrize(
    "text",
    [
        "train:\n  <<: {lr: 0.5}\n  batch_size: 4\n",
        "strategy:\n  params: &p {lr: 0.5, batch_size: 4}\ntrain:\n  <<: *p\n",
        "train:\n  <<: [{lr: 0.5}, {lr: 0.9, batch_size: 4}]\n",  # the first mapping wins
        "train:\n  <<: {lr: 0.9, batch_size: 4}\n  lr: 0.5\n",  # the mapping's own key wins
    ],
)
def test_yaml_merge_keys_are_read_as_yaml_says(tmp_path, text):
    cfg = load_config(_write(tmp_path, text))

    assert (cfg.train.lr, cfg.train.batch_size) == (0.5, 4)


def test_a_key_given_twice_beside_a_merge_key_is_still_refused(tmp_path):
    path = _write(tmp_path, "train:\n  <<: {batch_size: 4}\n  lr: 0.5\n  lr: 0.1\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value) == f"Config file '{path}' sets key 'lr' twice (second time at line 4); keep one."
    with pytest.raises(ConfigError, match="sets key 'lr' twice"):
        load_config(_write(tmp_path, "train:\n  <<: {lr: 0.5, lr: 0.1}\n"))


def test_merge_keys_in_an_override(tmp_path):
    cfg = load_config(overrides=["train={<<: {lr: 0.5, batch_size: 4}, lr: 0.25}"])

    assert (cfg.train.lr, cfg.train.batch_size) == (0.25, 4)
    with pytest.raises(ConfigError, match=r"^Config key 'train\.lr' must be a number written in plain decimal"):
        load_config(overrides=["train={<<: {lr: 0x10}}"])


@pytest.mark.parametrize(("text", "kind"), [("- 1\n- 2\n", "list"), ("just words\n", "str")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value) == (
        f"Config file '{path}' must hold a mapping of config keys at the top level "
        f"(e.g. 'rounds: 3'). Got a {kind} instead."
    )


def test_empty_file_means_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing yet\n")) == ExperimentConfig()


def test_missing_file_is_a_config_error_and_a_file_not_found_error(tmp_path):
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ConfigFileNotFoundError) as info:
        load_config(missing)

    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"Config file '{missing}' does not exist.")


# --- overrides ---------------------------------------------------------------------------
def test_overrides_apply_after_the_file_in_order(tmp_path):
    path = _write(tmp_path, "rounds: 5\ntrain:\n  lr: 0.1\n")

    cfg = load_config(path, overrides=["rounds=9", "train.lr=0.01", "rounds=10"])

    assert cfg.rounds == 10
    assert cfg.train.lr == 0.01


def test_overrides_reach_inside_strategy_params(tmp_path):
    path = _write(tmp_path, "strategy:\n  name: fedadam\n  params:\n    eta: 0.1\n")

    cfg = load_config(
        path, overrides=["strategy.params.tau=0.001", "strategy.params.extra={a: [1, 2]}"]
    )

    assert cfg.strategy.params == {"eta": 0.1, "tau": 0.001, "extra": {"a": [1, 2]}}


def test_override_null_and_empty_value_mean_none():
    cfg = load_config(overrides=["data.root=/d", "data.root=null"])
    assert cfg.data.root is None
    assert load_config(overrides=["simulation.ray_address="]).simulation.ray_address is None


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("data.root=/data/site #1/npz", "data.root", "/data/site #1/npz"),  # not a YAML comment
        ("data.root=2024-01-01", "data.root", "2024-01-01"),  # not a date
        ("data.root= /d ", "data.root", "/d"),
        ("data.root='/a b'", "data.root", "/a b"),  # quotes: YAML still unquotes
        ("data.root='null'", "data.root", "null"),
        ("data.root=~", "data.root", None),
        ("data.root=null", "data.root", None),
        ("data.root=", "data.root", None),
        ("name=yes", "name", "yes"),  # not True
        ("name=null", "name", "null"),  # no null for a key that does not take one
        ("model.name=010", "model.name", "010"),
        ("train.optimizer=sgd", "train.optimizer", "sgd"),
        ("data={root: yes, dataset: pneumoniamnist}", "data.root", "yes"),  # inside a mapping too
        ("data={root: null}", "data.root", None),
    ],
)
def test_text_keys_take_the_override_text_as_it_is(override, key, value):
    cfg = load_config(overrides=[override])

    section, _, name = key.rpartition(".")
    assert getattr(getattr(cfg, section) if section else cfg, name) == value


@pytest.mark.parametrize(
    ("override", "groups", "sites"),
    [
        ("federation.groups=[yes, no]", ["yes", "no"], []),  # was True, False: "Got True"
        ("federation.groups=[{name: on, corruptions: [[pixelate, 1]]}, off]",
         [{"name": "on", "corruptions": [["pixelate", 1]]}, "off"], []),
        ("federation.sites=[{name: yes, size: 0.5}]", [], [{"name": "yes", "size": 0.5}]),
    ],
)
def test_names_inside_group_and_site_lists_are_text(override, groups, sites):
    cfg = load_config(overrides=[override])
    assert (cfg.federation.groups, cfg.federation.sites) == (groups, sites)


def test_a_group_name_a_file_reads_as_a_boolean_says_to_quote_it(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("federation:\n  groups: [yes, no]\n")
    with pytest.raises(ConfigError, match=r"Got True \(quote a name such as \"no\": YAML reads it unquoted as a "
                                          r"boolean\)"):
        from medfed.sites.profiles import plan_for

        plan_for(load_config(path))


@pytest.mark.parametrize(
    ("override", "key", "got", "yaml_reads"),
    [
        ("rounds=010", "rounds", "010", "8"),  # octal
        ("federation.round_timeout_s=1:30", "federation.round_timeout_s", "1:30", "90"),  # base 60
        ("seed=0x10", "seed", "0x10", "16"),
        ("train.lr=0b1", "train.lr", "0b1", "1"),
        ("strategy.params.mu=-00.5", "strategy.params.mu", "-00.5", "-0.5"),
        ("strategy.params.extra={a: [1, 017]}", "strategy.params.extra.a", "017", "15"),
        ("train={lr: 1:00}", "train.lr", "1:00", "60"),
    ],
)
def test_numbers_yaml_would_read_other_than_decimal_are_refused(override, key, got, yaml_reads):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])

    assert str(info.value) == (
        f"Config key {key!r} must be a number written in plain decimal (such as 10, -2.5 or 1e-3). "
        f"Got {got!r}, which YAML would read as {yaml_reads} (from --set {override})."
    )


def test_plain_decimal_numbers_and_other_yaml_values_are_kept():
    cfg = load_config(
        overrides=[
            "rounds=1_000", "seed=+5", "train.lr=.5", "train.weight_decay=1E-4", "train.compile=true",
            "strategy.params={mu: -0.5, n: 0, note: '010', flags: [null, 1.0]}",
        ]
    )

    assert (cfg.rounds, cfg.seed, cfg.train.lr, cfg.train.weight_decay, cfg.train.compile) == (
        1000, 5, 0.5, 0.0001, True,
    )
    assert cfg.strategy.params == {"mu": -0.5, "n": 0, "note": "010", "flags": [None, 1.0]}


@pytest.mark.parametrize(
    ("override", "key", "dropped"),
    [("strategy.params.note=site #1", "strategy.params.note", "#1"), ("rounds=5 # five", "rounds", "# five")],
)
def test_a_yaml_comment_in_an_override_value_is_refused_not_dropped(override, key, dropped):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])

    assert str(info.value) == (
        f"Config key {key!r} would lose {dropped!r}: YAML reads ' #' as the start of a comment; "
        f"quote the whole value to keep it (from --set {override})."
    )


def test_override_error_on_a_key_the_file_set_names_the_override(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.1\n")

    with pytest.raises(ConfigError, match=r"Got -2 \(from --set train\.lr=-2\)\.$"):
        load_config(path, overrides=["train.lr=-2"])


def test_override_into_a_non_mapping_section_reports_the_file(tmp_path):
    path = _write(tmp_path, "train: 5\n")

    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=["train.lr=0.1"])

    assert str(info.value) == f"Config key 'train' must be a mapping of config keys. Got 5 (from {path})."


@pytest.mark.parametrize("override", ["rounds", "=3", "train..lr=1", ".lr=1"])
def test_malformed_overrides_are_refused(override):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])

    assert str(info.value) == (
        f"Override {override!r} must have the form key=value, e.g. 'train.lr=0.01'."
    )


def test_override_value_with_bad_yaml_is_refused():
    with pytest.raises(ConfigError, match=r"^Cannot parse the value of override 'strategy\.params=\{a: 1' as YAML"):
        load_config(overrides=["strategy.params={a: 1"])


def test_a_single_override_string_is_not_split_into_characters():
    assert load_config(overrides="rounds=4").rounds == 4


# --- params ---------------------------------------------------------------------------
def test_params_must_be_json_like_with_str_keys():
    with pytest.raises(ConfigError, match=r"^Config key 'strategy\.params' must be a mapping"):
        config_from_dict({"strategy": {"params": {1: "x"}}})
    with pytest.raises(ConfigError, match=r"^Config key 'strategy\.params' must be a mapping"):
        config_from_dict({"strategy": {"params": {"x": {1, 2}}}})


def test_params_are_copied_not_shared():
    params = {"eta": 0.1, "nested": {"a": 1}}

    cfg = config_from_dict({"strategy": {"params": params}})
    params["nested"]["a"] = 2

    assert cfg.strategy.params == {"eta": 0.1, "nested": {"a": 1}}


# --- dict / YAML / run config round trips ----------------------------------------------
_CUSTOM = [
    "name=pneumonia-fedadam",
    "seed=7",
    "rounds=12",
    "data.dataset=pneumoniamnist",
    "data.root=/data/medmnist",
    "data.img_size=64",
    "model.name=medvit_v2_tiny",
    "train.local_epochs=2",
    "train.optimizer=sgd",
    "train.lr=0.0125",
    "train.momentum=0.5",
    "strategy.name=fedadam",
    "strategy.params={eta: 0.01, beta_1: 0.9, note: 'x y', flags: [true, null]}",
    "federation.num_sites=5",
    "federation.partition=dirichlet",
    "federation.dirichlet_alpha=0.3",
    "federation.fraction_train=0.6",
    "federation.fraction_evaluate=0",
    "simulation.gpus_per_site=0.25",
    "simulation.ray_address=auto",
    "simulation.engine=ray",
]


@pytest.mark.parametrize("overrides", [[], _CUSTOM], ids=["defaults", "custom"])
def test_run_config_round_trip_is_exact(overrides):
    cfg = load_config(overrides=overrides)

    flat = to_run_config(cfg)

    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert from_run_config(flat) == cfg


def test_run_config_keys_are_dotted_kebab_case():
    flat = to_run_config(load_config(overrides=["strategy.params.proximal_mu=0.1"]))

    assert flat["train.local-epochs"] == 2
    assert flat["federation.num-sites"] == 3
    assert flat["output-dir"] == "runs"
    assert flat["data.root"] == ""
    assert flat["simulation.ray-address"] == ""
    assert json.loads(flat["strategy.params"]) == {"proximal_mu": 0.1}
    from medfed.config import _leaves

    assert len(flat) == len(list(_leaves())) + 1  # one run-config key per config leaf, and scenario-merged
    assert flat["scenario-merged"] is False  # no scenario
    assert all("_" not in key for key in flat)


def test_from_run_config_fills_missing_keys_with_defaults_and_checks_values():
    cfg = from_run_config({"rounds": 2, "train.lr": 1})

    assert cfg.rounds == 2 and cfg.train.lr == 1.0
    with pytest.raises(ConfigError) as info:
        from_run_config({"train.local-epochs": 0})
    assert str(info.value) == "Config key 'train.local_epochs' must be an int >= 1. Got 0 (from run_config)."


def test_from_run_config_unknown_keys_strict_and_lenient():
    flat = {**to_run_config(load_config()), "resume": True}

    with pytest.raises(ConfigError, match=r"^Unknown config key 'resume' .* in run_config\.$"):
        from_run_config(flat)
    assert from_run_config(flat, strict=False) == load_config()


def test_from_run_config_refuses_bad_params_json():
    with pytest.raises(ConfigError) as info:
        from_run_config({"strategy.params": "{eta: 1}"})

    assert str(info.value) == (
        "Config key 'strategy.params' must be a JSON object string such as "
        "'{\"proximal_mu\": 0.1}'. Got '{eta: 1}' (from run_config)."
    )


def test_config_to_dict_is_the_yaml_layout():
    data = config_to_dict(load_config(overrides=["strategy.params.mu=1"]))

    assert list(data) == [
        "name", "seed", "output_dir", "rounds", "data", "model", "train", "strategy",
        "federation", "simulation",
    ]
    assert data["train"]["local_epochs"] == 2
    assert data["strategy"] == {"name": "fedavg", "params": {"mu": 1}, "max_update_norm_z": None, "clip_update_norm": None}
    assert config_from_dict(data) == load_config(overrides=["strategy.params.mu=1"])


def test_save_then_load_gives_the_same_config(tmp_path):
    cfg = load_config(overrides=_CUSTOM)

    path = save_config(cfg, tmp_path / "run" / "config.yaml")

    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["federation"]["num_sites"] == 5
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left


def test_a_name_that_reads_as_a_number_is_saved_quoted_and_loads_back(tmp_path):
    # save_config wrote name: 1e3 bare, which medfed's loader reads as 1000.0: the run could not be resumed.
    cfg = load_config(overrides=["name=1e3"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert "name: '1e3'" in path.read_text()
    assert load_config(path, run_folder=True) == cfg


def test_dataset_choices_are_medmnists_2d_flags():
    # config reads medmnist/info.py on its own to avoid importing torch; check it
    # agrees with the package.
    import medmnist

    from medfed.config import _medmnist_2d_flags

    expected = sorted(flag for flag in medmnist.INFO if "3d" not in flag)
    assert list(_medmnist_2d_flags()) == expected
    assert len(expected) == 12


def test_simulation_engine_defaults_to_auto_and_ray_address_refuses_inprocess():
    # Execute
    default = load_config()
    on_cluster = load_config(overrides=["simulation.engine=ray", "simulation.ray_address=auto"])
    # Assert
    assert default.simulation.engine == "auto"
    assert on_cluster.simulation.ray_address == "auto"
    assert load_config(overrides=["simulation.ray_address=auto"]).simulation.engine == "auto"
    with pytest.raises(ConfigError, match=r"^Config key 'simulation.ray_address' needs simulation.engine 'ray' or"):
        load_config(overrides=["simulation.engine=inprocess", "simulation.ray_address=auto"])
def test_quorum_defaults_to_a_majority_and_cannot_exceed_the_sites():
    assert load_config(overrides=["federation.num_sites=4"]).federation.quorum == 3
    assert load_config(overrides=["federation.num_sites=3", "federation.min_sites=1"]).federation.quorum == 1
    with pytest.raises(ConfigError, match="'federation.min_sites' must be an int <= federation.num_sites"):
        load_config(overrides=["federation.num_sites=2", "federation.min_sites=3"])
    with pytest.raises(ConfigError, match="round_timeout_s"):
        load_config(overrides=["federation.round_timeout_s=0"])


def test_min_sites_above_num_sites_names_where_both_came_from(tmp_path):
    # Prepare
    path = _write(tmp_path, "federation:\n  num_sites: 4\n  min_sites: 3\n")
    expected = "Config key 'federation.min_sites' must be an int <= federation.num_sites (2) or null. Got 3"
    # Execute / Assert: num_sites by default, then the file's min_sites against an override's num_sites.
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["federation.min_sites=4"])
    assert str(info.value) == (
        "Config key 'federation.min_sites' must be an int <= federation.num_sites (3) or null. Got 4 "
        "(from --set federation.min_sites=4)."
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=["federation.num_sites=2"])
    assert str(info.value) == (
        f"{expected} (from {path}; federation.num_sites from --set federation.num_sites=2)."
    )


def test_ray_address_with_the_inprocess_engine_names_its_source(tmp_path):
    path = _write(tmp_path, "simulation:\n  engine: inprocess\n")

    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=["simulation.ray_address=auto"])

    assert str(info.value) == (
        "Config key 'simulation.ray_address' needs simulation.engine 'ray' or 'auto'. Got engine "
        f"'inprocess' with ray_address 'auto' (from --set simulation.ray_address=auto; simulation.engine "
        f"from {path}); set simulation.engine: ray or remove ray_address."
    )
    with pytest.raises(ConfigError, match=r"^Config key .* 'auto'; set simulation.engine: ray or remove ray_address\.$"):
        dataclasses.replace(load_config().simulation, engine="inprocess", ray_address="auto")


def test_a_mapping_for_a_section_changes_only_its_keys(tmp_path):
    # Prepare
    path = _write(tmp_path, "train:\n  lr: 0.1\n  batch_size: 64\n  optimizer: sgd\nstrategy:\n  params: {eta: 1}\n")
    # Execute
    cfg = load_config(path, overrides=["train={lr: 0.5, momentum: 0.5}", "strategy={params: {tau: 2}}"])
    # Assert: the section is merged; a leaf (even a mapping like params) is replaced.
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.batch_size, cfg.train.optimizer) == (0.5, 0.5, 64, "sgd")
    assert cfg.strategy.params == {"tau": 2}


def test_an_error_beside_a_merged_section_mapping_names_the_file(tmp_path):
    path = _write(tmp_path, "train:\n  batch_size: 0\n")

    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=["train={lr: 0.5}"])

    assert str(info.value) == f"Config key 'train.batch_size' must be an int >= 1. Got 0 (from {path})."


def test_a_cross_key_error_survives_pickling():
    # Ray and Flower send exceptions between processes; a ConfigError with its own
    # __init__ arguments must come back as itself.
    import dataclasses
    import pickle

    with pytest.raises(ConfigError) as err:
        dataclasses.replace(load_config().federation, min_sites=9)
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is type(err.value) and str(again) == str(err.value)


@pytest.mark.parametrize(("num_sites", "fraction", "per_round", "quorum"), [
    (4, 1.0, 4, 3), (4, 0.5, 2, 2), (10, 0.3, 3, 2), (4, 0.3, 2, 2), (5, 0.1, 1, 1),
    (25, 0.28, 7, 4),  # 0.28 * 25 is 7.000000000000001 in floating point: 7 sites are meant, not 8
])
def test_the_default_quorum_is_a_majority_of_the_sites_a_round_samples(num_sites, fraction, per_round, quorum):
    # A majority of all sites could never be met when a round samples half of them or less.
    federation = load_config(overrides=[f"federation.num_sites={num_sites}",
                                        f"federation.fraction_train={fraction}"]).federation
    assert (federation.sites_per_round, federation.quorum) == (per_round, quorum)


def test_a_quorum_above_the_sites_a_round_samples_is_refused():
    with pytest.raises(ConfigError, match=r"'federation.min_sites' must be at most the sites a round samples "
                                          r"\(fraction_train 0.5 of 4 sites: 2\), or null. Got 3"):
        load_config(overrides=["federation.num_sites=4", "federation.fraction_train=0.5", "federation.min_sites=3"])


# --- numbers in files -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "key", "line", "got", "yaml_reads"),
    [
        ("federation:\n  num_sites: 012\n", "federation.num_sites", 2, "012", "10"),  # octal
        ("seed: 010\n", "seed", 1, "010", "8"),
        ("rounds: 2\nseed: 0b101\n", "seed", 2, "0b101", "5"),
        ("rounds: 0x10\n", "rounds", 1, "0x10", "16"),
        ("rounds: 1:30\n", "rounds", 1, "1:30", "90"),  # base 60
        ("train:\n  batch_size: 4\n  lr: 1:30.5\n", "train.lr", 3, "1:30.5", "90.5"),
        ("strategy:\n  params:\n    extra: [1, 017]\n", "strategy.params.extra", 3, "017", "15"),
        ("train:\n  <<: {lr: 0x1}\n", "train.lr", 2, "0x1", "1"),
    ],
)
def test_a_file_number_yaml_would_read_other_than_decimal_is_refused(tmp_path, text, key, line, got, yaml_reads):
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value) == (
        f"Config key {key!r} must be a number written in plain decimal (such as 10, -2.5 or 1e-3). "
        f"Got {got!r}, which YAML would read as {yaml_reads} (from {path}, line {line})."
    )


def test_a_file_keeps_decimal_numbers_quoted_text_and_booleans(tmp_path):
    path = _write(tmp_path, (
        "rounds: 1_000\nseed: +5\nname: '010'\n"
        "train:\n  lr: 1e-3\n  weight_decay: 0.001\n  momentum: .5\n  compile: true\n"
        "strategy:\n  params: {note: \"0x10\", mu: -0.5, n: 0, e: 5E-2}\n"
    ))

    cfg = load_config(path)

    assert (cfg.rounds, cfg.seed, cfg.name) == (1000, 5, "010")
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.momentum, cfg.train.compile) == (0.001, 0.001, 0.5, True)
    assert cfg.strategy.params == {"note": "0x10", "mu": -0.5, "n": 0, "e": 0.05}


def test_a_scenario_file_number_is_checked_too(tmp_path):
    scenario = _write(tmp_path, "description: mine\nnum_sites: 010\n", name="mine.yaml")

    with pytest.raises(ConfigError) as info:
        load_config(overrides=[f"federation.scenario={scenario}"])

    assert str(info.value) == (
        "Config key 'federation.num_sites' must be a number written in plain decimal (such as 10, -2.5 or 1e-3). "
        f"Got '010', which YAML would read as 8 (from {scenario}, line 2)."
    )


def test_a_saved_config_loads_back_under_the_file_number_rule(tmp_path):
    cfg = load_config(overrides=["name=010", "train.lr=1e-5", "strategy.params={note: '0x10', big: 1e20}"])

    assert load_config(save_config(cfg, tmp_path / "config.yaml")) == cfg


# --- nesting -------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [101, 5000])
def test_a_file_nested_too_deeply_is_a_config_error(tmp_path, depth):
    path = _write(tmp_path, "strategy:\n  params:\n    x: " + "[" * depth + "]" * depth + "\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value) in (
        f"Config file '{path}' is nested too deeply for YAML to read (a setting needs a handful of levels, at most "
        "100).",  # PyYAML gave up first
        f"Config key 'strategy.params.x' is nested more than 100 lists or mappings deep (from {path}, line 3); "
        "no setting needs that.",
    )


@pytest.mark.parametrize("depth", [101, 5000])
def test_an_override_nested_too_deeply_is_a_config_error(depth):
    override = "strategy.params.x=" + "[" * depth + "]" * depth

    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])

    assert str(info.value) in (
        f"The value of override {override[:77] + '...'!r} is nested too deeply for YAML to read (a setting needs a "
        "handful of levels, at most 100).",
        "Config key 'strategy.params.x' is nested more than 100 lists or mappings deep (from --set "
        f"{override}); no setting needs that.",
    )


def test_nesting_a_setting_could_use_is_kept(tmp_path):
    value = "[" * 20 + "1" + "]" * 20
    path = _write(tmp_path, f"strategy:\n  params:\n    x: {value}\n")

    cfg = load_config(path, overrides=[f"strategy.params.y={value}"])

    assert cfg.strategy.params["x"] == cfg.strategy.params["y"] == yaml.safe_load(value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("strategy:\n  params: &a {b: *a}\n",
         "Config key 'strategy.params.b' contains itself: a YAML alias (*name) inside the anchor (&name) it refers "
         "to (from {path}, line 2)."),
        ("strategy:\n  params: {b: &a [1, *a]}\n",
         "Config key 'strategy.params.b' contains itself: a YAML alias (*name) inside the anchor (&name) it refers "
         "to (from {path}, line 2)."),
        ("train: &t\n  <<: *t\n",
         "Cannot parse config file '{path}' at line 2, column 3: found a merge key that merges a mapping into "
         "itself."),
    ],
)
def test_a_value_that_contains_itself_is_a_config_error(tmp_path, text, message):
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value) == message.format(path=path)


def test_an_alias_used_twice_is_fine(tmp_path):
    path = _write(tmp_path, "strategy:\n  params:\n    a: &l [1, 2]\n    b: *l\n    c: {d: *l}\n")

    assert load_config(path).strategy.params == {"a": [1, 2], "b": [1, 2], "c": {"d": [1, 2]}}


# --- run name ------------------------------------------------------------------------------
def test_a_long_run_name_is_the_file_systems_business_not_the_configs():
    # A 100-character bound here refused the run folders an older medfed made (their config.yaml is
    # read back through it); the file system's limit is checked where a fresh run's folder is.
    assert load_config(overrides=["name=" + "a" * 150]).name == "a" * 150


# --- ints a run config can carry ------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "low"),
    [("rounds", 1), ("train.batch_size", 1), ("train.local_epochs", 1), ("federation.num_sites", 1),
     ("federation.round_retries", 0)],
)
def test_ints_stop_at_2_to_the_31_minus_1(key, low):
    # Flower's config_record_to_proto refused 2**63 with "Value out of range" once the run had started.
    assert to_run_config(load_config(overrides=[f"{key}=2147483647"]))[key.replace("_", "-")] == 2**31 - 1
    for value in (2**31, 2**63, 10**20):
        with pytest.raises(ConfigError) as info:
            load_config(overrides=[f"{key}={value}"])

        assert str(info.value) == (
            f"Config key {key!r} must be an int in the range [{low}, 2147483647]. Got {value} "
            f"(from --set {key}={value})."
        )


def test_an_optional_int_above_the_bound_says_null_is_fine_too():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["federation.min_sites=10000000000"])

    assert str(info.value) == (
        "Config key 'federation.min_sites' must be an int in the range [1, 2147483647] or null. Got 10000000000 "
        "(from --set federation.min_sites=10000000000)."
    )
