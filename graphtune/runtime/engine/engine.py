"""graphtune's generation engine: it owns the decode loop of a Hugging Face causal LM.

Per call (an offline batch of prompts):

1. **Plan**: rows (prompt x sample) -> a prefix tree over token ids (shared prefixes found
   automatically, multi-level); every node gets one contiguous KV range, reserved once.
2. **Admit** rows in tree order while their KV fits the budget (``max_kv_tokens``); the rest wait
   and are admitted as rows finish (continuous batching within the call).
3. **Prefill** the admitted rows' nodes that are not resident yet, each shared node once, packed
   into forwards of at most ``max_batch_tokens`` tokens.
4. **Decode**: one forward per step over the active rows' new tokens (one token per row, no
   padding), attention planned once per step and run by every layer (:mod:`.step`).
5. **Retire** rows at EOS or ``max_new_tokens``; free their private range, and a shared node's
   range once no active or waiting row needs it.

Exactness: the plain model is the oracle; greedy tokens equal HF ``generate``'s row by row
(``tests/runtime/engine``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from graphtune import flags
from graphtune.errors import OptionError, PlanError
from graphtune.runtime.engine.hf_model import ModelRunner, unsupported_reason
from graphtune.runtime.engine.kv_pool import KVPool
from graphtune.runtime.engine.memory import keep_freed_memory
from graphtune.runtime.engine.prefix_tree import Node, PrefixTree, build_prefix_tree
from graphtune.runtime.engine.drafters import Drafter, describe_drafter, make_drafter
from graphtune.runtime.engine.sampling import Sampling, select_tokens
from graphtune.runtime.engine.speculative import SpecRowStats, Speculator
from graphtune.codegen.lean_decode.plan import make_plan
from graphtune.runtime.sparse_prefill import SparseStats, make_sparse
from graphtune.runtime.engine.step import LEAN_TILE, StepPlan, decode_plan, prefill_plan, run_attention

__all__ = ["Engine", "EnginePlan", "EngineResult", "EngineStats"]

log = logging.getLogger("graphtune.engine")


@dataclass
class EngineStats:
    """What one call did (times in seconds)."""

    rows: int = 0
    prompt_tokens: int = 0  # real prompt tokens of all rows
    prefilled_tokens: int = 0  # tokens the engine computed at prefill (shared ones once)
    generated_tokens: int = 0
    forwards: int = 0
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_capacity_tokens: int = 0
    kv_peak_tokens: int = 0
    kv_bytes_per_token: int = 0
    hf_kv_tokens: int = 0  # what HF generate would hold: rows x (longest prompt + new tokens)
    admissions: int = 0  # admission rounds (> 1: the budget made rows wait)
    tree: str = ""
    verify_steps: int = 0  # speculative verification forwards (decode_steps counts plain steps)
    draft_s: float = 0.0  # time the drafter took (inside decode_s)
    proposed_tokens: int = 0  # speculative: draft tokens verified
    accepted_tokens: int = 0  # speculative: draft tokens kept

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def kv_bytes(self) -> int:
        return self.kv_peak_tokens * self.kv_bytes_per_token

    @property
    def hf_kv_bytes(self) -> int:
        return self.hf_kv_tokens * self.kv_bytes_per_token

    @property
    def tokens_per_s(self) -> float:
        t = self.prefill_s + self.decode_s
        return self.generated_tokens / t if t > 0 else 0.0


@dataclass
class EngineResult:
    """Generated tokens per row (rows: prompt-major, ``num_return_sequences`` samples per prompt)."""

    sequences: list[list[int]]  # generated tokens only (EOS included when hit)
    prompts: list[list[int]]
    stats: EngineStats
    texts: list[str] | None = None
    speculation: list[SpecRowStats] | None = None  # per row, with a drafter (Engine(speculative=...))


@dataclass
class EnginePlan:
    """What the engine would do with a batch (``Engine.plan``; shown by ``explain``)."""

    rows: int
    prompt_tokens: int  # real prompt tokens over all rows
    prefill_tokens: int  # tokens the engine prefills (shared prefixes once)
    shared_nodes: int
    tree: str
    kv_bytes: int  # KV reserved by the engine for the whole call
    hf_kv_bytes: int  # KV HF generate holds at the end: rows x (longest prompt + new tokens)
    decode: str  # the first decode step's schedule of the private tails
    speculation: str = ""  # the drafter, and the last call's per-row speculation counters
    sparse: str = ""  # opt-in sparse prefill: settings, and the last call's per-layer density
    linears: str = ""  # how the linear layers of decode/verify steps were served (tuned or F.linear)

    def __str__(self) -> str:
        mb = 1 << 20
        lines = [f"engine plan: {self.rows} rows, {self.prompt_tokens} prompt tokens, prefill {self.prefill_tokens} "
                 f"({self.prompt_tokens / max(self.prefill_tokens, 1):.1f}x fewer), {self.shared_nodes} shared segments",
                 f"  KV held: {self.kv_bytes / mb:.1f} MiB vs HF {self.hf_kv_bytes / mb:.1f} MiB "
                 f"({self.hf_kv_bytes / max(self.kv_bytes, 1):.1f}x less)",
                 f"  {self.decode}", "  prefix tree:"]
        lines += [f"    {line}" for line in self.tree.splitlines()]
        lines += [f"  {line}" for line in self.speculation.splitlines()]
        lines += [f"  {line}" for line in self.sparse.splitlines()]
        if self.linears:
            lines.append(f"  {self.linears}")
        return "\n".join(lines)


@dataclass(eq=False)
class _Row:
    index: int
    prompt: list[int]
    leaf: Node
    out: list[int] = field(default_factory=list)
    done: bool = False


class Engine:
    """The offline batch engine for a Hugging Face causal LM (CPU).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM whose attention goes through HF's attention interface (Llama, Mistral, Qwen2,
        Phi-3, GPT-2, GPT-NeoX, OPT). :class:`OptionError` says why another one is not supported.
    tokenizer : optional
        Used to encode string prompts and decode the results.
    max_kv_tokens : int, optional
        KV budget in tokens (all layers); default ``GRAPHTUNE_ENGINE_MAX_KV_TOKENS`` (0: no bound).
        Rows that do not fit wait until others finish.
    min_shared : int
        Shortest shared prefix worth storing once (default ``GRAPHTUNE_ENGINE_MIN_SHARED``).
    max_batch_tokens : int
        Most tokens per prefill forward (long prompts are prefilled in chunks).
    speculative : str, Drafter or None
        Speculative decoding: ``"ngram"`` (prompt lookup), ``"layerskip"`` (the model's first
        layers as drafter), any :class:`~graphtune.runtime.engine.drafters.Drafter`, or None.
        Lossless (greedy tokens are the model's own; sampling keeps its distribution).
    spec_tokens : int
        Most draft tokens per row per step (default ``GRAPHTUNE_ENGINE_SPEC_TOKENS``).
    sparse_prefill : str, PBSConfig, SparsePrefill or None
        Opt-in approximate prefill of long prompts: ``"pbs"`` (permuted block-sparse attention),
        ``"block"`` (no permutation), a config, or None (exact). Decode stays dense.
        :attr:`last_sparse` holds the per-layer densities of the last sparse prefill.

    Examples
    --------
    >>> import torch, graphtune
    >>> from graphtune.models import build_model
    >>> model = build_model("llama")
    >>> eng = graphtune.Engine(model)
    >>> res = eng.generate([[1, 5, 6, 7], [1, 5, 6, 9, 10]], max_new_tokens=4)
    >>> [len(s) for s in res.sequences]
    [4, 4]
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, max_kv_tokens: int | None = None,
                 min_shared: int | None = None, max_batch_tokens: int | None = None,
                 speculative: str | Drafter | None = None, spec_tokens: int | None = None,
                 sparse_prefill: Any = None) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise OptionError(f"graphtune.Engine cannot run this model: {reason}")
        self.model = model
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model)
        keep_freed_memory()  # a forward's large temporaries reused, not page-faulted anew (memory.py)
        self.max_kv_tokens = flags.get("ENGINE_MAX_KV_TOKENS") if max_kv_tokens is None else max_kv_tokens
        self.min_shared = flags.get("ENGINE_MIN_SHARED") if min_shared is None else min_shared
        self.max_batch_tokens = flags.get("ENGINE_MAX_BATCH_TOKENS") if max_batch_tokens is None else max_batch_tokens
        if self.max_batch_tokens < 1 or self.min_shared < 1 or (self.max_kv_tokens or 0) < 0:
            raise OptionError(f"Engine: max_batch_tokens ({self.max_batch_tokens}) and min_shared "
                              f"({self.min_shared}) must be >= 1, max_kv_tokens ({self.max_kv_tokens}) >= 0")
        self.last_plan: PrefixTree | None = None
        self.drafter = make_drafter(speculative)
        self.sparse = make_sparse(sparse_prefill, model)
        self.last_speculation: list[SpecRowStats] | None = None
        self.spec_tokens = flags.get("ENGINE_SPEC_TOKENS") if spec_tokens is None else spec_tokens
        if self.spec_tokens < 1:
            raise OptionError(f"Engine: spec_tokens must be >= 1, got {self.spec_tokens}")

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[str],
        max_new_tokens: int = 32,
        *,
        num_return_sequences: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        on_tokens: Callable[[list[int], list[int]], None] | None = None,
        progress: bool = False,
    ) -> EngineResult:
        """Generate ``max_new_tokens`` (or until EOS) for every prompt, ``num_return_sequences`` times each.

        ``on_tokens(rows, tokens)`` is called after every step with the rows that got a token
        (a streamer hook). Returns an :class:`EngineResult`.
        """
        ids = self._encode(prompts)
        if max_new_tokens < 1:
            raise OptionError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_return_sequences < 1:
            raise OptionError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        eos = self._eos(eos_token_id)
        rows_prompts = [p for p in ids for _ in range(num_return_sequences)]
        # no_grad, not inference_mode: lean decode's worker threads write into tensors made here
        # (they run outside the caller's inference mode, so it is turned off here too)
        with torch.inference_mode(False), torch.no_grad():
            return self._run(rows_prompts, max_new_tokens, sampling, eos, on_tokens, progress)

    def plan(self, prompts: Sequence[Sequence[int]] | Sequence[str], max_new_tokens: int = 32,
             num_return_sequences: int = 1) -> "EnginePlan":
        """The engine's plan for a batch, without running it: prefix tree, KV held vs HF, first decode schedule.

        >>> from graphtune.models import build_model
        >>> p = Engine(build_model("llama")).plan([[1] + list(range(5, 40))] * 4, max_new_tokens=8)
        >>> p.rows, p.prefill_tokens, p.prompt_tokens
        (4, 36, 144)
        """
        ids = [p for p in self._encode(prompts) for _ in range(num_return_sequences)]
        tree = build_prefix_tree(ids, self.min_shared)
        r = self.runner
        bpt = 2 * r.num_layers * r.kv_heads * r.head_dim * torch.finfo(r.dtype).bits // 8
        need = tree.shared_tokens() + sum(len(leaf.tokens) + max_new_tokens - 1 for leaf in tree.leaves)
        hf = len(ids) * (max(len(p) for p in ids) + max_new_tokens)
        lengths = [len(leaf.tokens) + 1 for leaf in tree.leaves]  # private keys at the first decode step
        if len(set(lengths)) == 1:
            decode = f"private tails: one strided batched call ({len(lengths)} rows x {lengths[0]} keys)"
        else:
            lp = make_plan(lengths, r.kv_heads, LEAN_TILE, max(1, min(torch.get_num_threads(), len(lengths) * r.kv_heads)))
            decode = f"private tails: lean decode over ragged lengths {min(lengths)}..{max(lengths)}: {lp.summary()}"
        return EnginePlan(len(ids), sum(map(len, ids)), tree.prompt_tokens(), len(tree.shared), tree.describe(),
                          need * bpt, hf * bpt, decode, self._describe_speculation(), self._describe_sparse(),
                          r.linears.describe())

    @property
    def last_sparse(self) -> SparseStats | None:
        """Per-layer, per-head density of the last sparse prefill call (``sparse_prefill=`` only)."""
        return None if self.sparse is None else self.sparse.stats

    def _describe_sparse(self) -> str:
        if self.sparse is None:
            return ""
        return self.sparse.describe() + "\n" + self.sparse.stats.describe()

    def _describe_speculation(self) -> str:
        if self.drafter is None:
            return ""
        lines = [f"speculative decoding: drafter {describe_drafter(self.drafter)}, up to {self.spec_tokens} draft "
                 "tokens per row per step, tree verification, lossless acceptance"]
        last = self.last_speculation
        if last:
            lines.append("last call, per row: proposed / accepted (rate), tokens per verify step:")
            for i, st in enumerate(last[:16]):
                lines.append(f"  row {i}: {st.proposed} / {st.accepted} ({st.acceptance:.0%}), {st.mean_accepted:.2f}"
                             + (f", {st.off_steps} steps without drafts (low acceptance)" if st.off_steps else ""))
            if len(last) > 16:
                lines.append(f"  ... {len(last) - 16} more rows")
        return "\n".join(lines)

    # ------------------------------------------------------------------ internals

    def _encode(self, prompts: Sequence[Sequence[int]] | Sequence[str]) -> list[list[int]]:
        if not len(prompts):
            raise OptionError("Engine.generate: no prompts")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise OptionError("Engine.generate: string prompts need a tokenizer (Engine(model, tokenizer))")
                p = self.tokenizer(p, add_special_tokens=True)["input_ids"]
            toks = [int(t) for t in (p.tolist() if isinstance(p, Tensor) else p)]
            if not toks:
                raise OptionError(f"Engine.generate: prompt {i} is empty")
            vocab = self.model.config.vocab_size
            bad = [t for t in toks if not 0 <= t < vocab]
            if bad:
                raise OptionError(f"Engine.generate: prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            out.append(toks)
        return out

    def _eos(self, eos: int | Sequence[int] | None) -> frozenset[int]:
        eos = self.runner.eos_default if eos is None else eos
        if eos is None:
            return frozenset()
        return frozenset([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])

    def _run(self, prompts: list[list[int]], max_new: int, sampling: Sampling, eos: frozenset[int],
             on_tokens: Callable | None, progress: bool) -> EngineResult:
        r = self.runner
        tree = build_prefix_tree(prompts, self.min_shared)
        self.last_plan = tree
        for i, n in enumerate(tree.shared + tree.leaves):
            n.id = i
        # per-call state stays local: one Engine may serve overlapping calls (optimize(model).generate)
        ends_at_node = {leaf.parent.id for leaf in tree.leaves if not leaf.tokens}  # type: ignore[union-attr]
        # a row's range: its prompt tail and new tokens, plus room for one step's draft tokens
        slack = self.spec_tokens if self.drafter is not None else 0
        for n in tree.shared + tree.leaves:
            n.capacity = len(n.tokens) + (max_new - 1 + slack if n.leaf else 0)
        need = sum(n.capacity for n in tree.shared + tree.leaves)
        cap = min(need, self.max_kv_tokens) if self.max_kv_tokens else need
        pool = KVPool(r.num_layers, r.kv_heads, r.head_dim, max(1, cap), r.dtype)
        rows = [_Row(i, p, tree.leaves[i]) for i, p in enumerate(prompts)]
        stats = EngineStats(rows=len(rows), prompt_tokens=sum(map(len, prompts)), kv_capacity_tokens=cap,
                            kv_bytes_per_token=pool.bytes_per_token, tree=tree.describe(),
                            hf_kv_tokens=len(rows) * (max(map(len, prompts)) + max_new))
        users = {n.id: len(n.rows) for n in tree.shared}  # rows (active or waiting) still needing a node
        gens = sampling.generators(len(rows))
        spec = None
        if self.drafter is not None:
            spec = Speculator(self.drafter, self.spec_tokens, r, pool, sampling, gens)
            for row in rows:
                spec.add_row(row.index, row.prompt)
        # admission order = tree order (rows under the same shared nodes next to each other, the
        # nodes' ids being pre-order): sharers are admitted together, so a shared prefix is
        # resident once and freed soon after (BatchLLM's grouping)
        waiting = sorted(rows, key=lambda row: [n.id for n in row.leaf.chain()])
        active: list[_Row] = []
        node_logits: dict[int, Tensor] = {}
        bar = _Progress(len(rows) * max_new) if progress else None

        def finish(row: _Row) -> None:
            row.done = True
            pool.free(row.leaf.slot, row.leaf.capacity)
            for a in row.leaf.chain()[:-1]:
                users[a.id] -= 1
                if users[a.id] == 0 and a.slot >= 0:
                    pool.free(a.slot, a.capacity)
                    a.slot = -1

        def emit(batch: list[_Row], toks: list[int]) -> None:
            for row, t in zip(batch, toks):
                row.out.append(t)
                if t in eos or len(row.out) >= max_new:
                    finish(row)
            stats.generated_tokens += len(batch)
            if on_tokens is not None:
                on_tokens([row.index for row in batch], toks)
            if bar:
                bar.update(len(batch))

        def emit_many(batch: list[_Row], toks: list[list[int]]) -> None:
            # a speculative step's tokens, one position at a time (streamers see them in order);
            # a row stops at EOS or max_new_tokens even if more of its tokens were accepted
            for j in range(max(map(len, toks), default=0)):
                got = [(row, ts[j]) for row, ts in zip(batch, toks) if j < len(ts) and not row.done]
                if got:
                    emit([row for row, _ in got], [t for _, t in got])

        while waiting or active:
            admitted = self._admit(waiting, pool, active)
            if admitted:
                stats.admissions += 1
                t0 = time.perf_counter()
                first = self._prefill(admitted, pool, stats, node_logits, ends_at_node)
                toks = select_tokens(first, sampling, gens, [row.index for row in admitted])
                stats.prefill_s += time.perf_counter() - t0
                emit(admitted, toks)
                active = [row for row in active + admitted if not row.done]
                continue
            if not active:
                if pool.used:
                    # nothing runs, yet shared nodes kept for waiting rows block the next row:
                    # evict them all; rows that need them prefill them again
                    for n in tree.shared:
                        if n.slot >= 0:
                            pool.free(n.slot, n.capacity)
                            n.slot, n.filled = -1, 0
                    continue
                row = waiting[0]
                raise PlanError(f"Engine: row {row.index} needs {self._need(row)} KV slots but the budget "
                                f"max_kv_tokens={self.max_kv_tokens} has at most {pool.largest_free()} free")
            t0 = time.perf_counter()
            many = spec.step(self, active, max_new) if spec is not None else None
            if many is not None:
                stats.decode_s += time.perf_counter() - t0
                stats.verify_steps += 1
                stats.forwards += 1
                emit_many(active, many)
            else:
                logits = self._decode(active, pool, stats)
                toks = select_tokens(logits, sampling, gens, [row.index for row in active])
                dt = time.perf_counter() - t0
                stats.decode_s += dt
                if spec is not None:
                    spec.observe_decode(len(active), dt)
                stats.decode_steps += 1
                emit(active, toks)
            active = [row for row in active if not row.done]
        stats.kv_peak_tokens = pool.peak
        if bar:
            bar.close()
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(row.out, skip_special_tokens=True) for row in rows]
        per_row = None
        if spec is not None:
            per_row = [spec.stats[row.index] for row in rows]
            stats.draft_s = spec.draft_s
            stats.proposed_tokens = sum(s.proposed for s in per_row)
            stats.accepted_tokens = sum(s.accepted for s in per_row)
            self.last_speculation = per_row
        return EngineResult([row.out for row in rows], prompts, stats, texts, per_row)

    def _need(self, row: _Row) -> int:
        return row.leaf.capacity + sum(a.capacity for a in row.leaf.chain()[:-1] if a.slot < 0)

    def _admit(self, waiting: list[_Row], pool: KVPool, active: list[_Row]) -> list[_Row]:
        # FIFO over ``waiting`` (kept in tree order by the caller)
        admitted: list[_Row] = []
        while waiting:
            row = waiting[0]
            fresh = [a for a in row.leaf.chain()[:-1] if a.slot < 0]
            got: list[tuple[Node, int]] = []
            for n in fresh + [row.leaf]:
                s = pool.alloc(n.capacity)
                if s is None:
                    for m, s2 in got:
                        pool.free(s2, m.capacity)
                        m.slot = -1
                    return admitted
                n.slot = s
                got.append((n, s))
            admitted.append(waiting.pop(0))
        return admitted

    def _prefill(self, admitted: list[_Row], pool: KVPool, stats: EngineStats,
                 node_logits: dict[int, Tensor], ends_at_node: set[int]) -> Tensor:
        """Compute every not-yet-filled node of the admitted rows; return each row's next-token logits."""
        todo: list[Node] = []
        seen: set[int] = set()
        for row in admitted:
            for n in row.leaf.chain():
                if n.id not in seen and n.filled < len(n.tokens):
                    seen.add(n.id)
                    todo.append(n)
        todo.sort(key=lambda n: (len(n.chain()), n.id))  # parents before children
        # next-token logits: of each admitted row's last prompt token, and of every shared node
        # a prompt ends at (kept: rows admitted later read them without recomputing the node)
        wanted = {row.leaf.id for row in admitted if row.leaf.tokens} | ends_at_node
        last_hidden: dict[int, Tensor] = {}
        i = 0
        while i < len(todo):
            spans: list[tuple[Node, int, int]] = []
            budget = self.max_batch_tokens
            while i < len(todo) and budget > 0:
                n = todo[i]
                m = min(len(n.tokens) - n.filled, budget)
                spans.append((n, n.filled, m))
                budget -= m
                if n.filled + m < len(n.tokens):
                    break  # cut: its descendants wait for the next forward
                i += 1
            plan = prefill_plan(spans, self.sparse)
            ids = torch.tensor([t for n, off, m in spans for t in n.tokens[off:off + m]], dtype=torch.long)
            pos = torch.cat([torch.arange(n.start + off, n.start + off + m) for n, off, m in spans])
            hidden = self._forward(plan, pool, ids, pos)
            stats.forwards += 1
            stats.prefilled_tokens += plan.tokens
            t = 0
            for n, off, m in spans:
                n.filled = off + m
                if n.filled == len(n.tokens) and n.id in wanted:
                    last_hidden[n.id] = hidden[t + m - 1]
                t += m
        if last_hidden:
            keys = list(last_hidden)
            logits = self.runner.logits(torch.stack([last_hidden[k] for k in keys]))
            node_logits.update(zip(keys, logits))
        out = []
        for row in admitted:
            key = row.leaf.id if row.leaf.tokens else row.leaf.parent.id  # type: ignore[union-attr]
            out.append(node_logits[key])
        return torch.stack(out)

    def _decode(self, active: list[_Row], pool: KVPool, stats: EngineStats) -> Tensor:
        leaves = [row.leaf for row in active]
        plan = decode_plan(leaves, self.runner.kv_heads, torch.get_num_threads())
        ids = torch.tensor([row.out[-1] for row in active], dtype=torch.long)
        pos = torch.tensor([leaf.start + leaf.filled for leaf in leaves], dtype=torch.long)
        hidden = self._forward(plan, pool, ids, pos)
        for leaf in leaves:
            leaf.filled += 1
        stats.forwards += 1
        return self.runner.logits(hidden)

    def _forward(self, plan: StepPlan, pool: KVPool, ids: Tensor, pos: Tensor,
                 early_exit_layers: int | None = None) -> Tensor:
        def step(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
            return run_attention(plan, pool, layer, q, k, v, scale)

        with self.runner.attention(step):
            if early_exit_layers is not None:  # a self-speculative draft: the first layers only
                return self.runner.early_exit_hidden(ids, pos, early_exit_layers)
            return self.runner.hidden(ids, pos)


class _Progress:
    """A minimal progress line on stderr for long offline batches (tokens generated / expected)."""

    def __init__(self, total: int) -> None:
        import sys

        self.total, self.done, self.t0, self.out = total, 0, time.perf_counter(), sys.stderr
        self.last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            self.out.write(f"\rgraphtune: {self.done}/{self.total} tokens, {rate:.1f} tok/s")
            self.out.flush()

    def close(self) -> None:
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        self.out.write(f"\rgraphtune: {self.done} tokens, {rate:.1f} tok/s\n")
        self.out.flush()
