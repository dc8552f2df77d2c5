"""gift_fast.integrations.trl on CPU: a tiny random Qwen2 and a locally built tokenizer.

- GIFTTrainer trains end to end (generation, rule-based reward, several steps, two iterations per
  rollout so the implicit term is non-zero);
- its loss and gradient equal a float64 GIFT written from docs/losses.md on top of TRL's own
  log-prob path (TRL's ChunkedLogProbFunction) on the same batch;
- use_gift_fast leaves TRL's GRPO and DPO losses and gradients unchanged within float32
  tolerance, and patch_trl reaches trainers built afterwards.
"""
import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from gift_fast.integrations.trl import (GIFTConfig, GIFTTrainer, add_gift_fast_lm_head,  # noqa: E402
                                        patch_trl, use_gift_fast)
from gift_fast.train.tokenizer import CharTokenizer  # noqa: E402

V = 61   # small, odd
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def tokenizer():
    ct = CharTokenizer(V)
    return PreTrainedTokenizerFast(tokenizer_object=ct.tokenizer, pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")


def tiny_qwen2(tokenizer, seed=0, vocab=V):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():   # a sharper head than the random init, so log-prob errors would show
        model.lm_head.weight.mul_(10.0)
    return model


def prompts(n):
    return datasets.Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in
                                                  [(1, 2), (3, 4), (5, 6), (7, 8)] * (n // 4)]})


def digit_reward(completions, **kwargs):
    """Rule-based reward: share of digits in the completion, + 1 if it contains a 7."""
    return [sum(ch.isdigit() for ch in c) / (1 + len(c)) + ("7" in c) for c in completions]


def grpo_args(tmp_path, cls=GRPOConfig, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                num_generations=4, max_completion_length=6, report_to=[], save_strategy="no",
                logging_steps=1, seed=0, disable_tqdm=True)
    base.update(kw)
    return cls(**base)


def test_gift_trainer_end_to_end(tokenizer, tmp_path):
    model = tiny_qwen2(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = grpo_args(tmp_path, GIFTConfig, max_steps=4, num_iterations=2, learning_rate=3e-3,
                     temperature=1.0)
    trainer = GIFTTrainer(model=model, reward_funcs=digit_reward, args=args,
                          train_dataset=prompts(16), processing_class=tokenizer)
    trainer.train()
    logs = [l for l in trainer.state.log_history if "loss" in l]
    assert len(logs) == 4
    assert all(torch.isfinite(torch.tensor(float(l["loss"]))) for l in logs)
    assert all("gift/correlation" in l for l in logs)
    assert all("reward" in l for l in logs[::2])   # a rollout every num_iterations steps
    # second iteration on each rollout: pi_theta moved away from pi_old, so z is not all zero
    assert max(float(l["gift/z_abs_mean"]) for l in logs) > 0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in changed and len(changed) > 10
    assert args.beta == 1.0 and trainer.ref_model is None   # anchor = pi_old: no reference model


def _fixed_grpo_batch(tokenizer, seed=0, n=8, prompt_len=4, comp_len=5):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, V, (n, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0                      # left-padded prompt
    completion_ids = torch.randint(4, V, (n, comp_len), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[2, -2:] = 0                 # right-padded completion
    completion_mask[5, -4:] = 0
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, tokenizer.pad_token_id)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    rewards = torch.tensor([1.0, 0.2, 0.7, 0.0, 0.5, 0.5, 0.9, 0.1])[:n]
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, num_items_in_batch=completion_mask.sum(),
                gift_rewards=rewards, advantages=(rewards - 0.5) * 2)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _gift_reference(logps, anchor, mask, rewards, group, beta, eps):
    """GIFT from docs (float64, detached group statistics, unbiased std, sum log-ratio)."""
    s = ((logps - anchor) * mask).sum(-1).view(-1, group)
    r = rewards.double().view(-1, group)
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    sd = s.detach()
    z = (s - sd.mean(1, keepdim=True)) / (sd.std(1, keepdim=True) + eps)
    return ((a - beta * z) ** 2).mean()


def test_gift_loss_and_gradient_equal_float64_reference_on_trls_logprobs(tokenizer, tmp_path):
    model = tiny_qwen2(tokenizer, seed=1)
    args = grpo_args(tmp_path, GIFTConfig, beta=0.7, temperature=0.9)
    trainer = GIFTTrainer(model=model, reward_funcs=digit_reward, args=args,
                          train_dataset=prompts(8), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    inputs = _fixed_grpo_batch(tokenizer)
    ref_model = copy.deepcopy(model).double()
    add_fused_lm_head(ref_model, temperature=0.9)   # TRL's own log-prob path, in float64
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    labels = input_ids.masked_fill(attn == 0, -100)
    labels[:, :inputs["prompt_ids"].shape[1]] = -100
    keep = inputs["completion_ids"].shape[1]
    ref_lp = ref_model(input_ids=input_ids, attention_mask=attn, labels=labels,
                       fused_lm_head=True).log_probs[:, -keep:]
    mask = inputs["completion_mask"].double()
    # an anchor off the current policy, so z and its gradient are not degenerate
    anchor = (ref_lp.detach() + 0.05 * torch.randn(ref_lp.shape, dtype=torch.float64,
                                                   generator=torch.Generator().manual_seed(3))) * mask
    inputs["old_per_token_logps"] = anchor.float()
    ref_loss = _gift_reference(ref_lp, anchor.float().double(), mask, inputs["gift_rewards"], 4,
                               0.7, 1e-6)
    ref_loss.backward()

    model.train()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), atol=1e-5, rtol=1e-5)
    ours, ref = _grads(model), _grads(ref_model)
    assert ours.keys() == ref.keys() and len(ours) > 10
    for name in ours:
        scale = ref[name].abs().max().item() + 1e-12
        err = (ours[name].double() - ref[name]).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, f"{name}: max err {err:.3g} (scale {scale:.3g})"


def _grpo_trainer(tokenizer, tmp_path, model, **kw):
    args = grpo_args(tmp_path, **kw)
    trainer = GRPOTrainer(model=model, reward_funcs=digit_reward, args=args,
                          train_dataset=prompts(8), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_use_gift_fast_keeps_grpo_loss_and_gradient(tokenizer, tmp_path, beta):
    model = tiny_qwen2(tokenizer, seed=2)
    kw = dict(beta=beta, temperature=0.8, loss_type="dapo", entropy_coef=0.01)
    if beta:   # TRL rebuilds the reference model from config._name_or_path
        path = str(tmp_path / "policy")
        model.save_pretrained(path)
        model = Qwen2ForCausalLM.from_pretrained(path)
    trainer = _grpo_trainer(tokenizer, tmp_path, model, **kw)
    inputs = _fixed_grpo_batch(tokenizer, seed=4)
    if beta:
        with torch.no_grad():
            lp, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.ref_model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                inputs["completion_ids"].shape[1])
        inputs["ref_per_token_logps"] = lp - 0.1   # a reference away from the policy
    loss_trl = trainer.compute_loss(trainer.model, inputs)
    loss_trl.backward()
    grads_trl = _grads(trainer.model)
    trainer.model.zero_grad()

    use_gift_fast(trainer)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    torch.testing.assert_close(loss, loss_trl, atol=2e-6, rtol=1e-5)
    grads = _grads(trainer.model)
    assert grads.keys() == grads_trl.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_trl[name], atol=1e-6, rtol=2e-4, msg=name)


def test_use_gift_fast_keeps_dpo_loss_gradient_and_metrics(tokenizer, tmp_path):
    model = tiny_qwen2(tokenizer, seed=5)
    ref_model = tiny_qwen2(tokenizer, seed=6)
    data = datasets.Dataset.from_dict({
        "prompt": ["1+2=", "3+4=", "5+6=", "7+8="],
        "chosen": ["3", "7", "11", "15"], "rejected": ["4", "17", "1", "1+5"]})
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False,
                     per_device_train_batch_size=4, report_to=[], save_strategy="no",
                     disable_tqdm=True, beta=0.3)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data,
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()

    def run():
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return loss.detach(), _grads(trainer.model), {k: v[-1] for k, v in trainer._metrics["train"].items()}

    loss_trl, grads_trl, metrics_trl = run()
    use_gift_fast(trainer)
    loss, grads, metrics = run()
    torch.testing.assert_close(loss, loss_trl, atol=2e-6, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_trl[name], atol=1e-6, rtol=2e-4, msg=name)
    assert metrics.keys() == metrics_trl.keys()
    for key in set(metrics) - {"num_tokens"}:   # logits/*, mean_token_accuracy, entropy, rewards/*

        assert metrics[key] == pytest.approx(metrics_trl[key], rel=1e-4, abs=1e-5), key


