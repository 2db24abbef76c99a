"""The matrix router: DSL, compiler, solver, config loading and the router.

The cases marked "llama-swap" take their inputs and expected outcomes from
llama-swap's own tests (internal/matrix/dsl_test.go, internal/config/
matrix_test.go and config_test.go, internal/router/matrix_test.go), so the
two implementations agree on them."""

from __future__ import annotations

import asyncio
import random
import re
import socket
import textwrap
import time
from types import SimpleNamespace

import pytest

from helpers import fake_cmd
from swapd.backend import Backend, State
from swapd.config import DEFAULT_GROUP_ID, Config, ConfigError, load_config_text
from swapd.logring import LogRing
from swapd.matrix import (
    MAX_DEPTH,
    MatrixError,
    MatrixProgram,
    MatrixRouter,
    _flatten,
    _Query,
    _tokenize,
    compile_matrix,
)
from swapd.router import Decision, RunningModel
from swapd.scheduler import Scheduler


def identity(sets, models, costs=None) -> MatrixProgram:
    """Compile ``sets`` (a dict or pairs) over ``models`` without vars."""
    return compile_matrix(sets, models, evict_costs=costs)


def combinations(program: MatrixProgram, set_name: str, relevant) -> list[list[str]]:
    """The projected combinations of one set, in traversal order, each sorted."""
    (root,) = [root for name, _, root in program._sets if name == set_name]
    query = _Query(program, program._mask(relevant))
    return [list(_flatten(witness)) for _, witness in query.states(root)]


def compile_error(sets, models, **kwargs) -> MatrixError:
    with pytest.raises(MatrixError) as info:
        compile_matrix(sets, models, **kwargs)
    return info.value


# ------------------------------------------------------------------ the DSL (llama-swap dsl_test.go)


def tokens(text: str) -> list[tuple[str, str]]:
    return [(t.kind, t.text) for t in _tokenize(text)]


def test_tokenize_identifiers_operators_and_references():
    assert tokens("abc") == [("ident", "abc"), ("end", "")]
    assert tokens("model-name.v2") == [("ident", "model-name.v2"), ("end", "")]
    assert tokens("(a | +base) & b") == [
        ("(", "("),
        ("ident", "a"),
        ("|", "|"),
        ("ref", "base"),
        (")", ")"),
        ("&", "&"),
        ("ident", "b"),
        ("end", ""),
    ]


@pytest.mark.parametrize(
    ("text", "needle"), [("+", "expected a set name after '+'"), ("a @ b", "unexpected character")]
)
def test_tokenize_errors(text, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        _tokenize(text)


@pytest.mark.parametrize(
    ("dsl", "relevant", "expected"),
    [
        ("a", ["a"], [["a"]]),
        ("a & b", ["a", "b"], [["a", "b"]]),
        ("a | b | c", ["a", "b", "c"], [["a"], ["b"], ["c"]]),
        ("(a | b) & (c | d)", ["a", "b", "c", "d"], [["a", "c"], ["a", "d"], ["b", "c"], ["b", "d"]]),
        ("a | b & c", ["a", "b", "c"], [["a"], ["b", "c"]]),  # & binds tighter than |
        ("a & a", ["a"], [["a"]]),  # a model named twice is one model
    ],
)
def test_expressions_project_to_their_combinations(dsl, relevant, expected):
    program = identity({"test": dsl}, relevant)
    assert combinations(program, "test", relevant) == expected


def test_references_inline_another_set():
    models = ["g", "q", "m", "v", "e"]
    program = identity({"llms": "g | q | m", "with_tts": "+llms & v", "mega": "+with_tts & e"}, models)
    assert combinations(program, "mega", models) == [["e", "g", "v"], ["e", "q", "v"], ["e", "m", "v"]]


def test_overlapping_references_keep_everything_running():
    program = identity({"base": "a & b", "extended": "target & +base & b"}, ["target", "a", "b"])
    result = program.solve("target", ["a", "b"])
    assert result.evict == ()
    assert result.members == ("a", "b", "target")
    assert result.set_name == "extended"


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        ({"s": ""}, "empty expression"),
        ({"s": "   "}, "empty expression"),
        ({"s": "(a"}, "missing closing parenthesis"),
        ({"s": "a)"}, "unexpected ')'"),
        ({"s": "()"}, "unexpected token ')'"),
        ({"s": "a &"}, "unexpected end of expression"),
        ({"s": "a | | a"}, "unexpected token '|'"),
        ({"s": "missing"}, "unknown var or model 'missing'"),
        ({"s": "+missing"}, "references undefined set 'missing'"),
        ({"a": "+b", "b": "+a"}, "circular reference"),
        ({"s": "a | +s"}, "circular reference between sets: s -> s"),
    ],
)
def test_compile_errors_name_the_set(sets, needle):
    err = compile_error(sets, ["a"])
    assert needle in err.message
    assert err.key.startswith("matrix.sets.")
    assert err.key.removeprefix("matrix.sets.") in sets


