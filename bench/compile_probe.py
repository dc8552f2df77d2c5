"""Graph breaks (torch._dynamo.explain) and host syncs (tests/helpers.count_host_syncs) of
linear_logprobs and the loss front-ends on CPU, torch backend: the numbers quoted for issue 16.

    python bench/compile_probe.py
"""
import os
import sys
from collections import Counter

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
    }


def main():
    for name, (fn, h, w) in cases().items():
        torch._dynamo.reset()
        ex = torch._dynamo.explain(fn)(h, w)
        reasons = Counter()
        for b in ex.break_reasons:
            where = b.user_stack[-1] if b.user_stack else None
            at = f" at {os.path.basename(where.filename)}:{where.lineno}" if where else ""
            reasons[b.reason.splitlines()[0][:90] + at] += 1
        with count_host_syncs() as syncs:
            fn(h, w).backward()
        torch._dynamo.reset()
        try:
            compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
            compiled(h, w).backward()                       # compiles outside the count
            with count_host_syncs() as csyncs:
                compiled(h, w).backward()
            fullgraph = f"compiled (fullgraph, dynamic) fwd+bwd host syncs={sum(csyncs.values())}"
        except Exception as e:     # noqa: BLE001 - reported, not raised: this is a probe
            fullgraph = f"fullgraph compile fails: {type(e).__name__}"
        print(f"{name}: graph_breaks={ex.graph_break_count} graphs={ex.graph_count} "
              f"listed_reasons={len(ex.break_reasons)} "
              f"eager fwd+bwd host syncs={sum(syncs.values())} {dict(syncs)}; {fullgraph}")
        for reason, n in reasons.most_common():
            print(f"    {n} x {reason}")


if __name__ == "__main__":
    main()
