"""The Llama decode step as one Relax program (tvm.relax.frontend.nn).

Every call site the plan names (`shardtune.plan`) is a kernel template's compute, called
with `tensor_ir_op` and tagged with its template and workload, so the build can swap in
the schedule the tuning database holds for it. What the plan leaves out (everything in
q0f32, the embedding lookup, casts) is TVM's own operators.

One decode step reads the token and its position from device buffers and updates the KV
cache in place: every shape is static, so a CUDA graph can capture the whole step.

Beside it, a batched prefill step per prompt-length bucket (`prefill_<n>`, `shardtune.plan.
prefill_plan`): n tokens at once through the prefill templates (with TVM's matmul for fp16
weights), each one CUDA graph too."""
from __future__ import annotations

import json

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op, spec

from ..kernels import get_template
from ..kernels.allreduce_add_norm import comm_regions
from ..models import LlamaConfig, lm_head_rows, lm_head_split
from ..plan import KernelCall, decode_plan, plan_by_site, prefill_plan, residual_in_gemv
from .greedy import greedy_next

KERNEL_ATTR = "shardtune.kernel"   # JSON {"template", "workload", "site"} on each template PrimFunc


def act_dtype(quant: str) -> str:
    return "float32" if quant == "q0f32" else "float16"


def template_op(call: KernelCall, args: list, inplace: list[int] | None = None):
    """Call the template's unscheduled compute on `args`. Its parameters after the arguments
    are the new outputs (scratch included), allocated by Relax; `inplace` names arguments the
    kernel updates, returned first. One tensor back, or a list when there are several."""
    func = get_template(call.template).compute(call.workload)
    tag = json.dumps({"template": call.template, "workload": call.workload, "site": call.site}, sort_keys=True)
    tokens = call.workload.get("n", call.workload.get("M"))   # a prefill bucket's: one symbol per bucket
    name = f"{call.template}_{call.site}" + (f"_n{tokens}" if tokens is not None else "")
    # kOpaque (8): Relax's FuseOps must not merge a template into its neighbours, or the
    # database's schedule would no longer fit it. A unique symbol per call site.
    func = func.with_attr(KERNEL_ATTR, tag).with_attr("op_pattern", 8).with_attr("global_symbol", name)
    outs = get_template(call.template).output_specs(call.workload)
    placeholders = [nn.Tensor.placeholder(list(shape), dtype) for shape, dtype in outs]
    if inplace is None:
        return op.tensor_ir_op(func, name, args, placeholders if len(placeholders) > 1 else placeholders[0])
    placeholders = [nn.Tensor.placeholder(args[i].shape, args[i].dtype) for i in inplace] + placeholders
    return op.tensor_ir_inplace_op(func, name, args, inplace + [-1] * len(outs), placeholders)