def test_a_cycle_is_reported_with_its_path():
    err = compile_error({"top": "a & +x", "x": "+y | a", "y": "a & +x"}, ["a"])
    assert err.message == "circular reference between sets: x -> y -> x"
    assert err.key == "matrix.sets.x"


def test_no_expansion_limit():
    # 6 groups of 10 alternatives: a million combinations, never enumerated
    dsl, models = product_dsl(6, 10)
    program = identity({"large": dsl}, models)
    running = [f"model-{d}-9" for d in range(6)] + ["outside"]
    result = program.solve("target", running)
    assert result.evict == ("outside",)
    assert result.set_name == "large"
    assert len(result.members) == 7
    assert set(running[:-1]) < set(result.members)


def test_more_than_64_relevant_models():
    models = ["target"] + [f"model-{i}" for i in range(70)]
    program = identity({"wide": " & ".join(models)}, models)
    result = program.solve("target", models[1:] + ["outside"])
    assert result.evict == ("outside",)
    assert len(result.members) == 71


def test_a_dominated_projection_is_replaced_by_its_superset():
    program = identity({"preferred": "target & (a | (a & b))"}, ["target", "a", "b"])
    result = program.solve("target", ["a", "b"])
    assert result.evict == ()
    assert result.members == ("a", "b", "target")


def test_a_target_in_no_set_runs_alone():
    program = identity({"known": "a & b"}, ["a", "b", "missing"])
    result = program.solve("missing", ["a", "b"])
    assert result.evict == ("a", "b")
    assert result.members == ("missing",)
    assert result.set_name == ""


def test_many_sets_only_the_one_holding_the_target_counts():
    # llama-swap's multi-set benchmark, as a correctness check
    sets, models, costs = multi_set(32, 10)
    program = identity(sets, models, costs)
    running = ["a-16-1", "b-16-2", "a-0-0", "b-0-1", "outside"]
    result = program.solve("target-16", running)
    assert result.set_name == "set-16"
    assert result.evict == ("a-0-0", "b-0-1", "outside")  # in the order given
    assert result.cost == 2 + 5 + 1
    assert result.members == ("a-16-1", "b-16-2", "target-16")


def product_dsl(groups: int, choices: int) -> tuple[str, list[str]]:
    models = ["target"]
    parts = []
    for d in range(groups):
        names = [f"model-{d}-{c}" for c in range(choices)]
        models += names
        parts.append("(" + " | ".join(names) + ")")
    return "target & " + " & ".join(parts), models


def multi_set(count: int, choices: int) -> tuple[dict[str, str], list[str], dict[str, int]]:
    sets: dict[str, str] = {}
    models = ["outside"]
    costs: dict[str, int] = {}
    for s in range(count):
        a = [f"a-{s}-{c}" for c in range(choices)]
        b = [f"b-{s}-{c}" for c in range(choices)]
        models += [f"target-{s}", *a, *b]
        costs.update({m: 2 for m in a} | {m: 5 for m in b})
        sets[f"set-{s}"] = f"target-{s} & ({' | '.join(a)}) & ({' | '.join(b)})"
    return sets, models, costs


# ------------------------------------------------------------------ solver rules


def test_subset_semantics_a_set_permits_fewer_models():
    program = identity({"trio": "a & b & c"}, ["a", "b", "c"])
    assert program.solve("a", []).evict == ()
    assert program.solve("a", ["c"]).evict == ()
    assert program.solve("a", ["b", "c"]).members == ("a", "b", "c")


def test_the_lowest_total_cost_wins():
    program = identity(
        {"keep_b": "t & b", "keep_c_d": "t & c & d"},
        ["t", "b", "c", "d"],
        {"b": 3, "c": 2, "d": 2},
    )
    # keep_b evicts c+d (4), keep_c_d evicts b (3)
    result = program.solve("t", ["b", "c", "d"])
    assert (result.set_name, result.evict, result.cost) == ("keep_c_d", ("b",), 3)
    # explicit costs replace the program's own
    assert program.solve("t", ["b", "c", "d"], {"b": 10}).set_name == "keep_b"


