"""Graph breaks (torch._dynamo.explain) and host syncs (tests/helpers.count_host_syncs) of
linear_logprobs and the loss front-ends on CPU (torch backend; GIFT also on the triton backend
through the interpreter, and with group_ids): the numbers quoted for issue 16.

    python bench/compile_probe.py            # add --triton-op for the triton_op probe
"""
import os
import sys
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported: kernels on CPU

import torch
import torch._dynamo

torch._logging.set_logs(graph_breaks=False)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import count_host_syncs  # noqa: E402

import gift_fast as gf  # noqa: E402


def inputs(B=4, T=6, H=16, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(V, H, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :2] = -100                                   # prompt tokens
    anchor = -torch.rand(B, T, generator=g) * 3
    rewards = torch.rand(B, generator=g)
    return hidden, weight, targets, anchor, rewards


def cases():
    h, w, t, a, r = inputs()
    return {
        "linear_logprobs": (lambda h, w: gf.linear_logprobs(h, w, t, backend="torch").sum(), h, w),
        "gift_loss": (lambda h, w: gf.gift_loss(h, w, t, a, r, group_size=2, backend="torch")[0],
                      h, w),
        "grpo_loss": (lambda h, w: gf.grpo_loss(h, w, t, a, r, backend="torch")[0], h, w),
        "dpo_loss": (lambda h, w: gf.dpo_loss(h, w, t, a, backend="torch")[0], h, w),
        "gift_loss[group_ids]": (lambda h, w: gf.gift_loss(
            h, w, t, a, r, group_ids=torch.tensor([3, 1, 3, 1]), backend="torch")[0], h, w),
        "gift_loss[triton, fused]": (lambda h, w: gf.gift_loss(
            h, w, t, a, r, group_size=2, backend="triton")[0], h, w),
    }


def recording_unbacked_sizes(found):
    """aot_eager, recording the dynamo graph's nodes with a data-dependent (unbacked) size: each
    is a host read inside an op (e.g. torch.unique), unseen by count_host_syncs."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    def backend(gm, example_inputs):
        found.extend(n.name for n in gm.graph.nodes
                     if n.meta.get("example_value") is not None
                     and free_unbacked_symbols(n.meta["example_value"]))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def triton_op_probe():
    """Whether a torch.library.triton_op compiles here: with TRITON_INTERPRET=1, wrap_triton
    hands back the interpreted kernel itself (it has no JIT metadata to trace), so compiling
    traces the interpreter with fake tensors."""
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def add_kernel(a, b, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out + offs, tl.load(a + offs, mask=mask) + tl.load(b + offs, mask=mask),
                 mask=mask)

    @triton_op("gift_fast_probe::add", mutates_args={})
    def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        wrap_triton(add_kernel)[(triton.cdiv(x.numel(), 16),)](x, y, out, x.numel(), BLOCK=16)
        return out

    x = torch.randn(37)
    print(f"triton_op eager on CPU (interpreter): equal={torch.equal(add(x, x), x + x)}")
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        try:
            torch.compile(add, fullgraph=True, backend=backend)(x, x)
            print(f"triton_op compiled ({backend}): ok")
        except Exception as e:     # noqa: BLE001 - reported, not raised: this is a probe
            print(f"triton_op compiled ({backend}): {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160]}")


def main():
    for name, (fn, h, w) in cases().items():
        torch._dynamo.reset()
        try:
            ex = torch._dynamo.explain(fn)(h, w)
        except Exception as e:     # noqa: BLE001 - dynamo traced into the Triton interpreter
            print(f"{name}: torch._dynamo.explain fails: {type(e).__name__}")
            continue
        reasons = Counter()
        for b in ex.break_reasons:
            where = b.user_stack[-1] if b.user_stack else None
            at = f" at {os.path.basename(where.filename)}:{where.lineno}" if where else ""
            reasons[b.reason.splitlines()[0][:90] + at] += 1
        with count_host_syncs() as syncs:
            fn(h, w).backward()
        torch._dynamo.reset()
        unbacked = []
        try:
            compiled = torch.compile(fn, fullgraph=True, dynamic=True,
                                     backend=recording_unbacked_sizes(unbacked))
            compiled(h, w).backward()                       # compiles outside the count
            with count_host_syncs() as csyncs:
                compiled(h, w).backward()
            fullgraph = (f"compiled (fullgraph, dynamic) fwd+bwd host syncs={sum(csyncs.values())}"
                         f" data-dependent sizes={len(unbacked)}")
        except Exception as e:     # noqa: BLE001 - reported, not raised: this is a probe
            fullgraph = f"fullgraph compile fails: {type(e).__name__}"
        print(f"{name}: graph_breaks={ex.graph_break_count} graphs={ex.graph_count} "
              f"listed_reasons={len(ex.break_reasons)} "
              f"eager fwd+bwd host syncs={sum(syncs.values())} {dict(syncs)}; {fullgraph}")
        for reason, n in reasons.most_common():
            print(f"    {n} x {reason}")


if __name__ == "__main__":
    if "--triton-op" in sys.argv:
        triton_op_probe()
    else:
        main()
