"""llama-swap's ``matrix`` router: which models may run side by side, as expressions.

A matrix names *sets*; each set is an expression over models::

    vars:        {g: gemma, q: qwen, v: voxtral}   # short names (optional)
    evict_costs: {v: 50}                           # cost of stopping a model (default 1)
    sets:
      standard: "(g | q) & v"    # gemma or qwen, together with voxtral
      big:      "llama-70b"      # alone

``a & b`` means both, ``a | b`` either, parentheses group (``&`` binds tighter
than ``|``), and ``+name`` stands for another set's expression. An expression
describes a family of model combinations; a combination says which models
*may* run together (any subset of it may too). A model that is in no set runs
alone.

To start a target the solver looks at every combination that contains it and
picks the one whose running models outside it are cheapest to stop (sum of
their ``evict_costs``); ties go to the set that comes first, and within a set
to the combination met first while walking the expression left to right. Sets
are walked with every set a ``+name`` refers to placed before the set that
refers to it (otherwise in definition order), as llama-swap does.

The combinations are never enumerated: ten ``|`` groups of ten models joined
by ``&`` stand for 10**10 of them. Instead each query projects the expression
onto the models that matter to it (the target and the running models), as a
bitmask per combination, and keeps only the masks that are not contained in
another one. That is exact, because eviction costs are positive: a combination
that keeps a superset of running models is never worse.

Everything here is pure: :func:`compile_matrix` validates and returns an
immutable :class:`MatrixProgram`; :class:`MatrixRouter` applies a compiled
program (``config.matrix``) to the scheduler's running set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeAlias

from swapd.router import Decision, RunningModel

if TYPE_CHECKING:
    from swapd.config import Config

__all__ = ["MatrixDecision", "MatrixError", "MatrixProgram", "MatrixRouter", "compile_matrix"]

# A var id: ASCII letters, digits, '-' and '.', 1 to 32 of them (llama-swap's rule).
VAR_KEY_RE = re.compile(r"[a-zA-Z0-9.-]{1,32}")
# Deepest expression accepted, counting parentheses and +references together.
# llama-swap has no limit; this one only keeps Python's recursion in bounds and
# is far beyond any hand-written matrix.
MAX_DEPTH = 100

_LEAF, _REF, _AND, _OR = range(4)


class MatrixError(ValueError):
    """A matrix that cannot be compiled; ``key`` is the config key to blame."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


# ------------------------------------------------------------------ the DSL


class _Token:
    __slots__ = ("kind", "text", "pos")

    def __init__(self, kind: str, text: str, pos: int) -> None:
        self.kind = kind  # "ident", "ref", "&", "|", "(", ")" or "end"
        self.text = text
        self.pos = pos


def _ident_char(ch: str) -> bool:
    # letters and decimal digits of any script, '_', '-' and '.' (as llama-swap)
    return ch.isalpha() or ch.isdecimal() or ch in "_-."


def _tokenize(text: str) -> list[_Token]:
    """Split an expression into tokens; positions count characters from 0."""
    out: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "&|()":
            out.append(_Token(ch, ch, i))
            i += 1
        elif ch == "+" or _ident_char(ch):
            start = i + 1 if ch == "+" else i
            j = start
            while j < n and _ident_char(text[j]):
                j += 1
            if j == start:
                raise ValueError(f"expected a set name after '+' at position {start}")
            out.append(_Token("ref" if ch == "+" else "ident", text[start:j], i))
            i = j
        else:
            raise ValueError(f"unexpected character {ch!r} at position {i}")
    out.append(_Token("end", "", n))
    return out


class _Node:
    """One node of a compiled expression. Never changed after compilation."""

    __slots__ = ("kind", "name", "children", "target", "support", "index")

    def __init__(self, kind: int, name: str = "", children: tuple[_Node, ...] = ()) -> None:
        self.kind = kind
        self.name = name  # a leaf: its model id (after resolution); a ref: the set it names
        self.children = children
        self.target: _Node | None = None  # a ref: the root of the set it names
        self.support = 0  # bit of every model this node can produce (program-wide bits)
        self.index = -1  # position in MatrixProgram._nodes, for per-query memo tables