def test_ties_inside_one_set_follow_traversal_order():
    program = identity({"s": "t & (x | y)"}, ["t", "x", "y"])
    # nothing running: both alternatives cost 0; the first one is the witness
    assert program.solve("t", []).members == ("t", "x")
    # y running: only the second keeps it
    assert program.solve("t", ["y"]).members == ("t", "y")


def test_referenced_sets_come_before_the_sets_using_them():
    # llama-swap orders sets depth-first: a referenced set precedes its user,
    # so on a tie "small" (defined second) beats "big"
    program = identity({"big": "a & b & +small", "small": "a", "other": "a & c"}, ["a", "b", "c"])
    assert program.set_names == ("small", "big", "other")
    assert program.solve("a", []).set_name == "small"


def test_the_target_already_running_evicts_nothing():
    program = identity({"s_a": "a", "s_b": "b"}, ["a", "b"])
    result = program.solve("a", ["a", "b"])
    assert result.evict == ()
    assert result.members == ("a", "b")
    assert result.set_name == ""  # no set holds both
    assert identity({"ab": "a & b"}, ["a", "b"]).solve("b", ["a", "b"]).set_name == "ab"


def test_a_running_model_in_no_set_is_always_evicted():
    program = identity({"s": "t & a"}, ["t", "a", "loner"], {"loner": 100})
    result = program.solve("t", ["a", "loner"])
    assert result.evict == ("loner",)
    assert result.cost == 100


def test_can_contain_all():
    program = identity({"llm": "(a | b) & tts", "img": "a & sd"}, ["a", "b", "tts", "sd"])
    assert program.can_contain_all([])
    assert program.can_contain_all(["a", "tts"])
    assert program.can_contain_all(["b", "tts"])
    assert program.can_contain_all(["a", "sd"])
    assert not program.can_contain_all(["a", "b"])  # alternatives, never together
    assert not program.can_contain_all(["tts", "sd"])  # different sets
    assert not program.can_contain_all(["a", "unknown"])


def test_can_contain_all_on_a_huge_product():
    dsl, models = product_dsl(10, 10)  # 10**10 combinations
    program = identity({"large": dsl}, models)
    assert program.can_contain_all(["target"] + [f"model-{d}-{d}" for d in range(10)])
    assert not program.can_contain_all(["model-3-1", "model-3-2"])


def test_solve_is_fast_on_a_large_matrix_without_expansion():
    # 10 sets, each an AND of 10 groups of 10 alternatives: 10 * 10**10 combinations
    sets: dict[str, str] = {}
    models: list[str] = []
    for s in range(10):
        groups = []
        for g in range(10):
            names = [f"m{s}-{g}-{c}" for c in range(10)]
            models += names
            groups.append("(" + " | ".join(names) + ")")
        sets[f"set{s}"] = " & ".join(groups)
    started = time.perf_counter()
    program = identity(sets, models)
    running = [f"m{s}-{g}-{(s + g) % 10}" for s in range(0, 10, 3) for g in range(0, 10, 2)]
    # targets are in group 1, which never runs
    results = [program.solve(f"m{i % 10}-1-{i % 7}", running) for i in range(100)]
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"100 solves took {elapsed:.2f}s"
    # m3-1-0 sits in set3, which keeps the set3 models running beside it
    chosen = program.solve("m3-1-0", running)
    assert chosen.set_name == "set3"
    assert chosen.evict == tuple(m for m in running if not m.startswith("m3-"))
    assert chosen.members[:1] == ("m3-0-3",) and len(chosen.members) == 10
    assert all(r.set_name == f"set{i % 10}" for i, r in enumerate(results))


def test_deep_nesting_is_refused_not_crashed():
    err = compile_error({"s": "(" * (MAX_DEPTH + 1) + "a" + ")" * (MAX_DEPTH + 1)}, ["a"])
    assert "nested more than" in err.message and err.key == "matrix.sets.s"
    chain = {"s0": "a"} | {f"s{i}": f"+s{i - 1} & a" for i in range(1, MAX_DEPTH)}
    err = compile_error(chain, ["a"])
    assert "nested more than" in err.message
    # nesting up to the limit compiles and solves (no RecursionError)
    deep = "(a & " * (MAX_DEPTH - 1) + "b" + ")" * (MAX_DEPTH - 1)
    ok = identity({"s": deep}, ["a", "b", "c"])
    assert ok.solve("b", ["a", "c"]).evict == ("c",)
    assert ok.can_contain_all(["a", "b"])


