"""FSDP2 with a tiny Hugging Face Llama, run inside each rank of a gloo group (spawned by
tests/test_fsdp_lm_head.py).

Two layouts of ``fully_shard``: every decoder layer and the root, with lm_head in the root's unit
("root"), or lm_head given its own ``fully_shard`` as well ("own"). For each of the three ways the
library puts the fused head inside the root's forward (``hf.patch_model``,
``integrations.fsdp.FusedLossModel`` and TRL's patched forward ``trl.add_gift_fast_lm_head``, which
``use_gift_fast`` / ``patch_trl`` install on the trainers' models), every rank runs its uneven
share of the batch, and values and gradients (``full_tensor()``) are compared with the unwrapped
model on the whole batch in one process. Rank 0 writes the max abs differences (MAX over ranks),
the reference magnitudes and flags to a JSON file that the test checks.
"""
from __future__ import annotations

import copy
import json
import traceback
import warnings

import torch
import torch.distributed as dist

from helpers import finish_rank, init_gloo

SHARES = [2, 4]          # sequences per rank (2 ranks): uneven, GIFT groups span both ranks
B, T, V = 6, 9, 97
GROUP_IDS = [0, 1, 0, 1, 1, 0]
LAYOUTS = ("root", "own")


def _llama(seed=0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():   # a sharper head than the random init: lm_head gradients of order 1
        model.lm_head.weight.mul_(10.0)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0                         # right padding
    ids = ids.masked_fill(mask == 0, 0)
    anchor = -3 * torch.rand(B, T - 1, generator=g)
    rewards = torch.rand(B, generator=g)
    return ids, mask, anchor, rewards


def _share(rank):
    lo = sum(SHARES[:rank])
    return lo, lo + SHARES[rank]


def _shard(model, layout):
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    if layout == "own":
        fully_shard(model.lm_head)
    fully_shard(model)
    return model


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _max_diff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


class Report:
    def __init__(self):
        self.diffs, self.scales, self.flags = {}, {}, {}

    def _reduce(self, value, op):
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=op)
        return float(t)

    def compare(self, key, value, ref):
        """Max abs difference (over ranks) and the reference's largest magnitude."""
        self.diffs[key] = self._reduce(_max_diff(value, ref), dist.ReduceOp.MAX)
        self.scales[key] = float(ref.detach().abs().max())

    def grads(self, key, model, ref_grads):
        grads = _grads(model)
        if grads.keys() != ref_grads.keys() or any(g is None for g in grads.values()):
            raise AssertionError(f"{key}: parameters without gradient or mismatched names")
        self.compare(f"{key}/lm_head_grad", grads["lm_head.weight"], ref_grads["lm_head.weight"])
        worst = max(ref_grads, key=lambda n: _max_diff(grads[n], ref_grads[n])
                    / (1.0 + float(ref_grads[n].abs().max())))
        self.compare(f"{key}/worst_param_grad ({worst})", grads[worst], ref_grads[worst])

    def flag(self, key, ok):
        self.flags[key] = self._reduce(0.0 if ok else 1.0, dist.ReduceOp.MAX) == 0.0


