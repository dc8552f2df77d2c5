"""Cases run inside each rank of a gloo process group (spawned by tests/test_distributed.py).

Every rank builds the same global batch from fixed seeds, takes its own (uneven) share of the
sequences, runs the distributed computation, and compares with the single-process computation on
the whole batch, which every rank also runs. Each case records the max abs difference (reduced
with MAX over ranks) or a pass flag; rank 0 writes them to a JSON file that the test checks, so a
case that did not run is a failure too.
"""
from __future__ import annotations

import json
import traceback

import torch
import torch.distributed as dist

import gift_fast.functional as Fn
from gift_fast import GIFTLoss, gift_loss, grpo_loss, linear_logprobs
from gift_fast.integrations.fsdp import FusedLossModel

import data_parallel_gift as demo
from data_parallel_gift import TinyLM

import reference_losses as R
from helpers import finish_rank, init_gloo

# sequences held by each rank, in rank order: uneven; one rank holds a single one, one holds none
SPLITS = {1: [8], 2: [3, 5], 3: [1, 4, 3], 4: [3, 0, 1, 4]}
B, T, H, V = 8, 6, 16, 37
# non-consecutive labels: groups 7 and 3 span ranks, group 5 has one sequence
GROUP_IDS = [7, 3, 7, 5, 3, 9, 7, 3]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


class Results:
    def __init__(self, rank: int):
        self.rank = rank
        self.diffs = {}
        self.flags = {}

    def diff(self, name: str, value: float) -> None:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.diffs[name] = float(t)

    def flag(self, name: str, ok: bool) -> None:
        t = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.flags[name] = float(t) == 0.0


def _share(world: int, rank: int):
    counts = SPLITS[world]
    lo = sum(counts[:rank])
    return lo, lo + counts[rank]


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = False            # prompt token
    mask[2] = False               # an empty response
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[~mask] = -100
    logps = (-3 * torch.rand(B, T, generator=g)).to(dtype)
    anchor = (logps + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).to(dtype)
    rewards = torch.rand(B, generator=g).to(dtype)
    rewards[5] = rewards[0] = rewards[2] = rewards[6] = 0.25   # group 7 (ids) has uniform rewards
    hidden = torch.randn(B, T, H, generator=g)
    weight = 0.5 * torch.randn(V, H, generator=g)
    return mask, targets, logps, anchor, rewards, hidden, weight


# ---------------------------------------------------------------------------------------------
# GIFT epilogue and front-end with a group split across ranks
# ---------------------------------------------------------------------------------------------

EPILOGUE_OPTS = {
    "ids": dict(group_ids=torch.tensor(GROUP_IDS)),
    "ids_biased_mean_len": dict(group_ids=torch.tensor(GROUP_IDS), std="biased", length_norm=1.0,
                                beta=0.5),
    "ids_drop_uniform": dict(group_ids=torch.tensor(GROUP_IDS), drop_uniform_groups=True),
    "ids_sum": dict(group_ids=torch.tensor(GROUP_IDS), reduction="sum"),
    "group_size4": dict(group_size=4),
    "group_size2_none": dict(group_size=2, reduction="none"),
}


def _slice_opts(opts, lo, hi):
    out = dict(opts)
    if "group_ids" in out:
        out["group_ids"] = out["group_ids"][lo:hi]
    return out


def _ref_groups(opts):
    if "group_ids" in opts:
        return R.groups_of(B, group_ids=opts["group_ids"])
    return R.groups_of(B, group_size=opts["group_size"])