def test_a_long_reference_chain_without_a_cycle_compiles_iteratively():
    # topological ordering is not recursive: 2000 sets referencing the next
    sets = {f"s{i}": f"+s{i + 1}" for i in range(2000)} | {"s2000": "a"}
    err = compile_error(sets, ["a"])  # too deep to solve, but diagnosed, not a RecursionError
    assert "nested more than" in err.message


def test_program_is_reusable_and_queries_do_not_interfere():
    program = identity({"s": "t & (x | y)", "u": "x & y"}, ["t", "x", "y"])
    first = program.solve("t", ["y"])
    program.solve("x", ["y", "t"])
    assert program.solve("t", ["y"]) == first
    assert "sets=['s', 'u']" in repr(program)
    assert program.models == frozenset({"t", "x", "y"})


def _random_dsl(rng: random.Random, models: list[str], refs: list[str], depth: int = 0) -> str:
    roll = rng.random()
    if depth >= 3 or roll < 0.35:
        if refs and rng.random() < 0.2:
            return "+" + rng.choice(refs)
        return rng.choice(models)
    op = " & " if roll < 0.65 else " | "
    parts = [_random_dsl(rng, models, refs, depth + 1) for _ in range(rng.randint(2, 3))]
    return "(" + op.join(parts) + ")"


def _expand(text: str, sets: dict[str, str]) -> set[frozenset[str]]:
    """Every distinct combination of an expression, by brute force (a reference oracle)."""
    toks = text.replace("(", " ( ").replace(")", " ) ").replace("&", " & ").replace("|", " | ").split()
    pos = 0

    def or_expr() -> set[frozenset[str]]:
        nonlocal pos
        out = and_expr()
        while pos < len(toks) and toks[pos] == "|":
            pos += 1
            out = out | and_expr()
        return out

    def and_expr() -> set[frozenset[str]]:
        nonlocal pos
        out = atom()
        while pos < len(toks) and toks[pos] == "&":
            pos += 1
            right = atom()
            out = {x | y for x in out for y in right}
        return out

    def atom() -> set[frozenset[str]]:
        nonlocal pos
        tok = toks[pos]
        pos += 1
        if tok == "(":
            inner = or_expr()
            pos += 1  # ")"
            return inner
        if tok.startswith("+"):
            return _expand(sets[tok[1:]], sets)
        return {frozenset([tok])}

    return or_expr()


def test_solver_agrees_with_brute_force_expansion():
    rng = random.Random(20240611)
    models = ["a", "b", "c", "d", "e", "f"]
    for _ in range(300):
        sets: dict[str, str] = {}
        for i in range(rng.randint(1, 4)):
            sets[f"s{i}"] = _random_dsl(rng, models, list(sets))
        costs = {m: rng.randint(1, 4) for m in models if rng.random() < 0.5}
        program = identity(sets, models, costs)
        target = rng.choice(models)
        running = sorted(rng.sample([m for m in models if m != target], rng.randint(0, 4)))
        result = program.solve(target, running)
        best: tuple[int, str] | None = None
        for name in program.set_names:
            for combo in _expand(sets[name], sets):
                if target in combo:
                    cost = sum(costs.get(m, 1) for m in running if m not in combo)
                    if best is None or cost < best[0]:
                        best = (cost, name)
        if best is None:
            assert (result.set_name, result.evict) == ("", tuple(running))
            continue
        assert (result.cost, result.set_name) == best, (sets, target, running)
        assert target in result.members
        assert frozenset(result.members) in _expand(sets[result.set_name], sets)
        assert result.evict == tuple(m for m in running if m not in result.members)
        assert program.can_contain_all([target, *[m for m in running if m not in result.evict]])


# ------------------------------------------------------------------ compile_matrix validation
# (llama-swap config/matrix_test.go)

LLAMA_MODELS = ["gemma", "qwen", "mistral", "voxtral", "llama70B", "reranker"]


def test_basic_vars_costs_and_sets():
    program = compile_matrix(
        {"standard": "(g | q | m) & v", "full": "L"},
        LLAMA_MODELS,
        vars={"g": "gemma", "q": "qwen", "m": "mistral", "v": "voxtral", "L": "llama70B"},
        evict_costs={"L": 30, "v": 50},
    )
    result = program.solve("gemma", ["voxtral"])
    assert (result.set_name, result.members, result.evict) == ("standard", ("gemma", "voxtral"), ())
    result = program.solve("llama70B", ["voxtral"])
    assert (result.set_name, result.members, result.evict) == ("full", ("llama70B",), ("voxtral",))
    assert result.cost == 50


