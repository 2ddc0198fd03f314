"""
experiments/bench_trl.py -- wall time of one RL step of TRL's RLOOTrainer on the toy student workload,
for comparison with the handwritten RLOO step of train_student.py.

    python -m experiments.bench_trl            # from the repository root; prints a JSON dict

The workload (one optimiser step):
  - model: toy/model (LlamaForCausalLM, fp32, CPU, 2 torch threads), a frozen reference copy (beta > 0);
  - 8 toy chain questions (4 at L=7, 4 at L=8), prompt `User: {q} Assistant:` as a plain string;
  - 8 samples per question (num_generations = 8): 64 completions of at most 120 new tokens,
    HF `generate`, temperature 1.0, top_p 1.0, top_k off;
  - reward evaluate.shaped_reward (120 / 20 / 10 / 0), RLOO leave-one-out advantages;
  - AdamW, lr 1e-4 constant, KL coefficient 0.001, max_grad_norm 1.0, the whole 64-completion
    batch in one optimiser step (gradient_accumulation_steps = 1, num_iterations = 1).

What one TRL step does, in order (trl 1.16, RLOOTrainer):
  generate 64 completions -> a no-grad policy forward (the "old" log-probs, also the KL's policy
  side) -> a no-grad reference forward -> rewards, KL-penalised rewards (beta * sum over tokens of
  log pi - log ref, per sequence), leave-one-out advantages -> the training forward (log-probs
  and entropy) and backward -> gradient clipping -> AdamW step.
With steps_per_generation = gradient_accumulation_steps = 1 and num_iterations = 1, TRL's
generation buffer is refilled on every training step, so generation is inside every step.

The step time is measured by a TrainerCallback from on_step_begin to on_step_end. In the
Trainer's loop on_step_begin comes after the batch of prompts is fetched and before
training_step (whose _prepare_inputs generates and scores), and on_step_end comes after the
optimiser step; logging happens after on_step_end, outside the measured window.

trl is imported inside trl_step_seconds only, so this module imports without it. 
"""
import json
import os
import shutil
import statistics
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUESTIONS_PER_STEP = 8
GROUP = 8                 # RLOO group = TRL num_generations
LEVELS = (7, 8)           # toy chain difficulties, equally represented in every step
MAX_NEW_TOKENS = 120


def shaped_reward(completions, answer, **kwargs):
    """TRL reward function: evaluate.shaped_reward of each completion against its reference answer.

    TRL calls it with the decoded completions (plain strings for plain-string prompts) and every
    extra dataset column as a keyword list, here `answer`, one entry per completion. Toy answers:
    graded as digit strings, as this project's trainer grades them."""
    from evaluate import shaped_reward as reward

    return [reward(c, a, style="toy") for c, a in zip(completions, answer)]


def workload(steps, seed):
    """steps * 8 records {prompt, answer}, L=7 and L=8 alternating, so that each consecutive
    block of 8 (one step, with an unshuffled sampler) holds 4 questions of each level.

    Each level gets its own seed: task.problems draws from random.Random(seed) in the same
    order at every L, so with one seed the L=8 questions would be the L=7 ones plus one op."""
    from generate import student_prompt
    from toy import task

    half = steps * QUESTIONS_PER_STEP // len(LEVELS) + 1
    pools = [task.problems(half, L, seed + j) for j, L in enumerate(LEVELS)]
    rows = []
    for i in range(half):
        for pool in pools:
            rows.append({"prompt": student_prompt(pool[i]["problem"], "toy"), "answer": pool[i]["answer"]})
    return rows[:steps * QUESTIONS_PER_STEP]


def _resolve(model_dir):
    if os.path.isdir(model_dir):
        return os.path.abspath(model_dir)
    alt = os.path.join(ROOT, model_dir)
    if os.path.isdir(alt):
        return alt
    raise FileNotFoundError(f"model directory does not exist: {model_dir}")