class _Parser:
    """Recursive descent: or := and ('|' and)*; and := atom ('&' atom)*; atom := ident | +ref | '(' or ')'."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        token = self.tokens[self.pos]
        if token.kind != "end":
            self.pos += 1
        return token

    def parse(self) -> _Node:
        root = self.or_expr()
        extra = self.peek()
        if extra.kind != "end":
            raise ValueError(f"unexpected {extra.text!r} at position {extra.pos} after a complete expression")
        return root

    def or_expr(self) -> _Node:
        return self._chain("|", _OR, self.and_expr)

    def and_expr(self) -> _Node:
        return self._chain("&", _AND, self.atom)

    def _chain(self, op: str, kind: int, operand: Callable[[], _Node]) -> _Node:
        first = operand()
        if self.peek().kind != op:
            return first
        items = [first]
        while self.peek().kind == op:
            self.take()
            items.append(operand())
        return _Node(kind, children=tuple(items))

    def atom(self) -> _Node:
        token = self.take()
        if token.kind == "ident":
            return _Node(_LEAF, token.text)
        if token.kind == "ref":
            return _Node(_REF, token.text)
        if token.kind == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ValueError(f"parentheses nested more than {MAX_DEPTH} deep")
            inner = self.or_expr()
            if self.take().kind != ")":
                raise ValueError(f"missing closing parenthesis for '(' at position {token.pos}")
            self.depth -= 1
            return inner
        if token.kind == "end":
            raise ValueError("unexpected end of expression (an operand is missing)")
        raise ValueError(f"unexpected token {token.text!r} at position {token.pos}")


def _parse(text: str) -> _Node:
    if not text.strip():
        raise ValueError("empty expression")
    return _Parser(_tokenize(text)).parse()


def _walk(root: _Node) -> Iterable[_Node]:
    """Every node of one parsed expression (not following refs), parents before children, left to right."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


# ------------------------------------------------------------------ program


@dataclass(frozen=True)
class MatrixDecision:
    """The outcome of :meth:`MatrixProgram.solve`.

    ``set_name`` is "" when no set holds the target (it then runs alone).
    ``evict`` lists running models in the order they were given (sorted by
    :class:`MatrixRouter`). ``members`` is the chosen combination, sorted: the
    models that may run beside the target (for logs; nothing preloads them).
    When the target already runs it is the running set itself.
    """

    set_name: str
    evict: tuple[str, ...]
    members: tuple[str, ...]
    cost: int = 0
    dsl: str = ""


# A projected combination: (bitmask of relevant models it holds, witness).
# A witness is enough to rebuild the full combination for logging: a model id,
# None (nothing), a pair of witnesses (an AND), or a node whose first choice
# throughout is meant (a subtree with no relevant model).
_Witness: TypeAlias = "str | None | tuple[_Witness, _Witness] | _Node"
_State = tuple[int, _Witness]


def _add_to_frontier(states: list[_State], candidate: _State) -> None:
    """Keep ``candidate`` unless an earlier state holds all of it; drop the states it holds.

    Order is kept (the candidate goes last), so ties still go to traversal order."""
    mask = candidate[0]
    for other, _ in states:
        if mask | other == other:
            return
    states[:] = [state for state in states if state[0] | mask != mask]
    states.append(candidate)


