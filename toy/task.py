"""
The toy task family: left-to-right chains of single-digit operations mod 10.

    question   3+4*2-5+1*3      (difficulty L = number of operations)
    working    3+4=7 7*2=4 4-5=9 9+1=0 0*3=0
    answer     4900             (the last 4 running results, concatenated)

The answer holds the last four running results, so a guess is right with probability
10^-4 (a fail@128 survivor is a problem the model really cannot do, not an unlucky
one), while its length stays fixed: difficulty grows with the length of the working,
step by step, not with how many digits must be copied into the box (an all-results
answer made the student fall off a cliff at the first length it had rarely seen).
It is graded as a string of digits (evaluate.answers_match): Math-Verify would read it as
one integer, and count `80` right for `0080`.
"""
import random

OPS = "+-*"
ANSWER_DIGITS = 4  # the answer is the last 4 running results (0: all of them)


def apply(a, op, b):
    return (a + b) % 10 if op == "+" else (a - b) % 10 if op == "-" else (a * b) % 10


def make_question(L, rng):
    s = str(rng.randrange(10))
    for _ in range(L):
        s += rng.choice(OPS) + str(rng.randrange(10))
    return s


def solve(question):
    """(working steps, answer) for a well-formed chain; None otherwise."""
    q = question.strip()
    if len(q) < 3 or len(q) % 2 == 0 or not all(c.isdigit() for c in q[::2]) or not all(c in OPS for c in q[1::2]):
        return None
    acc, steps = int(q[0]), []
    for i in range(1, len(q), 2):
        new = apply(acc, q[i], int(q[i + 1]))
        steps.append(f"{acc}{q[i]}{q[i + 1]}={new}")
        acc = new
    return steps, "".join(s[-1] for s in (steps[-ANSWER_DIGITS:] if ANSWER_DIGITS else steps))


def answer_key_accuracy(pairs):
    """The share of (question, answer) pairs whose answer is the solver's (a non-chain counts as wrong)."""
    return sum(bool(solve(q)) and solve(q)[1] == a for q, a in pairs) / len(pairs)


def difficulty(question):
    """Number of operations, or None if the text is not a chain."""
    return (len(question.strip()) - 1) // 2 if solve(question) else None


def student_completion(question):
    steps, ans = solve(question)
    return " " + " ".join(steps) + " The final answer is: \\boxed{%s}." % ans


def teacher_completion(question):
    steps, ans = solve(question)
    return " <question>%s</question> %s <answer>\\boxed{%s}</answer>" % (question, " ".join(steps), ans)


def problems(n, L, seed):
    """n distinct problems of difficulty L as {id, problem, answer} records."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        q = make_question(L, rng)
        if q not in seen:
            seen.add(q)
            out.append({"id": f"L{L}-{len(out)}", "problem": q, "answer": solve(q)[1]})
    return out
