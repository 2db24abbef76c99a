"""Tests for swapd.config: llama-swap compatible configuration loading."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from swapd.config import (
    DEFAULT_GROUP_ID,
    Config,
    ConfigError,
    load_config,
    load_config_text,
)

# llama-swap's own example config, in the shared fixtures next to the repository
FIXTURE = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "llama-swap" / "config.example.yaml"
FIXTURE_ENV = {
    "HOME": "/home/tester",
    "API_KEY_1": "sk-one",
    "API_KEY_2": "sk-two",
    "OPENROUTER_API_KEY": "sk-or-secret",
}


def load(text: str, env: dict[str, str] | None = None) -> Config:
    return load_config_text(textwrap.dedent(text), "config.yaml", env or {})


def load_error(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, env)
    return info.value


# --------------------------------------------------------------- defaults


def test_defaults_for_global_model_and_group_settings():
    cfg = load(
        """
        models:
          model1:
            cmd: path/to/cmd --port ${PORT}
        """
    )
    assert cfg.health_check_timeout == 120
    assert cfg.start_port == 5800
    assert cfg.log_level == "info"
    assert cfg.global_ttl == 0
    assert cfg.unload_timeout == 10
    assert cfg.warnings == ()

    m = cfg.models["model1"]
    assert m.id == "model1"
    assert m.cmd == ("path/to/cmd", "--port", "5800")
    assert m.cmd_stop == ()
    assert m.proxy == "http://localhost:5800"
    assert m.port == 5800
    assert m.check_endpoint == "/health"
    assert m.aliases == ()
    assert m.env == ()
    assert m.ttl == 0
    assert m.unload_timeout == 10
    assert m.health_check_timeout == 120
    assert m.unlisted is False
    assert m.use_model_name == ""
    assert m.name == "" and m.description == ""
    assert m.concurrency_limit == 10
    assert dict(m.metadata) == {}

    default = cfg.groups[DEFAULT_GROUP_ID]
    assert (default.swap, default.exclusive, default.persistent) == (True, True, False)
    assert default.members == ("model1",)
    assert cfg.group_of("model1") is default


def test_empty_document_is_a_valid_config():
    cfg = load("")
    assert dict(cfg.models) == {}
    assert cfg.start_port == 5800
    assert cfg.groups[DEFAULT_GROUP_ID].members == ()


def test_results_are_read_only():
    cfg = load("models: {m: {cmd: 'srv --port ${PORT}'}}")
    with pytest.raises(TypeError):
        cfg.models["other"] = cfg.models["m"]  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.raw["x"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        cfg.models["m"].cmd = ("x",)  # type: ignore[misc]
    assert isinstance(hash(cfg.models["m"]), int)


def test_full_file_load_from_disk(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            """
            macros:
              svr-path: "path/to/server"
            healthCheckTimeout: 15
            models:
              model1:
                cmd: path/to/cmd --arg1 one
                proxy: "http://localhost:8080"
                name: "Model 1"
                description: "This is model 1"
                aliases: ["m1", "model-one"]
                env: ["VAR1=value1", "VAR2=value2"]
              model2:
                cmd: ${svr-path} --arg1 one
                proxy: "http://localhost:8081"
                aliases: ["m2"]
                checkEndpoint: "/"
              model4:
                cmd: path/to/cmd --arg1 one
                proxy: "http://localhost:8082"
            groups:
              group1:
                swap: true
                exclusive: false
                members: ["model2"]
              forever:
                exclusive: false
                persistent: true
                members: ["model4"]
            """
        )
    )
    cfg = load_config(str(path), environ={})
    assert cfg.path == str(path)
    assert cfg.health_check_timeout == 15
    assert cfg.models["model2"].cmd == ("path/to/server", "--arg1", "one")
    assert cfg.models["model1"].env == (("VAR1", "value1"), ("VAR2", "value2"))
    assert cfg.models["model1"].name == "Model 1"
    assert cfg.models["model2"].check_endpoint == "/"
    assert dict(cfg.aliases) == {"m1": "model1", "model-one": "model1", "m2": "model2"}
    assert cfg.groups["group1"].exclusive is False and cfg.groups["group1"].swap is True
    assert cfg.groups["forever"].persistent is True and cfg.groups["forever"].swap is True
    assert cfg.groups[DEFAULT_GROUP_ID].members == ("model1",)
    assert cfg.resolve("m1").id == "model1"
    assert cfg.raw["macros"] == {"svr-path": "path/to/server"}


# ------------------------------------------------------------------ ports


def test_start_port_can_be_set():
    assert load("startPort: 1000").start_port == 1000


@pytest.mark.parametrize("value", ["abcd", "-99", "0", "[1]"])
def test_invalid_start_port_is_rejected(value):
    err = load_error(f"startPort: {value}")
    assert err.key == "startPort" and err.model is None


def test_ports_follow_sorted_model_ids_and_only_models_using_port():
    cfg = load(
        """
        startPort: 5800
        models:
          model2:
            cmd: svr --port ${PORT}
            proxy: "http://172.11.22.33:${PORT}"
          model3:
            cmd: svr --port 1999
            proxy: "http://1.2.3.4:1999"
          model1:
            cmd: svr --port ${PORT}
        """
    )
    m1, m2, m3 = cfg.models["model1"], cfg.models["model2"], cfg.models["model3"]
    assert (m1.port, m1.proxy, m1.cmd[-1]) == (5800, "http://localhost:5800", "5800")
    assert (m2.port, m2.proxy, m2.cmd[-1]) == (5801, "http://172.11.22.33:5801", "5801")
    assert (m3.port, m3.proxy, m3.cmd[-1]) == (None, "http://1.2.3.4:1999", "1999")
    # document order is kept for the models mapping
    assert list(cfg.models) == ["model2", "model3", "model1"]


def test_model_without_proxy_that_ignores_port_loads_with_a_warning():
    # llama-swap refuses the whole file; swapd keeps the other models working
    cfg = load(
        """
        models:
          model1:
            cmd: svr --port 111
        """
    )
    (warning,) = cfg.warnings
    assert warning.startswith("model 'model1': key 'proxy': not set") and "${PORT}" in warning
    assert cfg.models["model1"].proxy == f"http://localhost:{cfg.start_port}"


def test_port_in_proxy_but_not_in_cmd_is_a_warning():
    cfg = load(
        """
        models:
          m:
            cmd: svr --port 9000
            proxy: http://localhost:${PORT}
        """
    )
    (warning,) = cfg.warnings
    assert warning.startswith("model 'm': key 'proxy': uses ${PORT} but cmd does not")


def test_port_only_in_cmd_stop_is_an_error():
    err = load_error(
        """
        models:
          m:
            cmd: svr
            proxy: http://localhost:9000
            cmdStop: stop --port ${PORT}
        """
    )
    assert (err.model, err.key) == ("m", "cmdStop")
    assert "only available when the model's cmd uses ${PORT}" in err.message


def test_port_reaches_cmd_through_a_macro_and_start_port_through_a_macro():
    cfg = load(
        """
        macros:
          FIRST_PORT: 6200
          autoPort: "--port ${PORT}"
        startPort: "${FIRST_PORT}"
        models:
          model1:
            cmd: server ${autoPort}
        """
    )
    assert cfg.start_port == 6200
    assert cfg.models["model1"].cmd == ("server", "--port", "6200")
    assert cfg.models["model1"].port == 6200
    assert cfg.models["model1"].proxy == "http://localhost:6200"


def test_port_is_substituted_throughout_the_model():
    cfg = load(
        """
        startPort: 6100
        models:
          model1:
            cmd: server --port ${PORT}
            proxy: http://localhost:${PORT}
            checkEndpoint: /health/${PORT}
            aliases: ["port-${PORT}"]
            metadata:
              port: "${PORT}"
        """
    )
    m = cfg.models["model1"]
    assert m.check_endpoint == "/health/6100"
    assert m.aliases == ("port-6100",)
    assert m.metadata["port"] == 6100  # direct substitution keeps the int type
    assert cfg.resolve("port-6100") is m


# ---------------------------------------------------------------- commands


def test_command_comments_continuations_and_quotes():
    cfg = load(
        r"""
        models:
          m:
            proxy: http://localhost:8080
            cmd: |
              python model1.py \
                -a "double quotes" \
                --arg2 'single quotes'
                -s
                # comment 1
                --arg3 123 \

                  # comment 2
                --arg4 '"string in string"'


                # stripped, like the blank lines above
                -c "'single quoted'"
        """
    )
    assert cfg.models["m"].cmd == (
        "python", "model1.py",
        "-a", "double quotes",
        "--arg2", "single quotes",
        "-s",
        "--arg3", "123",
        "--arg4", '"string in string"',
        "-c", "'single quoted'",
    )


def test_command_words_are_never_shell_expanded():
    cfg = load(
        r"""
        models:
          m:
            proxy: http://localhost:8080
            cmd: sh -c "echo $HOME && kill \$PPID" a\ b '$x' ""
        """
    )
    assert cfg.models["m"].cmd == ("sh", "-c", "echo $HOME && kill $PPID", "a b", "$x", "")


@pytest.mark.parametrize(
    "cmd_yaml",
    ['cmd: ""', "cmd: |\n      # only a comment\n      # and another", "name: no command"],
    ids=["empty", "only-comments", "missing"],
)
def test_empty_or_missing_cmd_with_a_proxy_is_a_remote_model(cmd_yaml):
    """As llama-swap loads it (cmd defaults to empty); swapd serves it as a remote model (issue 18)."""
    cfg = load_config_text("models:\n  m:\n    proxy: http://localhost:8080\n    " + cmd_yaml + "\n", "config.yaml")
    assert cfg.models["m"].remote and cfg.models["m"].cmd == ()


@pytest.mark.parametrize(
    "cmd_yaml",
    ['cmd: ""', "cmd: |\n      # only a comment\n      # and another", "name: no command"],
    ids=["empty", "only-comments", "missing"],
)
def test_empty_or_missing_cmd_without_a_proxy_is_an_error(cmd_yaml):
    err = load_error("models:\n  m:\n    " + cmd_yaml + "\n")
    assert (err.model, err.key) == ("m", "cmd")


def test_unterminated_quote_in_cmd_is_an_error():
    err = load_error(
        """
        models:
          m:
            proxy: http://localhost:8080
            cmd: server --name "oops
        """
    )
    assert (err.model, err.key) == ("m", "cmd")
    assert "unterminated double quote" in err.message


def test_macro_inside_a_command_comment_is_not_expanded():
    cfg = load(
        """
        startPort: 9990
        macros:
          "latest-llama": >
            /user/llama.cpp/build/bin/llama-server
            --port ${PORT}
        models:
          "test-model":
            cmd: |
              # ${latest-llama} is a macro that is defined above
              ${latest-llama}
              --model /path/to/model.gguf
              -ngl 99
        """
    )
    assert cfg.models["test-model"].cmd == (
        "/user/llama.cpp/build/bin/llama-server", "--port", "9990",
        "--model", "/path/to/model.gguf", "-ngl", "99",
    )


def test_cmd_stop_keeps_pid_placeholder_for_the_caller():
    cfg = load(
        """
        macros:
          STOP_COMMAND: kill -TERM ${PID}
        models:
          a:
            cmd: server
            proxy: http://localhost:8080
            cmdStop: "${STOP_COMMAND}"
          b:
            cmd: server
            proxy: http://localhost:8081
            cmdStop: sh -c "kill ${PID}"
        """
    )
    assert cfg.models["a"].cmd_stop == ("kill", "-TERM", "${PID}")
    assert cfg.models["a"].stop_command(4321) == ("kill", "-TERM", "4321")
    assert cfg.models["b"].stop_command(7) == ("sh", "-c", "kill 7")


def test_pid_outside_cmd_stop_is_rejected():
    err = load_error(
        """
        models:
          model1:
            cmd: server
            proxy: http://localhost:8080
            metadata:
              pid: "${PID}"
        """
    )
    assert (err.model, err.key) == ("model1", "metadata.pid")
    assert "${PID}" in err.message


# ------------------------------------------------------------------ macros


def test_global_and_model_macros_expand_in_cmd_and_cmd_stop():
    cfg = load(
        """
        startPort: 9990
        macros:
          svr-path: "path/to/server"
          argOne: "--arg1"
          argTwo: "--arg2"
          autoPort: "--port ${PORT}"
          overriddenByModelMacro: failed
        models:
          model1:
            macros:
              overriddenByModelMacro: success
            cmd: |
              ${svr-path} ${argTwo}
              # the automatic ${PORT} is replaced
              ${autoPort}
              ${argOne}
              --arg3 three
              --overridden ${overriddenByModelMacro}
            cmdStop: |
              /path/to/stop.sh --port ${PORT} ${argTwo}
        """
    )
    m = cfg.models["model1"]
    assert " ".join(m.cmd) == "path/to/server --arg2 --port 9990 --arg1 --arg3 three --overridden success"
    assert " ".join(m.cmd_stop) == "/path/to/stop.sh --port 9990 --arg2"


def test_model_id_macro_in_globals_and_models():
    cfg = load(
        """
        startPort: 9000
        macros:
          "docker-llama": docker run --name ${MODEL_ID} -p ${PORT}:8080 docker_img
          "docker-stop": docker stop ${MODEL_ID}
        models:
          model1:
            cmd: /path/to/server -p ${PORT} -hf ${MODEL_ID}
          model2:
            cmd: ${docker-llama}
            cmdStop: ${docker-stop}
          author/model:F16:
            cmd: /path/to/server -p ${PORT} -hf ${MODEL_ID}
            cmdStop: stop
        """
    )
    assert " ".join(cfg.models["author/model:F16"].cmd) == "/path/to/server -p 9000 -hf author/model:F16"
    assert " ".join(cfg.models["model1"].cmd) == "/path/to/server -p 9001 -hf model1"
    assert " ".join(cfg.models["model2"].cmd) == "docker run --name model2 -p 9002:8080 docker_img"
    assert cfg.models["model2"].cmd_stop == ("docker", "stop", "model2")
    # the declarations themselves stay unexpanded in raw
    assert cfg.raw["macros"]["docker-stop"] == "docker stop ${MODEL_ID}"


def test_typed_macros_in_metadata():
    cfg = load(
        """
        startPort: 10000
        macros:
          PORT_NUM: 10001
          TEMP: 0.7
          ENABLED: true
          NAME: "llama model"
          CTX: 16384
        models:
          test-model:
            cmd: /path/to/server -p ${PORT}
            metadata:
              port: ${PORT_NUM}
              temperature: ${TEMP}
              enabled: ${ENABLED}
              model_name: ${NAME}
              context: ${CTX}
              note: "Running on port ${PORT_NUM} with temp ${TEMP}, ctx ${CTX}, on=${ENABLED}"
        """
    )
    meta = cfg.models["test-model"].metadata
    assert meta["port"] == 10001 and type(meta["port"]) is int
    assert meta["temperature"] == 0.7
    assert meta["enabled"] is True
    assert meta["model_name"] == "llama model"
    assert meta["context"] == 16384
    assert meta["note"] == "Running on port 10001 with temp 0.7, ctx 16384, on=true"


def test_interpolated_floats_are_formatted_like_go():
    cfg = load(
        """
        macros:
          SCALE: 1.0
          BIG: 2000000.0
        models:
          m:
            proxy: http://localhost:8080
            cmd: server --scale ${SCALE} --big ${BIG}
        """
    )
    assert cfg.models["m"].cmd == ("server", "--scale", "1", "--big", "2e+06")


def test_nested_metadata_structures_are_expanded():
    cfg = load(
        """
        startPort: 10000
        macros:
          TEMP: 0.7
        models:
          test-model:
            cmd: /path/to/server -p ${PORT}
            metadata:
              config:
                port: ${PORT}
                temperature: ${TEMP}
              tags: ["model:${MODEL_ID}", "port:${PORT}"]
              nested:
                deep:
                  value: ${TEMP}
        """
    )
    meta = cfg.models["test-model"].metadata
    assert meta["config"] == {"port": 10000, "temperature": 0.7}
    assert meta["tags"] == ["model:test-model", "port:10000"]
    assert meta["nested"]["deep"]["value"] == 0.7


def test_model_macro_takes_precedence_over_global_macro():
    cfg = load(
        """
        macros:
          TEMP: 0.5
          GLOBAL_VAL: "global"
        models:
          test-model:
            cmd: /path/to/server -p ${PORT}
            macros:
              TEMP: 0.9
              LOCAL_VAL: "local"
            metadata:
              temperature: ${TEMP}
              global: ${GLOBAL_VAL}
              local: ${LOCAL_VAL}
        """
    )
    assert dict(cfg.models["test-model"].metadata) == {"temperature": 0.9, "global": "global", "local": "local"}


def test_mapping_keys_are_not_macro_targets():
    cfg = load(
        """
        macros:
          KEY: expanded
        models:
          model1:
            cmd: server
            proxy: http://localhost:8080
            metadata:
              "${KEY}": value
        """
    )
    assert dict(cfg.models["model1"].metadata) == {"${KEY}": "value"}


def test_macro_in_macro_resolves_chains_declared_in_order():
    cfg = load(
        """
        macros:
          "base": "/models"
          "path": "${base}/llama"
          "full": "${path}/model.gguf"
          "A": "value-A"
          "B": "prefix-${A}-suffix"
        models:
          test:
            cmd: load ${full} ${B}
            proxy: http://localhost:8080
        """
    )
    assert cfg.models["test"].cmd == ("load", "/models/llama/model.gguf", "prefix-value-A-suffix")


def test_macro_forward_reference_is_rejected():
    err = load_error(
        """
        macros:
          FIRST: "value-${SECOND}"
          SECOND: later
        models:
          model1:
            cmd: echo ${FIRST}
            proxy: http://localhost:8080
        """
    )
    assert str(err) == "config.yaml: model 'model1': key 'cmd': unknown macro ${SECOND}"


def test_model_macro_overrides_global_used_inside_another_global():
    cfg = load(
        """
        macros:
          "tag": "global"
          "msg": "value-${tag}"
          "podman": "podman run --name ${MODEL_ID}"
        models:
          test:
            macros:
              "tag": "model-level"
            cmd: echo ${msg} ${podman}
            proxy: http://localhost:8080
        """
    )
    assert cfg.models["test"].cmd == ("echo", "value-model-level", "podman", "run", "--name", "test")


def test_model_macros_do_not_leak_to_other_models():
    err = load_error(
        """
        models:
          owner:
            macros:
              LOCAL: owner-value
            cmd: echo ${LOCAL}
            proxy: http://localhost:8080
          other:
            cmd: echo ${LOCAL}
            proxy: http://localhost:8081
        """
    )
    assert (err.model, err.key, err.message) == ("other", "cmd", "unknown macro ${LOCAL}")


def test_macros_in_name_description_and_top_level_values():
    cfg = load(
        """
        macros:
          GLOBAL_TTL: 120
          MODEL_TTL: 45
          FAMILY: llama
        globalTTL: "${GLOBAL_TTL}"
        models:
          llama-3b:
            macros:
              MODEL_TTL: 30
            cmd: server --port ${PORT}
            ttl: "${MODEL_TTL}"
            name: "${FAMILY} ${MODEL_ID}"
            description: "Running ${MODEL_ID}"
            env:
              - "MODEL=${MODEL_ID}"
        """
    )
    m = cfg.models["llama-3b"]
    assert cfg.global_ttl == 120
    assert m.ttl == 30
    assert (m.name, m.description) == ("llama llama-3b", "Running llama-3b")
    assert m.env == (("MODEL", "llama-3b"),)


@pytest.mark.parametrize(
    ("text", "model", "key"),
    [
        ("macros:\n  PORT: '1111'\n", None, "macros.PORT"),
        ("macros:\n  MODEL_ID: model1\n", None, "macros.MODEL_ID"),
        ("macros:\n  PID: 1234\n", None, "macros.PID"),
        ("models:\n  model1:\n    macros:\n      PORT: 1111\n", "model1", "macros.PORT"),
        ("models:\n  model1:\n    macros:\n      MODEL_ID: x\n", "model1", "macros.MODEL_ID"),
        ("models:\n  model1:\n    macros:\n      PID: 1\n", "model1", "macros.PID"),
    ],
)
def test_reserved_macro_names_are_rejected(text, model, key):
    err = load_error(text)
    assert (err.model, err.key) == (model, key)
    assert re.search(r"macro name '(PORT|MODEL_ID|PID)' is reserved", err.message)


@pytest.mark.parametrize(
    ("name", "problem"),
    [("bad.name", "may only contain"), ("a" * 64, "longer than 63")],
)
def test_invalid_macro_names_are_rejected(name, problem):
    err = load_error(f"macros:\n  {name}: value\n")
    assert problem in err.message
    assert err.key == f"macros.{name}"


def test_longest_allowed_macro_name_is_accepted():
    name = "a" * 63
    cfg = load(f"macros:\n  {name}: v\nmodels:\n  m:\n    cmd: x ${{{name}}}\n    proxy: http://h:1\n")
    assert cfg.models["m"].cmd == ("x", "v")


@pytest.mark.parametrize("value", ["[1, 2, 3]", "{key: value}", "null"])
def test_macro_values_must_be_scalars(value):
    err = load_error(f"macros:\n  INVALID: {value}\n")
    assert "INVALID" in err.message and "must be a scalar" in err.message


@pytest.mark.parametrize("value", ['"text"', "42", "3.14", "true"])
def test_scalar_macro_values_are_accepted(value):
    cfg = load(f"macros:\n  V: {value}\nmodels:\n  m:\n    cmd: srv ${{V}} --port ${{PORT}}\n")
    assert len(cfg.models["m"].cmd) == 4


def test_self_referencing_macro_is_rejected():
    err = load_error(
        """
        macros:
          "recursive": "value-${recursive}"
        models:
          test:
            cmd: echo ${recursive}
            proxy: http://localhost:8080
        """
    )
    assert err.key == "macros.recursive"
    assert "self-reference" in err.message


@pytest.mark.parametrize(
    ("field", "yaml_line"),
    [
        ("cmd", "cmd: |\n      ${svr-path} --port ${PORT}\n      ${unknownMacro}"),
        ("cmdStop", 'cmdStop: "kill ${unknownMacro}"'),
        ("proxy", 'proxy: "http://${unknownMacro}:${PORT}"'),
        ("checkEndpoint", 'checkEndpoint: "http://localhost:${unknownMacro}/health"'),
        ("filters.stripParams", 'filters:\n      stripParams: "model,${unknownMacro}"'),
        ("metadata.value", "metadata:\n      value: ${unknownMacro}"),
        ("name", 'name: "Model ${unknownMacro}"'),
    ],
)
def test_unknown_macros_name_the_model_and_key(field, yaml_line):
    text = (
        "startPort: 9990\nmacros:\n  svr-path: path/to/server\nmodels:\n  model1:\n"
        "    " + yaml_line + "\n"
    )
    if not yaml_line.startswith("cmd:"):
        text += '    cmd: "${svr-path} --port ${PORT}"\n'
    err = load_error(text)
    assert str(err) == f"config.yaml: model 'model1': key '{field}': unknown macro ${{unknownMacro}}"


def test_unknown_macro_in_a_known_top_level_key_is_rejected():
    err = load_error('apiKeys: ["${NOPE}"]\n')
    assert (err.model, err.key, err.message) == (None, "apiKeys[0]", "unknown macro ${NOPE}")


def test_unknown_macro_in_an_unknown_top_level_key_is_tolerated():
    cfg = load("templates:\n  x: ${LATER}\n")
    assert cfg.raw["templates"] == {"x": "${LATER}"}


def test_anchors_are_materialised_per_model_before_expansion():
    cfg = load(
        """
        defs:
          model: &model
            cmd: echo ${LOCAL}
            proxy: http://localhost:8080
            env: ["MODEL_VALUE=${LOCAL}"]
            metadata:
              value: "${LOCAL}"
        models:
          first:
            <<: *model
            macros:
              LOCAL: first-value
          second:
            <<: *model
            macros:
              LOCAL: second-value
        """
    )
    for model_id in ("first", "second"):
        expected = f"{model_id}-value"
        m = cfg.models[model_id]
        assert m.cmd == ("echo", expected)
        assert m.env == (("MODEL_VALUE", expected),)
        assert m.metadata["value"] == expected
    assert cfg.warnings == ("unknown key 'defs' is ignored",)


# -------------------------------------------------------------- env macros


def test_env_macros_in_many_places():
    env = {"MODEL_DIR": "/opt/models", "HOST": "myserver", "HPORT": "9999", "KEY": "secret123", "ROOT": "/data"}
    cfg = load(
        """
        macros:
          MODEL_BASE: "${env.ROOT}/models"
        apiKeys: ["${env.KEY}"]
        models:
          test:
            macros:
              MODEL_FILE: "${env.MODEL_DIR}/model.gguf"
            cmd: "${env.MODEL_DIR}/llama-server --host ${env.HOST} -m ${MODEL_FILE} --alt ${MODEL_BASE}/${MODEL_ID}.gguf"
            proxy: "http://${env.HOST}:${env.HPORT}"
            checkEndpoint: "http://${env.HOST}/health"
            metadata:
              api_key: "${env.KEY}"
              nested:
                key: "${env.KEY}"
        """,
        env,
    )
    m = cfg.models["test"]
    assert m.cmd == (
        "/opt/models/llama-server", "--host", "myserver",
        "-m", "/opt/models/model.gguf", "--alt", "/data/models/test.gguf",
    )
    assert m.proxy == "http://myserver:9999"
    assert m.check_endpoint == "http://myserver/health"
    assert m.metadata == {"api_key": "secret123", "nested": {"key": "secret123"}}
    assert cfg.raw["apiKeys"] == ["secret123"]


@pytest.mark.parametrize(
    ("snippet", "model", "key"),
    [
        ('models:\n  test:\n    cmd: "${env.UNSET_VAR_1}/server"\n    proxy: http://h:1\n', "test", "cmd"),
        ('macros:\n  P: "${env.UNSET_VAR_1}"\n', None, "macros.P"),
        ('models:\n  test:\n    macros:\n      P: "${env.UNSET_VAR_1}"\n', "test", "macros.P"),
        ('models:\n  t:\n    metadata:\n      k: "${env.UNSET_VAR_1}"\n', "t", "metadata.k"),
        ("peers:\n  p:\n    apiKey: ${env.UNSET_VAR_1}\n", None, "peers.p.apiKey"),
    ],
)
def test_missing_env_var_is_named_with_its_location(snippet, model, key):
    err = load_error(snippet)
    assert "UNSET_VAR_1" in err.message and "not set" in err.message
    assert (err.model, err.key) == (model, key)


def test_missing_env_var_inside_a_flow_sequence_reports_the_variable():
    err = load_error("\n\napiKeys: [${env.NOT_THERE}]\n")
    assert "NOT_THERE" in err.message and "not set" in err.message and "line 3" in err.message


def test_env_references_in_comments_are_ignored():
    cfg = load(
        """
        # apiKeys: ["${env.COMMENTED_OUT_KEY}"]
        apiKeys: ["${env.ACTIVE}"] # TODO: add ${env.FUTURE_KEY} later
        models:
          test:
            cmd: |
              server
              --port 8080
            proxy: "http://localhost:8080"
            # metadata:
            #   api_key: "${env.SOME_UNSET_KEY}"
        """,
        {"ACTIVE": "active-key"},
    )
    assert cfg.raw["apiKeys"] == ["active-key"]


@pytest.mark.parametrize("value", ["line1\nline2", "line1\rline2", "nul\x00"])
def test_env_values_with_line_breaks_are_refused(value):
    err = load_error('models:\n  t:\n    cmd: "s ${env.MULTI}"\n    proxy: http://h:1\n', {"MULTI": value})
    assert "MULTI" in err.message and "newline" in err.message
    assert (err.model, err.key) == ("t", "cmd")


def test_env_values_with_quotes_and_backslashes_survive_double_quoted_yaml():
    cfg = load(
        """
        models:
          t:
            cmd: server
            proxy: http://localhost:8080
            metadata:
              quoted: "${env.QUOTED}"
              path: "${env.BACKSLASH}"
        """,
        {"QUOTED": 'value with "quotes"', "BACKSLASH": r"path\to\file"},
    )
    assert cfg.models["t"].metadata == {"quoted": 'value with "quotes"', "path": r"path\to\file"}


def test_environ_defaults_to_process_environment(monkeypatch):
    monkeypatch.setenv("SWAPD_TEST_CFG_VAR", "/from/os")
    cfg = load_config_text('models:\n  m:\n    cmd: "${env.SWAPD_TEST_CFG_VAR}/srv"\n    proxy: http://h:1\n')
    assert cfg.models["m"].cmd == ("/from/os/srv",)
    assert cfg.path == "<string>"


# ----------------------------------------------------------------- aliases


def test_aliases_must_be_unique_across_models():
    err = load_error(
        """
        models:
          model1:
            cmd: path/to/cmd --arg1 one
            proxy: "http://localhost:8080"
            aliases: [m1]
          model2:
            cmd: path/to/cmd --arg1 one
            proxy: "http://localhost:8081"
            aliases: [m1, m2]
        """
    )
    assert (err.model, err.key) == ("model2", "aliases")
    assert "duplicate alias 'm1'" in err.message and "model1" in err.message


def test_alias_listed_twice_in_one_model_is_rejected():
    err = load_error("models:\n  a:\n    cmd: x\n    proxy: http://h:1\n    aliases: [z, z]\n")
    assert (err.model, err.key) == ("a", "aliases")


def test_resolve_prefers_model_id_then_alias():
    cfg = load(
        """
        models:
          model1:
            cmd: python model1.py
            proxy: http://localhost:8080
            aliases: [m1, model-one, model2]
          model2:
            cmd: python model2.py
            proxy: http://localhost:8081
        """
    )
    assert cfg.resolve("model1").id == "model1"
    assert cfg.resolve("m1").id == "model1"
    assert cfg.resolve("model2").id == "model2"  # id wins over a clashing alias
    assert cfg.resolve("model3") is None
    assert any("alias 'model2' is also a model id" in w for w in cfg.warnings)


def test_set_params_by_id_keys_become_aliases():
    cfg = load(
        """
        startPort: 6300
        models:
          model1:
            cmd: path/to/cmd --port ${PORT}
            filters:
              setParamsByID:
                "${MODEL_ID}":
                  reasoning_effort: medium
                "${MODEL_ID}:high":
                  reasoning_effort: high
                "${MODEL_ID}:${PORT}":
                  reasoning_effort: low
        """
    )
    assert cfg.models["model1"].aliases == ("model1:high", "model1:6300")
    assert cfg.resolve("model1:high").id == "model1"
    assert set(cfg.raw["models"]["model1"]["filters"]["setParamsByID"]) == {"model1", "model1:high", "model1:6300"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "models:\n  model1:\n    cmd: c --port ${PORT}\n    filters:\n      setParamsByID:\n"
            "        model2: {reasoning_effort: high}\n  model2:\n    cmd: c --port ${PORT}\n",
            "conflicts with an existing model id",
        ),
        (
            "models:\n  model1:\n    cmd: c --port ${PORT}\n    filters:\n      setParamsByID:\n"
            "        shared: {a: 1}\n  model2:\n    cmd: c --port ${PORT}\n    filters:\n"
            "      setParamsByID:\n        shared: {a: 2}\n",
            "duplicate alias 'shared'",
        ),
        (
            "macros:\n  FIRST: same\n  SECOND: same\nmodels:\n  model1:\n    cmd: c --port ${PORT}\n"
            "    filters:\n      setParamsByID:\n        '${FIRST}': {a: 1}\n        '${SECOND}': {a: 2}\n",
            "resolve to 'same'",
        ),
    ],
    ids=["model-id", "other-model", "collision"],
)
def test_set_params_by_id_alias_conflicts(text, needle):
    err = load_error(text)
    assert needle in err.message
    assert err.key == "filters.setParamsByID"


# ------------------------------------------------------------------ groups


def test_model_in_two_groups_is_rejected():
    err = load_error(
        """
        models:
          model1: {cmd: a, proxy: "http://localhost:8080"}
          model2: {cmd: a, proxy: "http://localhost:8081"}
        groups:
          group1:
            members: ["model2"]
          group2:
            members: ["model2"]
        """
    )
    assert "model 'model2' is in more than one group" in err.message
    assert err.key.startswith("groups.")


def test_model_listed_twice_in_a_group_is_rejected():
    err = load_error(
        """
        models:
          model1: {cmd: a, proxy: "http://localhost:8080"}
        groups:
          g:
            members: [model1, model1]
        """
    )
    assert err.key == "groups.g.members"
    assert "more than once" in err.message


def test_group_member_must_be_a_model_id():
    base = "models:\n  model1: {cmd: a, proxy: 'http://h:1', aliases: [m1]}\ngroups:\n  g:\n    members: [%s]\n"
    # llama-swap does not check members at load time; swapd warns
    cfg = load(base % "ghost")
    assert cfg.warnings == ("key 'groups.g.members': 'ghost' is not a defined model; ignored",)
    assert cfg.groups[DEFAULT_GROUP_ID].members == ("model1",)
    err = load_error(base % "m1")
    assert "alias of model 'model1'" in err.message


def test_default_group_collects_ungrouped_models_sorted():
    cfg = load(
        """
        models:
          zeta: {cmd: a, proxy: "http://h:1"}
          alpha: {cmd: a, proxy: "http://h:2"}
          mid: {cmd: a, proxy: "http://h:3"}
        groups:
          pair:
            swap: false
            members: [mid]
        """
    )
    assert cfg.groups[DEFAULT_GROUP_ID].members == ("alpha", "zeta")
    pair = cfg.groups["pair"]
    assert (pair.swap, pair.exclusive, pair.persistent) == (False, True, False)
    assert cfg.group_of("mid") is pair
    assert cfg.group_of("alpha").id == DEFAULT_GROUP_ID
    with pytest.raises(KeyError):
        cfg.group_of("nope")


def test_groups_under_routing_router_settings():
    cfg = load(
        """
        models:
          gemma: {cmd: echo gemma, proxy: "http://localhost:8080"}
          qwen: {cmd: echo qwen, proxy: "http://localhost:8081"}
        routing:
          router:
            use: group
            settings:
              groups:
                g1:
                  members: [gemma, qwen]
              matrix:
                sets:
                  s: "gemma"
        """
    )
    assert cfg.groups["g1"].members == ("gemma", "qwen")
    assert cfg.groups[DEFAULT_GROUP_ID].members == ()
    assert cfg.router == "group" and cfg.matrix is None  # use: group leaves the matrix inactive
    assert cfg.warnings == ()


def test_priority_for_unknown_model_is_ignored_with_a_warning():
    cfg = load("models:\n  gemma: {cmd: echo, proxy: 'http://h:1'}\n"
               "routing:\n  scheduler:\n    settings:\n      fifo:\n        priority:\n          nope: 5\n")
    assert cfg.warnings == ("key 'routing.scheduler.settings.fifo.priority': unknown model 'nope'; ignored",)


@pytest.mark.parametrize(
    ("extra", "key", "needle"),
    [
        ("groups:\n  g1:\n    members: [gemma]\nrouting:\n  router:\n    use: group\n", "routing.router", "cannot be combined"),
        ("routing:\n  router:\n    use: bogus\n", "routing.router.use", "unknown router"),
        ("routing:\n  router:\n    use: matrix\n", "routing.router.use", "settings.matrix is not set"),
        ("routing:\n  scheduler:\n    use: lifo\n", "routing.scheduler.use", "unknown scheduler"),
    ],
)
def test_routing_validation(extra, key, needle):
    err = load_error("models:\n  gemma: {cmd: echo, proxy: 'http://h:1'}\n" + extra)
    assert err.key == key and needle in err.message


def test_matrix_routing_is_compiled_and_keeps_the_default_group():
    cfg = load(
        """
        models:
          gemma: {cmd: echo, proxy: "http://h:1"}
          qwen: {cmd: echo, proxy: "http://h:2"}
        routing:
          router:
            use: matrix
            settings:
              matrix:
                sets:
                  combo: "gemma | qwen"
        """
    )
    assert cfg.groups[DEFAULT_GROUP_ID].members == ("gemma", "qwen")
    assert cfg.router == "matrix" and cfg.matrix.set_names == ("combo",)
    assert cfg.warnings == ()  # see tests/test_matrix.py for the matrix itself


def test_fifo_priority_may_name_models_and_aliases():
    cfg = load(
        """
        models:
          gemma: {cmd: echo, proxy: "http://h:1", aliases: [g]}
        routing:
          scheduler:
            settings:
              fifo:
                priority: {gemma: 5, g: 1}
        """
    )
    assert cfg.raw["routing"]["scheduler"]["settings"]["fifo"]["priority"] == {"gemma": 5, "g": 1}


# ---------------------------------------------------- ttl / timeouts / limits


@pytest.mark.parametrize(
    ("global_line", "model_line", "expected"),
    [
        ("globalTTL: 300", "", 300),
        ("globalTTL: 300", "ttl: 0", 0),
        ("globalTTL: 300", "ttl: 600", 600),
        ("globalTTL: 300", "ttl: -1", 300),  # -1 means "use globalTTL" in llama-swap
        ("", "", 0),
    ],
)
def test_model_ttl_and_global_ttl(global_line, model_line, expected):
    cfg = load(f"{global_line}\nmodels:\n  m:\n    cmd: server --port ${{PORT}}\n    {model_line}\n")
    assert cfg.models["m"].ttl == expected


@pytest.mark.parametrize(
    ("text", "model", "key"),
    [
        ("globalTTL: -1\n", None, "globalTTL"),
        ("models:\n  m:\n    cmd: s --port ${PORT}\n    ttl: -2\n", "m", "ttl"),
        ("unloadTimeout: -1\n", None, "unloadTimeout"),
        ("models:\n  m:\n    cmd: s --port ${PORT}\n    unloadTimeout: -1\n", "m", "unloadTimeout"),
    ],
)
def test_negative_durations_are_rejected(text, model, key):
    err = load_error(text)
    assert (err.model, err.key) == (model, key)
    assert ">= 0" in err.message


def test_unload_timeout_defaults_and_overrides():
    cfg = load(
        """
        models:
          a: {cmd: 's --port ${PORT}'}
        """
    )
    assert cfg.unload_timeout == 10 and cfg.models["a"].unload_timeout == 10
    cfg = load(
        """
        unloadTimeout: 25
        models:
          a: {cmd: 's --port ${PORT}', unloadTimeout: 45}
          b: {cmd: 's --port ${PORT}'}
          c: {cmd: 's --port ${PORT}', unloadTimeout: 0}
        """
    )
    assert cfg.unload_timeout == 25
    assert [cfg.models[k].unload_timeout for k in "abc"] == [45, 25, 25]
    assert load("unloadTimeout: 0").unload_timeout == 10


@pytest.mark.parametrize(("value", "expected"), [(500, 500), (15, 15), (5, 15), (0, 15)])
def test_health_check_timeout_has_a_floor_of_15(value, expected):
    cfg = load(f"healthCheckTimeout: {value}\nmodels:\n  m: {{cmd: 's --port ${{PORT}}'}}\n")
    assert cfg.health_check_timeout == expected
    assert cfg.models["m"].health_check_timeout == expected


def test_concurrency_limit_defaults_and_comfyui_minimum():
    cfg = load(
        """
        models:
          plain: {cmd: 's --port ${PORT}'}
          limited: {cmd: 's --port ${PORT}', concurrencyLimit: 3}
          comfyui_auto: {cmd: 'comfy --port ${PORT}', concurrencyLimit: 10}
        """
    )
    assert cfg.models["plain"].concurrency_limit == 10
    assert cfg.models["limited"].concurrency_limit == 3
    assert cfg.models["comfyui_auto"].concurrency_limit == 50


# ---------------------------------------------------- type errors / messages


def test_type_error_message_names_file_model_and_key():
    err = load_error('models:\n  x:\n    cmd: s --port ${PORT}\n    ttl: "abc"\n')
    assert str(err) == "config.yaml: model 'x': key 'ttl': expected an integer number of seconds, got 'abc'"
    assert (err.file, err.model, err.key) == ("config.yaml", "x", "ttl")


def test_top_level_error_message_has_no_model_part():
    err = load_error("startPort: 0\n")
    assert str(err) == "config.yaml: key 'startPort': must be >= 1, got 0"


@pytest.mark.parametrize(
    ("line", "key", "needle"),
    [
        ("unlisted: yes", "unlisted", "expected true or false, got 'yes'"),
        ("aliases: just-one", "aliases", "expected a list of strings"),
        ("env: [NOEQUALS]", "env[0]", "expected NAME=VALUE, got 'NOEQUALS'"),
        ("metadata: [1, 2]", "metadata", "expected a mapping"),
        ("concurrencyLimit: 2.5", "concurrencyLimit", "expected an integer, got 2.5"),
        ("capabilities: {in: [video]}", "capabilities.in[0]", "invalid modality 'video'"),
        ("sendLoadingState: maybe", "sendLoadingState", "expected true or false"),
    ],
)
def test_model_field_type_errors(line, key, needle):
    err = load_error(f"models:\n  m:\n    cmd: s --port ${{PORT}}\n    {line}\n")
    assert (err.model, err.key) == ("m", key)
    assert needle in err.message


def test_env_entries_split_on_first_equals():
    cfg = load("models:\n  m:\n    cmd: s --port ${PORT}\n    env: ['A=b=c', 'EMPTY=']\n")
    assert cfg.models["m"].env == (("A", "b=c"), ("EMPTY", ""))


def test_yaml_syntax_error_reports_line():
    err = load_error("models:\n  m:\n    cmd: [unclosed\n  other: x\n")
    assert err.model is None and err.key is None
    assert re.search(r"line \d+", err.message)
    assert "\n" not in str(err)


def test_duplicate_yaml_keys_are_rejected():
    err = load_error("models:\n  m: {cmd: a, proxy: 'http://h:1'}\n  m: {cmd: b, proxy: 'http://h:2'}\n")
    assert "duplicate key 'm'" in err.message and "line 3" in err.message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(text):
    err = load_error(text)
    assert "top level" in err.message and "mapping" in err.message


def test_missing_file_raises_config_error(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.file == missing
    assert str(info.value).startswith(missing + ": ")


def test_merge_keys_are_not_mistaken_for_duplicates():
    cfg = load(
        """
        base: &base {k: 0, z: 9}
        holder:
          inner: &mid
            <<: *base
            k: 1
        models:
          x:
            <<: *mid
            k: 2
            cmd: "srv --port ${PORT}"
        """
    )
    assert cfg.raw["models"]["x"]["k"] == 2 and cfg.raw["models"]["x"]["z"] == 9
    assert cfg.raw["holder"]["inner"] == {"k": 1, "z": 9}


def test_yaml_scalars_follow_yaml_1_2_like_llama_swap():
    cfg = load(
        """
        models:
          m:
            cmd: s --port ${PORT}
            aliases: [on, no, 12:30]
            metadata:
              time: 1:30
              hex: 0x10
              word: yes
        """
    )
    m = cfg.models["m"]
    assert m.aliases == ("on", "no", "12:30")
    assert dict(m.metadata) == {"time": "1:30", "hex": 16, "word": "yes"}


def test_log_settings_validation():
    cfg = load("logLevel: DEBUG\n")
    assert cfg.log_level == "debug"
    cfg = load("logLevel: verbose\n")
    assert cfg.log_level == "info"
    assert any("logLevel" in w and "verbose" in w for w in cfg.warnings)
    err = load_error("logToStdout: everywhere\n")
    assert err.key == "logToStdout"


@pytest.mark.parametrize(
    ("keys", "bad_index", "needle"),
    [('[""]', 0, "must not be empty"), ('["ok", "bad key"]', 1, "cannot contain spaces")],
)
def test_api_key_validation(keys, bad_index, needle):
    err = load_error(f"apiKeys: {keys}\n")
    assert err.key == f"apiKeys[{bad_index}]" and needle in err.message


def test_peer_requires_proxy_and_models():
    err = load_error("peers:\n  p1:\n    models: [a]\n")
    assert err.key == "peers.p1.proxy"
    err = load_error("peers:\n  p1:\n    proxy: http://x\n    models: []\n")
    assert err.key == "peers.p1.models"


# ---------------------------------------------------------------- warnings


def test_unknown_keys_warn_with_a_suggestion():
    cfg = load(
        """
        gloablTTL: 5
        totallyUnrelatedSetting: 1
        models:
          m:
            cmd: s --port ${PORT}
            cmdd: oops
            tll: 4
        groups:
          g:
            members: [m]
            exclusiv: false
        """
    )
    assert "unknown key 'gloablTTL' (did you mean 'globalTTL'?)" in cfg.warnings
    assert "unknown key 'totallyUnrelatedSetting' is ignored" in cfg.warnings
    assert "model 'm': unknown key 'cmdd' (did you mean 'cmd'?)" in cfg.warnings
    assert "model 'm': unknown key 'tll' (did you mean 'ttl'?)" in cfg.warnings
    assert "group 'g': unknown key 'exclusiv' (did you mean 'exclusive'?)" in cfg.warnings
    assert cfg.global_ttl == 0  # the misspelt key really is ignored


def test_formerly_ignored_keys_load_without_a_warning():
    # profiles, selectors (tests/test_profiles.py, tests/test_selectors.py) and ui were once accepted and ignored
    names = ["profiles", "selectors", "ui"]
    cfg = load("\n".join(f"{name}: {{}}" for name in names) + "\n")
    assert list(cfg.warnings) == []


def test_observe_keys_are_read():
    cfg = load(
        """
        metricsMaxInMemory: 50
        captureBuffer: 2
        store: {path: /tmp/activity.sqlite}
        logRequests: true
        performance: {disabled: true, every: 1m30s}
        telemetry: {endpoint: "http://127.0.0.1:4318", serviceName: box, headers: {x-token: t}}
        """
    )
    assert cfg.warnings == ()
    o = cfg.observe
    assert (o.metrics_max_in_memory, o.capture_buffer_bytes, o.store_path) == (50, 2 * 1024 * 1024, "/tmp/activity.sqlite")
    assert o.log_requests and o.performance_disabled and o.performance_every == 90.0
    assert o.telemetry.enabled and o.telemetry.endpoint == "http://127.0.0.1:4318"
    assert o.telemetry.service_name == "box" and o.telemetry.headers == (("x-token", "t"),)


def test_observe_defaults_follow_llama_swap():
    o = load("").observe
    assert (o.metrics_max_in_memory, o.capture_buffer_bytes, o.performance_every) == (1000, 5 * 1024 * 1024, 5.0)
    assert not o.telemetry.enabled and not o.performance_disabled


@pytest.mark.parametrize(
    "text, key",
    [
        ("performance: {every: 2s}", "performance.every"),
        ("performance: {every: soon}", "performance.every"),
        ("captureBuffer: -1", "captureBuffer"),
        ("store: /x.sqlite", "store"),
        ("telemetry: {endpoint: localhost:4318}", "telemetry.endpoint"),
        ("telemetry: {sampleRatio: 2}", "telemetry.sampleRatio"),
    ],
)
def test_observe_key_errors_name_the_key(text, key):
    with pytest.raises(ConfigError) as err:
        load(text + "\n")
    assert f"key '{key}'" in str(err.value)


def test_keys_implemented_elsewhere_are_silent():
    cfg = load(
        """
        hooks: {on_startup: {preload: [m]}}
        apiKeys: [sk-1]
        peers: {p: {proxy: "http://x", models: [a]}}
        sendLoadingState: true
        includeAliasesInList: true
        logToStdout: both
        logTimeFormat: rfc3339
        upstream: {ignorePaths: ['.*\\.js$']}
        routing: {scheduler: {use: fifo}}
        groups: {}
        models:
          m:
            cmd: s --port ${PORT}
            filters: {stripParams: "top_k", setParams: {temperature: 0.1}}
            timeouts: {connect: 5}
            compat: {ignoreWebsockets: true}
            capabilities: {in: [text], out: [text], tools: true, context: 4096}
            sendLoadingState: false
        """
    )
    assert cfg.warnings == ()
    assert cfg.raw["hooks"] == {"on_startup": {"preload": ["m"]}}


def test_every_schema_key_is_known():
    top = ["apiKeys", "captureBuffer", "globalTTL", "groups", "healthCheckTimeout", "hooks",
           "includeAliasesInList", "logLevel", "logTimeFormat", "logToStdout", "macros", "matrix",
           "metricsMaxInMemory", "models", "peers", "performance", "profiles", "routing", "selectors",
           "sendLoadingState", "startPort", "store", "ui", "unloadTimeout", "upstream"]
    per_model = ["aliases", "capabilities", "checkEndpoint", "cmd", "cmdStop", "compat", "concurrencyLimit",
                 "description", "env", "filters", "macros", "metadata", "name", "proxy", "sendLoadingState",
                 "timeouts", "ttl", "unlisted", "unloadTimeout", "useModelName"]
    values = {key: "null" for key in top}
    values["models"] = "{m: {" + ", ".join(
        f"{k}: " + ("'s --port ${PORT}'" if k == "cmd" else "null") for k in per_model
    ) + "}}"
    cfg = load("\n".join(f"{k}: {v}" for k, v in values.items()) + "\n")
    assert not [w for w in cfg.warnings if "unknown key" in w]


# ------------------------------------------------------------- fingerprint


def _fp(text: str) -> dict[str, str]:
    return {mid: m.fingerprint for mid, m in load(text).models.items()}


def test_fingerprint_is_stable_and_tracks_effective_changes():
    base = "models:\n  a: {cmd: 'srv --port ${PORT}'}\n  b: {cmd: 'other', proxy: 'http://h:1'}\n"
    first, again = _fp(base), _fp(base)
    assert first == again and len(first["a"]) == 64 and first["a"] != first["b"]

    changed_cmd = _fp(base.replace("other", "other --flag"))
    assert changed_cmd["a"] == first["a"] and changed_cmd["b"] != first["b"]

    # a new start port changes the allocated port and so model a's command
    moved = _fp("startPort: 7000\n" + base)
    assert moved["a"] != first["a"] and moved["b"] == first["b"]

    # the same effective value reached through a macro gives the same fingerprint
    via_macro = _fp("macros:\n  BIN: other\n" + base.replace("cmd: 'other'", "cmd: '${BIN}'"))
    assert via_macro["b"] == first["b"]


# ----------------------------------------------------------------- fixture


def _fixture() -> str:
    """The fixture's path; skips the test when ../shared/ is not beside the repository."""
    if not FIXTURE.is_file():
        pytest.skip(f"shared fixture not present: {FIXTURE}")
    return str(FIXTURE)