class _Query:
    """Projects expressions onto the models relevant to one question (memoised per node)."""

    def __init__(self, program: MatrixProgram, relevant: int) -> None:
        self.relevant = relevant
        self.memo: list[list[_State] | None] = [None] * len(program._nodes)

    def states(self, node: _Node) -> list[_State]:
        cached = self.memo[node.index]
        if cached is not None:
            return cached
        out: list[_State]
        if not node.support & self.relevant:
            # Every combination projects to the empty mask; the frontier keeps
            # only the first, which is the first choice at every '|'.
            out = [(0, node)]
        elif node.kind == _LEAF:
            out = [(node.support, node.name)]
        elif node.kind == _REF:
            assert node.target is not None
            out = self.states(node.target)
        elif node.kind == _OR:
            out = []
            for child in node.children:
                for state in self.states(child):
                    _add_to_frontier(out, state)
        else:  # _AND: union of one combination from each child
            out = [(0, None)]
            for child in node.children:
                right_states = self.states(child)
                combined: list[_State] = []
                for left_mask, left_witness in out:
                    for right_mask, right_witness in right_states:
                        _add_to_frontier(combined, (left_mask | right_mask, (left_witness, right_witness)))
                out = combined
        self.memo[node.index] = out
        return out


def _flatten(witness: _Witness) -> tuple[str, ...]:
    """The sorted, distinct models of a witness."""
    models: set[str] = set()
    stack = [witness]
    while stack:
        item = stack.pop()
        if item is None:
            continue
        if isinstance(item, str):
            models.add(item)
        elif isinstance(item, tuple):
            stack.extend(item)
        elif item.kind == _LEAF:
            models.add(item.name)
        elif item.kind == _REF:
            stack.append(item.target)
        elif item.kind == _OR:
            stack.append(item.children[0])
        else:
            stack.extend(item.children)
    return tuple(sorted(models))


class MatrixProgram:
    """A compiled, immutable matrix. Safe to share; every query has its own scratch state."""

    __slots__ = ("_sets", "_nodes", "_bits", "_costs")

    def __init__(
        self,
        sets: tuple[tuple[str, str, _Node], ...],
        nodes: tuple[_Node, ...],
        bits: Mapping[str, int],
        evict_costs: Mapping[str, int],
    ) -> None:
        self._sets = sets  # (name, dsl, root) in solving order
        self._nodes = nodes
        self._bits = bits  # model id -> bit number, for every model some set names
        self._costs = evict_costs

    @property
    def evict_costs(self) -> Mapping[str, int]:
        """Model id -> eviction cost (read-only); a model not listed costs 1."""
        return self._costs

    def __repr__(self) -> str:
        return f"MatrixProgram(sets={list(self.set_names)!r}, models={len(self._bits)})"

    @property
    def set_names(self) -> tuple[str, ...]:
        """Set names in the order ties are broken (referenced sets before their users)."""
        return tuple(name for name, _, _ in self._sets)

    @property
    def models(self) -> frozenset[str]:
        """Every model that appears in some set."""
        return frozenset(self._bits)

    def cost(self, model: str, costs: Mapping[str, int] | None = None) -> int:
        table = self.evict_costs if costs is None else costs
        return table.get(model, 1)

    def _mask(self, models: Iterable[str]) -> int:
        mask = 0
        for model in models:
            bit = self._bits.get(model)
            if bit is not None:
                mask |= 1 << bit
        return mask

    def _first_set_holding(self, models: Collection[str]) -> tuple[str, str]:
        """The first set with one combination holding every model: (name, dsl), or ("", "")."""
        if not models:
            return "", ""
        if any(model not in self._bits for model in models):
            return "", ""
        required = self._mask(models)
        query = _Query(self, required)
        for name, dsl, root in self._sets:
            if root.support & required != required:
                continue
            for mask, _ in query.states(root):
                if mask & required == required:
                    return name, dsl
        return "", ""

    def can_contain_all(self, models: Collection[str]) -> bool:
        """Whether one combination of some set holds every model (True for none)."""
        if not models:
            return True
        return self._first_set_holding(models)[0] != ""

    def solve(self, target: str, running: Iterable[str], costs: Mapping[str, int] | None = None) -> MatrixDecision:
        """The cheapest combination holding ``target``, and the running models outside it.

        ``costs`` defaults to the program's own ``evict_costs``. If ``target``
        is among ``running`` nothing is evicted. If no set holds the target,
        every running model is evicted: it runs alone.
        """
        running = list(dict.fromkeys(running))
        if target in running:
            name, dsl = self._first_set_holding(running)
            return MatrixDecision(name, (), tuple(running), 0, dsl)

        target_bit = self._bits.get(target)
        if target_bit is None:
            return MatrixDecision("", tuple(running), (target,))
        target_mask = 1 << target_bit
        run_bits = [(model, self._mask((model,)), self.cost(model, costs)) for model in running]
        query = _Query(self, target_mask | self._mask(running))

        best: tuple[int, str, str, _State] | None = None
        for name, dsl, root in self._sets:
            if not root.support & target_mask:
                continue
            for state in query.states(root):
                mask = state[0]
                if not mask & target_mask:
                    continue
                total = sum(cost for _, bit, cost in run_bits if not mask & bit)
                if best is None or total < best[0]:
                    best = (total, name, dsl, state)
        if best is None:  # cannot happen: a set whose support holds the target has such a state
            return MatrixDecision("", tuple(running), (target,))
        total, name, dsl, (mask, witness) = best
        evict = tuple(model for model, bit, _ in run_bits if not mask & bit)
        return MatrixDecision(name, evict, _flatten(witness), total, dsl)


