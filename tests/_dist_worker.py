"""One rank of the 2-process CPU tests in tests/test_distributed.py; launched by torchrun, never collected by pytest.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_worker.py train,train_joint,eval,recipe MODEL OUT

`train` runs SparkGRPOTrainer (LoRA, beta > 0, the study's loss, adaptive groups 4 -> 8, an auxiliary phase at the
end of the epoch) for two optimizer steps on a dataset arranged so that the two ranks need different top-ups (see
`TASKS`) and have different numbers of auxiliary examples, and writes
OUT/rank{r}.json: the task ids each reward call saw, the number of training forward and backward passes, a
hash of the trainable parameters and whether they moved, and the trainer's log history and spark_stats.
`eval` runs `spark_trl.evaluation.evaluate_problems` on a few problems and writes OUT/eval_rank{r}.json.
`train_joint` is `train` with the auxiliary loss joint with the GRPO loss, two optimizer steps per generation and
top-ups taken from prefetched samples (writes OUT/rank{r}_joint.json). `recipe` runs recipes/condition_a.py's study (2 tiny iterations) into OUT/run.
`train_fsdp`, `train_joint_fsdp` and `train_epoch_fsdp` are `train`, `train_joint` and `train_epoch` with the model
sharded by FSDP2 through the Trainer's fsdp arguments (see `enable_fsdp_on_cpu`); their files end in `_fsdp` and
also count FSDP's all-gathers and reduce-scatters. Each training mode also saves OUT/rank{r}{suffix}.pt (initial and
final trainable parameters, the first step's gradient and batch). FSDP modes go in a launch of their own: the
accelerate state they set up is process-wide.
Modes in one launch share the process start-up (most of the run time on 2 cores).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch
from spark_trl.testing import PromptKeyedReward

# In dataset order, with shuffle_dataset=False and 2 groups per rank per step, TRL's sampler hands
# step 1: rank 0 [flat1, flat2], rank 1 [vary1, late1]; step 2: rank 0 [vary2, late2], rank 1 [flat3, vary3].
# 'flat' never varies (topped up 4 -> 6 -> 8, left out of the loss); 'vary' varies within its first 4 samples;
# 'late' is flat in its first reward call and varies afterwards (topped up once, to 6). So in step 1 rank 0
# needs two top-up rounds for both groups and has nothing in the loss, while rank 1 needs one round for one group.
TASKS = ["flat1", "flat2", "vary1", "late1", "vary2", "late2", "flat3", "vary3"]
# rollout_schedule="epoch": 7 problems, so rank 0 takes 4 (positions 0, 2, 4, 6) and rank 1 takes 3; rank 0's groups
# put 4 + 6 + 4 = 14 sequences in the loss (4 optimizer steps of 2 x 2), rank 1's 4 + 6 = 10 (3 steps).
EPOCH_TASKS = ["vary1", "flat1", "late1", "vary2", "flat2", "late2", "vary3"]


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: under FSDP2 a parameter (or gradient) is a DTensor holding this rank's shard, and
    ``full_tensor()`` all-gathers it (a collective: every rank calls it at the same point)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).float().cpu().clone()


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}


def enable_fsdp_on_cpu() -> None:
    """Let accelerate shard with FSDP on CPU processes (gloo). accelerate 1.15's AcceleratorState turns an FSDP
    plugin into DistributedType.FSDP only for accelerator types (MULTI_GPU, MULTI_XPU, ...); on CPU it leaves
    MULTI_CPU, and Accelerator.prepare then wraps the model in DDP. This applies the same switch to MULTI_CPU, so
    that prepare() calls accelerate's own FSDP2 path (fsdp2_prepare_model: torch's fully_shard on a CPU mesh)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def count_fsdp_collectives(counts: dict) -> None:
    """Count FSDP2's parameter all-gathers and gradient reduce-scatters on this rank: torch 2.13's fully_shard
    issues them through torch.distributed.all_gather_single / reduce_scatter_single, looked up at call time."""
    import torch.distributed as dist

    for name, key in (("all_gather_single", "all_gathers"), ("reduce_scatter_single", "reduce_scatters")):
        original = getattr(dist, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
        counts[key] = 0


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].numpy().tobytes())
    return h.hexdigest()