class Linear(nn.Module):
    """y = W x for one shard's slice of W [n, k]: fp16/fp32 weights, or q4f16_1 words and scales."""

    def __init__(self, n: int, k: int, quant: str):
        self.n, self.k, self.quant = n, k, quant
        if quant == "q4f16_1":
            self.qweight = nn.Parameter((n, k // 8), "uint32")
            self.qscale = nn.Parameter((n, k // 32), "float16")
        else:
            self.weight = nn.Parameter((n, k), act_dtype(quant))

    def weights(self) -> list:
        return [self.qweight, self.qscale] if self.quant == "q4f16_1" else [self.weight]

    def forward(self, x, call: KernelCall | None, extra: tuple = ()):
        if call is None:    # q0f32: TVM's matmul
            return op.matmul(x, op.permute_dims(self.weight))
        return template_op(call, [x, *self.weights(), *extra])

    def matmul(self, x, call: KernelCall | None = None):
        """Prefill: x [n, k] -> [n, self.n]. q4f16_1: the prefill GEMM template (`call`); fp weights:
        TVM's matmul, fp32 accumulation for fp16 (the build fuses the transpose into it)."""
        if self.quant == "q0f32":
            return op.matmul(x, op.permute_dims(self.weight))
        if self.quant == "q4f16_1":
            return template_op(call, [x, self.qweight, self.qscale])
        return op.astype(op.matmul(x, op.permute_dims(self.weight), out_dtype="float32"), "float16")


class Weight(nn.Module):
    """A module holding one tensor, so its parameter is named `<attribute>.weight`."""

    def __init__(self, shape: tuple, dtype: str):
        self.weight = nn.Parameter(shape, dtype)


class Layer(nn.Module):
    def __init__(self, cfg: LlamaConfig, quant: str, shards: int):
        h, hd = cfg.hidden_size, cfg.head_dim
        self.hq, self.hkv = cfg.num_attention_heads // shards, cfg.num_key_value_heads // shards
        self.inter = cfg.intermediate_size // shards
        self.input_norm = Weight((h,), act_dtype(quant))
        self.qkv = Linear((self.hq + 2 * self.hkv) * hd, h, quant)
        self.o = Linear(h, self.hq * hd, quant)
        self.post_norm = Weight((h,), act_dtype(quant))
        self.gate_up = Linear(2 * self.inter, h, quant)
        self.down = Linear(h, self.inter, quant)


class Llama(nn.Module):
    """One shard's decode step: decode(token [1], pos [1], caches) -> (logits [1, V] fp32, token, pos,
    caches), the next greedy token and position written into token and pos."""

    def __init__(self, cfg: LlamaConfig, quant: str, shards: int = 1, capacity: int = 4096,
                 prefill: tuple = (), allreduce: str = "nccl", vendor: str = "nvidia"):
        self.cfg, self.quant, self.shards, self.capacity, self.vendor = cfg, quant, shards, capacity, vendor
        self.plan = plan_by_site(decode_plan(cfg, quant, shards, capacity=capacity, allreduce=allreduce))
        # The fused all-reduce reads peer memory that decode takes as an input (comm).
        self.fused_allreduce = "allreduce_norm" in self.plan
        self.prefill_buckets = tuple(prefill)     # a prefill_<n> step for each
        self.prefill_plans = {n: plan_by_site(prefill_plan(cfg, quant, shards, n, capacity)) for n in prefill}
        dt = act_dtype(quant)
        self.embed = Weight((cfg.vocab_size, cfg.hidden_size), dt)
        self.layers = nn.ModuleList([Layer(cfg, quant, shards) for _ in range(cfg.num_hidden_layers)])
        self.norm = Weight((cfg.hidden_size,), dt)
        self.lm_head = Linear(lm_head_rows(cfg, shards), cfg.hidden_size, quant)
        # each shard holds some of the head's rows: its logits are gathered after it
        self.head_gathered = shards > 1 and lm_head_split(cfg, shards)
        self.fused_residual = residual_in_gemv(quant, shards)

    # --- pieces ---------------------------------------------------------------
    def _norm(self, x, weight, residual=None):
        """(y, h): RMSNorm of h = x (+ residual). A template where the plan has one."""
        if residual is not None and "add_norm" in self.plan:
            y, h = template_op(self.plan["add_norm"], [x, residual, weight])
            return y, h
        h = x if residual is None else x + residual
        if "norm" in self.plan:
            return template_op(self.plan["norm"], [h, weight]), h
        return op.rms_norm(h, weight, axes=[-1], epsilon=self.cfg.rms_norm_eps), h

    def _reduce_norm(self, partial, weight, residual, comm):
        """(y, h) after a row-parallel layer: the all-reduce, the residual add and the next norm,
        in one kernel over peer memory (given its buffers, comm), or an NCCL all-reduce and then
        the add+norm."""
        if comm:
            y, h = template_op(self.plan["allreduce_norm"], [partial, residual, weight, *comm])
            return y, h
        return self._norm(self._reduce(partial), weight, residual)

    def _head(self, y, call):
        """Logits [1, V]: each shard's rows of the LM head, then gathered (shard order is vocabulary
        order) where the head is split, so every rank holds all of them, bit for bit the same."""
        logits = self.lm_head(y, call)
        if self.head_gathered:
            logits = op.reshape(op.ccl_allgather(logits, self.shards), [1, self.cfg.vocab_size])
        return logits

    def _reduce(self, partial):
        """Row-parallel layers leave partial sums on each shard."""
        return op.ccl_allreduce(partial, "sum") if self.shards > 1 else partial

    def _attention(self, layer: Layer, y, pos, k_cache, v_cache, new_caches: list):
        qkv = layer.qkv(y, self.plan.get("qkv"))
        k_cache, v_cache, q = template_op(self.plan["rope"], [qkv, pos, k_cache, v_cache], inplace=[2, 3])
        new_caches += [k_cache, v_cache]
        out = template_op(self.plan["attention"], [q, k_cache, v_cache, pos])
        return out[0] if isinstance(out, (list, tuple)) else out   # the rest is scratch

    def _mlp(self, layer: Layer, y):
        """SiLU(gate) * up: fused into the q4 GEMV, TVM's operators otherwise."""
        if self.quant == "q4f16_1":
            return layer.gate_up(y, self.plan["gate_up"])
        gate, up = op.split(layer.gate_up(y, self.plan.get("gate_up")), 2, axis=-1)
        return op.silu(gate) * up

    # --- the step -------------------------------------------------------------
    def decode(self, token, pos, caches, comm=()):
        """(logits [1, V] fp32, token, pos, caches). After the logits, the greedy choice is made on
        the device, inside the step's CUDA graph: argmax(logits) into `token` and pos + 1 into
        `pos`, so greedy steps follow each other with a 4-byte read per token on the host. A
        caller that samples on the host sets token and pos before every step and ignores them.
        On several GPUs every rank picks a token; with the LM head split, from the same gathered
        logits, so every rank's is the same."""
        logits, new_caches = self._logits(token, pos, caches, comm)
        token, pos = op.tensor_ir_inplace_op(
            greedy_next(self.cfg.vocab_size, logits.dtype, self.vendor), "greedy_next", [logits, token, pos], [1, 2],
            [nn.Tensor.placeholder([1], "int32"), nn.Tensor.placeholder([1], "int32")])
        # the logits' cast to fp32 is a function output: it runs after the graph
        return op.astype(logits, "float32"), token, pos, new_caches

    def _logits(self, token, pos, caches, comm=()):
        """(logits [1, V] in the activation dtype, caches) of one step."""
        h = op.take(self.embed.weight, token, axis=0)          # [1, H]
        new_caches = []
        if self.fused_residual:     # the o/down GEMVs add the residual
            for i, layer in enumerate(self.layers):
                y, _ = self._norm(h, layer.input_norm.weight)
                a = self._attention(layer, y, pos, caches[2 * i], caches[2 * i + 1], new_caches)
                h = layer.o(a, self.plan["o"], extra=(h,))
                y, _ = self._norm(h, layer.post_norm.weight)
                h = layer.down(self._mlp(layer, y), self.plan["down"], extra=(h,))
            y, _ = self._norm(h, self.norm.weight)
        else:                       # the next norm adds it, after the all-reduce
            y, h = self._norm(h, self.layers[0].input_norm.weight)
            for i, layer in enumerate(self.layers):
                a = self._attention(layer, y, pos, caches[2 * i], caches[2 * i + 1], new_caches)
                y, h = self._reduce_norm(layer.o(a, self.plan.get("o")), layer.post_norm.weight, h, comm)
                d = layer.down(self._mlp(layer, y), self.plan.get("down"))
                next_weight = self.layers[i + 1].input_norm.weight if i + 1 < len(self.layers) else self.norm.weight
                y, h = self._reduce_norm(d, next_weight, h, comm)
        return self._head(y, self.plan.get("lm_head")), tuple(new_caches)

    def decode_nccl(self, token, pos, caches):
        """decode with NCCL all-reduces: what a fused build runs where peer access is missing."""
        return self.decode(token, pos, caches)

    def prefill(self, tokens, pos, last, caches):
        """prefill_<n>(tokens [n], pos [1], last [1], caches) -> (logits [1, V] fp32, caches): token t
        at position pos[0] + t, its K/V rows into the caches (in place), the logits of token last[0]
        only. Tokens after `last` are padding: their cache rows (below the capacity) hold garbage
        that decode overwrites, in order, before any step reads them; causal attention keeps the
        real tokens from reading them."""
        plan = self.prefill_plans[int(tokens.shape[0])]
        eps = self.cfg.rms_norm_eps

        def reduce(partial):   # row-parallel layers leave partial sums on each shard
            return op.ccl_allreduce(partial, "sum") if self.shards > 1 else partial

        if "embedding" in plan:
            h = template_op(plan["embedding"], [tokens, self.embed.weight])      # [n, H]
        else:
            h = op.take(self.embed.weight, tokens, axis=0)
        new_caches = []
        for i, layer in enumerate(self.layers):
            y = op.rms_norm(h, layer.input_norm.weight, axes=[-1], epsilon=eps)
            qkv = layer.qkv.matmul(y, plan.get("qkv"))
            k_cache, v_cache, q = template_op(plan["rope"], [qkv, pos, caches[2 * i], caches[2 * i + 1]],
                                              inplace=[2, 3])
            new_caches += [k_cache, v_cache]
            a = template_op(plan["attention"], [q, k_cache, v_cache, pos])
            h = h + reduce(layer.o.matmul(a, plan.get("o")))
            y = op.rms_norm(h, layer.post_norm.weight, axes=[-1], epsilon=eps)
            gate, up = op.split(layer.gate_up.matmul(y, plan.get("gate_up")), 2, axis=-1)
            h = h + reduce(layer.down.matmul(op.silu(gate) * up, plan.get("down")))
        y = op.rms_norm(op.take(h, last, axis=0), self.norm.weight, axes=[-1], epsilon=eps)   # [1, H]
        return op.astype(self._head(y, plan.get("lm_head")), "float32"), tuple(new_caches)

    def __getattr__(self, name: str):
        """prefill_<n>: the method export_tvm traces for bucket n."""
        if name.startswith("prefill_") and name[8:].isdigit():
            return self.prefill
        raise AttributeError(name)

    def prefill_specs(self, caches: list) -> dict:
        return {f"prefill_{n}": {"tokens": spec.Tensor([n], "int32"), "pos": spec.Tensor([1], "int32"),
                                 "last": spec.Tensor([1], "int32"), "caches": caches}
                for n in self.prefill_buckets}

    def prefill_in_one_graph(self, mod) -> None:
        """As decode: the runtime passes each bucket's very same token, position, index and cache
        tensors on every call, so each prefill_<n> is one CUDA graph too. (With weights alone
        fixed, Relax's rewrite would still capture the runs of kernels between those reading the
        inputs, in graphs of their own: static scratch counts as fixed.)"""
        for name in self.prefill_specs([]):
            mod[name] = mod[name].with_attr("num_input", 0)

    def cache_shape(self) -> tuple:
        return (self.cfg.num_key_value_heads // self.shards, self.capacity, self.cfg.head_dim)

    def export(self):
        """(IRModule, [(param name, nn.Parameter)])."""
        dt = act_dtype(self.quant)
        caches = [spec.Tensor(list(self.cache_shape()), dt) for _ in range(2 * self.cfg.num_hidden_layers)]
        decode = {"token": spec.Tensor([1], "int32"), "pos": spec.Tensor([1], "int32"), "caches": caches}
        steps = {"decode": decode}
        if self.fused_allreduce:   # the regions of each GPU's peer-visible buffer (rank-relative)
            comm = [spec.Tensor(list(shape), dtype) for _, shape, dtype in comm_regions(self.cfg.hidden_size, self.shards)
                    for _ in range(self.shards)]
            # decode_nccl: the fallback where peers cannot reach each other
            steps = {"decode": {**decode, "comm": comm}, "decode_nccl": decode}
        mod, params = self.export_tvm(spec={**steps, **self.prefill_specs(caches)})
        # Relax's CUDA-graph rewrite captures only what depends on arguments past `num_input`
        # (the weights). The runtime passes the very same token, position and cache tensors on
        # every step, so they are as fixed as the weights: count them in, and one graph holds
        # the whole step instead of pieces between the attention kernels.
        for name in steps:
            mod[name] = mod[name].with_attr("num_input", 0)
        self.prefill_in_one_graph(mod)
        return mod, params