def compile_matrix(
    sets: Mapping[str, str] | Iterable[tuple[str, str]],
    models: Collection[str],
    vars: Mapping[str, str] | None = None,
    evict_costs: Mapping[str, int] | None = None,
    key_prefix: str = "matrix",
) -> MatrixProgram:
    """Validate a matrix and compile it without expanding any combination.

    ``sets`` is ordered (name -> expression); ``models`` are the configured
    model ids; ``vars`` maps short ids to model ids; ``evict_costs`` is keyed
    by var or model id. Raises :class:`MatrixError` whose ``key`` starts with
    ``key_prefix`` (``matrix.sets.NAME``, ``matrix.vars.ID`` ...).
    """
    definitions = list(sets.items()) if isinstance(sets, Mapping) else list(sets)
    vars = vars or {}
    evict_costs = evict_costs or {}
    known = frozenset(models)

    if not definitions:
        raise MatrixError("must define at least one set", f"{key_prefix}.sets")

    for var_id, model in vars.items():
        key = f"{key_prefix}.vars.{var_id}"
        if not VAR_KEY_RE.fullmatch(var_id):
            raise MatrixError(
                f"var id {var_id!r} must be 1-32 characters long, using only ASCII letters, digits, '-' or '.'", key
            )
        if model not in known:
            raise MatrixError(f"var {var_id!r} names unknown model {model!r} (vars must name model ids)", key)

    def resolve(name: str) -> str | None:
        if name in vars:
            return vars[name]
        return name if name in known else None

    costs: dict[str, int] = {}
    for name, cost in evict_costs.items():
        key = f"{key_prefix}.evict_costs.{name}"
        if isinstance(cost, bool) or not isinstance(cost, int) or cost <= 0:
            raise MatrixError(f"evict cost must be a positive integer, got {cost!r}", key)
        real = resolve(name)
        if real is None:
            raise MatrixError(f"unknown var or model {name!r}", key)
        costs[real] = cost  # two keys naming one model: the later one wins

    set_names = {name for name, _ in definitions}
    roots: dict[str, _Node] = {}
    dsls: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for name, dsl in definitions:
        key = f"{key_prefix}.sets.{name}"
        try:
            root = _parse(dsl)
        except ValueError as err:
            raise MatrixError(f"set {name!r}: {err}", key) from None
        refs: list[str] = []
        for node in _walk(root):
            if node.kind == _LEAF:
                real = resolve(node.name)
                if real is None:
                    raise MatrixError(f"set {name!r}: unknown var or model {node.name!r}", key)
                node.name = real
            elif node.kind == _REF:
                if node.name not in set_names:
                    raise MatrixError(f"set {name!r} references undefined set {node.name!r}", key)
                if node.name not in refs:
                    refs.append(node.name)
        roots[name] = root
        dsls[name] = dsl
        deps[name] = refs

    order = _solving_order([name for name, _ in definitions], deps, key_prefix)

    nodes: list[_Node] = []
    for name in order:  # referenced sets first, so every ref's target is finished
        for node in _walk(roots[name]):
            node.index = len(nodes)
            nodes.append(node)
            if node.kind == _REF:
                node.target = roots[node.name]

    bits: dict[str, int] = {}
    heights: dict[str, int] = {}
    for name in order:
        heights[name] = _assign_support(roots[name], bits, heights)
        if heights[name] > MAX_DEPTH:
            raise MatrixError(
                f"set {name!r}: expression nested more than {MAX_DEPTH} deep (counting +references)",
                f"{key_prefix}.sets.{name}",
            )

    return MatrixProgram(
        tuple((name, dsls[name], roots[name]) for name in order),
        tuple(nodes),
        MappingProxyType(bits),
        MappingProxyType(costs),
    )


