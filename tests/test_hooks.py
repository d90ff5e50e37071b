"""The patch's hooks: they see the right tensors, change nothing, and survive failing handlers."""

import ctypes

import numpy as np
import pytest

from edge_preattn.model.engine import Engine, EngineConfig
from edge_preattn.model.native import NativeApi
from edge_preattn.traces.hooks import Hooks, bind_hook_functions

PROMPT = "def fibonacci(n):\n    if n < 2:"


def greedy_with_logits(engine: Engine, n: int = 12) -> tuple[list[int], np.ndarray]:
    logits: list[np.ndarray] = []
    tokens = [token for token, _ in engine.generate(PROMPT, n, on_logits=logits.append)]
    return tokens, np.stack(logits)


@pytest.fixture(scope="module")
def ref_engine(llama_lib, moe_ref_a):
    with Engine(llama_lib, EngineConfig(str(moe_ref_a), n_ctx=256)) as engine:
        yield engine


def test_hooks_change_neither_tokens_nor_logits(ref_engine):
    tokens_off, logits_off = greedy_with_logits(ref_engine)
    seen: list[int] = []
    with Hooks(ref_engine.api, ref_engine.ctx, lambda il, x: seen.append(il), lambda r: None) as hooks:
        tokens_on, logits_on = greedy_with_logits(ref_engine)
        assert hooks.stats().pre_attn_calls == len(seen) > 0
    assert tokens_on == tokens_off
    if ref_engine.api.gpus():
        # observing a node ends a graph split, which can turn off a fused CUDA kernel: close, not equal
        assert np.abs(logits_on - logits_off).max() < 0.1
    else:
        assert np.array_equal(logits_on, logits_off)  # bit for bit


def test_hooks_deliver_every_layer_and_token_in_order(ref_engine):
    pre: dict[int, list[tuple[int, int]]] = {}
    routed: dict[int, list[tuple[int, ...]]] = {}

    def on_routing(r):
        # probabilities after softmax: rows sum to 1; ids are the router's top-k, best first
        assert np.allclose(r.probs.sum(axis=1), 1.0, atol=1e-5)
        best = np.take_along_axis(r.probs, r.ids.astype(np.int64), axis=1)
        assert (np.diff(best, axis=1) <= 1e-7).all()
        assert r.router_input is not None and r.selection is None
        routed.setdefault(r.layer, []).append(r.ids.shape)

    with Hooks(
        ref_engine.api, ref_engine.ctx, lambda il, x: pre.setdefault(il, []).append(x.shape), on_routing
    ):
        n_prompt = len(ref_engine.tokenize(PROMPT))
        list(ref_engine.generate(PROMPT, 4))
    assert sorted(pre) == list(range(8)) and sorted(routed) == list(range(8))
    for il in range(8):
        assert pre[il] == [(n_prompt, 384), (1, 384), (1, 384), (1, 384)]
    # the last layer's FFN only runs on the rows llama.cpp outputs: one, unless all logits are asked for
    assert routed[7][0] == (1, 8) and routed[0][0] == (n_prompt, 8)


def test_user_cb_eval_keeps_working_beside_hooks(llama_lib, moe_ref_a):
    asked: list[int] = []

    @llama_lib.ggml_backend_sched_eval_callback
    def user_cb(tensor, ask, _user_data):
        asked.append(int(ask))
        return False  # observe nothing; keep the compute going

    def set_cb(params):
        params.cb_eval = user_cb

    with Engine(llama_lib, EngineConfig(str(moe_ref_a), n_ctx=128), context_params_hook=set_cb) as engine:
        list(engine.generate(PROMPT, 2))
        without_hooks = len(asked)
        calls: list[int] = []
        with Hooks(engine.api, engine.ctx, lambda il, x: calls.append(il)):
            list(engine.generate(PROMPT, 2))
        assert without_hooks > 0 and len(asked) > 2 * without_hooks - 5
        assert len(calls) == 8 * 2


def test_a_failing_handler_is_switched_off_and_output_unchanged(ref_engine, caplog):
    expected, _ = greedy_with_logits(ref_engine, 6)

    def broken(_routing):
        raise ValueError("predictor exploded")

    with Hooks(ref_engine.api, ref_engine.ctx, on_routing=broken) as hooks:
        tokens, _ = greedy_with_logits(ref_engine, 6)
    assert tokens == expected
    assert "predictor exploded" in hooks.failed["routing"]
    assert sum("switched off" in record.message for record in caplog.records) == 1  # said once


def test_c_api_refuses_bad_arguments(llama_lib):
    api = NativeApi(llama_lib)
    bind_hook_functions(api)
    from edge_preattn.traces.hooks import PRE_ATTN_HOOK, ROUTING_HOOK, HookStats

    assert api.lib.llama_edge_set_hooks(None, PRE_ATTN_HOOK(), ROUTING_HOOK(), None) == -1
    assert api.lib.llama_edge_get_hook_stats(None, ctypes.byref(HookStats())) == -1
