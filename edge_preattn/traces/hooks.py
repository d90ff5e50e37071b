"""The patch's pre-attention and routing hooks, as Python callables on numpy arrays.

llama.cpp calls them on the thread that runs llama_decode, with pointers valid only during the call:
handlers get read-only views and must copy what they keep. A handler that raises is reported once
and switched off; generation carries on unchanged (a hook only observes).
"""

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..model.native import NativeApi

log = logging.getLogger(__name__)

# void (*llama_edge_pre_attn_hook)(int32_t il, const float * x, int32_t n_embd, int32_t n_tokens,
#                                  void * user_data);
PRE_ATTN_HOOK = ctypes.CFUNCTYPE(
    None, ctypes.c_int32, ctypes.POINTER(ctypes.c_float), ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p
)
# void (*llama_edge_routing_hook)(int32_t il, int32_t n_tokens, const int32_t * ids, int32_t k,
#     const float * probs, const float * selection, int32_t n_expert, const float * router_input,
#     int32_t n_embd, void * user_data);
ROUTING_HOOK = ctypes.CFUNCTYPE(
    None,
    ctypes.c_int32,
    ctypes.c_int32,
    ctypes.POINTER(ctypes.c_int32),
    ctypes.c_int32,
    ctypes.POINTER(ctypes.c_float),
    ctypes.POINTER(ctypes.c_float),
    ctypes.c_int32,
    ctypes.POINTER(ctypes.c_float),
    ctypes.c_int32,
    ctypes.c_void_p,
)


class HookStats(ctypes.Structure):
    # struct llama_edge_hook_stats { uint64_t pre_attn_calls, routing_calls, bytes_copied; };
    _fields_ = [
        ("pre_attn_calls", ctypes.c_uint64),
        ("routing_calls", ctypes.c_uint64),
        ("bytes_copied", ctypes.c_uint64),
    ]


def bind_hook_functions(api: NativeApi) -> None:
    lib = api.lib
    # int32_t llama_edge_set_hooks(struct llama_context * ctx, llama_edge_pre_attn_hook pre_attn,
    #                              llama_edge_routing_hook routing, void * user_data);
    lib.llama_edge_set_hooks.restype = ctypes.c_int32
    lib.llama_edge_set_hooks.argtypes = [ctypes.c_void_p, PRE_ATTN_HOOK, ROUTING_HOOK, ctypes.c_void_p]
    if api.patch_version() >= 3:
        # int32_t llama_edge_set_routing_detail(struct llama_context * ctx, bool detail);
        lib.llama_edge_set_routing_detail.restype = ctypes.c_int32
        lib.llama_edge_set_routing_detail.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    if api.patch_version() >= 8:
        # int32_t llama_edge_set_router_input_hook(struct llama_context * ctx, llama_edge_pre_attn_hook hook,
        #                                          void * user_data);
        lib.llama_edge_set_router_input_hook.restype = ctypes.c_int32
        lib.llama_edge_set_router_input_hook.argtypes = [ctypes.c_void_p, PRE_ATTN_HOOK, ctypes.c_void_p]
    # int32_t llama_edge_get_hook_stats(const struct llama_context * ctx, struct llama_edge_hook_stats * out);
    lib.llama_edge_get_hook_stats.restype = ctypes.c_int32
    lib.llama_edge_get_hook_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(HookStats)]


@dataclass(frozen=True)
class Routing:
    """One MoE layer's router decision for one ubatch (views: copy what you keep)."""

    layer: int
    ids: np.ndarray  # [n_tokens, k] int32, in the router's order (descending score)
    probs: np.ndarray | None  # [n_tokens, n_expert] float32 after the gating function (None without detail)
    selection: np.ndarray | None  # [n_tokens, n_expert] bias-adjusted scores, where the arch has them
    router_input: np.ndarray | None  # [n_tokens, n_embd] float32


PreAttnHandler = Callable[[int, np.ndarray], None]  # (layer, x: [n_tokens, n_embd])
RoutingHandler = Callable[[Routing], None]


def _view(pointer, *shape: int) -> np.ndarray | None:
    if not pointer:
        return None
    array = np.ctypeslib.as_array(pointer, shape=shape)
    array.flags.writeable = False
    return array


