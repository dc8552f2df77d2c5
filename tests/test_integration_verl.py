"""gift_fast.integrations.verl without verl installed.

The two verl functions against the independent float64 transcription of the authors' algorithm
(tests/gift_authors_reference), in verl's layout: numpy object arrays of uid strings, interleaved
groups, prefix response masks, config objects. Registration is tested with a fake ``verl`` module
providing the registries (monkeypatched sys.modules), and through the setup.py plugin entry point.
"""
import importlib
import importlib.metadata
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import gift_fast.functional as Fn
from helpers import assert_within, rounding_bound
from tests.gift_authors_reference import authors_advantage, authors_policy_loss

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-13)
ROOT = Path(__file__).resolve().parents[1]


def _verl_module():
    return importlib.import_module("gift_fast.integrations.verl")


def verl_batch(group_sizes, T, seed, dtype=F64, empty=()):
    g = torch.Generator().manual_seed(seed)
    uids = [f"uid-{k}" for k, n in enumerate(group_sizes) for _ in range(n)]
    perm = torch.randperm(len(uids), generator=g).tolist()
    index = np.array([uids[i] for i in perm], dtype=object)
    B = len(index)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    for i in empty:
        lengths[i] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    scores = torch.randn(B, generator=g, dtype=F64)
    token_rewards = torch.zeros(B, T, dtype=F64)
    token_rewards[torch.arange(B), (lengths - 1).clamp_min(0)] = scores   # verl: reward on the last token
    old = (-torch.rand(B, T, generator=g, dtype=F64) * 3) * mask.to(F64)
    logp = (old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)) * mask.to(F64)
    return (token_rewards.to(dtype), mask, index, old.to(dtype),
            logp.to(dtype).requires_grad_(True), scores)


SIZES = [[4, 1, 3, 4], [1, 1], [8, 2, 5]]


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "-".join(map(str, s)))
def test_advantage_equals_authors(sizes):
    V = _verl_module()
    rewards, mask, index, *_ = verl_batch(sizes, 7, seed=sum(sizes))
    adv, ret = V.compute_gift_outcome_advantage(rewards, mask, index, epsilon=1e-6)
    assert adv is ret and adv.shape == rewards.shape and adv.dtype == rewards.dtype
    torch.testing.assert_close(adv, authors_advantage(rewards, mask, index), **TOL)


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_policy_loss_equals_authors(sizes, beta):
    V = _verl_module()
    rewards, mask, index, old, logp, _ = verl_batch(sizes, 7, seed=10 + sum(sizes), empty=(1,))
    adv, _ = V.compute_gift_outcome_advantage(rewards, mask, index)
    cfg = types.SimpleNamespace(kl_loss_coef=beta, epsilon=1e-6, clip_ratio=0.2)
    ours, metrics = V.compute_policy_loss_gift(old_log_prob=old, log_prob=logp, advantages=adv,
                                               response_mask=mask, loss_agg_mode="token-mean",
                                               config=cfg, rollout_is_weights=None, index=index)
    ref = authors_policy_loss(old, logp, authors_advantage(rewards, mask, index), mask, index,
                              beta=beta)
    torch.testing.assert_close(ours, ref, **TOL)
    g_ours, = torch.autograd.grad(ours, logp)
    g_ref, = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(g_ours, g_ref, **TOL)
    assert g_ours.abs().max() > 0
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert isinstance(metrics[key], float)
    assert metrics["actor/ppo_kl"] == pytest.approx(((logp - old) * mask).sum(-1).mean().item())


def test_verl_pipeline_equals_library_gift_loss():
    """advantage estimator -> policy loss == gift_fast.functional.gift_loss on the same batch."""
    V = _verl_module()
    rewards, mask, index, old, logp, scores = verl_batch([3, 1, 5, 2], 6, seed=2)
    adv, _ = V.compute_gift_outcome_advantage(rewards, mask, index)
    loss, _ = V.compute_policy_loss_gift(old, logp, adv, mask, index=index)
    group_ids, _ = V.gift_group_ids(index, len(index))
    lib, _ = Fn.gift_loss(logp, old, scores, mask=mask.bool(), group_ids=group_ids)
    torch.testing.assert_close(loss, lib, **TOL)
    torch.testing.assert_close(*(torch.autograd.grad(x, logp)[0] for x in (loss, lib)), **TOL)