def test_references_with_vars():
    program = compile_matrix(
        {"llms": "g | q | m", "with_tts": "+llms & v", "mega": "+with_tts & e"},
        LLAMA_MODELS,
        vars={"g": "gemma", "q": "qwen", "m": "mistral", "v": "voxtral", "e": "reranker"},
    )
    result = program.solve("reranker", ["gemma", "voxtral"])
    assert (result.set_name, result.members, result.evict) == ("mega", ("gemma", "reranker", "voxtral"), ())


def test_direct_model_names_and_mixed_vars():
    models = ["gemma", "qwen", "voxtral"]
    program = compile_matrix({"combo": "gemma & voxtral"}, models)
    assert program.solve("gemma", ["voxtral"]).members == ("gemma", "voxtral")

    program = compile_matrix({"base": "g | qwen", "combo": "+base & voxtral"}, models, vars={"g": "gemma"})
    result = program.solve("qwen", ["voxtral"])
    assert (result.set_name, result.members) == ("combo", ("qwen", "voxtral"))

    program = compile_matrix({"combo": "g & gemma"}, models, vars={"g": "gemma"})
    assert program.solve("gemma", []).members == ("gemma",)  # one model after resolution

    program = compile_matrix({"combo": "qwen"}, models, vars={"qwen": "gemma"})
    assert program.solve("gemma", []).members == ("gemma",)  # a var wins over a model id
    assert program.solve("qwen", []).set_name == ""  # the model qwen is in no set


@pytest.mark.parametrize("key", ["abcdefghijklmnopqrstuvwxyzABCDEF", "model-var", "model.var", "7"])
def test_valid_var_ids(key):
    program = compile_matrix({"s": key}, ["gemma"], vars={key: "gemma"})
    assert program.solve("gemma", []).set_name == "s"


@pytest.mark.parametrize("key", ["abcdefghijklmnopqrstuvwxyzABCDEFG", "a_b", "", "a b", "é", "a\n"])
def test_invalid_var_ids(key):
    err = compile_error({"s": "gemma"}, ["gemma"], vars={key: "gemma"})
    assert "1-32 characters" in err.message and "'-' or '.'" in err.message
    assert err.key == f"matrix.vars.{key}"


def test_a_var_must_name_a_model_id():
    err = compile_error({"s": "x"}, ["gemma"], vars={"x": "nonexistent"})
    assert "unknown model 'nonexistent'" in err.message
    assert err.key == "matrix.vars.x"


@pytest.mark.parametrize("cost", [0, -1, True, 1.5])
def test_evict_costs_must_be_positive_integers(cost):
    err = compile_error({"s": "g"}, ["gemma"], vars={"g": "gemma"}, evict_costs={"g": cost})
    assert "positive integer" in err.message
    assert err.key == "matrix.evict_costs.g"


def test_evict_costs_keys_resolve_through_vars_and_model_ids():
    err = compile_error({"s": "g"}, ["gemma"], vars={"g": "gemma"}, evict_costs={"unknown": 5})
    assert "unknown var or model 'unknown'" in err.message
    assert err.key == "matrix.evict_costs.unknown"
    program = compile_matrix(
        {"s": "g"}, ["gemma", "llama70B", "mistral"],
        vars={"g": "gemma", "L": "llama70B"}, evict_costs={"L": 30, "g": 5, "mistral": 10},
    )  # fmt: skip
    assert dict(program.evict_costs) == {"llama70B": 30, "gemma": 5, "mistral": 10}
    assert program.cost("qwen") == 1  # unlisted: 1


def test_unknown_model_in_a_set_and_no_sets():
    err = compile_error({"s": "g & nonexistent"}, ["gemma"], vars={"g": "gemma"})
    assert err.message == "set 's': unknown var or model 'nonexistent'"
    assert err.key == "matrix.sets.s"
    err = compile_error({}, ["gemma"])
    assert "at least one set" in err.message and err.key == "matrix.sets"


def test_validation_order_sets_then_vars_then_costs_then_expressions():
    err = compile_error({}, ["gemma"], vars={"bad_id": "gemma"})
    assert err.key == "matrix.sets"
    err = compile_error({"s": "("}, ["gemma"], vars={"bad_id": "gemma"}, evict_costs={"nope": 1})
    assert err.key == "matrix.vars.bad_id"
    err = compile_error({"s": "("}, ["gemma"], evict_costs={"nope": 1})
    assert err.key == "matrix.evict_costs.nope"


def test_model_aliases_are_not_matrix_names():
    # llama-swap resolves DSL names through vars and model ids only
    err = compile_error({"s": "gpt"}, ["gemma"])
    assert "unknown var or model 'gpt'" in err.message