def case_epilogue(res: Results, world: int, rank: int) -> None:
    """functional.gift_loss: loss sum, per-sequence gradients and metrics equal single-process."""
    mask, _, logps, anchor, rewards, _, _ = _batch()
    lo, hi = _share(world, rank)
    for name, opts in EPILOGUE_OPTS.items():
        full = logps.clone().requires_grad_(True)
        ref_loss, ref_m = Fn.gift_loss(full, anchor, rewards, mask=mask, **opts)
        ref_loss.sum().backward()
        mine = logps[lo:hi].clone().requires_grad_(True)
        loss, m = Fn.gift_loss(mine, anchor[lo:hi], rewards[lo:hi], mask=mask[lo:hi],
                               data_parallel_group=dist.group.WORLD, **_slice_opts(opts, lo, hi))
        loss.sum().backward()
        if opts.get("reduction") == "none":
            res.diff(f"epilogue/{name}/per_seq", _max_diff(loss, ref_loss[lo:hi]))
        total = loss.detach().sum().clone()
        dist.all_reduce(total)
        res.diff(f"epilogue/{name}/loss_sum", _max_diff(total, ref_loss.detach().sum()))
        res.diff(f"epilogue/{name}/grad", _max_diff(mine.grad, full.grad[lo:hi]))
        res.diff(f"epilogue/{name}/metrics",
                 max(_max_diff(m[k], ref_m[k]) for k in ref_m))
        if opts.get("reduction") != "none":
            # and the single-process value itself against the float64 spec implementation
            ref64 = R.gift(R.split_padded(logps, mask), R.split_padded(anchor, mask), rewards,
                           _ref_groups(opts), beta=opts.get("beta", 1.0),
                           unbiased=opts.get("std", "unbiased") == "unbiased",
                           p=opts.get("length_norm", 0.0),
                           drop_uniform=opts.get("drop_uniform_groups", False),
                           reduction=opts.get("reduction", "mean"))
            res.diff(f"epilogue/{name}/spec", _max_diff(total, ref64))
    # nonfinite_rows counts the whole batch on every rank (sequences 1 and 6 sit on different
    # ranks for every split but one rank)
    poisoned = logps.clone()
    poisoned[1] = poisoned[6] = float("nan")
    want = int((mask & torch.isnan(poisoned)).sum())
    _, m = Fn.gift_loss(poisoned[lo:hi], anchor[lo:hi], rewards[lo:hi], mask=mask[lo:hi],
                        data_parallel_group=dist.group.WORLD,
                        **_slice_opts(EPILOGUE_OPTS["ids"], lo, hi))
    res.flag("epilogue/nonfinite_rows", want > 0 and m["nonfinite_rows"].item() == want)


def _front_end_inputs(world, rank):
    mask, targets, _, _, rewards, hidden, weight = _batch()
    rewards = rewards.float()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():     # an anchor policy clearly different from the current one
        anchor = linear_logprobs(hidden, weight + 0.2 * torch.randn(V, H, generator=g), targets,
                                 backend="torch")
    return targets, anchor, rewards, hidden, weight


def case_front_end(res: Results, world: int, rank: int, backends) -> None:
    """Fused gift_loss (hidden + weight) and GIFTLoss: dX of own rows, summed dW, loss sum."""
    targets, anchor, rewards, hidden, weight = _front_end_inputs(world, rank)
    lo, hi = _share(world, rank)
    gid = torch.tensor(GROUP_IDS)
    for backend in backends:
        h_full = hidden.clone().requires_grad_(True)
        w_full = weight.clone().requires_grad_(True)
        ref, _ = gift_loss(h_full, w_full, targets, anchor, rewards, group_ids=gid, backend=backend)
        ref.backward()
        for form in ("function", "module"):
            h = hidden[lo:hi].clone().requires_grad_(True)
            w = weight.clone().requires_grad_(True)
            args = (h, w, targets[lo:hi], anchor[lo:hi], rewards[lo:hi])
            if form == "function":
                loss, _ = gift_loss(*args, group_ids=gid[lo:hi], backend=backend,
                                    data_parallel_group=dist.group.WORLD)
            else:
                module = GIFTLoss(backend=backend, data_parallel_group=dist.group.WORLD)
                loss, _ = module(*args, group_ids=gid[lo:hi])
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            dw = w.grad.clone()
            dist.all_reduce(dw)
            key = f"front_end/{backend}/{form}"
            res.diff(f"{key}/loss_sum", _max_diff(total, ref))
            res.diff(f"{key}/dhidden", _max_diff(h.grad, h_full.grad[lo:hi]))
            res.diff(f"{key}/dweight", _max_diff(dw, w_full.grad))


def case_errors(res: Results, world: int, rank: int) -> None:
    mask, _, logps, anchor, rewards, _, _ = _batch()
    lo, hi = _share(world, rank)
    try:
        Fn.gift_loss(logps[lo:hi], anchor[lo:hi], rewards[lo:hi], mask=mask[lo:hi],
                     group_ids=torch.tensor(GROUP_IDS)[lo:hi], detach_stats=False,
                     data_parallel_group=dist.group.WORLD)
        ok = world == 1          # one rank: nothing to gather, differentiable statistics are fine
    except ValueError as e:
        ok = world > 1 and "detach_stats" in str(e)
    res.flag("errors/detach_stats_false", ok)
    try:
        Fn.gift_loss(logps[lo:hi], anchor[lo:hi], rewards[lo:hi], mask=mask[lo:hi],
                     group_ids=torch.tensor(GROUP_IDS)[:1].expand(B), data_parallel_group=dist.group.WORLD)
        ok = hi - lo == B
    except ValueError as e:
        ok = "group_ids" in str(e)
    res.flag("errors/group_ids_shape", ok)
    try:
        Fn.gift_loss(logps[lo:hi], anchor[lo:hi], rewards[lo:hi], mask=mask[lo:hi],
                     group_size=1, data_parallel_group="world")
        ok = False
    except TypeError as e:
        ok = "data_parallel_group" in str(e)
    res.flag("errors/group_type", ok)