def test_patch_trl_reaches_new_trainers(tokenizer, tmp_path):
    undo = patch_trl()
    try:
        trainer = _grpo_trainer(tokenizer, tmp_path, tiny_qwen2(tokenizer, seed=7))
    finally:
        undo()
    assert getattr(trainer.model.forward, "gift_fast_head", False)
    plain = _grpo_trainer(tokenizer, tmp_path, tiny_qwen2(tokenizer, seed=7))
    assert not getattr(plain.model.forward, "gift_fast_head", False)


def test_fused_head_output_fields_and_errors(tokenizer):
    model = tiny_qwen2(tokenizer, seed=8).double()
    ref = copy.deepcopy(model)
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    add_gift_fast_lm_head(model, temperature=0.7, outputs=outputs)
    add_fused_lm_head(ref, temperature=0.7, outputs=outputs)
    ids = torch.randint(4, V, (3, 7), generator=torch.Generator().manual_seed(9))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[0, -1] = -100
    ours = model(input_ids=ids, labels=labels, fused_lm_head=True)
    theirs = ref(input_ids=ids, labels=labels, fused_lm_head=True)
    for name in outputs + ("label_mask", "loss"):
        a, b = getattr(ours, name), getattr(theirs, name)
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a.double(), b.double(), atol=1e-6, rtol=1e-6, msg=name)
    # pre-shifted labels (context / sequence parallel): scored as given, every position
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    a = model(input_ids=ids, shift_labels=shifted, fused_lm_head=True)
    b = ref(input_ids=ids, shift_labels=shifted, fused_lm_head=True)
    assert a.log_probs.shape == ids.shape
    torch.testing.assert_close(a.log_probs.double(), b.log_probs.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.log_probs[:, :-1], ours.log_probs)
    # generation path untouched
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    with pytest.raises(ValueError, match="outputs"):
        add_gift_fast_lm_head(tiny_qwen2(tokenizer), outputs=("logits",))
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        GIFTTrainer(model=tiny_qwen2(tokenizer), reward_funcs=digit_reward,
                    args=grpo_args("unused", GIFTConfig, per_device_train_batch_size=6,
                                   num_generations=4, generation_batch_size=12),
                    train_dataset=prompts(8), processing_class=tokenizer)
    with pytest.raises(ValueError, match="anchor"):
        grpo_args("unused", GIFTConfig, anchor="pi_ref")