def test_float32_close_to_authors_and_uniform_groups_exact():
    V = _verl_module()
    rewards, mask, index, old, logp, _ = verl_batch([4, 4, 1], 5, seed=4, dtype=torch.float32)
    adv, _ = V.compute_gift_outcome_advantage(rewards, mask, index)
    # both float32: each within its rounding bound (helpers.py) of the exact value
    r64, o64, l64, m64 = (x.double() for x in (rewards, old, logp, mask))
    _, b_ours = rounding_bound(lambda: V.compute_gift_outcome_advantage(r64, m64, index)[0])
    _, b_theirs = rounding_bound(lambda: authors_advantage(r64, m64, index))
    assert_within("advantage", adv, authors_advantage(rewards, mask, index), b_ours + b_theirs)
    loss, _ = V.compute_policy_loss_gift(old, logp, adv, mask, index=index)
    ref = authors_policy_loss(old, logp, adv, mask, index)
    a64 = adv.double()
    _, b_ours = rounding_bound(
        lambda: V.compute_policy_loss_gift(o64, l64, a64, m64, index=index)[0])
    _, b_theirs = rounding_bound(lambda: authors_policy_loss(o64, l64, a64, m64, index))
    assert_within("loss", loss, ref, b_ours + b_theirs)
    # equal rewards in a group: exactly 0 here, rounding noise of order 1e-2 in the authors' code
    same = torch.zeros(8, 3)
    same[:, -1] = 0.9
    adv_same, _ = V.compute_gift_outcome_advantage(same, torch.ones(8, 3), np.array(["p"] * 8, dtype=object))
    assert torch.all(adv_same == 0)


def test_config_variants_and_anchor_choice():
    V = _verl_module()
    rewards, mask, index, old, logp, _ = verl_batch([3, 3], 6, seed=7)
    adv, _ = V.compute_gift_outcome_advantage(rewards, mask, index)
    default, _ = V.compute_policy_loss_gift(old, logp, adv, mask, index=index)          # config None
    as_dict, _ = V.compute_policy_loss_gift(old, logp, adv, mask, index=index,
                                            config={"kl_loss_coef": 1.0, "epsilon": 1e-6})
    via_uid, _ = V.compute_policy_loss_gift(old, logp, adv, mask, uid=list(index))
    torch.testing.assert_close(default, as_dict, **TOL)
    torch.testing.assert_close(default, via_uid, **TOL)
    # policy_loss.kl_source = "reference": ref_log_prob replaces old_log_prob as the anchor
    ref_lp = old - 0.1 * mask
    cfg = types.SimpleNamespace(kl_loss_coef=0.5, policy_loss={"kl_source": "reference"})
    with_ref, _ = V.compute_policy_loss_gift(old, logp, adv, mask, index=index, config=cfg,
                                             ref_log_prob=ref_lp)
    expect = authors_policy_loss(ref_lp, logp, adv, mask, index, beta=0.5)
    torch.testing.assert_close(with_ref, expect, **TOL)
    # response_length_penalty p: s divided by |y|^p (p = 1: per-token mean)
    cfg = types.SimpleNamespace(response_length_penalty=1.0)
    mean_norm, _ = V.compute_policy_loss_gift(old, logp, adv, mask, index=index, config=cfg)
    group_ids, _ = V.gift_group_ids(index, len(index))
    scores = rewards.sum(-1)
    lib, _ = Fn.gift_loss(logp, old, scores, mask=mask.bool(), group_ids=group_ids, length_norm=1.0)
    torch.testing.assert_close(mean_norm, lib, **TOL)


def test_bad_input_names_the_argument():
    V = _verl_module()
    rewards, mask, index, old, logp, _ = verl_batch([2, 2], 4, seed=1)
    adv, _ = V.compute_gift_outcome_advantage(rewards, mask, index)
    with pytest.raises(ValueError, match="index: expected the uid"):
        V.compute_policy_loss_gift(old, logp, adv, mask)
    with pytest.raises(ValueError, match=r"index: expected 4 labels"):
        V.compute_gift_outcome_advantage(rewards, mask, index[:3])
    with pytest.raises(TypeError, match="index: labels must be hashable"):
        V.compute_gift_outcome_advantage(rewards, mask, [{0}, {0}, {1}, {1}])
    with pytest.raises(ValueError, match="log_prob: expected shape"):
        V.compute_policy_loss_gift(old, logp[:, :2], adv, mask, index=index)
    with pytest.raises(ValueError, match="token_level_rewards: expected finite"):
        V.compute_gift_outcome_advantage(rewards * float("nan"), mask, index)
    with pytest.raises(ValueError, match="ref_log_prob: required"):
        V.compute_policy_loss_gift(old, logp, adv, mask, index=index,
                                   config={"policy_loss": {"kl_source": "reference"}})
    with pytest.raises(ValueError, match="config.kl_loss_coef"):
        V.compute_policy_loss_gift(old, logp, adv, mask, index=index, config={"kl_loss_coef": "x"})
    with pytest.raises(ValueError, match="loss_agg_mode"):
        V.compute_policy_loss_gift(old, logp, adv, mask, index=index, loss_agg_mode="bogus")


# ------------------------------------------------------------------------------ registration

def _fake_verl(monkeypatch, preexisting=None):
    """A stand-in for verl.trainer.ppo.core_algos with verl's registry semantics."""
    core = types.ModuleType("verl.trainer.ppo.core_algos")
    core.POLICY_LOSS_REGISTRY = {}
    core.ADV_ESTIMATOR_REGISTRY = {}

    def register_policy_loss(name):
        def deco(fn):
            core.POLICY_LOSS_REGISTRY[name] = fn
            return fn
        return deco

    def register_adv_est(name):
        def deco(fn):
            if name in core.ADV_ESTIMATOR_REGISTRY and core.ADV_ESTIMATOR_REGISTRY[name] != fn:
                raise ValueError(f"Adv estimator {name} has already been registered")
            core.ADV_ESTIMATOR_REGISTRY[name] = fn
            return fn
        return deco

    core.register_policy_loss = register_policy_loss
    core.register_adv_est = register_adv_est
    if preexisting:
        core.POLICY_LOSS_REGISTRY["gift"] = preexisting
        core.ADV_ESTIMATOR_REGISTRY["gift"] = preexisting
    patcher = types.ModuleType("verl.models.transformers.monkey_patch")
    patcher.patch_forward_with_backends = lambda model, **kwargs: None
    core.monkey_patch = patcher
    losses = types.ModuleType("verl.workers.utils.losses")
    losses.ppo_loss = lambda config, model_output, data, dp_group=None: None
    core.losses = losses
    names = ["verl", "verl.trainer", "verl.trainer.ppo", "verl.models", "verl.models.transformers",
             "verl.workers", "verl.workers.utils"]
    mods = {n: types.ModuleType(n) for n in names}
    mods["verl.trainer.ppo.core_algos"] = core
    mods["verl.models.transformers.monkey_patch"] = patcher
    mods["verl.workers.utils.losses"] = losses
    for name, mod in mods.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "gift_fast.integrations.verl", raising=False)
    return core


def test_import_registers_with_verl(monkeypatch):
    core = _fake_verl(monkeypatch)
    V = importlib.import_module("gift_fast.integrations.verl")
    for name in ("gift_fast", "gift"):
        assert core.POLICY_LOSS_REGISTRY[name] is V.compute_policy_loss_gift
        assert core.ADV_ESTIMATOR_REGISTRY[name] is V.compute_gift_outcome_advantage
    assert V.register() == ("gift_fast", "gift")            # idempotent
    # the fused forward hook and the uid-passing ppo_loss wrapper are installed too
    assert core.monkey_patch.patch_forward_with_backends._gift_fast_original is not None
    assert core.losses.ppo_loss._gift_fast_original is not None


def test_an_existing_gift_registration_is_kept(monkeypatch):
    def authors_fn(*a, **k):
        return None
    core = _fake_verl(monkeypatch, preexisting=authors_fn)
    V = importlib.import_module("gift_fast.integrations.verl")
    assert core.POLICY_LOSS_REGISTRY["gift"] is authors_fn
    assert core.ADV_ESTIMATOR_REGISTRY["gift"] is authors_fn
    assert core.POLICY_LOSS_REGISTRY["gift_fast"] is V.compute_policy_loss_gift


def test_import_without_verl_and_with_a_broken_verl(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)             # "import verl" raises ImportError
    monkeypatch.delitem(sys.modules, "gift_fast.integrations.verl", raising=False)
    V = importlib.import_module("gift_fast.integrations.verl")
    with pytest.raises(ImportError):
        V.register()
    core = _fake_verl(monkeypatch)
    del core.register_adv_est
    with pytest.warns(RuntimeWarning, match="could not register GIFT with verl"):
        importlib.import_module("gift_fast.integrations.verl")


def test_setup_py_plugin_entry_point_registers(monkeypatch):
    """verl 0.9.1 loads every 'verl.plugins' entry point on `import verl`: ours registers GIFT."""
    text = (ROOT / "setup.py").read_text()
    m = re.search(r'"verl\.plugins":\s*\[\s*"(\w+)\s*=\s*([\w.]+)"', text)
    assert m, "setup.py must declare a verl.plugins entry point"
    core = _fake_verl(monkeypatch)
    ep = importlib.metadata.EntryPoint(name=m.group(1), value=m.group(2), group="verl.plugins")
    ep.load()
    assert core.POLICY_LOSS_REGISTRY["gift_fast"].__name__ == "compute_policy_loss_gift"


# ------------------------------------------------------------------ the fused forward in the actor

def _tiny_causal_lm(kind="llama", seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    common = dict(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0,
                                        attn_implementation="eager")
        base = transformers.Gemma2ForCausalLM
    else:
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=(kind == "llama_tied"))
        base = transformers.LlamaForCausalLM
    # a subclass, so patching its forward never touches the transformers class other tests use
    cls = type(f"Tiny{base.__name__}", (base,), {})
    return cls(cfg).to(F64).eval()


def _logits_reference(model, input_ids, temperature, labels):
    logits = model(input_ids=input_ids).logits / temperature
    # (Gemma-2's forward already applies its final logit softcapping to .logits)
    logp = torch.log_softmax(logits, dim=-1)
    token = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token, entropy


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "gemma2"])
def test_forward_for_ppo_equals_logits_path(kind):
    """log_probs / entropy of the rolled labels, values and gradients, vs logits -> log_softmax."""
    V = _verl_module()
    model = _tiny_causal_lm(kind)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 67, (3, 9), generator=g)
    temperature = 0.7
    out = V.forward_for_ppo(model, input_ids=input_ids, temperature=temperature, return_dict=True)
    ref_lp, ref_ent = _logits_reference(model, input_ids, temperature,
                                        torch.roll(input_ids, -1, dims=-1))
    torch.testing.assert_close(out.log_probs, ref_lp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, ref_ent, rtol=1e-10, atol=1e-10)
    w = torch.randn(3, 9, generator=g, dtype=F64)
    params = [p for p in model.parameters() if p.requires_grad][-4:]
    ga = torch.autograd.grad((w * out.log_probs).sum() + 0.1 * out.entropy.sum(), params)
    gb = torch.autograd.grad((w * ref_lp).sum() + 0.1 * ref_ent.sum(), params)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_forward_for_ppo_packed_rows_with_shift_labels():
    """verl's remove-padding layout: one packed row [1, nnz], position ids restart per sequence,
    labels rolled over the whole packed row and passed as shift_labels. (Packed attention needs
    flash-attention, so the reference is the model's own logits on the same packed call.)"""
    V = _verl_module()
    model = _tiny_causal_lm("llama", seed=2)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 67, (5,), generator=g), torch.randint(0, 67, (4,), generator=g)
    packed = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(5), torch.arange(4)])[None]
    shift = torch.roll(packed, -1, dims=-1)
    out = V.forward_for_ppo(model, input_ids=packed, position_ids=pos, shift_labels=shift,
                            temperature=torch.tensor(1.0), return_dict=True)
    logp = torch.log_softmax(model(input_ids=packed, position_ids=pos).logits, dim=-1)
    ref = logp.gather(-1, shift.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.log_probs, ref, rtol=1e-10, atol=1e-10)
    wrong = logp.gather(-1, packed.unsqueeze(-1)).squeeze(-1)      # unshifted labels differ
    assert (out.log_probs - wrong).abs().max() > 1e-3


