"""gift_fast's TRL integrations inside the trainers' own ``torch_compile=True``.

accelerate wraps the policy (and the reference model) in ``torch.compile``; the patched forward,
gift_fast's fused head included, is what dynamo traces. Each test trains a few steps compiled and
eager from the same seed and checks:

- the steps ran compiled (the trainer's model is a compiled module, dynamo captured graphs) with
  no graph break anywhere in the compiled calls;
- the first step's loss, where the policy equals its anchor so the loss's structure is known
  (GIFT: z = 0; GRPO: ratio 1; DPO: margin 0), within a bound derived for it. Later steps
  depend on the whole model's float32 rounding (compiled and eager sum in other orders), for
  which no useful bound can be derived, so they are only checked for structure;
- the patched forward compiles with ``fullgraph=True``, its graph holds gift_fast's op, and a
  compiled call makes no host sync (``count_host_syncs``).

Compiled with the ``aot_eager`` backend (``torch_compile_backend``), as tests/test_compile.py does:
dynamo and AOTAutograd decide graph breaks and what runs in the graph exactly as with inductor;
inductor's C++ code generation for a whole model would take minutes on a 2-core CPU.
"""
import copy
import math
import warnings

import pytest
import torch
import torch._dynamo

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import DPOConfig, DPOTrainer, GRPOTrainer  # noqa: E402

from gift_fast.integrations.trl import GIFTConfig, GIFTTrainer, use_gift_fast  # noqa: E402
from helpers import count_host_syncs, rounding_bound  # noqa: E402
from test_integration_trl import (V, digit_reward, grpo_args, prompts, tiny_qwen2,  # noqa: E402
                                  tokenizer)  # noqa: F401  (fixture)

BACKEND = "aot_eager"
STEPS = 3
OptimizedModule = torch._dynamo.eval_frame.OptimizedModule
warnings.filterwarnings("ignore", category=UserWarning)


class RecordedReward:
    """digit_reward that keeps what it returned, one list per call (one call per rollout)."""
    __name__ = "digit_reward"

    def __init__(self):
        self.calls = []

    def __call__(self, completions, **kwargs):
        out = digit_reward(completions)
        self.calls.append(out)
        return out


def _train(make, compiled):
    """Build with ``make(**config_args)`` and train ``STEPS`` steps; returns (trainer, logs).

    Gradient checkpointing (on by default in TRL) is off: each time TRL re-enables it after a
    generation or a no-grad pass, transformers 5.24 adds one more forward hook to the input
    embeddings, a guard change that recompiles the forward at every step (falling back to eager
    after torch._dynamo.config.recompile_limit)."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    trainer = make(torch_compile=compiled, torch_compile_backend=BACKEND if compiled else None,
                   gradient_checkpointing=False)
    trainer.train()
    stats = {k: dict(v) for k, v in counters.items()}
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logs] == list(range(1, STEPS + 1))
    assert all(math.isfinite(log["loss"]) for log in logs)
    if compiled:
        assert isinstance(trainer.model_wrapped, OptimizedModule)
        assert stats["stats"]["unique_graphs"] >= 1 and stats["stats"]["calls_captured"] > 0
        assert not stats.get("graph_break"), stats.get("graph_break")
    else:
        assert not stats.get("stats"), stats
    return trainer, logs


def _fused_head_compiles_without_sync(trainer, call):
    """``call(model)`` runs the patched forward; compiled with fullgraph=True it must trace in one
    graph holding gift_fast's op, and a compiled call reads no tensor value on the host."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend(BACKEND)(gm, example_inputs)

    torch._dynamo.reset()
    policy = trainer.accelerator.unwrap_model(trainer.model_wrapped, keep_torch_compile=False)
    model = torch.compile(policy, backend=backend, fullgraph=True)
    call(model)                                  # compiles outside the count
    with count_host_syncs() as syncs:
        call(model)
    assert sum(syncs.values()) == 0, dict(syncs)
    assert len(graphs) == 1
    assert "gift_fast.linear_logprobs_fwd" in graphs[0].code


def _gift_structure(rewards, eps):
    """GIFT's loss for one group when z = 0 (policy = anchor): mean_i A_i^2 with
    A = (r - mean r) / (std_unbiased(r) + eps), and the first-order bound of its float32 rounding
    (helpers.rounding_bound: the same two-pass mean / deviation / sum of squares / sqrt the loss
    uses, each sum bounded by gamma_n whatever its order). The float32 rewards are exact inputs."""
    r = torch.tensor(rewards, dtype=torch.float32).double()

    def loss():
        d = r - r.sum() / r.numel()
        a = d / (torch.sqrt((d * d).sum() / (r.numel() - 1)) + eps)
        return (a * a).sum() / r.numel()
    value, bound = rounding_bound(loss)
    return value.item(), bound.item()