def _fixture_text() -> str:
    with open(_fixture(), encoding="utf-8") as handle:
        return handle.read()


def _fixture_llama_swap_would_run(text: str) -> str:
    """Patch the spots where the example names things llama-swap itself would reject."""
    text = text.replace(
        "    unlisted: true\n    cmd: some-upstream-server\n",
        "    unlisted: true\n    cmd: some-upstream-server\n    proxy: http://127.0.0.1:9000\n",
    )
    text = re.sub(r'(\n {10}members:\n)(?: {12}- "[^"]+"\n)+', r'\1            - "__MEMBER__"\n', text)
    for member in ("gpt-oss-120b", "docker-llama", "unlisted-model"):
        text = text.replace('"__MEMBER__"', f'"{member}"', 1)
    text = re.sub(r"(\n {8}priority:\n)(?: {10}\w+: \d+\n)+", r"\1          gpt-oss-120b: 10\n", text)
    # selector targets and a profile pin naming models the example never defines
    text = text.replace('      - "qwen-unlisted"\n', '      - "unlisted-model"\n')
    text = text.replace('"llm-plan": "qwen-unlisted"', '"llm-plan": "unlisted-model"')
    text = text.replace('      - "modelA"\n      - "modelB"\n', '      - "llama-swap-peer/model_a"\n')
    return text