def _check_layout(rep, key, model, layout):
    """The layout really is what the key says (the comparison cannot pass vacuously)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    head = model.lm_head
    rep.flag(f"{key}/layout", isinstance(head.weight, DTensor)
             and isinstance(head, FSDPModule) == (layout == "own")
             and "_gift_fast_unit_call" not in vars(head))


def _gift(rank, keep=None):
    """GIFT head losses on the whole batch and on this rank's share (the group statistics
    gathered over the ranks), on the last ``keep`` positions if given."""
    from gift_fast import gift_loss
    _, _, anchor, rewards = _batch()
    if keep is not None:
        anchor = anchor[:, -keep:]
    lo, hi = _share(rank)
    gid = torch.tensor(GROUP_IDS)

    def single(h, w, t, **kw):
        return gift_loss(h, w, t, anchor, rewards, group_ids=gid, backend="torch", **kw)[0]

    def per_rank(h, w, t, **kw):
        return gift_loss(h, w, t, anchor[lo:hi], rewards[lo:hi], group_ids=gid[lo:hi],
                         data_parallel_group=dist.group.WORLD, backend="torch", **kw)[0]
    return single, per_rank


def _all_sum(x):
    t = x.detach().clone().reshape(1)
    dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------------------------

def case_patch_model(rep, rank, world):
    from gift_fast.integrations.hf import patch_model, token_logprobs
    ids, mask, _, _ = _batch()
    lo, hi = _share(rank)
    base = _llama()
    plain = copy.deepcopy(base)
    logp, ent = token_logprobs(plain, ids, mask, return_entropy=True, backend="torch")
    (logp.sum() + ent.sum()).backward()
    ref_grads = _grads(plain)
    single, per_rank = _gift(rank)
    plain.zero_grad()
    ref_gift = patch_model(plain)(ids, mask, token_logprobs=True, head_loss=single).loss
    ref_gift.backward()
    ref_gift_grads = _grads(plain)
    for layout in LAYOUTS:
        key = f"patch_model/{layout}"
        model = _shard(patch_model(copy.deepcopy(base)), layout)
        out = model(ids[lo:hi], mask[lo:hi], token_logprobs=True, return_entropy=True,
                    backend="torch")
        ((out.logprobs.sum() + out.entropy.sum()) * world).backward()   # FSDP2 averages
        rep.compare(f"{key}/logprobs", out.logprobs, logp[lo:hi])
        rep.grads(key, model, ref_grads)
        _check_layout(rep, key, model, layout)
        # a fused loss inside the forward (head_loss), GIFT groups split across the two ranks
        model = _shard(patch_model(copy.deepcopy(base)), layout)
        loss = model(ids[lo:hi], mask[lo:hi], token_logprobs=True, head_loss=per_rank).loss
        (loss * world).backward()
        rep.compare(f"{key}/head_loss_gift/loss_sum", _all_sum(loss), ref_gift.reshape(1))
        rep.grads(f"{key}/head_loss_gift", model, ref_gift_grads)



def case_fused_loss_model(rep, rank, world):
    from gift_fast import gift_loss
    from gift_fast.integrations.fsdp import FusedLossModel
    from gift_fast.integrations.hf import next_token_targets
    from torch.distributed.fsdp import fully_shard
    ids, mask, anchor, rewards = _batch()
    lo, hi = _share(rank)
    gid = torch.tensor(GROUP_IDS)
    inputs, targets = ids[:, :-1], next_token_targets(ids, mask)
    base = _llama()
    plain = copy.deepcopy(base)
    ref, _ = FusedLossModel(plain, gift_loss)(inputs, targets, anchor, rewards, group_ids=gid,
                                               attention_mask=mask[:, :-1], backend="torch")
    ref.backward()
    ref_grads = _grads(plain)
    for layout in LAYOUTS:
        key = f"fused_loss_model/{layout}"
        model = copy.deepcopy(base)
        for layer in model.model.layers:
            fully_shard(layer)
        if layout == "own":
            fully_shard(model.lm_head)
        root = fully_shard(FusedLossModel(model, gift_loss))
        loss, _ = root(inputs[lo:hi], targets[lo:hi], anchor[lo:hi], rewards[lo:hi],
                       group_ids=gid[lo:hi], attention_mask=mask[lo:hi, :-1],
                       data_parallel_group=dist.group.WORLD, backend="torch")
        (loss * world).backward()
        rep.compare(f"{key}/loss_sum", _all_sum(loss), ref.reshape(1))
        rep.grads(key, model, ref_grads)
        _check_layout(rep, key, model, layout)


def case_trl(rep, rank, world):
    from gift_fast.integrations.trl import add_gift_fast_lm_head
    ids, mask, _, _ = _batch()
    lo, hi = _share(rank)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100                      # the prompt is not scored
    base = _llama()
    plain = copy.deepcopy(base)
    add_gift_fast_lm_head(plain, temperature=0.7, outputs=("log_probs", "entropy"),
                          backend="torch")
    ref = plain(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    (ref.log_probs.sum() + ref.entropy.sum()).backward()
    ref_grads = _grads(plain)
    keep = 5
    single, per_rank = _gift(rank, keep)
    plain.zero_grad()   # the head_loss path GIFTTrainer takes, on the last `keep` positions
    ref_gift = plain(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True,
                     logits_to_keep=keep, head_loss=single).loss
    ref_gift.backward()
    ref_gift_grads = _grads(plain)
    for layout in LAYOUTS:
        key = f"trl_fused_lm_head/{layout}"
        model = copy.deepcopy(base)
        add_gift_fast_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"),
                              backend="torch")
        model = _shard(model, layout)
        out = model(input_ids=ids[lo:hi], attention_mask=mask[lo:hi], labels=labels[lo:hi],
                    fused_lm_head=True)
        ((out.log_probs.sum() + out.entropy.sum()) * world).backward()
        rep.compare(f"{key}/log_probs", out.log_probs, ref.log_probs[lo:hi])
        rep.grads(key, model, ref_grads)
        _check_layout(rep, key, model, layout)
        model = copy.deepcopy(base)
        add_gift_fast_lm_head(model, temperature=0.7, backend="torch")
        model = _shard(model, layout)
        loss = model(input_ids=ids[lo:hi], attention_mask=mask[lo:hi], labels=labels[lo:hi],
                     fused_lm_head=True, logits_to_keep=keep, head_loss=per_rank).loss
        (loss * world).backward()
        rep.compare(f"{key}/head_loss_gift/loss_sum", _all_sum(loss), ref_gift.reshape(1))
        rep.grads(f"{key}/head_loss_gift", model, ref_gift_grads)


def case_errors(rep, rank, world):
    """Outside the root forward the integration refuses sharded weights with the clear message."""
    from gift_fast.integrations.hf import lm_head_of, patch_model, token_logprobs
    ids, mask, _, _ = _batch()
    lo, hi = _share(rank)
    for layout in LAYOUTS:
        model = patch_model(_llama())
        token_logprobs(model, ids[lo:hi], mask[lo:hi])   # caches "nothing sharded" for the model
        model = _shard(model, layout)                    # in place: the check runs again
        try:
            token_logprobs(model, ids[lo:hi], mask[lo:hi])
            ok = False
        except TypeError as e:
            msg = str(e)
            ok = ("token_logprobs(model)" in msg and "DTensor" in msg and "patch_model" in msg)
        rep.flag(f"errors/{layout}/token_logprobs_outside_forward", ok)
        head = lm_head_of(model)
        try:
            head.fold(torch.randn(2, 32))
            ok = False
        except TypeError as e:
            ok = "lm_head weight: got a DTensor" in str(e)
        rep.flag(f"errors/{layout}/fold_sharded_weight", ok)


CASES = {"patch_model": case_patch_model, "fused_loss_model": case_fused_loss_model,
         "trl": case_trl, "errors": case_errors}


def run(rank: int, world: int, init_method: str, out_path: str, cases) -> None:
    """Entry point of one rank (torch.multiprocessing.start_processes)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")   # FSDP2 and transformers notices, not results
    init_gloo(rank, world, 180, init_method=init_method)
    rep = Report()
    errors = {}
    try:
        for name in cases:
            try:
                CASES[name](rep, rank, world)
            except Exception:       # reported as a failure by the test
                errors[name] = traceback.format_exc()
                break               # collectives may now be out of step: stop here
        out = out_path if rank == 0 else f"{out_path}.rank{rank}"
        if rank == 0 or errors:
            with open(out, "w") as f:
                json.dump({"diffs": rep.diffs, "scales": rep.scales, "flags": rep.flags,
                           "errors": errors}, f, indent=1)
    except BaseException:       # the traceback goes to the parent; the group goes first
        dist.destroy_process_group()
        raise
    finish_rank()