def train(model_path: str, out: Path, joint: bool = False, epoch: bool = False, fsdp: bool = False) -> None:
    from datasets import Dataset
    from peft import LoraConfig

    from transformers import AutoTokenizer, TrainerCallback

    from spark_trl import SparkGRPOConfig, SparkGRPOTrainer
    from spark_trl.recycling import AuxExample, RecyclingObjective

    class RewardedRolloutsObjective(RecyclingObjective):
        """The built-in objective's loss on one small example per rollout with reward > 0: 3 on rank 0 and 5 on
        rank 1 over the epoch, so with batches of 2 the auxiliary phase has 2 real steps on rank 0 and 3 on rank 1."""

        required_columns = ("task_id",)

        def build(self, rollouts):
            return [self._tokenize(AuxExample("reflection", self._chat(f"task {r.row['task_id']}", "ok"), 1.0))
                    for r in rollouts if r.reward > 0]

    class CapturingTrainer(SparkGRPOTrainer):
        """Keeps the generation batch of the first optimizer step (the real method's output), and tells apart the
        forwards of generation from the others."""

        generating = False

        def _generate_and_score_completions(self, inputs):
            batch = super()._generate_and_score_completions(inputs)
            if self.model.training and self.state.global_step == 0:
                self.first_batch = {k: v.detach().cpu() for k, v in batch.items() if torch.is_tensor(v)}
            return batch

        def _generate_round(self, prompts, per_prompt):
            self.generating = True
            try:
                return super()._generate_round(prompts, per_prompt)
            finally:
                self.generating = False

    class GradientProbe(TrainerCallback):
        """The accumulated, all-reduced gradient of the first optimizer step, just before the optimizer uses it."""

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 0:
                grads["calls_before_first_step"] = len(reward.calls)
                grads["step1"] = {n: _full(p.grad) for n, p in model.named_parameters() if p.requires_grad}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == args.max_steps and args.max_steps > 0:  # before the epoch's auxiliary phase
                grads["digest_before_aux"] = _digest(_trainable_state(model))

    grads: dict = {}
    tasks = EPOCH_TASKS if epoch else TASKS
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Solve task {t}."}] for t in tasks],
                                 "task_id": tasks})
    settings = dict(
        output_dir=str(out / "trainer"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        disable_tqdm=True, logging_steps=1, seed=0, shuffle_dataset=False, max_completion_length=6,
        per_device_train_batch_size=4, learning_rate=5e-2,
        # phase: 2 micro-steps per optimizer step; joint: 2 optimizer steps per generation (old log-probs needed)
        gradient_accumulation_steps=1 if joint else 2, steps_per_generation=2, max_steps=4 if joint else 2,
        min_generations=4, max_generations=8, generation_increment=2, loss_type="spark", beta=0.02,
        max_grad_norm=1e6,  # no clipping: the gradient probe sees the raw accumulated gradient
        aux_loss_scale=0.5, aux_mode="joint" if joint else "phase", aux_batch_size=2,
        lr_scheduler_type="constant",  # a linear decay would reach 0 before the auxiliary phase at the epoch's end
        top_up_mode="prefetch" if joint else "rounds",
    )
    if epoch:  # the study's schedule: one epoch, an optimizer step every 2 x 2 sequences per process
        settings.update(rollout_schedule="epoch", max_steps=-1, num_train_epochs=1, per_device_train_batch_size=2,
                        gradient_accumulation_steps=2, aux_loss_scale=0.0)
    if fsdp:  # FSDP2 through the Trainer's own fsdp arguments: every decoder layer and the root sharded
        enable_fsdp_on_cpu()
        settings.update(fsdp="full_shard", fsdp_config={"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                        "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})
    args = SparkGRPOConfig(**settings)
    reward = PromptKeyedReward()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    trainer = CapturingTrainer(model=model_path, reward_funcs=reward, args=args, train_dataset=dataset,
                               peft_config=lora, callbacks=[GradientProbe()],
                               aux_objective=RewardedRolloutsObjective(AutoTokenizer.from_pretrained(model_path)))
    rank = trainer.accelerator.process_index
    assert trainer.accelerator.num_processes == 2, "launch with 2 processes"

    # Count the passes that build a graph (the loss and auxiliary forwards), the other forwards outside generation
    # (reference and old log-probs, per optimizer step: under FSDP each one gathers parameters collectively) and
    # the backward passes through the model: accelerator.backward calls during which a hook on the logits (or
    # log-probs) of a forward fired. (FSDP replaces the parameters by sharded ones at prepare() and sets their
    # gradients itself, so a hook on a parameter would not see the backward passes there.)
    model = trainer.accelerator.unwrap_model(trainer.model)
    counts = {"forward": 0, "backward": 0, "nograd_by_step": {}}
    reached = []

    def on_forward(module, inputs, output):
        if torch.is_grad_enabled():
            counts["forward"] += 1
            # The logits, or the log-probs of TRL's fused LM head (its `loss` output is not in the GRPO loss).
            (output["logits"] if "logits" in output else output["log_probs"]).register_hook(reached.append)
        elif not trainer.generating:
            step = str(trainer.state.global_step)
            counts["nograd_by_step"][step] = counts["nograd_by_step"].get(step, 0) + 1

    backward = trainer.accelerator.backward

    def counted_backward(loss, **kwargs):
        reached.clear()
        backward(loss, **kwargs)
        counts["backward"] += bool(reached)

    trainer.accelerator.backward = counted_backward
    model.register_forward_hook(on_forward)
    if fsdp:
        count_fsdp_collectives(counts)

    before = _trainable_state(model)
    trainer.train()
    after = _trainable_state(model)

    report = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "backend": str(torch.distributed.get_backend()),
        "reward_calls": reward.calls,
        "forward": counts["forward"],
        "backward": counts["backward"],
        "nograd_by_step": counts["nograd_by_step"],
        "calls_before_first_step": grads.get("calls_before_first_step"),
        "micro_steps": trainer._step,
        "global_step": trainer.state.global_step,
        "param_digest": _digest(after),
        "param_digest_before": _digest(before),
        "param_digest_before_aux": grads.get("digest_before_aux"),
        "moved": any(not torch.equal(before[n], after[n]) for n in before),
        "log_history": trainer.state.log_history,
        "spark_stats": trainer.spark_stats_history,
        "distributed_type": str(trainer.accelerator.distributed_type),
        **_sharding(trainer.model),
        **{k: counts[k] for k in ("all_gathers", "reduce_scatters") if k in counts},
    }
    suffix = ("_joint" if joint else "_epoch" if epoch else "") + ("_fsdp" if fsdp else "")
    (out / f"rank{rank}{suffix}.json").write_text(json.dumps(report, default=str))
    # For the test's single-process recomputation of the first step's gradient, and the FSDP-vs-DDP comparison.
    torch.save({"init": before, "final": after, "batch": trainer.first_batch, "grads": grads.get("step1")},
               out / f"rank{rank}{suffix}.pt")