def test_loss_step_peak_memory_lower_at_large_vocab(tokenizer, tmp_path):
    """One GRPO / GIFT loss step (forward + backward) at V = 151936 and 512 completion tokens:
    TRL's own head holds [tokens x 32768] tiles and their temporaries; gift_fast's chunk is bounded
    by a fixed element budget. Peak bytes from the torch profiler, no timing involved."""
    from gift_fast.train.memory import peak_bytes
    vocab, n, prompt_len, comp_len = 151936, 8, 4, 64
    g = torch.Generator().manual_seed(13)
    inputs = dict(prompt_ids=torch.randint(4, vocab, (n, prompt_len), generator=g),
                  prompt_mask=torch.ones(n, prompt_len, dtype=torch.long),
                  completion_ids=torch.randint(4, vocab, (n, comp_len), generator=g),
                  completion_mask=torch.ones(n, comp_len, dtype=torch.long),
                  advantages=torch.randn(n, generator=g), gift_rewards=torch.rand(n, generator=g),
                  num_items_in_batch=torch.tensor(n * comp_len))

    def step_of(trainer):
        def step():
            trainer.model.zero_grad(set_to_none=True)
            trainer.compute_loss(trainer.model, inputs).backward()
        return step

    grpo = _grpo_trainer(tokenizer, tmp_path, tiny_qwen2(tokenizer, seed=14, vocab=vocab))
    trl_peak = peak_bytes(step_of(grpo), torch.device("cpu"))
    use_gift_fast(grpo)
    fused_peak = peak_bytes(step_of(grpo), torch.device("cpu"))
    gift = GIFTTrainer(model=tiny_qwen2(tokenizer, seed=14, vocab=vocab), reward_funcs=digit_reward,
                       args=grpo_args(tmp_path, GIFTConfig), train_dataset=prompts(8),
                       processing_class=tokenizer)
    gift.current_gradient_accumulation_steps = 1
    gift.model.train()
    gift_peak = peak_bytes(step_of(gift), torch.device("cpu"))
    mib = {k: v / 2**20 for k, v in dict(trl=trl_peak, fused=fused_peak, gift=gift_peak).items()}
    print("loss-step peak MiB:", mib)
    assert fused_peak < 0.8 * trl_peak, mib
    assert gift_peak < 0.8 * trl_peak, mib


def test_gift_trainer_with_reference_anchor(tokenizer, tmp_path):
    """anchor='ref': TRL builds the reference model (from the saved policy) and its log-probs
    anchor the implicit reward; after one update the policy has moved, so z is non-zero."""
    path = str(tmp_path / "policy")
    tiny_qwen2(tokenizer, seed=15).save_pretrained(path)
    model = Qwen2ForCausalLM.from_pretrained(path)
    args = grpo_args(tmp_path, GIFTConfig, anchor="ref", beta=0.5, max_steps=2,
                     learning_rate=3e-3)
    trainer = GIFTTrainer(model=model, reward_funcs=digit_reward, args=args,
                          train_dataset=prompts(8), processing_class=tokenizer)
    assert trainer.ref_model is not None and args.beta == 0.5
    trainer.train()
    logs = [l for l in trainer.state.log_history if "loss" in l]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(float(l["loss"]))) for l in logs)
    assert float(logs[1]["gift/z_abs_mean"]) > 0.0   # policy moved away from the reference