def test_gift_trainer_under_torch_compile(tokenizer, tmp_path):
    rewards = {}

    def make(**config_args):
        rewards[config_args["torch_compile"]] = reward = RecordedReward()
        args = grpo_args(tmp_path, GIFTConfig, max_steps=STEPS, learning_rate=3e-3,
                         **config_args)
        return GIFTTrainer(model=tiny_qwen2(tokenizer), reward_funcs=reward, args=args,
                           train_dataset=prompts(16), processing_class=tokenizer)

    eager, eager_logs = _train(make, compiled=False)
    trainer, logs = _train(make, compiled=True)
    assert len(rewards[True].calls) == STEPS   # one group of num_generations per step
    # Step 1 generates from the same initial weights and seed (generation runs eagerly)
    assert rewards[True].calls[0] == rewards[False].calls[0]
    for run, run_logs in (("eager", eager_logs), ("compiled", logs)):
        for log, group in zip(run_logs, rewards[run == "compiled"].calls):
            # num_iterations=1: the anchor is the same forward's no-grad log-probs, so s = 0
            # and z = 0 exactly, compiled or not, and the loss is mean_i A_i^2 of the rewards.
            assert log["gift/z_abs_mean"] == 0.0 and log["gift/implicit_std"] == 0.0, (run, log)
            want, bound = _gift_structure(group, trainer.args.epsilon)
            assert abs(log["loss"] - want) <= bound, (run, log["loss"], want, bound)
    # same rewards at step 1: the two float32 losses are each within `bound` of the same value
    want, bound = _gift_structure(rewards[True].calls[0], trainer.args.epsilon)
    assert abs(logs[0]["loss"] - eager_logs[0]["loss"]) <= 2 * bound

    head_loss = trainer._head_loss(None, torch.tensor([1.0, 0.2, 0.7, 0.0]), group=4)
    _fused_head_compiles_without_sync(trainer, lambda model: model(**_batch(), head_loss=head_loss))


def test_use_gift_fast_grpo_under_torch_compile(tokenizer, tmp_path):
    rewards = {}

    def make(**config_args):
        rewards[config_args["torch_compile"]] = reward = RecordedReward()
        args = grpo_args(tmp_path, max_steps=STEPS, learning_rate=3e-3, **config_args)
        return use_gift_fast(GRPOTrainer(model=tiny_qwen2(tokenizer, seed=2), reward_funcs=reward,
                                         args=args, train_dataset=prompts(16),
                                         processing_class=tokenizer))

    eager, eager_logs = _train(make, compiled=False)
    trainer, logs = _train(make, compiled=True)
    assert rewards[True].calls[0] == rewards[False].calls[0]
    # num_iterations=1: the old log-probs are this forward's own, detached, so the ratio is
    # exp(0) = 1 exactly, compiled or not; the loss is TRL's eager arithmetic on the same
    # advantages and masks: equal bit for bit.
    assert logs[0]["loss"] == eager_logs[0]["loss"]
    assert all(math.isfinite(log["entropy"]) and log["entropy"] > 0 for log in logs)
    _fused_head_compiles_without_sync(trainer, lambda model: model(**_batch()))


def test_use_gift_fast_dpo_under_torch_compile(tokenizer, tmp_path):
    # rows of equal lengths: every batch has the same shape, so nothing recompiles for shapes
    data = datasets.Dataset.from_dict({
        "prompt": ["1+2=", "3+4=", "2+5=", "1+7="] * STEPS,
        "chosen": ["3", "7", "7", "8"] * STEPS, "rejected": ["4", "1", "9", "5"] * STEPS})

    def make(**config_args):
        model = tiny_qwen2(tokenizer, seed=5)
        args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=STEPS,
                         per_device_train_batch_size=4, report_to=[], save_strategy="no",
                         disable_tqdm=True, beta=0.3, logging_steps=1, learning_rate=3e-3,
                         seed=0, **config_args)
        return use_gift_fast(DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                        train_dataset=data, processing_class=tokenizer))

    eager, eager_logs = _train(make, compiled=False)
    trainer, logs = _train(make, compiled=True)
    assert isinstance(trainer.ref_model, OptimizedModule)   # the reference is compiled too
    # Step 1: the policy is a copy of the reference and both forwards (compiled: the training
    # graph and the reference's inference graph) run the same ops on the same weights, so every
    # implicit reward is 0 and the sigmoid loss is -log sigmoid(0) = ln 2, rounded once by
    # softplus and by the mean of 4 equal float32 values: |loss - ln 2| <= (1 + gamma_4) u ln 2.
    u = 2.0 ** -24
    for run_logs in (eager_logs, logs):
        first = run_logs[0]
        assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0, first
        assert abs(first["loss"] - math.log(2)) <= (1 + 4 * u / (1 - 4 * u)) * u * math.log(2)
    assert all(math.isfinite(log["entropy"]) for log in logs)
    _fused_head_compiles_without_sync(trainer, lambda model: model(**_batch(keep=False)))


def _batch(n=4, prompt_len=4, comp_len=5, keep=True):
    """A fixed batch for the patched forward: padding on both sides, prompts unscored."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (n, prompt_len + comp_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt_len] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True,
                logits_to_keep=comp_len if keep else None)
