"""What a predictor must beat, on the same held-out tokens: popularity, previous token, an LRU cache,
the router as prior (no training) and the oracle (a sanity line at 1.0); and Belady's cache, the bound no
cache of its size can pass.

The ranked-list baselines give ids [N, n] (best first) that `metrics.per_token` scores like any
predictor's. The LRU cache has no ranked list: `lru` scores its content directly (see there).
Arrays are one MoE layer's, rows in trace order (prompt by prompt, each prompt's prefill tokens then
its decode tokens):

    ids:    [N, k]  the router's experts, router order (best first)
    prompt: [N]     the prompt index of each token
"""

from collections import OrderedDict, deque
from pathlib import Path

import numpy as np

from ..errors import UserError
from .metrics import margins

NORM_FLOOR = 1e-6  # |norm weight| below this: that feature carries nothing the router could read back


def popularity_order(train_ids: np.ndarray, n_expert: int) -> np.ndarray:
    """All experts of a layer, most often selected in the training tokens first (ties: lower id).

    train_ids: [N_train, k] → order: [n_expert] int64."""
    counts = np.bincount(np.asarray(train_ids, np.int64).ravel(), minlength=n_expert)  # [E]
    return np.argsort(-counts, kind="stable")


def fill(head: np.ndarray, order: np.ndarray, n: int) -> np.ndarray:
    """Each row's `head` ids, then the experts of `order` not already in it, cut to n columns.

    head: [N, h] (distinct ids per row), order: [E] (a permutation of all experts) → [N, min(n, E)]."""
    head = np.asarray(head, np.int64)
    n_tokens, h = head.shape
    in_head = (order[None, :, None] == head[:, None, :]).any(axis=2)  # [N, E]
    rest = np.broadcast_to(order, in_head.shape)[~in_head].reshape(n_tokens, len(order) - h)  # [N, E-h]
    return np.concatenate([head, rest], axis=1)[:, : min(n, len(order))]


def popularity(order: np.ndarray, n_tokens: int, n: int) -> np.ndarray:
    """The same list for every token: the n most frequent experts of the layer in the training traces.

    → [n_tokens, min(n, E)]"""
    return np.broadcast_to(order[:n], (n_tokens, min(n, len(order)))).copy()


def first_of_prompt(prompt: np.ndarray) -> np.ndarray:
    """True where a token starts a new prompt (its predecessor row belongs to another prompt). [N] bool"""
    prompt = np.asarray(prompt)
    first = np.ones(len(prompt), bool)
    first[1:] = prompt[1:] != prompt[:-1]
    return first


def prev_token(ids: np.ndarray, prompt: np.ndarray, order: np.ndarray, n: int) -> np.ndarray:
    """The experts the previous token of the same prompt used in this layer, in router order, then
    filled by popularity; a prompt's first token gets the popularity list. → [N, min(n, E)]"""
    ids = np.asarray(ids, np.int64)
    k = ids.shape[1]
    previous = np.empty_like(ids)
    previous[1:] = ids[:-1]
    previous[first_of_prompt(prompt)] = order[:k]  # rows with no predecessor in their prompt
    return fill(previous, order, n)


def oracle(ids: np.ndarray, order: np.ndarray, n: int) -> np.ndarray:
    """The router's own ids, then popularity: every metric is 1.0 (checks the plumbing)."""
    return fill(ids, order, n)