def _sharding(wrapped) -> dict:
    """How the prepared model holds its parameters: whether it is an FSDP2 module, how many parameters are DTensors
    sharded over the ranks, and how many elements this rank stores locally out of the model's total."""
    from torch.distributed.fsdp import FSDPModule

    params = list(wrapped.parameters())
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    return {"wrapper": type(wrapped).__name__, "fsdp_module": isinstance(wrapped, FSDPModule),
            "dtensor_params": sum(hasattr(p, "placements") for p in params),
            "sharded_params": sum(any(pl.is_shard() for pl in getattr(p, "placements", ())) for p in params),
            "params": len(params), "local_numel": sum(t.numel() for t in local),
            "full_numel": sum(p.numel() for p in params)}


def aux_caps(model_path: str, out: Path) -> None:
    """The built-in objective's caps hold over all processes: rank 0 has 6 reflection candidates (3 groups x the
    first 2 failing rollouts), rank 1 has 2; with a cap of 5, the two ranks together keep 5."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from spark_trl.collectives import Ranks
    from spark_trl.outcome import ExecutionOutcome, Status
    from spark_trl.recycling import RecyclingObjective, Rollout

    ranks = Ranks(Accelerator(cpu=True))
    groups = 3 if ranks.rank == 0 else 1
    rollouts = [Rollout(prompt=f"task {g}", completion="x", reward=0.0, advantage=0.0, group=g,
                        outcome=ExecutionOutcome(status=Status.WRONG_ANSWER, code=f"def f():\n    return {g}{i}",
                                                 error_tail="AssertionError"),
                        row={"reference": "def f():\n    return 1"})
                for g in range(groups) for i in range(4)]
    objective = RecyclingObjective(AutoTokenizer.from_pretrained(model_path), caps={"reflection": 5},
                                   max_length=4096)
    kept = [len(objective.build(rollouts, ranks=ranks)) for _ in range(3)]
    (out / f"aux_caps_rank{ranks.rank}.json").write_text(json.dumps({"kept": kept, "candidates": 2 * groups}))


def evaluate(model_path: str, out: Path) -> None:
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spark_trl.evaluation import EvalConfig, evaluate_problems
    from spark_trl.problems import load_builtin
    from spark_trl.sandbox import Executor

    state = PartialState(cpu=True)
    # Problems 0 and 2 are passed by any program that runs, the others by none that the tiny model writes. With
    # the end-of-turn token pushed to the top of the model's distribution every completion is empty (an empty
    # program runs), so pass@1 is exactly 2/5 over all problems, while rank 0's shard (0, 2, 4) alone would give
    # 2/3 and rank 1's (1, 3) 0.
    problems = load_builtin("heldout")[:5]
    problems = [dataclasses.replace(p, tests=("assert True",)) if i in (0, 2) else p for i, p in enumerate(problems)]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.generation_config.sequence_bias = {(tokenizer.eos_token_id,): 100.0}
    config = EvalConfig(n_samples=2, max_new_tokens=8, batch_size=4, seed=0, progress=False, ks=(1, 2))
    # Sequences this rank generated: its shard only.
    generated = []
    result = evaluate_problems(model, tokenizer, problems, config, name="heldout",
                               samples_path=out / "heldout.samples.jsonl", executor=Executor(workers=1),
                               on_batch=generated.append)
    report = {"rank": state.process_index, "pass_at": {str(k): v for k, v in result.pass_at.items()},
              "n_problems": result.n_problems, "per_problem": result.per_problem,
              "task_ids": [p.task_id for p in problems], "generated": sum(generated)}
    (out / f"eval_rank{state.process_index}.json").write_text(json.dumps(report))


def recipe(model_path: str, out: Path) -> None:
    """recipes/condition_a.py's entry point with CPU-sized overrides: 2 iterations over 4 problems (one group of
    2, topped up to at most 4, per rank and step), evaluation sharded over the ranks, checkpoints, final/ best/."""
    import os

    from spark_trl.runner import RECIPES, recipe_main

    argv = ["--model_name_or_path", model_path, "--output_dir", str(out / "run"),
            "--mbpp_path", os.environ["SPARK_TRL_MBPP"], "--max_train_problems", "4", "--iterations", "2",
            "--load_in_4bit", "false", "--dtype", "float32", "--use_cpu", "true", "--gradient_checkpointing", "false",
            "--eval_limit", "3", "--eval_n_samples", "2", "--eval_max_new_tokens", "4", "--eval_batch_size", "4",
            "--max_completion_length", "4", "--min_generations", "2", "--max_generations", "4",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--exec_workers", "1",
            "--exec_timeout", "5", "--logging_steps", "1", "--disable_tqdm", "true"]
    code = recipe_main(RECIPES["condition_a"], argv)
    if code != 0:
        raise SystemExit(code)


if __name__ == "__main__":
    modes, model_path, out_dir = sys.argv[1:4]
    for mode in modes.split(","):
        {"train": train, "train_joint": lambda m, o: train(m, o, joint=True),
         "train_epoch": lambda m, o: train(m, o, epoch=True), "aux_caps": aux_caps, "eval": evaluate,
         "recipe": recipe, "train_fsdp": lambda m, o: train(m, o, fsdp=True),
         "train_joint_fsdp": lambda m, o: train(m, o, joint=True, fsdp=True),
         "train_epoch_fsdp": lambda m, o: train(m, o, epoch=True, fsdp=True)}[mode](model_path, Path(out_dir))
    # A clean shutdown: without it gloo's threads can still be running when the interpreter exits, and a rank
    # then aborts ("terminate called without an active exception") after its work is done and written.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