# ---------------------------------------------------------------------------------------------
# DDP and FSDP2 with a tiny causal LM
# ---------------------------------------------------------------------------------------------

def _lm_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[:, :2] = -100                       # prompt
    targets[1, 4:] = -100                       # padding
    rewards = torch.rand(B, generator=g)
    rewards[0] = rewards[2] = rewards[6] = 0.5
    with torch.no_grad():
        torch.manual_seed(2)
        m = TinyLM(V, H)
        hidden = m.model(inputs)[0]
        anchor = linear_logprobs(hidden, m.lm_head.weight, targets, backend="torch")
    old = anchor + 0.1 * torch.randn(B, T, generator=g)     # so that s != 0 at the first step
    adv = Fn.group_advantages(rewards, 2)
    return inputs, targets, old, rewards, adv


def _losses(lo, hi, group, n_tokens):
    """(name, loss_fn, per-rank extra args, kwargs) for the model tests."""
    gid = torch.tensor(GROUP_IDS)
    return [
        ("gift", gift_loss, dict(group_ids=gid[lo:hi], data_parallel_group=group, backend="torch")),
        ("grpo", grpo_loss, dict(loss_type="dapo", num_items_in_batch=n_tokens, backend="torch")),
    ]


def _single_step(name, inputs, targets, old, rewards, adv, lr):
    torch.manual_seed(3)
    model = TinyLM(V, H)
    wrapped = FusedLossModel(model, gift_loss if name == "gift" else grpo_loss)
    if name == "gift":
        loss, _ = wrapped(inputs, targets, old, rewards, group_ids=torch.tensor(GROUP_IDS),
                          backend="torch")
    else:
        loss, _ = wrapped(inputs, targets, old, adv, loss_type="dapo", backend="torch")
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=lr).step()
    return grads, {k: p.detach().clone() for k, p in model.named_parameters()}


def _rank_args(name, lo, hi, old, rewards, adv):
    return (old[lo:hi], rewards[lo:hi]) if name == "gift" else (old[lo:hi], adv[lo:hi])


