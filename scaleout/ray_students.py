"""
scaleout/ray_students.py -- SOAR step 3 on Ray (--workers N): the g*r inner students as Ray tasks,
at most N in flight, each on one CPU (and one GPU where there is one), with the numbers of the
sequential loop in train_teacher.py.

Imported only when --workers N > 0 (ray itself only here). It knows nothing of how a student is
trained: train_teacher.grounded_rewards hands it the one function that trains student (k, j)
(`train_one`, also the sequential loop's), the result type and the running argmax, so imports run
one way (train_teacher -> here). Each task copies the baseline from the object store, sets up the
driver's sampler and prompts, trains, and returns its accuracy, health counts and trained state;
results are collected in (k, j) order, whatever order they finish in.
"""
import os

import torch

from engines import lora
from evaluate import get_verifier
from generate import STUDENT_PROMPTS, add_style, sampler_spec, teacher_prompt, use_sampler

class InnerStudentError(RuntimeError):
    """An inner student that could not be trained (its worker died more often than Ray retries)."""


# A Ray worker that dies (killed, out of memory, node lost) is restarted and its student retrained
# from scratch this many times; each attempt is seeded the same, so a retry gives the same result.
# An exception raised by the training code itself is not retried: it would only fail again.
RAY_MAX_RETRIES = 2
# Fault injection for the tests: this variable names a file; while it holds "K,J,once" the Ray task
# for dataset K, repeat J kills its own worker process (and empties the file, so the retry trains
# normally); "K,J,always" kills it on every attempt. Read when the task starts, so a test can arm it
# on a running cluster.
FAULT_ENV = "SOAR_FAULT_FILE"


def _maybe_die(k, j):
    path = os.environ.get(FAULT_ENV)
    if not path or not os.path.exists(path):
        return
    spec = open(path).read().strip().split(",")
    if len(spec) == 3 and (int(spec[0]), int(spec[1])) == (k, j):
        if spec[2] == "once":
            open(path, "w").close()
        os._exit(1)  # the worker process dies mid-step, as if killed


def _inner_student_task(train_one, base, pairs, reward_qs, steps, cfg, seed, k, j, eval_max_new_tokens, threads,
                        proc, lora_rank=0):
    """The Ray task for student (k, j): base is the object-store copy of the baseline (model on
    CPU and tokenizer, one put per outer step); proc the driver's sampler and prompt texts, set
    up the same way in this worker process. Returns what the sequential loop computes, plus
    this worker's verifier timeouts during the task."""
    _maybe_die(k, j)
    add_style(*proc["style"])
    use_sampler(**proc["sampler"])
    model, tok = base["model"], base["tok"]
    if torch.cuda.is_available():  # the task was given one GPU (num_gpus=1); Ray sets CUDA_VISIBLE_DEVICES
        model = model.to("cuda")
    if lora_rank:  # this task's own copy of the baseline carries the adapter
        lora.attach(model)
    t0 = get_verifier().timeouts
    acc, health, state = train_one(model, tok, pairs, reward_qs, steps, cfg, seed, k, j, eval_max_new_tokens,
                                   threads, lora_rank)
    return dict(acc=acc, health=health, state=state, timeouts=get_verifier().timeouts - t0)


def init_ray(workers, address=None):
    """Start a local Ray cluster of `workers` CPUs (address None), or join a running one
    (address "auto" or HOST:PORT); returns (ray, whether this call connected). Ray is imported
    here only, so --workers 0 never needs it. Already connected (a caller's own ray.init): kept."""
    import logging

    import ray

    if ray.is_initialized():
        return ray, False
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # workers import the project's modules by name: put the repository on their path (on a cluster
    # it must sit at the same path on every node)
    env = {"PYTHONPATH": os.pathsep.join(p for p in [here, os.environ.get("PYTHONPATH")] if p)}
    kw = dict(runtime_env={"env_vars": env}, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, **kw)
    return ray, True


def grounded_rewards_ray(student, tok, datasets, reward_qs, base_acc, repeats, steps, cfg, seed,
                         eval_max_new_tokens, progress, workers, threads, lora_rank, train_one, result, keep_best):
    """train_teacher.grounded_rewards with workers > 0: the same (results, best)."""
    import ray
    from tqdm import tqdm

    if not ray.is_initialized():
        init_ray(workers)
    # the baseline goes into the object store once per call, on CPU; each task copies it
    dev = next(student.parameters()).device
    student.to("cpu")
    try:
        base = ray.put(dict(model=student, tok=tok))
    finally:
        student.to(dev)
    opts = dict(num_cpus=1, max_retries=RAY_MAX_RETRIES, retry_exceptions=False)
    if torch.cuda.is_available():
        opts["num_gpus"] = 1
    task = ray.remote(**opts)(_inner_student_task)
    jobs = [(k, j) for k in range(len(datasets)) for j in range(repeats)]
    pairs = [[(q, a) for _, q, a in data] for data in datasets]
    proc = dict(sampler=sampler_spec(), style=(cfg.style, teacher_prompt(cfg.style), STUDENT_PROMPTS[cfg.style]))
    refs = {}

    def submit(i):  # keep at most `workers` tasks in flight ahead of the one being collected
        while len(refs) < workers and i < len(jobs):
            k, j = jobs[i]
            refs[(k, j)] = task.remote(train_one, base, pairs[k], reward_qs, steps, cfg, seed, k, j, eval_max_new_tokens, threads,
                                       proc, lora_rank)
            i += 1
        return i

    bar = tqdm(total=len(jobs), desc="inner students", disable=not progress, leave=False)
    results, best, nxt = [], None, submit(0)
    try:
        for k in range(len(datasets)):
            rs, states, health, timeouts = [], [], {"zero_signal_groups": 0, "skipped": 0}, 0
            for j in range(repeats):
                # collected in (k, j) order, whatever order they finish in: ties and the median
                # are decided exactly as in the sequential loop
                try:
                    out = ray.get(refs.pop((k, j)))
                except ray.exceptions.RayError as e:
                    raise InnerStudentError(
                        f"inner student for dataset {k}, repeat {j} failed (after up to {RAY_MAX_RETRIES} "
                        f"retries of a lost worker): {str(e).strip().splitlines()[-1][:500].rstrip('.')}") from e
                nxt = submit(nxt)
                rs.append(out["acc"] - base_acc)
                states.append(out["state"])
                for key in health:
                    health[key] += out["health"][key]
                timeouts += out["timeouts"]
                bar.update()
            res = result(k, sum(rs) / len(rs), rs, health["zero_signal_groups"], health["skipped"],
                         remote_verifier_timeouts=timeouts)
            best = keep_best(best, res, states)
            results.append(res)
    finally:
        for ref in refs.values():  # a failure leaves tasks running: stop them
            ray.cancel(ref, force=True)
        bar.close()
    return results, best
