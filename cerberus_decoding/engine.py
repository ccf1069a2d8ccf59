"""One decoding loop for every method: auto-regressive, Medusa, Cerberus (gated or not).

The prompt's forward gives the first new token, which is shown at once (time to first token is
one forward). Every step is then exactly one forward of the base model (runtime/__init__.py) over
its KV cache:
  - AR step:   feed the pending token, read the next one.
  - SPEC step: heads draft a tree from the last hidden state, feed pending token + tree (tree mask,
               explicit positions), keep the path the base model accepts (verify.py: greedy,
               exact sampling or typical acceptance), plus the bonus token verify draws after it,
               and compact the cache to that path.
The gate picks the mode per step from the entropy of the last step's output.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from . import gate as gating
from .lookup import NgramIndex, first_match
from .models import CerberusError, LoadedModel
from .sampling import ACCEPTANCES, DEFAULT_ACCEPTANCE, sample
from .stops import TextTracker
from .tree import Tree, prune
from .verify import verify

CACHE_ROUND = 256  # KV cache capacity is allocated in multiples of this many tokens


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (lossless with every method)
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # how speculative steps accept drafts when temperature > 0 (greedy ignores it): "exact" samples
    # exactly the base model's distribution, "typical" is Medusa's lossy rule (docs/sampling.md)
    acceptance: str = DEFAULT_ACCEPTANCE

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise CerberusError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens}).")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise CerberusError(f"temperature must be a finite number >= 0 (got {self.temperature}).")
        if not 0 < self.top_p <= 1:
            raise CerberusError(f"top_p must be in (0, 1] (got {self.top_p}).")
        if self.acceptance not in ACCEPTANCES:
            raise CerberusError(f"Unknown acceptance {self.acceptance!r}; use one of {', '.join(ACCEPTANCES)}.")


@dataclass
class Step:
    mode: str  # "ar" or "spec"
    hidden_entropy: float  # entropy of the hidden state this step's decision read (NaN: not computed)
    logits_entropy: float  # entropy of the next-token distribution at that state (NaN: not computed)
    candidates: int  # tree nodes verified (0 on an AR step)
    accepted: int  # tokens this step produced (1 + accepted draft tokens)
    seconds: float


@dataclass
class Result:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    seconds: float
    steps: list[Step]
    finish_reason: str  # "stop" (EOS or stop string), "length" or "cancelled"
    method: str

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens per decoding step (the first token comes from the prompt's forward, not a step)."""
        return sum(s.accepted for s in self.steps) / len(self.steps) if self.steps else 0.0

    @property
    def speculative_steps(self) -> int:
        return sum(s.mode == "spec" for s in self.steps)

    def summary(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "steps": len(self.steps),
            "mean_accepted": round(self.mean_accepted, 4),
            "speculative_steps": self.speculative_steps,
            "method": self.method,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
        }

    def trace(self) -> list[dict]:
        return [asdict(s) for s in self.steps]