def lru_simulate(
    ids: np.ndarray, prompt: np.ndarray, capacity: int, carry: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """An LRU cache of `capacity` expert slots for one layer, run over the tokens in order.

    Each token's k experts are looked up in the cache as it was before the token (a hit each one
    there), then touched in router order (so among one token's experts the last-ranked is the most
    recent) and the least recently used beyond `capacity` are evicted. The cache is cleared at the
    start of each prompt (each prompt is an independent request, and results do not depend on the
    order of prompts) unless `carry`.

    → hits: [N] int (how many of the k were cached), first_hit: [N] bool (the router's best was).
    """
    ids_list = np.asarray(ids, np.int64).tolist()
    starts = first_of_prompt(prompt).tolist()
    hits = np.zeros(len(ids_list), np.int64)
    first_hit = np.zeros(len(ids_list), bool)
    cache: OrderedDict[int, None] = OrderedDict()
    for row, (experts, start) in enumerate(zip(ids_list, starts, strict=True)):
        if start and not carry:
            cache.clear()
        hits[row] = sum(expert in cache for expert in experts)
        first_hit[row] = experts[0] in cache
        for expert in experts:
            cache[expert] = None
            cache.move_to_end(expert)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits, first_hit


def belady_simulate(
    ids: np.ndarray, prompt: np.ndarray, capacity: int, carry: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Belady's cache of `capacity` expert slots for one layer: the best any cache of that size can do
    knowing the whole future, so the upper bound a predictor's prefetching and eviction approach.

    As `lru_simulate` (hits counted before the token, its experts then inserted), except the victim:
    of the cached experts the token did not select, the one next selected furthest ahead (never, past
    the end of the prompt unless `carry`), ties broken by LRU (router order, as there).

    → hits: [N] int, first_hit: [N] bool.
    """
    ids_list = np.asarray(ids, np.int64).tolist()
    starts = first_of_prompt(prompt).tolist()
    ends = np.append(np.flatnonzero(starts)[1:], len(ids_list)) if not carry else None  # one per prompt
    uses: dict[int, deque[int]] = {}
    for row, experts in enumerate(ids_list):
        for expert in dict.fromkeys(experts):
            uses.setdefault(expert, deque()).append(row)
    hits = np.zeros(len(ids_list), np.int64)
    first_hit = np.zeros(len(ids_list), bool)
    cache: OrderedDict[int, None] = OrderedDict()  # least recently used first
    prompt_end, n_prompts = len(ids_list), 0
    for row, (experts, start) in enumerate(zip(ids_list, starts, strict=True)):
        if start and not carry:
            cache.clear()
            prompt_end, n_prompts = int(ends[n_prompts]), n_prompts + 1
        hits[row] = sum(expert in cache for expert in experts)
        first_hit[row] = experts[0] in cache
        for expert in dict.fromkeys(experts):
            uses[expert].popleft()
        for expert in experts:
            cache[expert] = None
            cache.move_to_end(expert)
        while len(cache) > capacity:
            victim, furthest = -1, -1.0
            for expert in cache:  # least recently used first: the first of equals wins
                ahead = uses[expert]
                next_use = ahead[0] if ahead and ahead[0] < prompt_end else float("inf")
                if expert not in experts and next_use > furthest:
                    victim, furthest = expert, next_use
            del cache[victim]
    return hits, first_hit


def lru(ids: np.ndarray, prompt: np.ndarray, capacity: int, carry: bool = False) -> dict:
    """The LRU cache scored in the shape of `metrics.per_token`.

    A cache's "prediction" is its content, a set of `capacity` experts with no rank and no size k, so:
    `recall_at_k` is the hit rate |cache ∩ T| / k (hits / (k × tokens) once averaged); `exact_set` and
    every `cover_at_k_plus_m` are the share of tokens whose k experts were all cached (no miss);
    every `recall_at_k_plus_m` repeats the hit rate (the capacity, not k+m, sets it); `top1` is the
    share of tokens whose router's best expert was cached.
    """
    k = np.asarray(ids).shape[1]
    hits, first_hit = lru_simulate(ids, prompt, capacity, carry)
    hit_rate = hits / k
    no_miss = (hits == k).astype(np.float64)
    return {
        "exact_set": no_miss,
        "recall_at_k": hit_rate,
        "top1": first_hit.astype(np.float64),
        "recall_at_k_plus_m": dict.fromkeys(margins(k), hit_rate),
        "cover_at_k_plus_m": dict.fromkeys(margins(k), no_miss),
    }


def lru_capacities(k: int, n_expert: int) -> tuple[int, ...]:
    """C = k, 2k, 4k slots per layer, those below the number of experts (a cache of all E never misses
    after warm-up and says nothing)."""
    return tuple(c for c in (k, 2 * k, 4 * k) if c < n_expert) or (k,)


def router_prior(
    model: Path, layers: tuple[int, ...], source: str = "x_pre", read_from: dict[int, int] | None = None
) -> dict[int, np.ndarray]:
    """Per layer, the router's weights mapped onto a predictor's input: prior [E, d] such that
    x @ prior.T is the router's logits on that input, as if the residual stream had not changed since.

    The router reads rmsnorm(h + attn)·w_ffn; the pre-attention state is x_pre = rmsnorm(h)·w_attn,
    so with attention's contribution left out the router input is x_pre / w_attn · w_ffn (RMS norm
    is per token, and a per-token factor changes neither the top-k nor the order). For x_prev (the
    previous layer's router input, rmsnorm(·)·w_ffn of that layer; the token embedding for layer 0)
    the divisor is that layer's w_ffn (1 for the embedding). Selection biases (exp_probs_b) are not
    included: the prior ranks by the gating logits alone. `read_from` ({layer: layer}, x_pre only)
    names an earlier layer whose pre-attention state the predictor reads instead (a lead):
    its w_attn is the divisor.
    """
    import gguf

    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(model).tensors}

    def weight(name: str) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"{model} has no tensor {name}: the router prior needs a qwen3moe-style router")
        tensor = tensors[name]
        return np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), np.float32)

    priors = {}
    for il in layers:
        ffn_norm = weight(f"blk.{il}.ffn_norm.weight").reshape(-1)  # [d]
        router = weight(f"blk.{il}.ffn_gate_inp.weight").reshape(-1, len(ffn_norm))  # [E, d]
        if source == "x_pre":
            divisor = weight(f"blk.{(read_from or {}).get(il, il)}.attn_norm.weight").reshape(-1)
        elif il > 0 and f"blk.{il - 1}.ffn_norm.weight" in tensors:
            divisor = weight(f"blk.{il - 1}.ffn_norm.weight").reshape(-1)
        else:
            divisor = np.ones_like(ffn_norm)
        safe = np.where(np.abs(divisor) < NORM_FLOOR, np.inf, divisor)
        priors[il] = router * (ffn_norm / safe)[None, :]
    return priors