def test_fixture_env_references():
    live_lines = [line for line in _fixture_text().splitlines() if not line.lstrip().startswith("#")]
    refs = set(re.findall(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}", "\n".join(live_lines)))
    assert refs == {"HOME", "API_KEY_1", "API_KEY_2", "OPENROUTER_API_KEY"}
    with pytest.raises(ConfigError) as info:
        load_config(_fixture(), environ={})
    assert "HOME" in info.value.message and "not set" in info.value.message


def test_fixture_as_shipped_loads_with_warnings():
    # llama-swap's own example has illustrative group members and priorities
    # and an unlisted model with no port; swapd loads it and says what it ignored
    cfg = load_config(_fixture(), environ=FIXTURE_ENV)
    assert sorted(cfg.models) == ["docker-llama", "gpt-oss-120b", "unlisted-model"]
    text = "\n".join(cfg.warnings)
    assert "model 'unlisted-model': key 'proxy'" in text
    assert "'modelA' is not a defined model" in text
    assert "unknown model 'A'" in text


def test_fixture_loads_and_lists_its_models(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(_fixture_llama_swap_would_run(_fixture_text()), encoding="utf-8")
    cfg = load_config(str(path), environ=FIXTURE_ENV)

    assert sorted(cfg.models) == ["docker-llama", "gpt-oss-120b", "unlisted-model"]
    assert cfg.health_check_timeout == 500 and cfg.start_port == 10001

    gpt = cfg.models["gpt-oss-120b"]
    assert gpt.port == 10002  # docker-llama sorts first and takes 10001
    assert gpt.cmd == (
        "/path/to/llama-server/llama-server-ec9e0301", "--port", "10002",
        "--model", "path/to/gpt-oss-120B.gguf", "--ctx-size", "16384", "--temperature", "0.7",
    )
    assert gpt.proxy == "http://127.0.0.1:8999"
    assert gpt.aliases == ("gpt-4o-mini", "gpt-oss-120b:high", "gpt-oss-120b:low")
    assert gpt.env == (("CUDA_VISIBLE_DEVICES", "0,1,2"),)
    assert (gpt.ttl, gpt.unload_timeout, gpt.check_endpoint) == (60, 10, "/custom-endpoint")
    assert gpt.metadata["port"] == 10002 and gpt.metadata["temperature"] == 0.7
    assert gpt.metadata["an_obj"]["c"] == [0.7, False, "model: gpt-oss-120b"]

    docker = cfg.models["docker-llama"]
    assert docker.port == 10001 and docker.proxy == "http://127.0.0.1:10001"
    assert docker.cmd_stop == ("docker", "stop", "docker-llama")
    assert cfg.models["unlisted-model"].unlisted is True and cfg.models["unlisted-model"].port is None

    assert cfg.resolve("gpt-4o-mini") is gpt
    assert cfg.group_of("docker-llama").swap is False
    assert cfg.raw["apiKeys"][2:] == ["sk-one", "sk-two"]
    assert cfg.raw["macros"]["models_dir"] == "/home/tester/models"
    assert cfg.raw["peers"]["openrouter"]["apiKey"] == "sk-or-secret"
    assert not [w for w in cfg.warnings if "unknown key" in w]
    assert sorted(w.split("'")[1] for w in cfg.warnings) == sorted(
        ["hooks.on_startup.preload"]  # it preloads 'llama', a selector: preload takes models
    )
    assert cfg.preload == ()
    assert cfg.peers["openrouter"].api_key == "sk-or-secret"
    assert cfg.peers["openrouter"].filters.strip_params == ("temperature", "top_p")
    assert cfg.resolve_peer("openrouter/z-ai/glm-4.7") == (cfg.peers["openrouter"], "z-ai/glm-4.7")
    gpt = cfg.models["gpt-oss-120b"]
    assert gpt.filters.set_params == {"temperature": 0.7, "top_p": 0.9}
    assert gpt.filters.set_params_by_id["gpt-oss-120b:high"] == {"chat_template_kwargs": {"reasoning_effort": "high"}}
    assert (gpt.timeouts.connect, gpt.timeouts.response_header) == (30.0, 60.0)



# ------------------------------------------------------- vramCheck (swapd.gpu)


def test_vram_check_defaults_to_warn_with_ten_seconds():
    cfg = load("models: {m: {cmd: 'srv --port ${PORT}'}}")
    assert (cfg.vram_check, cfg.vram_check_timeout) == ("warn", 10.0)
    assert not cfg.warnings


@pytest.mark.parametrize(
    "text, mode, timeout",
    [
        ("vramCheck: strict\nvramCheckTimeout: 2.5\n", "strict", 2.5),
        ("vramCheck: 'off'\nvramCheckTimeout: 30\n", "off", 30.0),
        ("vramCheck: off\n", "off", 10.0),  # a plain string in swapd's YAML
        ("vramCheck: false\n", "off", 10.0),
        ("vramCheck: ' Warn '\n", "warn", 10.0),
    ],
)
def test_vram_check_values_are_parsed(text, mode, timeout):
    cfg = load(text)
    assert (cfg.vram_check, cfg.vram_check_timeout) == (mode, timeout)
    assert not [w for w in cfg.warnings if "vramCheck" in w], cfg.warnings


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("vramCheck: maybe\n", "vramCheck", "must be one of: off, warn, strict; got 'maybe'"),
        ("vramCheck: true\n", "vramCheck", "must be one of"),
        ("vramCheck: [strict]\n", "vramCheck", "got a list"),
        ("vramCheckTimeout: 0\n", "vramCheckTimeout", "must be > 0"),
        ("vramCheckTimeout: -3\n", "vramCheckTimeout", "must be > 0"),
        ("vramCheckTimeout: 5000\n", "vramCheckTimeout", "<= 3600"),
        ("vramCheckTimeout: soon\n", "vramCheckTimeout", "expected a number of seconds, got 'soon'"),
        ("vramCheckTimeout: true\n", "vramCheckTimeout", "expected a number of seconds"),
    ],
)
def test_vram_check_errors_name_the_key(text, key, fragment):
    err = load_error(text)
    assert err.key == key and err.model is None
    assert fragment in str(err)
    assert str(err).startswith(f"config.yaml: key '{key}': ")


def test_warnings_from_late_blocks_are_kept():
    """Unknown keys under blocks read last (performance, ollama) still warn (their warnings were once lost)."""
    cfg = load_config_text(
        "performance:\n  evry: 5s\nollama:\n  lisen: 1\nmodels:\n  m:\n    cmd: srv --port ${PORT}\n", "config.yaml"
    )
    assert any("evry" in w for w in cfg.warnings) and any("lisen" in w for w in cfg.warnings)