class Hooks:
    """Registers handlers on one llama_context; close() (or leaving the with-block) removes them."""

    def __init__(
        self,
        api: NativeApi,
        ctx,
        on_pre_attn: PreAttnHandler | None = None,
        on_routing: RoutingHandler | None = None,
        detail: bool = True,
        *,
        on_router_input: PreAttnHandler | None = None,
    ) -> None:
        """`detail=False`: routing handlers get only the ids (one graph split per layer, not four).
        `on_router_input` (layer, x) gets a cached layer's router input after its routing, at no extra
        graph split: it needs the expert cache enabled on `ctx`."""
        if api.patch_version() < 2:
            raise RuntimeError("this llama.cpp build has no hooks (patch version < 2): rebuild it")
        bind_hook_functions(api)
        self.api, self.ctx = api, ctx
        self.on_pre_attn, self.on_routing, self.on_router_input = on_pre_attn, on_routing, on_router_input
        self.failed: dict[str, str] = {}  # handler name -> the error that switched it off
        self.interrupted = False  # Ctrl-C inside a handler: ctypes would swallow it, the caller re-raises
        # The C side keeps raw pointers: these objects must live as long as the registration.
        self._pre_attn = self._activation_hook("pre_attn") if on_pre_attn else PRE_ATTN_HOOK()
        self._routing = ROUTING_HOOK(self._call_routing) if on_routing else ROUTING_HOOK()
        self._router_input = self._activation_hook("router_input") if on_router_input else None
        status = api.lib.llama_edge_set_hooks(ctx, self._pre_attn, self._routing, None)
        if status == 0 and not detail:
            status = api.lib.llama_edge_set_routing_detail(ctx, False)
        if status == 0 and self._router_input is not None:
            if api.patch_version() < 8:
                raise RuntimeError("this llama.cpp build has no router-input hook (patch < 8): rebuild it")
            status = api.lib.llama_edge_set_router_input_hook(ctx, self._router_input, None)
        if status != 0:
            raise RuntimeError(f"llama_edge_set_hooks failed with status {status}")

    def _fail(self, name: str, error: BaseException) -> None:
        if name not in self.failed:
            self.failed[name] = repr(error)
            log.warning("%s hook raised %r: it is switched off, generation continues unchanged", name, error)

    def _activation_hook(self, name: str):
        """The C callable for the (layer, activation) handler `on_<name>`."""

        def call(il, x, n_embd, n_tokens, _user_data) -> None:
            if name in self.failed:
                return
            try:
                getattr(self, f"on_{name}")(il, _view(x, n_tokens, n_embd))
            except KeyboardInterrupt:
                self.interrupted = True
            except Exception as error:  # a hook must never unwind through C
                self._fail(name, error)

        return PRE_ATTN_HOOK(call)

    def _call_routing(  # noqa: PLR0917 (the C hook passes everything positionally)
        self, il, n_tokens, ids, k, probs, selection, n_expert, router_input, n_embd, _user_data
    ) -> None:
        if "routing" in self.failed:
            return
        try:
            self.on_routing(
                Routing(
                    layer=il,
                    ids=_view(ids, n_tokens, k),
                    probs=_view(probs, n_tokens, n_expert) if n_expert else None,
                    selection=_view(selection, n_tokens, n_expert) if n_expert else None,
                    router_input=_view(router_input, n_tokens, n_embd) if n_embd else None,
                )
            )
        except KeyboardInterrupt:
            self.interrupted = True
        except Exception as error:
            self._fail("routing", error)

    def drop_prediction_input(self) -> None:
        """Stop handing over what predictors read: attn_norm (one graph split and device synchronize
        fewer per layer) and the router input. Safe from inside a handler: the handlers' ctypes
        objects stay referenced until close()."""
        if self.ctx is None:
            return
        if self.on_pre_attn is not None:
            self.api.lib.llama_edge_set_hooks(self.ctx, PRE_ATTN_HOOK(), self._routing, None)
            self.on_pre_attn = None
        if self.on_router_input is not None:
            self.api.lib.llama_edge_set_router_input_hook(self.ctx, PRE_ATTN_HOOK(), None)
            self.on_router_input = None

    def stats(self) -> HookStats:
        out = HookStats()
        self.api.lib.llama_edge_get_hook_stats(self.ctx, ctypes.byref(out))
        return out

    def close(self) -> None:
        if self.ctx is not None:
            if self.api.patch_version() >= 3:
                self.api.lib.llama_edge_set_routing_detail(self.ctx, True)
            if self.on_router_input is not None:
                self.api.lib.llama_edge_set_router_input_hook(self.ctx, PRE_ATTN_HOOK(), None)
            self.api.lib.llama_edge_set_hooks(self.ctx, PRE_ATTN_HOOK(), ROUTING_HOOK(), None)
            self.ctx = None

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