def test_key_prefix_names_the_block():
    err = compile_error({"s": "nope"}, ["a"], key_prefix="routing.router.settings.matrix")
    assert err.key == "routing.router.settings.matrix.sets.s"


# ------------------------------------------------------------------ config loading


def load(text: str) -> Config:
    return load_config_text(textwrap.dedent(text), "config.yaml", {})


def load_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text)
    return info.value


TWO_MODELS = """
models:
  gemma: {cmd: echo gemma, proxy: "http://localhost:8080", aliases: [g-alias]}
  qwen: {cmd: echo qwen, proxy: "http://localhost:8081"}
"""


def test_config_top_level_matrix():
    cfg = load(TWO_MODELS + "matrix:\n  vars:\n    g: gemma\n    q: qwen\n  sets:\n    combo: 'g | q'\n")
    assert cfg.router == "matrix"
    assert isinstance(cfg.matrix, MatrixProgram)
    assert cfg.matrix.set_names == ("combo",)
    assert cfg.warnings == ()
    # groups still hold every model in the default group (group_of keeps working)
    assert list(cfg.groups) == [DEFAULT_GROUP_ID]
    assert cfg.groups[DEFAULT_GROUP_ID].members == ("gemma", "qwen")
    assert cfg.group_of("qwen").id == DEFAULT_GROUP_ID


def test_config_routing_router_use_matrix():
    cfg = load(
        TWO_MODELS
        + """
routing:
  router:
    use: matrix
    settings:
      groups:
        g1: {members: [gemma, qwen]}
      matrix:
        vars: {g: gemma, q: qwen}
        evict_costs: {q: 7}
        sets:
          combo: "g & q"
"""
    )
    assert cfg.router == "matrix"
    assert cfg.matrix.evict_costs == {"qwen": 7}
    assert cfg.matrix.solve("gemma", ["qwen"]).evict == ()
    assert list(cfg.groups) == [DEFAULT_GROUP_ID]  # settings.groups is inactive, as in llama-swap


def test_config_use_group_ignores_the_matrix_without_validating_it():
    cfg = load(
        TWO_MODELS
        + """
routing:
  router:
    use: group
    settings:
      groups:
        g1: {members: [gemma, qwen]}
      matrix:
        sets:
          s: "not-a-model & ("
"""
    )
    assert cfg.router == "group" and cfg.matrix is None
    assert "g1" in cfg.groups


def test_config_without_matrix_is_group_routing():
    cfg = load(TWO_MODELS)
    assert cfg.router == "group" and cfg.matrix is None
    assert cfg.group_of("gemma").id == DEFAULT_GROUP_ID


def test_config_use_vram_names_its_router_and_has_no_matrix():
    cfg = load(TWO_MODELS + "routing:\n  router:\n    use: vram\n")
    assert cfg.router == "vram" and cfg.matrix is None


def test_config_groups_and_matrix_together_fail():
    err = load_error(TWO_MODELS + "groups:\n  g1:\n    members: [gemma]\nmatrix:\n  sets:\n    s: gemma\n")
    assert "cannot both be used" in err.message and err.key == "matrix"
    # an empty groups mapping is no conflict (llama-swap counts groups)
    assert load(TWO_MODELS + "groups: {}\nmatrix:\n  sets:\n    s: gemma\n").router == "matrix"


def test_config_null_matrix_is_no_matrix():
    assert load(TWO_MODELS + "matrix:\n").router == "group"


