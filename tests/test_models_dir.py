"""modelsDir and --models-dir: a folder of GGUF files served as models (issue 15, part 3).

The first half tests the loader (as test_config.py does); the second runs swapd
as a real process against the fake backend, whose /x/argv shows what a found
model's command line carried.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import textwrap
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import PY, ROOT, fake_cmd, free_port, free_port_range, wait_until, write_config

from swapd.config import Config, ConfigError, load_config_sources, load_config_text

# ------------------------------------------------------------------ helpers


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"GGUF")


def load(text: str, env: dict[str, str] | None = None, **kw) -> Config:
    return load_config_text(textwrap.dedent(text), "config.yaml", env or {}, **kw)


def load_error(text: str, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, **kw)
    return info.value


def folder_config(path: Path, extra: str = "") -> str:
    """``modelsDir`` with ``path``, plus ``extra`` (lines indented by two spaces)."""
    return f"modelsDir:\n  path: {path}\n{extra}"


# ------------------------------------------------------------------ discovery


def test_every_gguf_under_the_folder_becomes_a_model(tmp_path):
    touch(
        tmp_path,
        "qwen2.5-7b-q4.gguf",
        "nested/deeper/phi-3-mini.GGUF",  # any case, any depth
        "nested/notes.txt",
        ".cache/hidden.gguf",  # dot-names are skipped
        ".secret.gguf",
        "partial.gguf.part",
    )
    cfg = load(folder_config(tmp_path))
    assert sorted(cfg.models) == ["phi-3-mini", "qwen2.5-7b-q4"]
    qwen = cfg.models["qwen2.5-7b-q4"]
    # the default cmd: llama-server --port ${PORT} -m ${MODEL_PATH}
    assert qwen.cmd == ("llama-server", "--port", str(qwen.port), "-m", str(tmp_path / "qwen2.5-7b-q4.gguf"))
    assert cfg.models["phi-3-mini"].cmd[-1] == str(tmp_path / "nested" / "deeper" / "phi-3-mini.GGUF")
    assert cfg.models_dir is not None and cfg.models_dir.path == str(tmp_path)
    assert dict(cfg.models_dir.found) == {
        "phi-3-mini": str(tmp_path / "nested" / "deeper" / "phi-3-mini.GGUF"),
        "qwen2.5-7b-q4": str(tmp_path / "qwen2.5-7b-q4.gguf"),
    }
    assert cfg.warnings == ()
    assert cfg.group_of("qwen2.5-7b-q4").id == "(default)"  # the default group: one at a time


def test_split_files_are_one_model_and_an_incomplete_split_is_skipped(tmp_path):
    touch(
        tmp_path,
        "big-00003-of-00003.gguf",
        "big-00001-of-00003.gguf",
        "big-00002-of-00003.gguf",
        "half-00001-of-00002.gguf",  # part 2 still downloading
    )
    cfg = load(folder_config(tmp_path))
    assert sorted(cfg.models) == ["big"]
    assert cfg.models["big"].cmd[-1] == str(tmp_path / "big-00001-of-00003.gguf")
    (warning,) = cfg.warnings
    assert "half-00001-of-00002.gguf" in warning and "1 of its 2 parts" in warning and "modelsDir.path" in warning


def test_mmproj_files_are_never_models_and_go_to_the_model_they_name(tmp_path):
    # ggml-org / bartowski style: the projector names its model
    touch(
        tmp_path / "named",
        "gemma-3-4b-it-Q4_K_M.gguf",
        "gemma-3-4b-it-Q8_0.gguf",
        "mmproj-gemma-3-4b-it-f16.gguf",
        "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf",
        "Qwen2.5-VL-7B-Instruct-mmproj-bf16.gguf",  # the word may come last
        "llama-3-8b-Q4_K_M.gguf",  # named by no projector: gets none
    )
    # unsloth style: one projector that names no model goes to every model of its folder
    touch(tmp_path / "unsloth", "Mistral-Small-Q4_K_M.gguf", "Mistral-Small-Q6_K.gguf", "mmproj-F16.gguf")
    # two projectors that name no model: ambiguous, so none (and a warning)
    touch(tmp_path / "ambiguous", "llava-7b-Q4.gguf", "mmproj-F16.gguf", "mmproj-F32.gguf")
    cfg = load(folder_config(tmp_path))
    assert sorted(cfg.models) == [
        "Mistral-Small-Q4_K_M",
        "Mistral-Small-Q6_K",
        "Qwen2.5-VL-7B-Instruct-Q4_K_M",
        "gemma-3-4b-it-Q4_K_M",
        "gemma-3-4b-it-Q8_0",
        "llama-3-8b-Q4_K_M",
        "llava-7b-Q4",
    ]

    def mmproj(model_id):
        cmd = cfg.models[model_id].cmd
        return cmd[cmd.index("--mmproj") + 1] if "--mmproj" in cmd else None

    named = tmp_path / "named"
    assert (
        mmproj("gemma-3-4b-it-Q4_K_M") == mmproj("gemma-3-4b-it-Q8_0") == str(named / "mmproj-gemma-3-4b-it-f16.gguf")
    )
    assert mmproj("Qwen2.5-VL-7B-Instruct-Q4_K_M") == str(named / "Qwen2.5-VL-7B-Instruct-mmproj-bf16.gguf")
    assert mmproj("llama-3-8b-Q4_K_M") is None
    assert (
        mmproj("Mistral-Small-Q4_K_M") == mmproj("Mistral-Small-Q6_K") == str(tmp_path / "unsloth" / "mmproj-F16.gguf")
    )
    assert mmproj("llava-7b-Q4") is None
    (warning,) = cfg.warnings
    assert "2 mmproj files" in warning and "'llava-7b-Q4'" in warning and str(tmp_path / "ambiguous") in warning
    # --mmproj goes last, after everything the cmd says
    assert cfg.models["gemma-3-4b-it-Q4_K_M"].cmd[-2] == "--mmproj"


def test_a_cmd_that_chooses_its_own_projector_gets_none_added(tmp_path):
    touch(tmp_path, "vis.gguf", "mmproj-F16.gguf")
    cfg = load(folder_config(tmp_path, "  cmd: srv --port ${PORT} -m ${MODEL_PATH} --no-mmproj\n"))
    assert "--mmproj" not in cfg.models["vis"].cmd


def test_ids_swapd_refuses_and_ids_found_twice_are_skipped_with_warnings(tmp_path):
    touch(tmp_path, "a/dup.gguf", "b/dup.gguf", "with space.gguf", "100%.gguf", "ok_名前.gguf")
    cfg = load(folder_config(tmp_path))
    assert sorted(cfg.models) == ["dup", "ok_名前"]
    assert cfg.models["dup"].cmd[-1] == str(tmp_path / "a" / "dup.gguf")
    text = "\n".join(cfg.warnings)
    assert len(cfg.warnings) == 3, text
    assert str(tmp_path / "b" / "dup.gguf") in text and "already found" in text
    assert str(tmp_path / "with space.gguf") in text and str(tmp_path / "100%.gguf") in text


def test_unreadable_subfolders_are_skipped_and_links_followed_once(tmp_path, monkeypatch):
    touch(tmp_path, "ok.gguf", "locked/secret.gguf", "real/linked.gguf")
    (tmp_path / "loop").symlink_to(tmp_path)  # a link back up: read once
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    locked = str(tmp_path / "locked")
    real_scandir = os.scandir

    def scandir(path):  # chmod 0 does not stop root, so refuse the way the kernel would
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr("swapd.config._models_dir.os.scandir", scandir)
    cfg = load(folder_config(tmp_path))
    assert sorted(cfg.models) == ["linked", "ok"]
    (warning,) = cfg.warnings
    assert "cannot read folder" in warning and str(tmp_path / "locked") in warning


# ------------------------------------------------------------------ macros and settings


def test_macros_expand_in_the_modelsdir_cmd(tmp_path):
    touch(tmp_path / "my models", "m1.gguf")
    cfg = load(
        """
        macros:
          server: srv --threads 4
          root: "%s"
        modelsDir:
          path: ${root}
          cmd: |
            # comment lines go, as in a model's cmd
            ${server} --port ${PORT} --alias ${MODEL_ID}
              -m ${MODEL_PATH}
          env: ["WHERE=${MODEL_PATH}", "ID=${MODEL_ID}"]
          checkEndpoint: /ready
        """
        % (tmp_path / "my models")
    )
    m = cfg.models["m1"]
    path = str(tmp_path / "my models" / "m1.gguf")
    # ${MODEL_PATH} is shell-quoted where it needs it, so it stays one argument
    assert m.cmd == ("srv", "--threads", "4", "--port", "5800", "--alias", "m1", "-m", path)
    assert m.env == (("WHERE", shlex.quote(path)), ("ID", "m1"))
    assert m.check_endpoint == "/ready"
    assert m.proxy == "http://localhost:5800"


def test_modelsdir_settings_apply_to_every_found_model(tmp_path):
    touch(tmp_path, "a.gguf", "b.gguf")
    cfg = load(
        "globalTTL: 60\n"
        + folder_config(tmp_path, "  ttl: 300\n  unloadTimeout: 7\n  concurrencyLimit: 2\n  aliases: [nope]\n")
    )
    for model_id in ("a", "b"):
        m = cfg.models[model_id]
        assert (m.ttl, m.unload_timeout, m.concurrency_limit, m.aliases) == (300, 7, 2, ())
    assert any("modelsDir" in w and "'aliases'" in w for w in cfg.warnings), cfg.warnings
    # without ttl the global one applies, as for any model
    assert load(folder_config(tmp_path) + "globalTTL: 60\n").models["a"].ttl == 60


def test_models_entries_win_over_found_files_and_aliases_are_kept(tmp_path):
    touch(tmp_path, "a.gguf", "b.gguf", "c.gguf")
    cfg = load(
        folder_config(tmp_path)
        + textwrap.dedent(
            """
        models:
          a:
            cmd: mine --port ${PORT} -m /elsewhere/a.gguf
          x:
            cmd: other --port ${PORT}
            aliases: [b]
        """
        )
    )
    assert sorted(cfg.models) == ["a", "c", "x"]
    assert cfg.models["a"].cmd[0] == "mine"
    assert cfg.resolve("b").id == "x"
    assert dict(cfg.models_dir.found) == {"c": str(tmp_path / "c.gguf")}
    (warning,) = cfg.warnings
    assert "'b' is an alias of model 'x'" in warning and str(tmp_path / "b.gguf") in warning
    # models: ports come first, in id order, as without modelsDir
    assert (cfg.models["a"].port, cfg.models["x"].port, cfg.models["c"].port) == (5800, 5801, 5802)


def test_found_models_keep_their_ports_across_a_reload(tmp_path):
    touch(tmp_path, "m.gguf", "z.gguf")
    text = folder_config(tmp_path) + "models:\n  cfg:\n    cmd: srv --port ${PORT}\n"
    first = load(text)
    ports = {m: first.models[m].port for m in first.models}
    touch(tmp_path, "a.gguf")  # sorts before m and z
    again = load(text, previous=first)
    assert {m: again.models[m].port for m in ports} == ports
    assert again.models["m"].fingerprint == first.models["m"].fingerprint  # so a reload leaves it running
    assert again.models["a"].port not in ports.values()
    # without the previous config, ports follow id order again
    assert load(text).models["a"].port == 5801


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("make", ["missing", "file"])
def test_a_missing_folder_or_a_file_is_an_error_naming_the_key(tmp_path, make):
    target = tmp_path / "models"
    if make == "file":
        target.write_text("not a folder")
    err = load_error(folder_config(target))
    assert (err.file, err.model, err.key) == ("config.yaml", None, "modelsDir.path")
    assert str(target) in str(err)
    assert ("does not exist" if make == "missing" else "is not a folder") in str(err)


@pytest.mark.parametrize(
    "extra, key, words",
    [
        ("  cmd: srv --port ${PORT} ${nope}\n", "modelsDir.cmd", "unknown macro ${nope}"),
        ("  env: ['X=${nope}']\n", "modelsDir.env[0]", "unknown macro ${nope}"),
        ("  ttl: soon\n", "modelsDir.ttl", "expected an integer number of seconds"),
        ("  env: [JUSTNAME]\n", "modelsDir.env[0]", "expected NAME=VALUE"),
        ("  cmd: 'srv \"unclosed'\n", "modelsDir.cmd", "unterminated double quote"),
    ],
)
def test_errors_in_modelsdir_settings_name_the_key(tmp_path, extra, key, words):
    touch(tmp_path, "m1.gguf")
    err = load_error(folder_config(tmp_path, extra))
    assert err.file == "config.yaml" and err.key == key and words in str(err), str(err)
    # while the folder is empty too: the model part is then left out
    (tmp_path / "m1.gguf").unlink()
    err = load_error(folder_config(tmp_path, extra))
    assert err.key == key and err.model is None and words in str(err), str(err)


def test_an_unknown_macro_names_the_found_model(tmp_path):
    touch(tmp_path, "m1.gguf")
    err = load_error(folder_config(tmp_path, "  cmd: srv --port ${PORT} ${nope}\n"))
    assert str(err) == "config.yaml: model 'm1': key 'modelsDir.cmd': unknown macro ${nope}"


def test_model_path_outside_modelsdir_and_a_missing_path_are_errors(tmp_path):
    err = load_error("models:\n  m:\n    cmd: srv --port ${PORT} -m ${MODEL_PATH}\n")
    assert err.model == "m" and err.key == "cmd" and "only set for the models modelsDir finds" in str(err)
    err = load_error("modelsDir:\n  cmd: srv\n")
    assert err.key == "modelsDir.path" and "is required" in str(err)
    err = load_error("modelsDir: /models\n")
    assert err.key == "modelsDir" and "expected a mapping" in str(err)


# ------------------------------------------------------------------ --models-dir


def test_the_flag_alone_needs_no_config_file(tmp_path):
    touch(tmp_path, "solo.gguf")
    cfg = load_config_sources(None, None, environ={}, models_dir=str(tmp_path))
    assert list(cfg.models) == ["solo"]
    assert cfg.path == f"--models-dir {tmp_path}"
    with pytest.raises(ConfigError) as info:
        load_config_sources(None, None, environ={}, models_dir=str(tmp_path / "nope"))
    assert str(info.value) == (
        f"--models-dir {tmp_path / 'nope'}: key 'modelsDir.path': "
        f"folder {tmp_path / 'nope'} does not exist (given with --models-dir)"
    )


def test_the_flag_sets_the_path_of_the_configs_modelsdir(tmp_path):
    touch(tmp_path / "one", "from-config.gguf")
    touch(tmp_path / "two", "from-flag.gguf")
    config = tmp_path / "config.yaml"
    config.write_text(folder_config(tmp_path / "one", "  ttl: 42\n"))
    assert list(load_config_sources(str(config), environ={}).models) == ["from-config"]
    cfg = load_config_sources(str(config), environ={}, models_dir=str(tmp_path / "two"))
    assert list(cfg.models) == ["from-flag"] and cfg.models["from-flag"].ttl == 42
    # a config without modelsDir gains one
    config.write_text("models: {}\n")
    assert list(load_config_sources(str(config), environ={}, models_dir=str(tmp_path / "two")).models) == ["from-flag"]


def test_config_dir_errors_name_the_file_that_holds_modelsdir(tmp_path):
    d = tmp_path / "conf.d"
    d.mkdir()
    (d / "a.yaml").write_text("models:\n  m:\n    cmd: srv --port ${PORT}\n")
    (d / "b.yaml").write_text(folder_config(tmp_path / "missing"))
    with pytest.raises(ConfigError) as info:
        load_config_sources(None, str(d), environ={})
    assert info.value.file == str(d / "b.yaml") and info.value.key == "modelsDir.path"
    touch(tmp_path / "models", "f.gguf")
    (d / "b.yaml").write_text(folder_config(tmp_path / "models", "  cmd: srv --port ${PORT} ${nope}\n"))
    with pytest.raises(ConfigError) as info:
        load_config_sources(None, str(d), environ={})
    assert (info.value.file, info.value.model, info.value.key) == (str(d / "b.yaml"), "f", "modelsDir.cmd")


# ------------------------------------------------------------------ end to end


def echo_cmd() -> str:
    """A modelsDir cmd that runs the fake backend, whose /x/argv shows what it was given."""
    return "${swapd.python} -m swapd.fake_backend --port ${PORT} --quiet --model-id ${MODEL_ID} -m ${MODEL_PATH}"


def models_dir(path: Path, tag: str, **keys) -> dict:
    return {"path": str(path), "cmd": echo_cmd(), "env": [f"SWAPD_TEST_TAG={tag}"], **keys}


def backend_argv(s, model_id: str) -> list[str]:
    port = s.running()[model_id]["proxy"].rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/x/argv", timeout=10) as resp:
        return json.loads(resp.read())["argv"]


def listed(s) -> list[str]:
    return sorted(m["id"] for m in s.get("/v1/models").json()["data"])


def reloaded(s) -> list[dict]:
    return [e for e in s.log_events() if e.get("event") == "config.reloaded"]


def gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_found_models_are_listed_served_and_get_their_path_and_projector(swapd, tmp_path):
    folder = tmp_path / "models"
    touch(folder, "alpha.gguf", "vision/see-Q4.gguf", "vision/mmproj-see-f16.gguf", "big-00001-of-00002.gguf")
    touch(folder, "big-00002-of-00002.gguf", "mine.gguf")
    tag = "md-" + os.urandom(4).hex()
    s = swapd(
        {"mine": {"cmd": fake_cmd("--model-id", "configured")}},
        tag=tag,
        modelsDir=models_dir(folder, tag, ttl=300),
    )
    assert listed(s) == ["alpha", "big", "mine", "see-Q4"]

    reply = s.chat("see-Q4")
    assert reply.status == 200, reply.body
    argv = backend_argv(s, "see-Q4")
    assert argv[argv.index("--model-id") + 1] == "see-Q4"
    assert argv[argv.index("-m") + 1] == str(folder / "vision" / "see-Q4.gguf")
    assert argv[argv.index("--mmproj") + 1] == str(folder / "vision" / "mmproj-see-f16.gguf")
    assert s.running()["see-Q4"]["ttl"] == 300

    assert s.chat("big").status == 200
    argv = backend_argv(s, "big")
    assert argv[argv.index("-m") + 1] == str(folder / "big-00001-of-00002.gguf") and "--mmproj" not in argv

    # models: wins over the file of the same name
    assert s.chat("mine").status == 200
    argv = backend_argv(s, "mine")
    assert argv[argv.index("--model-id") + 1] == "configured" and "-m" not in argv
    started = [e for e in s.log_events() if e.get("event") == "config.models_dir"]
    assert started and started[0]["models"] == ["alpha", "big", "see-Q4"]


def test_the_flag_alone_serves_the_folder_with_the_default_cmd(swapd, tmp_path):
    # the default cmd runs `llama-server`: here a stand-in that starts the fake backend
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    server = bin_dir / "llama-server"
    server.write_text(f'#!/bin/sh\nexec {shlex.quote(PY)} -m swapd.fake_backend --quiet "$@"\n')
    server.chmod(0o755)
    folder = tmp_path / "ggufs"
    touch(folder, "tiny.gguf")
    tag = "md-" + os.urandom(4).hex()
    s = swapd(
        {},
        tag=tag,
        config_flag=False,
        extra_args=("--models-dir", str(folder)),
        # backends inherit swapd's environment: the tag finds any leak
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SWAPD_TEST_TAG": tag},
    )
    assert listed(s) == ["tiny"]
    assert s.chat("tiny").status == 200
    argv = backend_argv(s, "tiny")
    assert argv[argv.index("-m") + 1] == str(folder / "tiny.gguf")
    assert "config.no_models" not in s.log_text()


def test_reload_adds_new_files_and_drops_removed_ones(swapd, tmp_path):
    folder = tmp_path / "models"
    touch(folder, "keep.gguf", "leave.gguf")
    tag = "md-" + os.urandom(4).hex()
    s = swapd({}, tag=tag, modelsDir=models_dir(folder, tag))
    assert listed(s) == ["keep", "leave"]
    assert s.chat("leave").status == 200
    pid = s.running()["leave"]["pid"]

    (folder / "leave.gguf").unlink()
    touch(folder, "arrived.gguf")
    s.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: reloaded(s), timeout=10, message="reload")
    changes = reloaded(s)[0]
    assert (changes["added"], changes["changed"], changes["removed"]) == (["arrived"], [], ["leave"])
    assert listed(s) == ["arrived", "keep"]
    wait_until(lambda: gone(pid), timeout=10, message="the removed model to stop")
    assert "leave" not in s.running()
    assert s.chat("leave").status == 404
    assert s.chat("arrived").status == 200


def test_watch_config_sees_the_folder_and_leaves_running_models_alone(swapd, tmp_path):
    folder = tmp_path / "models"
    touch(folder, "m.gguf")
    tag = "md-" + os.urandom(4).hex()
    s = swapd({}, tag=tag, modelsDir=models_dir(folder, tag), extra_args=("--watch-config",))
    assert s.chat("m").status == 200
    pid = s.running()["m"]["pid"]
    touch(folder, "a-first.gguf")  # sorts before m: with ports in id order, m's would move
    wait_until(lambda: reloaded(s), timeout=10, message="a reload from the folder")
    changes = reloaded(s)[0]
    assert (changes["added"], changes["changed"], changes["removed"]) == (["a-first"], [], [])
    assert s.running()["m"]["pid"] == pid, "a model whose file is unchanged keeps running"
    assert s.chat("m").status == 200 and s.running()["m"]["pid"] == pid


def _run_swapd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [PY, "-m", "swapd", "--listen", f"127.0.0.1:{free_port()}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=cwd,
    )


def test_a_missing_folder_stops_swapd_with_a_config_error(tmp_path):
    config = write_config(tmp_path / "config.yaml", {}, "unused", modelsDir={"path": str(tmp_path / "absent")})
    r = _run_swapd("--config", str(config), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        f"swapd: config error: {config}: key 'modelsDir.path': folder {tmp_path / 'absent'} does not exist"
    )
    r = _run_swapd("--models-dir", "absent", cwd=tmp_path)  # relative to the working directory
    assert r.returncode == 2
    assert f"--models-dir absent: key 'modelsDir.path': folder {tmp_path / 'absent'} does not exist" in r.stderr


def test_example_block_in_config_example_loads(tmp_path):
    """The commented modelsDir block of config.example.yaml, uncommented, is a valid config."""
    text = (ROOT / "config.example.yaml").read_text()
    start = text.index("# modelsDir:")
    block = [line[2:] for line in text[start:].splitlines() if line.startswith("# ") or line == "#"]
    doc = yaml.safe_load("\n".join(line for line in block if line.strip()))
    touch(tmp_path, "x.gguf")
    doc["modelsDir"]["path"] = str(tmp_path)
    doc["startPort"] = free_port_range()
    cfg = load(yaml.safe_dump(doc))
    assert list(cfg.models) == ["x"]