def case_ddp(res: Results, world: int, rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    inputs, targets, old, rewards, adv = _lm_batch()
    lo, hi = _share(world, rank)
    n_tokens = int((targets != -100).sum())       # global normaliser of the token-mean loss
    lr = 1e-2
    for name, fn, kw in _losses(lo, hi, dist.group.WORLD, n_tokens):
        ref_grads, ref_params = _single_step(name, inputs, targets, old, rewards, adv, lr)
        torch.manual_seed(3)
        model = TinyLM(V, H)
        ddp = DDP(FusedLossModel(model, fn))
        loss, _ = ddp(inputs[lo:hi], targets[lo:hi], *_rank_args(name, lo, hi, old, rewards, adv),
                      **kw)
        (loss * world).backward()                   # DDP averages over ranks: undo it
        torch.optim.AdamW(ddp.parameters(), lr=lr).step()
        res.diff(f"ddp/{name}/grad", max(_max_diff(p.grad, ref_grads[k])
                                         for k, p in model.named_parameters()))
        res.diff(f"ddp/{name}/param_after_step", max(_max_diff(p, ref_params[k])
                                                     for k, p in model.named_parameters()))


def _fsdp_model(fn, shard_head=False):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(3)
    model = TinyLM(V, H)
    for layer in model.model.layers:
        fully_shard(layer)
    if shard_head:
        fully_shard(model.lm_head)          # the loss then runs as a forward of lm_head's unit
    root = FusedLossModel(model, fn)
    fully_shard(root)
    return model, root


def case_fsdp2(res: Results, world: int, rank: int) -> None:
    from torch.distributed.tensor import DTensor
    inputs, targets, old, rewards, adv = _lm_batch()
    lo, hi = _share(world, rank)
    n_tokens = int((targets != -100).sum())
    lr = 1e-2
    for name, fn, kw in _losses(lo, hi, dist.group.WORLD, n_tokens):
        ref_grads, ref_params = _single_step(name, inputs, targets, old, rewards, adv, lr)
        model, root = _fsdp_model(fn)
        loss, _ = root(inputs[lo:hi], targets[lo:hi], *_rank_args(name, lo, hi, old, rewards, adv),
                       **kw)
        (loss * world).backward()                   # FSDP2 averages over ranks too
        torch.optim.AdamW(root.parameters(), lr=lr).step()
        res.flag(f"fsdp2/{name}/params_are_dtensors",
                 all(isinstance(p, DTensor) for p in model.parameters()))
        res.diff(f"fsdp2/{name}/grad", max(_max_diff(p.grad.full_tensor(), ref_grads[k])
                                           for k, p in model.named_parameters()))
        res.diff(f"fsdp2/{name}/param_after_step", max(_max_diff(p.full_tensor(), ref_params[k])
                                                       for k, p in model.named_parameters()))
    # the wrong patterns are caught: a DTensor lm_head weight reaching the op, whatever the backend
    hidden = torch.randn(hi - lo, T, H)
    for backend in ("torch", "reference", "triton"):
        try:
            linear_logprobs(hidden, model.lm_head.weight, targets[lo:hi], backend=backend)
            ok = False
        except TypeError as e:
            ok = "DTensor" in str(e) and "FusedLossModel" in str(e)
        res.flag(f"dtensor_error/linear_logprobs/{backend}", ok)
    try:
        gift_loss(hidden, model.lm_head.weight, targets[lo:hi], old[lo:hi], rewards[lo:hi],
                  group_ids=torch.tensor(GROUP_IDS)[lo:hi], data_parallel_group=dist.group.WORLD)
        ok = False
    except TypeError as e:
        ok = "DTensor" in str(e)
    res.flag("dtensor_error/gift_loss_outside_forward", ok)
    # why the check exists: the weight's full_tensor() read outside the root forward runs without
    # error but its gradient skips FSDP2's reduce-scatter, so lm_head gets a wrong gradient
    from torch.distributed.fsdp import fully_shard
    ref_grads, _ = _single_step("gift", inputs, targets, old, rewards, adv, 1e-2)
    torch.manual_seed(3)
    model = TinyLM(V, H)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.model)
    fully_shard(model)
    hidden = model.model(inputs[lo:hi])[0]
    loss, _ = gift_loss(hidden, model.lm_head.weight.full_tensor(), targets[lo:hi], old[lo:hi],
                        rewards[lo:hi], group_ids=torch.tensor(GROUP_IDS)[lo:hi],
                        data_parallel_group=dist.group.WORLD, backend="torch")
    (loss * world).backward()
    wrong = _max_diff(model.lm_head.weight.grad.full_tensor(), ref_grads["lm_head.weight"])
    res.diff("wrong_pattern/full_tensor_outside_forward/lm_head_grad", wrong)
    # lm_head given its own fully_shard: FusedLossModel runs the loss inside that unit's forward
    model, root = _fsdp_model(gift_loss, shard_head=True)
    loss, _ = root(inputs[lo:hi], targets[lo:hi], old[lo:hi], rewards[lo:hi],
                   group_ids=torch.tensor(GROUP_IDS)[lo:hi], data_parallel_group=dist.group.WORLD,
                   backend="torch")
    (loss * world).backward()
    res.diff("fsdp2/gift_lm_head_own_unit/grad", max(_max_diff(p.grad.full_tensor(), ref_grads[k])
                                                     for k, p in model.named_parameters()))


def case_demo(res: Results, world: int, rank: int) -> None:
    """examples/data_parallel_gift.py (the torchrun check in docs/distributed.md), several steps."""
    for wrap in ("ddp", "fsdp2"):
        losses, single_losses, diff = demo.check(wrap, steps=2)
        if rank == 0:
            diff = max(diff, max(abs(a - b) for a, b in zip(losses, single_losses)))
        res.diff(f"demo/{wrap}/params_and_losses_after_2_steps", diff if rank == 0 else 0.0)


CASES = {
    "epilogue": case_epilogue,
    "front_end": lambda res, w, r: case_front_end(res, w, r, ("torch", "reference")),
    "front_end_triton": lambda res, w, r: case_front_end(res, w, r, ("triton",)),
    "errors": case_errors,
    "ddp": case_ddp,
    "fsdp2": case_fsdp2,
    "demo": case_demo,
}


def run(rank: int, world: int, init_method: str, out_path: str, cases) -> None:
    """Entry point of one rank (torch.multiprocessing.start_processes)."""
    torch.set_num_threads(1)
    init_gloo(rank, world, 180, init_method=init_method)
    res = Results(rank)
    errors = {}
    try:
        for name in cases:
            try:
                CASES[name](res, world, rank)
            except Exception:       # reported as a failure by the test, the other cases still run
                errors[name] = traceback.format_exc()
                break               # collectives may now be out of step: stop here
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"diffs": res.diffs, "flags": res.flags, "errors": errors}, f, indent=1)
        elif errors:
            with open(f"{out_path}.rank{rank}", "w") as f:
                json.dump({"errors": errors}, f)
    except BaseException:       # the traceback goes to the parent; the group goes first
        dist.destroy_process_group()
        raise
    finish_rank()