@pytest.mark.parametrize(
    ("block", "key", "needle"),
    [
        ("matrix: {}", "matrix.sets", "at least one set"),
        ("matrix: [a]", "matrix", "expected a mapping with vars, evict_costs and sets, got a list"),
        ("matrix: {sets: [a]}", "matrix.sets", "expected a mapping"),
        ("matrix: {sets: {big: 'gemma & (qwen'}}", "matrix.sets.big", "set 'big': missing closing parenthesis"),
        ("matrix: {sets: {big: 'gemma &'}}", "matrix.sets.big", "unexpected end of expression"),
        ("matrix: {sets: {big: 'gemma @ qwen'}}", "matrix.sets.big", "unexpected character '@' at position 6"),
        ("matrix: {sets: {big: }}", "matrix.sets.big", "empty expression"),
        ("matrix: {sets: {big: [gemma]}}", "matrix.sets.big", "expected a string"),
        ("matrix: {sets: {big: g-alias}}", "matrix.sets.big", "unknown var or model 'g-alias'"),
        ("matrix: {sets: {big: +small}}", "matrix.sets.big", "references undefined set 'small'"),
        ("matrix: {sets: {a: +b, b: +a}}", "matrix.sets.a", "circular reference between sets: a -> b -> a"),
        ("matrix: {vars: {x: nope}, sets: {s: x}}", "matrix.vars.x", "unknown model 'nope'"),
        ("matrix: {vars: {x: g-alias}, sets: {s: x}}", "matrix.vars.x", "vars must name model ids"),
        ("matrix: {vars: {x_y: gemma}, sets: {s: gemma}}", "matrix.vars.x_y", "1-32 characters"),
        ("matrix: {vars: {x: [gemma]}, sets: {s: gemma}}", "matrix.vars.x", "expected a string"),
        ("matrix: {evict_costs: {q: 5}, sets: {s: gemma}}", "matrix.evict_costs.q", "unknown var or model 'q'"),
        ("matrix: {evict_costs: {qwen: 0}, sets: {s: gemma}}", "matrix.evict_costs.qwen", "positive integer, got 0"),
        ("matrix: {evict_costs: {qwen: '5'}, sets: {s: gemma}}", "matrix.evict_costs.qwen", "got '5'"),
        ("matrix: {evict_costs: {qwen: }, sets: {s: gemma}}", "matrix.evict_costs.qwen", "got null"),
        (
            "routing: {router: {use: matrix, settings: {matrix: {sets: {big: nope}}}}}",
            "routing.router.settings.matrix.sets.big",
            "unknown var or model 'nope'",
        ),
    ],
)
def test_config_errors_name_the_key(block, key, needle):
    err = load_error(TWO_MODELS + block + "\n")
    assert err.file == "config.yaml" and err.model is None
    assert err.key == key
    assert needle in err.message
    assert f"key '{key}'" in str(err)


def test_config_set_order_is_the_yaml_order():
    cfg = load(TWO_MODELS + "matrix:\n  sets:\n    zeta: gemma & qwen\n    alpha: gemma\n")
    assert cfg.matrix.set_names == ("zeta", "alpha")
    assert cfg.matrix.solve("gemma", []).set_name == "zeta"


def test_config_unknown_matrix_key_warns():
    cfg = load(TWO_MODELS + "matrix:\n  sets: {s: gemma}\n  evict_cost: {gemma: 2}\n")
    assert cfg.router == "matrix"
    assert cfg.warnings == ("key 'matrix': unknown key 'evict_cost' (did you mean 'evict_costs'?)",)


def test_config_numeric_scalars_are_read_as_names():
    # yaml.v3 decodes a scalar into a string field as written; so does swapd
    cfg = load("models:\n  '7': {cmd: echo, proxy: 'http://h:1'}\nmatrix:\n  vars: {x: 7}\n  sets: {s: 7, t: x}\n")
    assert cfg.matrix.solve("7", []).set_name == "s"


def test_the_example_in_docs_scheduling_matrix():
    cfg = load(
        """
        models:
          gemma: {cmd: "llama-server --port ${PORT} -m gemma.gguf"}
          qwen: {cmd: "llama-server --port ${PORT} -m qwen.gguf"}
          voxtral: {cmd: "vllm serve voxtral --port ${PORT}"}
          llama-70b: {cmd: "llama-server --port ${PORT} -m llama-70b.gguf"}
        matrix:
          vars: {g: gemma, q: qwen, v: voxtral}
          evict_costs: {v: 50}
          sets:
            standard: "(g | q) & v"
            full: "llama-70b"
        """
    )
    table = [
        ([], "gemma", "standard", (), 0),
        (["gemma", "voxtral"], "qwen", "standard", ("gemma",), 1),
        (["qwen", "voxtral"], "llama-70b", "full", ("qwen", "voxtral"), 51),
        (["llama-70b"], "voxtral", "standard", ("llama-70b",), 1),
    ]
    for run, target, set_name, evicted, cost in table:
        result = cfg.matrix.solve(target, run)
        assert (result.set_name, result.evict, result.cost) == (set_name, evicted, cost)
        assert decide(cfg, target, *run) == evicted


# ------------------------------------------------------------------ MatrixRouter (llama-swap router/matrix_test.go)


def matrix_config(sets: dict[str, str], costs: dict[str, int] | None = None, models=("a", "b", "c")) -> Config:
    lines = ["models:"]
    lines += [f"  {m}: {{cmd: 'server --port ${{PORT}}'}}" for m in models]
    lines += ["matrix:", "  sets:"] + [f"    {name}: '{dsl}'" for name, dsl in sets.items()]
    if costs:
        lines += ["  evict_costs:"] + [f"    {m}: {c}" for m, c in costs.items()]
    return load_config_text("\n".join(lines) + "\n")