class Decoder:
    """Generates from a loaded model with optional draft heads; owns one KV cache (one sequence)."""

    def __init__(
        self,
        lm: LoadedModel,
        heads=None,
        tree: Tree | None = None,
        gate: str = "off",
        threshold: float = math.inf,
        method: str | None = None,
        drafter=None,
        min_confidence: float = 0.0,
    ):
        if heads is not None and tree is None:
            raise CerberusError("Draft heads need a tree.")
        if gate not in gating.GATES:
            raise CerberusError(f"Unknown gate {gate!r}; use one of {', '.join(gating.GATES)}.")
        if not 0.0 <= min_confidence <= 1.0:
            raise CerberusError(f"min_confidence is a probability, 0 to 1 (got {min_confidence}).")
        self.lm, self.heads, self.gate, self.threshold = lm, heads, gate, threshold
        self.min_confidence = min_confidence  # verify only draft nodes the heads give at least this chance
        self.tree = tree.to(lm.device) if tree is not None else None
        self.method = method or ("ar" if heads is None else heads.config.head_type)
        self.drafter = drafter  # optional extra draft source (prompt lookup), see lookup.py
        reads_lookup = heads is not None and heads.config.reads_lookup
        self.lookup_index = NgramIndex(heads.config.lookup_max_ngram) if reads_lookup else None  # for those heads
        self.runtime = lm.runtime
        self.vocab_size = int(lm.model.config.vocab_size)  # valid token ids: [0, vocab_size)
        self.tokenizer = lm.tokenizer
        self.eos_ids = _eos_ids(lm)
        self.cache = None  # the runtime's KV cache of this decoder's sequence
        self.cached_ids: list[int] = []  # tokens whose K/V the cache holds, in order
        self.heads_calls = 0  # counts draft-head invocations (the gate must skip them on AR steps)
        self.trace_entropies = False  # compute both entropies every step (analyze, --trace), not just the gate's
        self.config = None  # methods.EffectiveConfig: what it runs with and why (set by build_decoder)

    # ---- prompts -------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict], raw: bool = False) -> list[int]:
        """A chat prompt (str or messages) through the chat template, or raw text as is."""
        tok = self.tokenizer
        if raw:
            if not isinstance(prompt, str):
                raise CerberusError("A raw prompt must be a string.")
            return tok(prompt, add_special_tokens=False)["input_ids"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if getattr(tok, "chat_template", None) is None:
            text = "\n".join(m["content"] for m in messages)
            return tok(text, add_special_tokens=False)["input_ids"]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def check_fits(self, prompt_len: int) -> None:
        if prompt_len + 1 >= self.lm.context_length:
            raise CerberusError(
                f"The prompt is {prompt_len} tokens, but the model's context is {self.lm.context_length} "
                "tokens (and at least one must be left to generate). Shorten the prompt."
            )

    # ---- the model calls -------------------------------------------------------------------
    def _prefill(self, prompt_ids: list[int], capacity: int, reuse: bool) -> torch.Tensor:
        """Feed the prompt (reusing the cached prefix if allowed) -> hidden state at its last token."""
        device = self.lm.device
        keep = 0
        if self.cache is not None and self.cache.capacity >= capacity:  # this decoder's own cache, reused
            shared = min(len(self.cached_ids), len(prompt_ids) - 1) if reuse else 0
            while keep < shared and self.cached_ids[keep] == prompt_ids[keep]:
                keep += 1
            self.cache.truncate(keep)
        else:  # room rounded up, so that the next prompts fit too (and keep a CUDA graph's buffers)
            self.cache = self.runtime.new_cache(-(-capacity // CACHE_ROUND) * CACHE_ROUND, device)
        new = torch.tensor(prompt_ids[keep:], device=device)
        hidden = self.runtime.forward(self.cache, new, torch.arange(keep, len(prompt_ids), device=device))
        self.cached_ids = list(prompt_ids)
        return hidden[-1]

    def _ar_step(self, root: torch.Tensor, cfg: SamplingConfig, generator):
        """Feed the pending token alone -> (fed token ids [1 id], hidden [H], logits [V], next pending token [1])."""
        pos = torch.tensor([self.cache.length], device=root.device)
        hidden = self.runtime.forward(self.cache, root, pos)  # [1, H]
        if cfg.temperature <= 0:  # the LM head and its argmax in one call where the runtime fuses them
            logits, token = self.runtime.lm_head_greedy(hidden)
            return root.tolist(), hidden[0], logits[0], token
        logits = self.runtime.lm_head(hidden)[0]
        return root.tolist(), hidden[0], logits, sample(logits, cfg.temperature, cfg.top_p, generator)

    def _spec_step(self, tree: Tree, tokens: torch.Tensor, cfg: SamplingConfig, generator):
        """Feed pending token + tree, keep the accepted path -> (fed token ids, a list of a+1: pending
        + accepted drafts; hidden [H], logits [V], next pending token [1])."""
        pos = self.cache.length
        hidden = self.runtime.forward(self.cache, tokens, pos + tree.depth, tree.mask)  # [N+1, H]
        path, logits, root = verify(
            tree,
            tokens,
            hidden,
            self.runtime.lm_head,
            cfg.temperature,
            cfg.top_p,
            cfg.acceptance,
            generator,
            self.runtime.lm_head_greedy,
        )
        self.cache.compact(pos, path)
        token_ids = tokens.tolist()
        return [token_ids[node] for node in path], hidden[path[-1]], logits, root

    # ---- generation ------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        config: SamplingConfig | None = None,
        on_text: Callable[[str], bool | None] | None = None,
        reuse_cache: bool = False,
    ) -> Result:
        """Generate after ``prompt_ids``. ``on_text`` gets each new piece of text; returning False
        stops generation. ``reuse_cache`` keeps the K/V of a shared prefix from the last call (chat):
        those were computed step by step; in w4a8 a fresh prefill computes each row as that step
        (``runtime.chained_prompts``), so the output equals a fresh call's; elsewhere it computes them
        in one block, and the output equals a fresh call's up to near-ties (tests/test_engine.py)."""
        cfg = config or SamplingConfig()
        cfg.validate()
        self.check_fits(len(prompt_ids))
        max_new = min(cfg.max_new_tokens, self.lm.context_length - len(prompt_ids))  # clamp to context
        draft_room = (self.tree.size if self.tree is not None else 0) + (self.drafter.max_nodes if self.drafter else 0)
        generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        start = time.perf_counter()
        hidden = self._prefill(prompt_ids, len(prompt_ids) + max_new + draft_room + 2, reuse_cache)
        logits = self.runtime.lm_head(hidden[None])[0]
        root = sample(logits, cfg.temperature, cfg.top_p, generator)  # the first new token, shown now, fed next
        if self.drafter is not None:
            self.drafter.reset(prompt_ids)
        if self.lookup_index is not None:
            self.lookup_index.reset(prompt_ids)

        out: list[int] = []
        steps: list[Step] = []
        shown = TextTracker(self.tokenizer, cfg.stop)

        def emit(new_ids: list[int]) -> str | None:
            """Output new tokens and stream their text -> the finish reason if generation ends here."""
            finish = None
            for i, t in enumerate(new_ids):  # stop conditions, in order: EOS, token budget, stop strings
                if t in self.eos_ids:
                    new_ids, finish = new_ids[: i + 1], "stop"
                    break
            if len(out) + len(new_ids) >= max_new:
                new_ids, finish = new_ids[: max_new - len(out)], finish or "length"
            out.extend(new_ids)
            delta = shown.add(new_ids, final=finish is not None)
            if shown.stopped:
                finish = "stop"
            if on_text is not None and delta and on_text(delta) is False and finish is None:
                finish = "cancelled"
            return finish

        finish = emit(root.tolist())
        while finish is None:
            t0 = time.perf_counter()
            h_ent, l_ent = self._entropies(hidden, logits)
            drafts = self._draft(hidden, root, h_ent, l_ent)
            if drafts is None:  # fed_ids: the pending token (already shown) and the accepted drafts
                fed_ids, hidden, logits, root = self._ar_step(root, cfg, generator)
            else:
                fed_ids, hidden, logits, root = self._spec_step(*drafts, cfg, generator)
            self.cached_ids.extend(fed_ids)
            if self.drafter is not None:
                self.drafter.extend(fed_ids)
            if self.lookup_index is not None:
                self.lookup_index.extend(fed_ids)
            seconds = time.perf_counter() - t0
            shown_before = len(out)
            finish = emit(fed_ids[1:] + root.tolist())
            mode, candidates = ("ar", 0) if drafts is None else ("spec", drafts[0].size - 1)
            steps.append(Step(mode, h_ent, l_ent, candidates, len(out) - shown_before, seconds))
        return Result(out, shown.text, len(prompt_ids), time.perf_counter() - start, steps, finish, self.method)

    def _entropies(self, hidden, logits) -> tuple[float, float]:
        """(hidden, logits) entropies of this step's decision: the one the gate reads, both when
        tracing, NaN otherwise (each is a softmax over its vector: 0.1-1 ms for the logits on a
        CPU, docs/gate.md, which a plain AR step must not pay)."""
        gate = gating.reads(self.gate, self.threshold) if self.heads is not None else None
        hidden_entropy = gating.entropy(hidden) if self.trace_entropies or gate == "hidden" else math.nan
        logits_entropy = gating.entropy(logits) if self.trace_entropies or gate == "logits" else math.nan
        return hidden_entropy, logits_entropy

    def _draft(self, hidden, root, h_ent, l_ent):
        """The tree of this step and its tokens, or None for a plain AR step."""
        heads_on = self.heads is not None and gating.speculate(self.gate, self.threshold, h_ent, l_ent)

        def drafts():  # (tree, tokens [N+1]) the heads draft, or None; the drafter runs them only if it needs them
            self.heads_calls += 1
            lookup = None
            if self.lookup_index is not None:  # heads that read what prompt lookup finds after the root
                found = first_match(self.lookup_index, int(root), self.heads.config.lookup_tokens)
                lookup = torch.tensor(found, device=root.device)
            tokens, confidence = self.heads.draft(hidden, root, self.tree, self.runtime.cuda_graphs, lookup)
            return prune(self.tree, tokens, confidence, self.min_confidence)

        if self.drafter is not None:
            return self.drafter.draft(root, self.tree, drafts) if heads_on else self.drafter.draft(root, None, None)
        if not heads_on:
            return None
        return drafts()


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids = set()
    for src in (lm.model.generation_config.eos_token_id, lm.tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids
