"""gift_fast.integrations.hf against each model's own logits -> log_softmax -> gather, in float64.

Tiny random-config models built from transformers configs (no downloads). Every architecture in
the table of docs/integrations.md is tested here: values and gradients, left/right padding,
temperature, logits_to_keep, entropy, the patched forward, and the error for an unknown head.
"""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gift_fast.integrations.hf import lm_head_of, patch_model, token_logprobs  # noqa: E402
from helpers import LargestAllocation, count_host_syncs, init_gloo, rendezvous

V = 97   # not a multiple of any tile or chunk size
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)


def _configs():
    t = transformers
    return {
        "llama": t.LlamaConfig(**_COMMON),
        "qwen2": t.Qwen2Config(**_COMMON),
        "qwen3": t.Qwen3Config(**_COMMON, head_dim=8),
        "mistral": t.MistralConfig(**_COMMON),
        "phi3": t.Phi3Config(**_COMMON),
        "phi": t.PhiConfig(**_COMMON),                          # lm_head with a bias
        "gemma": t.GemmaConfig(**_COMMON, head_dim=8),          # tied embeddings
        "gemma2": t.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=3.0),
        "gemma3_text": t.Gemma3TextConfig(**_COMMON, head_dim=8, final_logit_softcapping=3.0),
        "cohere": t.CohereConfig(**_COMMON, logit_scale=0.5),
        "granite": t.GraniteConfig(**_COMMON, logits_scaling=4.0),
    }


ARCHS = list(_configs())


def _model(arch, seed=0):
    torch.manual_seed(seed)
    cfg = copy.deepcopy(_configs()[arch])
    try:   # SDPA handles fully padded query rows; float64 eager turns left padding into NaN
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    except ValueError:
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(_configs()[arch]),
                                                              attn_implementation="eager")
    model = model.double().eval()
    with torch.no_grad():   # random heads are near-uniform; sharpen them so errors would show
        model.get_output_embeddings().weight.mul_(20.0)
        if model.get_output_embeddings().bias is not None:
            model.get_output_embeddings().bias.normal_()
    return model


def _batch(model, seed=1, left=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    eager = model.config._attn_implementation == "eager"
    if left and not eager:
        mask[0, :3] = 0          # left padding
    mask[1, -2:] = 0             # right padding
    return ids.masked_fill(mask == 0, 0), mask


def _reference(model, ids, mask, temperature=1.0, keep=None):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double() / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, 1:, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    live = mask[:, 1:].bool()
    logp, entropy = logp * live, entropy * live
    if keep is not None:
        logp, entropy, live = logp[:, -keep:], entropy[:, -keep:], live[:, -keep:]
    return logp, entropy, live


@pytest.mark.parametrize("arch", ARCHS)
def test_values_and_gradients_match_model_logits(arch):
    model = _model(arch)
    ids, mask = _batch(model)
    upstream = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64)

    ref, ref_ent, live = _reference(model, ids, mask, temperature=0.7)
    (ref * upstream + 0.3 * ref_ent).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    logp, ent = token_logprobs(model, ids, mask, temperature=0.7, return_entropy=True)
    assert logp.shape == (3, 8) and logp.dtype == torch.float64
    assert torch.equal(logp[~live], torch.zeros_like(logp[~live]))
    torch.testing.assert_close(logp, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ent, ref_ent, atol=1e-10, rtol=1e-10)
    (logp * upstream + 0.3 * ent).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-9, rtol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_logits_to_keep_is_trls_alignment(arch):
    model = _model(arch, seed=3)
    ids, mask = _batch(model, seed=4)
    full = token_logprobs(model, ids, mask)
    kept = token_logprobs(model, ids, mask, logits_to_keep=3)
    ref, _, _ = _reference(model, ids, mask, keep=3)
    torch.testing.assert_close(kept, ref, atol=1e-10, rtol=1e-10)
    assert torch.equal(kept, full[:, -3:])
    # TRL's own convention: model(..., logits_to_keep=k + 1).logits[:, :-1] scores input_ids[:, -k:]
    trl_logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=4).logits[:, :-1]
    trl = trl_logits.log_softmax(-1).gather(-1, ids[:, -3:, None])[..., 0] * mask[:, -3:]
    torch.testing.assert_close(kept, trl, atol=1e-10, rtol=1e-10)


def test_gradient_wrt_inputs_embeds():
    model = _model("llama", seed=5)
    ids, mask = _batch(model, seed=6)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    token_logprobs(model, ids, mask, inputs_embeds=embeds).sum().backward()
    ours = embeds.grad.clone()
    embeds.grad = None
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]
    (logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]).sum().backward()
    torch.testing.assert_close(ours, embeds.grad, atol=1e-10, rtol=1e-8)
    assert ours.abs().sum() > 0


def test_float32_model_within_float32_tolerance():
    model = _model("qwen3", seed=7).float()
    ids, mask = _batch(model, seed=8)
    logp = token_logprobs(model, ids, mask, backend="torch")
    ref, _, _ = _reference(model.double(), ids, mask)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "cohere"])
def test_patched_forward_equals_function_and_keeps_generation(arch):
    model = _model(arch, seed=9)
    ids, mask = _batch(model, seed=10)
    plain_logits = model(input_ids=ids, attention_mask=mask).logits
    patch_model(model)
    assert patch_model(model) is model   # idempotent
    out = model(ids, mask, token_logprobs=True, temperature=1.3, return_entropy=True, logits_to_keep=5)
    logp, ent = token_logprobs(model, ids, mask, temperature=1.3, return_entropy=True, logits_to_keep=5)
    assert torch.equal(out.logprobs, logp) and torch.equal(out.entropy, ent)
    assert torch.equal(out.mask, mask[:, -5:].bool())
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, plain_logits)

    # a fused loss runs inside the forward on the folded head (logit_scale / softcap included)
    def head_loss(hidden, weight, targets, bias=None, softcap=None, temperature=1.0):
        from gift_fast import linear_logprobs
        return -linear_logprobs(hidden, weight, targets, bias, softcap=softcap,
                                temperature=temperature).sum()
    loss = model(input_ids=ids, attention_mask=mask, token_logprobs=True, head_loss=head_loss).loss
    ref, _, _ = _reference(model, ids, mask)
    torch.testing.assert_close(loss, -ref.sum(), atol=1e-9, rtol=1e-10)


def test_token_logprobs_and_patched_forward_under_torch_compile():
    """token_logprobs and the patched forward compile with fullgraph=True (no graph break: the
    FSDP2 check's walk over the parameters is folded while tracing), run without a host sync,
    and give the float64 reference within this file's float64 tolerances (aot_eager backend:
    the graphs dynamo and AOTAutograd build, without inductor's code generation; see
    tests/test_compile.py). Gradients go through the compiled backward."""
    model = _model("cohere", seed=9)          # a scaled head (gemma2 would count transformers'
    # own host read: a dynamo guard on its embed_scale buffer's value, run at every call)
    ids, mask = _batch(model, seed=10)
    upstream = torch.randn(ids.shape[0], ids.shape[1] - 1, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(11))
    ref, ref_ent, _ = _reference(model, ids, mask, temperature=0.7)
    (ref * upstream + 0.3 * ref_ent).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    patched = patch_model(copy.deepcopy(model))
    runs = {
        "token_logprobs": lambda i, m: token_logprobs(model, i, m, temperature=0.7,
                                                     return_entropy=True),
        "patched forward": lambda i, m: (lambda o: (o.logprobs, o.entropy))(patched(
            i, m, token_logprobs=True, temperature=0.7, return_entropy=True)),
    }
    for name, fn in runs.items():
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        compiled(ids, mask)                   # compiles outside the count
        target = model if name == "token_logprobs" else patched
        target.zero_grad()
        with count_host_syncs() as syncs:
            logp, ent = compiled(ids, mask)
        assert sum(syncs.values()) == 0, (name, dict(syncs))
        torch.testing.assert_close(logp, ref, atol=1e-10, rtol=1e-10, msg=name)
        torch.testing.assert_close(ent, ref_ent, atol=1e-10, rtol=1e-10, msg=name)
        (logp * upstream + 0.3 * ent).sum().backward()
        grads = {n: p.grad for n, p in target.named_parameters() if p.grad is not None}
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-9, rtol=1e-7,
                                       msg=f"{name}: {n}")


def test_no_logits_sized_tensor(monkeypatch):
    """The integration itself never builds a [B*T, V] tensor (chunk budget below it)."""
    import gift_fast.backends.torch_chunked as tc
    v = 1000   # large enough that N x V dwarfs the body's activations and the [V, H] weight
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_COMMON, "vocab_size": v}))
    ids = torch.randint(3, v, (4, 40), generator=torch.Generator().manual_seed(12))
    monkeypatch.setattr(tc, "CHUNK_ELEMENTS", 8 * v)
    with LargestAllocation() as spy:
        logp, ent = token_logprobs(model, ids, return_entropy=True, backend="torch")
        (logp.sum() + ent.sum()).backward()
    n = ids.shape[0] * (ids.shape[1] - 1)
    assert spy.largest <= v * 32, f"largest tensor had {spy.largest} elements (N*V={n * v})"


def test_clear_errors():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1,
                                                                n_head=2))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        token_logprobs(gpt2, torch.randint(0, V, (2, 5)))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        patch_model(gpt2)
    model = _model("llama")
    with pytest.raises(ValueError, match="input_ids"):
        token_logprobs(model, torch.randint(0, V, (2,)))
    with pytest.raises(ValueError, match="attention_mask"):
        token_logprobs(model, torch.randint(0, V, (2, 5)), torch.ones(2, 4))
    with pytest.raises(ValueError, match="logits_to_keep"):
        token_logprobs(model, torch.randint(0, V, (2, 5)), logits_to_keep=5)
    assert lm_head_of(model).softcap is None


def test_patched_forward_under_fsdp2_single_process(tmp_path):
    """patch_model's forward runs the fused head inside the root module's forward, where FSDP2
    has unsharded the lm_head weight; values and gradients equal the unwrapped model's."""
    dist = pytest.importorskip("torch.distributed")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    # A file rendezvous: a port picked free and bound later can be taken by another process.
    init_gloo(0, 1, 60.0, init_method=rendezvous(tmp_path))
    try:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**_COMMON)
        model = transformers.LlamaForCausalLM(cfg)
        plain = transformers.LlamaForCausalLM(cfg)
        plain.load_state_dict(model.state_dict())
        patch_model(model)
        for layer in model.model.layers:
            fsdp.fully_shard(layer)
        fsdp.fully_shard(model)
        ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # FSDP2 notes that the outputs are views
            out = model(ids, token_logprobs=True, return_entropy=True)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        logp, ent = token_logprobs(plain, ids, return_entropy=True)
        (logp.sum() + ent.sum()).backward()
        torch.testing.assert_close(out.logprobs, logp)
        grad = model.lm_head.weight.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        torch.testing.assert_close(grad, plain.lm_head.weight.grad)
    finally:
        dist.destroy_process_group()