def trl_step_seconds(model_dir="toy/model", steps=6, seed=0):
    """Run `steps` RLOOTrainer optimiser steps on the toy workload and time each one.

    Returns {"step_seconds", "median_after_first", "trl_version", "config", "checks"}; `checks`
    holds per-step evidence read from the trainer: completions generated and their lengths,
    optimiser steps taken, which forwards ran (policy / reference, with or without grad) and the
    seconds spent in generation, reward and those forwards, plus TRL's own logged metrics."""
    import torch

    torch.set_num_threads(2)

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import RLOOConfig, RLOOTrainer

    from evaluate import get_verifier

    path = _resolve(model_dir)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dataset = Dataset.from_list(workload(steps, seed))

    out_dir = tempfile.mkdtemp(prefix="bench_trl_")
    args = RLOOConfig(
        output_dir=out_dir,
        # batch: one step = 8 prompts x 8 samples = 64 completions, one generation per step
        per_device_train_batch_size=QUESTIONS_PER_STEP * GROUP,
        num_generations=GROUP,
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_steps=steps,
        shuffle_dataset=False,       # dataset order is already the 4 + 4 per-step mix
        # sampling: HF generate
        max_completion_length=MAX_NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        use_transformers_continuous_batching=False,
        # optimisation
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.001,
        # precision and devices: TRL defaults to bf16=True and gradient checkpointing on
        bf16=False,
        fp16=False,
        activation_checkpointing=False,   # the newer name transformers 5 resolves the old one from
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
        # no evaluation, saving or external logging; log every step (outside the timed window)
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        seed=seed,
    )

    class StepTimer(TrainerCallback):
        """Wall time from on_step_begin to on_step_end, the optimiser steps in between, and
        the trainer's logged metrics."""

        def __init__(self):
            self.step_seconds, self.per_step, self.logs = [], [], []
            self.current = None
            self._t0 = None

        def on_step_begin(self, args, state, control, **kw):
            self.current = {"optimizer_steps": 0, "generate": [], "forwards": [], "reward_seconds": 0.0}
            self._t0 = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            self.current["optimizer_steps"] += 1

        def on_step_end(self, args, state, control, **kw):
            self.step_seconds.append(time.perf_counter() - self._t0)
            self.current["global_step"] = state.global_step
            self.current["torch_threads"] = torch.get_num_threads()
            self.per_step.append(self.current)
            self.current = None

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    timer = StepTimer()
    trainer = RLOOTrainer(model=model, reward_funcs=shaped_reward, args=args, train_dataset=dataset,
                          processing_class=tok, callbacks=[timer])
    # keep stdout for the JSON result: the printer would echo every log dict
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    # Instrument the instance (not the class) to record what each step does. The wrappers add
    # one perf_counter pair per call, negligible next to what they wrap.
    gen, fwd, rew = trainer._generate, trainer._get_per_token_logps_and_entropies, trainer._calculate_rewards

    def timed_generate(prompts):
        t = time.perf_counter()
        prompt_ids, completion_ids, completions = gen(prompts)
        lens = [len(c) for c in completion_ids]
        if timer.current is not None:
            timer.current["generate"].append({
                "seconds": time.perf_counter() - t, "prompts": len(prompts),
                "distinct_prompts": len(set(prompts)), "completions": len(completion_ids),
                "max_len": max(lens), "mean_len": sum(lens) / len(lens),
                "ended_with_eos": sum(1 for c in completion_ids if c and c[-1] in trainer.eos_token_ids),
                "prompt_token_lens": sorted(set(len(p) for p in prompt_ids))})
        return prompt_ids, completion_ids, completions

    def timed_forward(model, input_ids, *a, **k):
        t = time.perf_counter()
        result = fwd(model, input_ids, *a, **k)
        if timer.current is not None:
            timer.current["forwards"].append({
                "model": "reference" if model is trainer.ref_model else "policy",
                "grad": torch.is_grad_enabled(), "rows": int(input_ids.shape[0]),
                "seq_len": int(input_ids.shape[1]), "seconds": time.perf_counter() - t})
        return result

    def timed_rewards(*a, **k):
        t = time.perf_counter()
        result = rew(*a, **k)
        if timer.current is not None:
            timer.current["reward_seconds"] += time.perf_counter() - t
        return result

    trainer._generate = timed_generate
    trainer._get_per_token_logps_and_entropies = timed_forward
    trainer._calculate_rewards = timed_rewards

    # Start the Math-Verify child before timing: its start-up is a one-off cost of any run,
    # not part of an RL step.
    get_verifier().equal("1", "2")

    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    secs = timer.step_seconds
    keep = ("loss", "grad_norm", "learning_rate", "reward", "kl", "entropy", "step_time", "num_tokens",
            "completions/mean_length", "completions/max_length", "completions/clipped_ratio",
            "rewards/shaped_reward/mean", "frac_reward_zero_std")
    config = {k: getattr(args, k) for k in (
        "per_device_train_batch_size", "num_generations", "generation_batch_size", "steps_per_generation",
        "gradient_accumulation_steps", "num_iterations", "max_completion_length", "temperature", "top_p",
        "top_k", "min_p", "repetition_penalty", "use_vllm", "learning_rate", "lr_scheduler_type",
        "warmup_steps", "weight_decay", "max_grad_norm", "beta", "epsilon", "normalize_advantages",
        "mask_truncated_completions", "bf16", "fp16", "gradient_checkpointing", "activation_checkpointing", "use_cpu", "shuffle_dataset",
        "pad_to_multiple_of", "seed", "max_steps")}
    config["optim"] = str(args.optim.value if hasattr(args.optim, "value") else args.optim)
    config["lr_scheduler_type"] = str(getattr(config["lr_scheduler_type"], "value", config["lr_scheduler_type"]))
    config["reference_model"] = trainer.ref_model is not None
    config["model_dir"] = os.path.relpath(path, ROOT)  # result files record paths relative to the repository
    config["questions_per_step"] = QUESTIONS_PER_STEP
    config["levels"] = list(LEVELS)
    return {
        "step_seconds": secs,
        "median_after_first": statistics.median(secs[1:]) if len(secs) > 1 else (secs[0] if secs else None),
        "trl_version": trl.__version__,
        "config": config,
        "checks": {
            "per_step": timer.per_step,
            "logged": [{k: v for k, v in log.items() if k in keep} for log in timer.logs if "loss" in log],
            "global_step": trainer.state.global_step,
            "verifier_timeouts": get_verifier().timeouts,
        },
    }


if __name__ == "__main__":
    print(json.dumps(trl_step_seconds(), indent=1, default=str))
