"""--config-dir: llama-swap's merge of *.yml/*.yaml files, in the loader and end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap

import pytest
import yaml

from helpers import PY, ROOT, fake_cmd, free_port, free_port_range, wait_until
from swapd.config import ConfigError, config_sources, load_config_sources


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def model_yaml(model_id: str, cmd: str = "srv --port ${PORT}") -> str:
    return f"models:\n  {model_id}:\n    cmd: {cmd}\n"


def load_error(config, config_dir) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config_sources(config and str(config), config_dir and str(config_dir), environ={})
    return info.value


# -- merge rules -------------------------------------------------------------------


def test_dir_files_merge_in_name_order(tmp_path):
    d = tmp_path / "conf.d"
    # written out of order: the merge follows the sorted names, not creation order
    write(d / "b.yml", model_yaml("beta") + "apiKeys: [key-b]\nmacros:\n  HIGH: 2\n")
    write(d / "a.yaml", model_yaml("alpha", "srv --level ${HIGH} --port ${PORT}") + "apiKeys: [key-a]\nmacros:\n  LOW: 1\n")
    write(d / "notes.txt", "this: [is not yaml\n")
    write(d / "c.yaml.bak", model_yaml("ignored"))
    write(d / "sub" / "d.yaml", model_yaml("nested"))  # subdirectories are not read
    cfg = load_config_sources(None, str(d), environ={})
    assert sorted(cfg.models) == ["alpha", "beta"]
    assert cfg.api_keys == ("key-a", "key-b"), "lists concatenate in file order"
    # macros (a mapping) merge, so a macro from one file serves a model in another
    assert cfg.models["alpha"].cmd[:3] == ("srv", "--level", "2")
    assert config_sources(None, str(d)) == [str(d / "a.yaml"), str(d / "b.yml")]


def test_config_file_comes_first_and_the_dir_adds_to_it(tmp_path):
    main = write(tmp_path / "main.yaml", model_yaml("base") + "apiKeys: [key-main]\nglobalTTL: 60\n")
    d = tmp_path / "conf.d"
    write(d / "extra.yaml", model_yaml("ext") + "apiKeys: [key-ext]\nglobalTTL: 60\n")  # same value: fine
    cfg = load_config_sources(str(main), str(d), environ={})
    assert sorted(cfg.models) == ["base", "ext"]
    assert cfg.api_keys == ("key-main", "key-ext")
    assert cfg.global_ttl == 60
    # an empty directory adds nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sorted(load_config_sources(str(main), str(empty), environ={}).models) == ["base"]


def test_nested_mappings_merge_and_null_yields(tmp_path):
    d = tmp_path / "d"
    write(
        d / "1.yaml",
        model_yaml("m1")
        + "hooks:\n  on_startup:\n    preload: [m1]\ngroups:\n  g1:\n    swap: false\n    members: [m1]\nlogLevel:\n",
    )
    write(d / "2.yaml", model_yaml("m2") + "hooks:\n  on_startup:\n    preload: [m2]\nlogLevel: debug\n")
    cfg = load_config_sources(None, str(d), environ={})
    assert cfg.preload == ("m1", "m2")
    assert cfg.log_level == "debug"
    assert cfg.groups["g1"].members == ("m1",)


def test_conflicting_scalar_names_both_files_and_the_key(tmp_path):
    d = tmp_path / "d"
    a = write(d / "a.yaml", model_yaml("m1") + "globalTTL: 100\n")
    b = write(d / "b.yaml", model_yaml("m2") + "globalTTL: 200\n")
    err = load_error(None, d)
    text = str(err)
    assert "\n" not in text
    assert err.file == str(b) and err.key == "globalTTL"
    assert str(a) in text and "200" in text and "100" in text
    # a nested scalar names its full key
    write(d / "b.yaml", model_yaml("m2") + "hooks:\n  on_startup:\n    preload: x\n")
    write(d / "a.yaml", model_yaml("m1") + "hooks:\n  on_startup:\n    preload: [m1]\n")
    err = load_error(None, d)
    assert err.key == "hooks.on_startup.preload" and "a list" in str(err) and str(a) in str(err)


@pytest.mark.parametrize(
    "section, body, what",
    [
        ("models", "  same:\n    cmd: srv --port ${PORT}\n", "model 'same'"),
        ("groups", "  same:\n    members: []\n", "group 'same'"),
        ("peers", "  same:\n    proxy: http://h:1\n    models: [x]\n", "peer 'same'"),
    ],
)
def test_one_entity_in_two_files_is_an_error(tmp_path, section, body, what):
    d = tmp_path / "d"
    first = write(d / "10-first.yaml", f"{section}:\n{body}")
    second = write(d / "20-second.yaml", f"{section}:\n{body}")  # identical contents still conflict
    text = str(load_error(None, d))
    assert text.startswith(str(second)), text
    assert f"duplicate {what.split()[0]}" in text and what.split()[1] in text and str(first) in text


def test_the_config_file_may_not_also_be_in_the_dir(tmp_path):
    d = tmp_path / "d"
    inside = write(d / "main.yaml", model_yaml("m1"))
    assert "also in --config-dir" in str(load_error(inside, d))


def test_empty_or_missing_dir_without_a_config_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no configuration sources found" in str(load_error(None, empty))
    assert "cannot read config directory" in str(load_error(None, tmp_path / "missing"))


def test_errors_after_the_merge_point_at_the_file_that_caused_them(tmp_path):
    d = tmp_path / "d"
    write(d / "a.yaml", model_yaml("m1"))
    bad = write(d / "b.yaml", model_yaml("m2") + "    ttl: soon\n")
    err = load_error(None, d)
    assert (err.file, err.model, err.key) == (str(bad), "m2", "ttl")
    # a problem found while parsing one file names that file
    write(d / "b.yaml", "models:\n  m2:\n    cmd: srv ${env.NOT_SET_ANYWHERE}\n")
    err = load_error(None, d)
    assert err.file == str(bad) and "NOT_SET_ANYWHERE" in str(err)


# -- the flag, end to end -------------------------------------------------------------


def _dir_file(path, models: dict, tag: str, **top):
    doc = {**top, "models": {}}
    for model_id, opts in models.items():
        doc["models"][model_id] = {"cmd": fake_cmd(*opts), "env": [f"SWAPD_TEST_TAG={tag}"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))




def test_config_dir_flag_serves_merged_models_and_reloads_on_change(swapd, tmp_path):
    import uuid

    tag = uuid.uuid4().hex
    d = tmp_path / "conf.d"
    _dir_file(d / "00-global.yaml", {}, tag, startPort=free_port_range(), healthCheckTimeout=15)
    _dir_file(d / "10-a.yaml", {"a": ()}, tag)
    _dir_file(d / "20-b.yml", {"b": ("--chunks", "2")}, tag)
    s = swapd({}, tag=tag, config_flag=False, extra_args=("-config-dir", str(d), "--watch-config"))
    assert [m["id"] for m in s.get("/v1/models").json()["data"]] == ["a", "b"]
    assert s.chat("a").status == 200
    assert s.chat("b").json()["choices"][0]["message"]["content"].count("tok") == 2
    # a new file in the directory is picked up by --watch-config
    _dir_file(d / "30-c.yaml", {"c": ()}, tag)
    reloaded = wait_until(
        lambda: [e for e in s.log_events() if e["event"] == "config.reloaded"], timeout=15, message="reload"
    )
    assert reloaded[0]["added"] == ["c"]
    assert s.chat("c").status == 200
    # a conflicting edit is refused and the running config stays
    _dir_file(d / "40-bad.yaml", {}, tag, startPort=1)
    failed = wait_until(
        lambda: [e for e in s.log_events() if e["event"] == "config.reload_failed"], timeout=15, message="failed reload"
    )
    assert "40-bad.yaml" in failed[0]["error"] and "00-global.yaml" in failed[0]["error"] and "startPort" in failed[0]["error"]
    assert s.chat("c").status == 200
    # SIGHUP reloads the directory too
    (d / "40-bad.yaml").unlink()
    (d / "30-c.yaml").unlink()
    s.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: any(e.get("removed") == ["c"] for e in s.log_events() if e["event"] == "config.reloaded"),
        timeout=15,
        message="reload removing c",
    )
    assert s.chat("c").status == 404


def test_config_and_config_dir_together(swapd, tmp_path):
    s_models = {"main": {"cmd": fake_cmd()}}
    d = tmp_path / "more"
    import uuid

    tag = uuid.uuid4().hex
    _dir_file(d / "x.yaml", {"extra": ()}, tag)
    s = swapd(s_models, tag=tag, extra_args=("--config-dir", str(d)))
    assert [m["id"] for m in s.get("/v1/models").json()["data"]] == ["extra", "main"]
    assert s.chat("extra").status == 200 and s.chat("main").status == 200


def test_conflicting_dir_exits_with_one_line_naming_both_files(tmp_path):
    d = tmp_path / "d"
    write(d / "a.yaml", model_yaml("m1") + "globalTTL: 1\n")
    write(d / "b.yaml", model_yaml("m2") + "globalTTL: 2\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [PY, "-m", "swapd", "--config-dir", str(d), "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30, env=env, cwd=ROOT,
    )
    assert out.returncode == 2
    line = out.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "a.yaml" in line and "b.yaml" in line and "globalTTL" in line