def _solving_order(names: list[str], deps: Mapping[str, list[str]], key_prefix: str) -> list[str]:
    """Depth-first post-order from each set in definition order; a cycle is an error."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    order: list[str] = []
    for start in names:
        if state.get(start):
            continue
        state[start] = 1
        path = [start]
        stack = [iter(deps[start])]
        while stack:
            dependency = next(stack[-1], None)
            if dependency is None:
                stack.pop()
                done = path.pop()
                state[done] = 2
                order.append(done)
                continue
            seen = state.get(dependency)
            if seen == 1:
                cycle = " -> ".join([*path[path.index(dependency) :], dependency])
                raise MatrixError(f"circular reference between sets: {cycle}", f"{key_prefix}.sets.{dependency}")
            if seen == 2:
                continue
            state[dependency] = 1
            path.append(dependency)
            stack.append(iter(deps[dependency]))
    return order


def _assign_support(root: _Node, bits: dict[str, int], heights: Mapping[str, int]) -> int:
    """Fill ``support`` bottom-up for one set and return its height.

    Sets it refers to are finished already (``heights`` has them)."""
    height: dict[int, int] = {}
    for node in reversed(list(_walk(root))):  # children before parents
        if node.kind == _LEAF:
            node.support = 1 << bits.setdefault(node.name, len(bits))
            height[node.index] = 1
        elif node.kind == _REF:
            assert node.target is not None
            node.support = node.target.support
            height[node.index] = 1 + heights[node.name]
        else:
            support = 0
            for child in node.children:
                support |= child.support
            node.support = support
            height[node.index] = 1 + max(height[child.index] for child in node.children)
    return height[root.index]


# ------------------------------------------------------------------ router


class MatrixRouter:
    """The scheduler's router for ``config.router == "matrix"``.

    * The target may stay beside the running models of the cheapest
      combination that holds it (see :meth:`MatrixProgram.solve`); every
      other running model is evicted.
    * A target in no set runs alone.
    * A model that is no longer configured (removed by a reload while it
      still stops) is always evicted.

    Busy models are evicted like idle ones: the scheduler waits for their
    requests to finish before stopping them (llama-swap queues the swap the
    same way). Without a compiled matrix every other model is evicted.
    """

    def decide(self, target: str, running: Mapping[str, RunningModel], config: Config) -> Decision:
        stale = [model for model in running if model != target and model not in config.models]
        live = sorted(model for model in running if model in config.models)
        program = config.matrix
        if isinstance(program, MatrixProgram):
            evict = list(program.solve(target, live).evict)
        else:
            evict = [model for model in live if model != target]
        return Decision(tuple(sorted(evict + stale)))
