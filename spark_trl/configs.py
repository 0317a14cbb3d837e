"""`SparkGRPOConfig`: TRL's `GRPOConfig` plus the settings of the SPARK-Code study.

Every study condition (A, C-light, C-reg, C-reg2) is only configuration of these fields; see `docs/trainer.md`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig

from .recycling import STUDY_CAPS, STUDY_WEIGHTS

ADVANTAGE_STDS = ("population", "sample")
TOP_UP_MODES = ("rounds", "prefetch")
SKIP_ZERO_ADVANTAGE = ("group", "sequence", "none")
AUX_MODES = ("phase", "joint")
AUX_OBJECTIVES = ("recycling",)
ROLLOUT_ENGINES = ("trl", "spark", "auto")
ROLLOUT_SCHEDULES = ("batch", "epoch")
REF_ADAPTERS = ("disable", "copy")
# Loss types that SparkGRPOTrainer adds to TRL's.


def check_group_sizes(args) -> None:
    """Adaptive group sizes that can work: at least 2 completions (a z-score needs them), max >= min, a
    positive increment. Called by the config and again by the trainer (a config is a mutable dataclass)."""
    if args.min_generations < 2:
        raise ValueError(f"min_generations must be at least 2 to compute advantages, got {args.min_generations}")
    if args.max_generations < args.min_generations:
        raise ValueError(
            f"max_generations ({args.max_generations}) must be >= min_generations ({args.min_generations})"
        )
    if args.generation_increment < 1:
        raise ValueError(f"generation_increment must be at least 1, got {args.generation_increment}")


@dataclass
class SparkGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`SparkGRPOTrainer`]: every field of [`trl.GRPOConfig`] plus the following.

    Adaptive group sizing (the study's "K=4 adaptive, up to 8"):

    - `min_generations` completions are sampled per prompt; a group whose rewards have no variance
      (std <= `adaptive_std_threshold`) gets `generation_increment` more, until it has variance or holds
      `max_generations`. `min_generations == max_generations` is a fixed group size. `num_generations` (TRL's
      field) is the initial group size and is set to `min_generations`.
    - Advantages are z-scores within each final group (`advantage_std`: population or sample std, plus
      `advantage_epsilon`). Groups still without variance carry zero advantage; with
      `skip_zero_advantage="group"` (default) they are left out of the loss entirely: no forward, backward,
      KL or reference forward. `"sequence"` also leaves out single sequences whose |advantage| <
      `advantage_epsilon` (the study's exact rule); `"none"` keeps everything.

    Loss: `loss_type="spark"` is the study's objective: per-sequence token mean of the clipped surrogate plus
    `beta` times the k3 KL estimator (no importance-ratio correction of the KL), then the mean over the sequences
    of the optimizer step. Every TRL `loss_type` stays available.

    Optimisation schedule (`rollout_schedule`): `"batch"` is TRL's on-policy schedule, a fresh rollout for every
    generation batch; `"epoch"` is the study's, rollouts for every problem of the epoch first, then one pass over
    the sequences in the loss, an optimizer step every `per_device_train_batch_size * gradient_accumulation_steps`
    of them per process (later steps are off-policy, and the clip acts). See `docs/trainer.md`.

    Auxiliary recycling (the study's Condition C): `aux_loss_scale > 0` turns it on (0 = Condition A).

    Example:
    ```python
    >>> from spark_trl import SparkGRPOConfig
    >>> args = SparkGRPOConfig(output_dir="out", min_generations=4, max_generations=8, loss_type="spark")
    >>> args.num_generations
    4
    ```
    """

    # TRL's default is 8; here the initial group size comes from `min_generations` unless set explicitly.
    num_generations: int | None = field(
        default=None,
        metadata={"help": "Initial group size. Leave unset: it is taken from `min_generations`."},
    )
    min_generations: int = field(
        default=4, metadata={"help": "Completions sampled per prompt before any top-up (the study's K)."}
    )
    max_generations: int = field(
        default=8,
        metadata={"help": "Largest group size after top-ups. Equal to `min_generations` for a fixed group size."},
    )
    generation_increment: int = field(
        default=2, metadata={"help": "Completions added to a group without reward variance at each top-up."}
    )
    top_up_mode: str = field(
        default="rounds",
        metadata={
            "help": "'rounds': top-ups are sampled in further generation rounds, only for the groups that need them "
            "(fewest tokens; the study). 'prefetch': max_generations are sampled per prompt in one round and the "
            "top-ups are taken from them (one generation round: faster where a decoding step costs the same at "
            "any batch size, as on a GPU; the unused samples are discarded). Groups are the same in distribution."
        },
    )
    adaptive_std_threshold: float = field(
        default=1e-8, metadata={"help": "A group whose reward std is at most this has no variance (is topped up)."}
    )
    advantage_std: str = field(
        default="population",
        metadata={"help": "Std used to z-score rewards within a group: 'population' (the study) or 'sample'."},
    )
    advantage_epsilon: float = field(
        default=1e-8, metadata={"help": "Added to the group std before dividing (the study: 1e-8)."}
    )
    skip_zero_advantage: str = field(
        default="group",
        metadata={
            "help": "Which sequences are left out of the loss: 'group' (groups still without reward variance), "
            "'sequence' (also any sequence with |advantage| < advantage_epsilon, the study's rule) or 'none'."
        },
    )
    rollout_schedule: str = field(
        default="batch",
        metadata={
            "help": "'batch': a fresh rollout for every generation batch (TRL's schedule: the first optimizer step "
            "over it is exactly on-policy). 'epoch': the study's schedule, rollouts for every problem of the epoch "
            "with the epoch's starting policy, then one pass over the sequences in the loss in rollout order, one "
            "optimizer step every per_device_train_batch_size * gradient_accumulation_steps sequences per process "
            "(num_iterations passes with num_iterations > 1). Generation still runs in chunks of "
            "per_device_train_batch_size * steps_per_generation completions per process."
        },
    )
    ref_adapter: str = field(
        default="disable",
        metadata={
            "help": "With PEFT and beta > 0, the reference policy: 'disable' = the base model with adapters disabled "
            "(the study; also when training resumes from a saved adapter); 'copy' = TRL's frozen copy of a "
            "pre-existing adapter."
        },
    )
    # Auxiliary recycling (Condition C)
    aux_loss_scale: float = field(
        default=0.0, metadata={"help": "Scale of the auxiliary recycling loss; 0 turns it off (Condition A)."}
    )
    aux_objective: str | None = field(
        default=None,
        metadata={
            "help": "Built-in auxiliary objective to use when the trainer is given none: 'recycling' (the study's "
            "pointwise/pairwise/reflection examples) or None."
        },
    )
    aux_mode: str = field(
        default="phase",
        metadata={
            "help": "'phase': one auxiliary epoch after each epoch's GRPO pass, same optimizer (the study). "
            "'joint': the auxiliary loss is added to the GRPO loss at every step."
        },
    )
    # The study's values are spark_trl.recycling.STUDY_WEIGHTS / STUDY_CAPS.
    aux_pointwise_weight: float = field(default=STUDY_WEIGHTS["pointwise"],
                                        metadata={"help": "Weight of pointwise (judge) examples."})
    aux_pairwise_weight: float = field(default=STUDY_WEIGHTS["pairwise"],
                                       metadata={"help": "Weight of pairwise (A/B) examples."})
    aux_reflection_weight: float = field(default=STUDY_WEIGHTS["reflection"],
                                         metadata={"help": "Weight of reflection (repair) examples."})
    aux_max_pointwise: int = field(
        default=STUDY_CAPS["pointwise"],
        metadata={"help": "Cap on pointwise examples per build (an epoch, or a rollout in joint mode), over all "
                          "processes."})
    aux_max_pairwise: int = field(default=STUDY_CAPS["pairwise"],
                                  metadata={"help": "Cap on pairwise examples per build, all processes."})
    aux_max_reflection: int = field(default=STUDY_CAPS["reflection"],
                                    metadata={"help": "Cap on reflection examples per build, all processes."})
    aux_failing_per_group: int = field(
        default=2,
        metadata={"help": "Failing rollouts of a group that yield pairwise and reflection examples (the first ones "
                          "in rollout order; the study: 2)."},
    )
    aux_max_length: int = field(
        default=1024, metadata={"help": "Token cap of an auxiliary example; the prompt side is truncated."}
    )
    aux_batch_size: int = field(default=2, metadata={
        "help": "Examples per auxiliary forward: the phase's micro-batch, or at most this many per micro-step in "
                "joint mode (the rest of a rollout's examples are left unused and counted)."})
    aux_error_tail_lines: int = field(
        default=6, metadata={"help": "Lines of the error output shown in a reflection example."}
    )
    # Collapse detection (spark_trl.monitor)
    collapse_window: int = field(
        default=16,
        metadata={
            "help": "Logged steps over which the trainer compares reward and train pass rate (first half against "
            "second half) and warns once when the reward rises while the pass rate falls; 0 turns it off."
        },
    )
    # The sampler's importance-sampling correction: TRL's fields and semantics (`vllm_importance_sampling_mode`,
    # `_clip_min`, `_clip_max` and the deprecated `_cap` are GRPOConfig's), applied to the fast engine's rollouts.
    # Off by default (TRL's default is True): the study had no correction, and the recipes reproduce it.
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={
            "help": "Importance-sampling correction of the gap between the sampler and the training model (TRL's "
            "option, here for the sampler of rollout_engine='spark': the fast engine's dense bf16 copy against a "
            "4-bit QLoRA trainer). The per-token loss is multiplied by exp(logp_train_old - logp_sampler), "
            "truncated or masked as vllm_importance_sampling_mode / _clip_min / _clip_max say. Refused with "
            "rollout_engine='trl' (TRL's generate samples from the training model itself: there is no gap) and "
            "with use_vllm (not implemented on SparkGRPOTrainer's path). Default False (the study had none)."
        },
    )
    # Generation backend
    rollout_engine: str = field(
        default="trl",
        metadata={
            "help": "'trl': TRL's own generation (transformers generate, or vLLM when use_vllm). "
            "'spark': spark_trl.rollout.FastRolloutEngine. 'auto': 'spark' on a CUDA GPU with one process per GPU "
            "(DDP or none), else 'trl' (no GPU, use_vllm, FSDP, DeepSpeed). The recipes use 'auto'."
        },
    )

    def __post_init__(self):
        # Checked before GRPOConfig.__post_init__, whose batch-size arithmetic uses num_generations.
        check_group_sizes(self)
        if self.num_generations is None:
            self.num_generations = self.min_generations
        elif self.num_generations != self.min_generations:
            raise ValueError(
                f"num_generations ({self.num_generations}) differs from min_generations ({self.min_generations}). "
                "SparkGRPOConfig sizes groups with min_generations/max_generations; for a fixed group size G set "
                "min_generations=max_generations=G and leave num_generations unset."
            )
        _check_choice("advantage_std", self.advantage_std, ADVANTAGE_STDS)
        _check_choice("top_up_mode", self.top_up_mode, TOP_UP_MODES)
        _check_choice("skip_zero_advantage", self.skip_zero_advantage, SKIP_ZERO_ADVANTAGE)
        _check_choice("aux_mode", self.aux_mode, AUX_MODES)
        _check_choice("rollout_engine", self.rollout_engine, ROLLOUT_ENGINES)
        if self.rollout_engine == "auto":
            self.rollout_engine = resolve_rollout_engine(self)
        _check_choice("ref_adapter", self.ref_adapter, REF_ADAPTERS)
        _check_choice("rollout_schedule", self.rollout_schedule, ROLLOUT_SCHEDULES)
        if self.rollout_schedule == "epoch":
            if self.max_steps is not None and self.max_steps > 0:
                raise ValueError(
                    f"rollout_schedule='epoch' trains whole epochs whose number of optimizer steps depends on the "
                    f"rollouts: set num_train_epochs, not max_steps ({self.max_steps})")
            if str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) not in (
                    "constant", "constant_with_warmup"):
                raise ValueError(
                    f"rollout_schedule='epoch' needs lr_scheduler_type 'constant' or 'constant_with_warmup' (got "
                    f"{self.lr_scheduler_type!r}): the number of optimizer steps is not known in advance, so a decaying "
                    "schedule would be laid out over an upper bound and never reach its end")
        if self.aux_objective is not None:
            _check_choice("aux_objective", self.aux_objective, AUX_OBJECTIVES)
        if self.aux_loss_scale < 0:
            raise ValueError(f"aux_loss_scale must be >= 0, got {self.aux_loss_scale}")
        for name in ("aux_pointwise_weight", "aux_pairwise_weight", "aux_reflection_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.aux_failing_per_group < 1:
            raise ValueError(f"aux_failing_per_group must be at least 1, got {self.aux_failing_per_group}")
        if self.collapse_window < 0 or self.collapse_window % 2:
            raise ValueError(f"collapse_window must be an even number of logged steps >= 0, got {self.collapse_window}")
        if self.aux_batch_size < 1:
            raise ValueError(f"aux_batch_size must be at least 1, got {self.aux_batch_size}")
        if self.aux_max_length < 16:
            raise ValueError(f"aux_max_length must be at least 16 tokens, got {self.aux_max_length}")
        super().__post_init__()  # rewrites the deprecated vllm_importance_sampling_cap into _clip_max
        check_sampler_correction(self)

    @property
    def adaptive(self) -> bool:
        """Whether groups can grow beyond their initial size."""
        return self.max_generations > self.min_generations


def check_sampler_correction(args) -> None:
    """The sampler's importance-sampling settings (TRL's `vllm_importance_sampling_*` fields): values that mean
    something, and a sampler to correct for. Called by the config and again by the trainer."""
    from .grpo_math import SAMPLER_IS_MODES

    _check_choice("vllm_importance_sampling_mode", args.vllm_importance_sampling_mode, SAMPLER_IS_MODES)
    for name in ("vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} bounds an importance ratio: a finite number >= 0 or None, got {value}")
    low, high = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
    if high is not None and high <= 0:
        raise ValueError("vllm_importance_sampling_clip_max=0 would zero every importance weight")
    if low is not None and high is not None and low >= high:  # TRL checks it too; a changed dataclass may not
        raise ValueError(f"vllm_importance_sampling_clip_min ({low}) must be less than "
                         f"vllm_importance_sampling_clip_max ({high})")
    if not args.vllm_importance_sampling_correction:
        return
    if args.vllm_importance_sampling_mode.endswith("truncate") and low is None and high is None:
        raise ValueError("vllm_importance_sampling_mode='*_truncate' needs vllm_importance_sampling_clip_min or "
                         "_clip_max")
    if args.use_vllm:
        raise ValueError(
            "vllm_importance_sampling_correction=True with use_vllm=True is not supported by SparkGRPOTrainer yet "
            "(its adaptive rollouts do not keep vLLM's log-probs); set it to False, or sample with "
            "rollout_engine='spark', for which the correction is implemented")
    if args.rollout_engine != "spark":
        raise ValueError(
            f"vllm_importance_sampling_correction=True needs a sampler other than the training model: "
            f"rollout_engine='spark' (got {args.rollout_engine!r}; 'auto' resolves to 'trl' without a CUDA GPU, "
            "with FSDP/DeepSpeed or vLLM). With rollout_engine='trl' TRL's generate samples from the training "
            "model itself, so there is no sampler/trainer gap to correct: set it to False")
    if args.loss_type == "vespo" and not args.vllm_importance_sampling_mode.startswith("token"):
        raise ValueError("loss_type='vespo' needs vllm_importance_sampling_mode 'token_truncate' or 'token_mask' "
                         "(TRL's rule: VESPO builds sequence weights itself)")


def resolve_rollout_engine(args) -> str:
    """What rollout_engine="auto" means for these settings (see the field's help).

    The fast engine keeps a full dense copy of the weights per process, which sharded setups (FSDP, DeepSpeed) do
    not have at hand, and vLLM is a backend of its own; without a CUDA GPU it has nothing to win.
    """
    import os

    import torch

    truthy = ("1", "true", "yes")
    sharded = bool(getattr(args, "fsdp", None)) or bool(getattr(args, "deepspeed", None)) or any(
        os.environ.get(k, "").lower() in truthy for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    if getattr(args, "use_vllm", False) or sharded or getattr(args, "use_cpu", False) or not torch.cuda.is_available():
        return "trl"
    return "spark"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