def test_install_fused_forward_adds_the_gift_fast_backend(monkeypatch):
    V = _verl_module()
    calls = []
    fake = types.ModuleType("verl.models.transformers.monkey_patch")
    fake.patch_forward_with_backends = lambda model, use_fused_kernels=False, fused_kernels_backend=None: \
        calls.append(fused_kernels_backend)
    assert V.install_fused_forward(fake) is True
    assert V.install_fused_forward(fake) is False                    # idempotent
    model = _tiny_causal_lm("llama", seed=3)
    fake.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    assert calls == ["torch"]                                        # verl's own backends untouched
    fake.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="gift_fast")
    assert type(model).forward is V.forward_for_ppo and calls == ["torch"]
    ids = torch.randint(0, 67, (2, 6))
    out = model(input_ids=ids, temperature=1.0, return_dict=True)     # what verl's engine calls
    assert out.log_probs.shape == (2, 6) and out.entropy.shape == (2, 6)
    model.config.model_type = "qwen2_vl"
    with pytest.raises(ValueError, match="fused_kernels_backend: 'gift_fast' supports text-only"):
        fake.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="gift_fast")


def test_uid_passing_wrapper_feeds_index_to_the_policy_loss():
    """verl 0.9.1's ppo_loss calls the policy loss without index: the wrapper publishes the
    micro-batch's data["uid"] for the duration of the call, and only then."""
    V = _verl_module()
    rewards, mask, index, old, logp, _ = verl_batch([3, 2, 1], 5, seed=9)
    adv, _ = V.compute_gift_outcome_advantage(rewards, mask, index)

    def ppo_loss(config, model_output, data, dp_group=None):     # what verl's ppo_loss does
        return V.compute_policy_loss_gift(old_log_prob=old, log_prob=model_output["log_probs"],
                                          advantages=adv, response_mask=mask,
                                          loss_agg_mode="token-mean", config=config,
                                          rollout_is_weights=None)

    fake = types.ModuleType("verl.workers.utils.losses")
    fake.ppo_loss = ppo_loss
    with pytest.raises(ValueError, match="index: expected the uid"):
        fake.ppo_loss(config=None, model_output={"log_probs": logp}, data={"uid": index})
    assert V.install_uid_passing(fake) is True and V.install_uid_passing(fake) is False
    loss, _ = fake.ppo_loss(config=None, model_output={"log_probs": logp}, data={"uid": index},
                            dp_group=None)
    expect, _ = V.compute_policy_loss_gift(old, logp, adv, mask, index=index)
    torch.testing.assert_close(loss, expect, **TOL)
    with pytest.raises(ValueError, match="index: expected the uid"):   # nothing left behind
        V.compute_policy_loss_gift(old, logp, adv, mask)
    with pytest.raises(ValueError, match="index: expected the uid"):   # a batch without uids
        fake.ppo_loss(config=None, model_output={"log_probs": logp}, data={})


def test_global_batch_normalisation_adds_micro_batches_up_to_the_mini_batch_mean():
    """With verl 0.9.1's global_batch_info, two micro-batches (whole groups) sum to the authors'
    mean over the mini-batch, values and gradients; without it, each call is the authors' mean."""
    V = _verl_module()
    rewards, mask, index, old, logp, _ = verl_batch([2, 2, 2, 2], 4, seed=12)
    adv, _ = V.compute_gift_outcome_advantage(rewards, mask, index)
    order = np.argsort(index, kind="stable")                       # groups whole per micro-batch
    parts = [torch.as_tensor(order[:4]), torch.as_tensor(order[4:])]
    cfg = types.SimpleNamespace(kl_loss_coef=1.0, global_batch_info={"global_batch_size": 8, "dp_size": 1})
    total = sum(V.compute_policy_loss_gift(old[p], logp[p], adv[p], mask[p], index=index[p.numpy()],
                                           config=cfg)[0] for p in parts)
    means = [authors_policy_loss(old[p], logp[p], adv[p], mask[p], index[p.numpy()]) for p in parts]
    expect = sum(means) / 2
    torch.testing.assert_close(total, expect, **TOL)
    torch.testing.assert_close(torch.autograd.grad(total, logp)[0],
                               torch.autograd.grad(expect, logp)[0], **TOL)
    cfg.global_batch_info = {"global_batch_size": 8, "dp_size": 2}  # FSDP averages over 2 ranks
    doubled, _ = V.compute_policy_loss_gift(old[parts[0]], logp[parts[0]], adv[parts[0]],
                                            mask[parts[0]], index=index[parts[0].numpy()], config=cfg)
    torch.testing.assert_close(doubled, means[0], **TOL)           # 4 of 8 sequences, times 2