def running(*ids: str, **in_flight: int) -> dict[str, RunningModel]:
    return {m: RunningModel(m, in_flight.get(m, 0), 100.0 + i) for i, m in enumerate(ids)}


def decide(cfg: Config, target: str, *ids: str, **in_flight: int) -> tuple[str, ...]:
    return MatrixRouter().decide(target, running(*ids, **in_flight), cfg).evict


def test_router_evicts_a_model_that_shares_no_set():
    cfg = matrix_config({"s_a": "a", "s_b": "b"})
    assert decide(cfg, "b", "a") == ("a",)


def test_router_keeps_a_model_that_shares_a_set():
    cfg = matrix_config({"s_ab": "a & b"})
    assert decide(cfg, "b", "a") == ()


def test_router_counts_swaps_in_progress_as_running():
    # llama-swap: two coexisting targets load in parallel; incompatible ones
    # queue, then the second evicts the first. swapd's scheduler hands the
    # router every model a swap is bringing in, as state "swapping".
    for sets, expected in (({"s_ab": "a & b"}, []), ({"s_a": "a", "s_b": "b"}, ["a"])):
        sched = Scheduler(SimpleNamespace(config=matrix_config(sets), backends={}), router=MatrixRouter())
        sched._active["a"] = object()  # a swap bringing "a" in
        assert list(sched._decision_for("b").evict) == expected


def test_router_tie_break_is_definition_order():
    cfg = matrix_config({"first": "a & b", "second": "a & c"})
    assert cfg.matrix.solve("a", []).set_name == "first"
    assert decide(cfg, "a") == ()


def test_router_evict_costs_steer_the_choice():
    cfg = matrix_config({"a_with_c": "a & c", "a_with_b": "a & b"}, {"b": 10, "c": 1})
    assert cfg.matrix.solve("a", ["b", "c"]).set_name == "a_with_b"
    assert decide(cfg, "a", "b", "c") == ("c",)


def test_router_a_model_in_no_set_runs_alone():
    cfg = matrix_config({"s_ab": "a & b"})
    assert decide(cfg, "c", "b", "a") == ("a", "b")
    assert decide(cfg, "a", "c") == ("c",)  # and is evicted for anything else


def test_router_always_evicts_a_model_no_longer_configured():
    cfg = matrix_config({"s_ab": "a & b"})
    assert decide(cfg, "a", "b", "gone") == ("gone",)


def test_router_evicts_busy_models_too_the_scheduler_drains_them():
    cfg = matrix_config({"s_a": "a", "s_b": "b"})
    assert decide(cfg, "b", "a", a=3) == ("a",)


def test_router_decision_is_sorted_and_never_names_the_target():
    cfg = matrix_config({"s": "a"}, models=("a", "b", "c", "d"))
    decision = MatrixRouter().decide("a", running("d", "b", "c"), cfg)
    assert decision == Decision(("b", "c", "d"))
    # a running set that includes the target: nothing is evicted (llama-swap's fast path)
    assert decide(cfg, "a", "a", "b") == ()


def test_router_without_a_program_runs_the_target_alone():
    cfg = load_config_text("models:\n  a: {cmd: 'x --port ${PORT}'}\n  b: {cmd: 'x --port ${PORT}'}\n")
    assert decide(cfg, "a", "b") == ("b",)


# ------------------------------------------------------------------ end to end (real backend processes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scheduler_with_the_matrix_router_starts_and_stops_backends():
    lines = ["models:"]
    for model_id in ("a", "b", "c"):
        port = _free_port()
        lines += [f"  {model_id}:", f"    cmd: {fake_cmd(port=str(port))}", f"    proxy: http://127.0.0.1:{port}"]
    lines += ["matrix:", "  sets:", "    pair: 'a & b'", "    solo: 'c'"]
    cfg = load_config_text("\n".join(lines) + "\n")

    async def main() -> list[dict[str, State]]:
        backends = {m: Backend(mc, logs=LogRing(), session=None) for m, mc in cfg.models.items()}
        rt = SimpleNamespace(config=cfg, backends=backends)
        sched = Scheduler(rt, router=MatrixRouter())
        seen = []
        try:
            for model_id in ("a", "b", "c", "a"):
                (await sched.acquire(model_id)).release()
                seen.append({m: b.state for m, b in backends.items() if b.state != State.STOPPED})
        finally:
            await sched.close()
        return seen

    assert asyncio.run(main()) == [
        {"a": State.READY},
        {"a": State.READY, "b": State.READY},  # a and b share "pair"
        {"c": State.READY},  # c runs alone
        {"a": State.READY},
    ]
