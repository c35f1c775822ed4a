#!/usr/bin/env python3
"""How well a quality budget's rule picks K from a noisy validation curve.

Reads `hopscotch eval --log-samples` files of the original and of each K's slim model, scored
on the same documents, held out of the runs' fits, and
replays the budget many times: each replay draws a validation set of --val documents at random
and lets each rule choose K from the validation drops. The chosen K is scored by its drop on
the whole pool: per rule, the mean K, the replays that chose no K, the replays whose K loses
more than the budget plus half a point, and the mean drop. Prints the pool's own curve first.
"first break, extended" draws twice --val documents and reads the second half only for a K
over budget by less than 1.96 standard errors; the other rules read the first half.

    scripts/budget-study.py --original original.jsonl --slim 'plain-k{k}.jsonl' --max-skip 10 \
        --max-drop 1 --val 200 --replays 2000
"""
import argparse
import json
import random


def load(path):
    with open(path) as f:
        return {d["doc_id"]: d["pred"] == d["gold"] for d in map(json.loads, f)}


def pava(values):
    """The non-decreasing sequence nearest to `values` in squared error (pool adjacent violators)."""
    blocks = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    out = []
    for m, c in blocks:
        out.extend([m] * c)
    return out


def first_break(drops, budget):
    """`run`'s rule: the largest K before the first K over budget."""
    k = 0
    for i, d in enumerate(drops):
        if d > budget:
            break
        k = i + 1
    return k


def largest_within(drops, budget):
    return max([i + 1 for i, d in enumerate(drops) if d <= budget], default=0)


def isotonic(drops, budget):
    return largest_within(pava(drops), budget)


def measured_break(drops, budget, ses):
    """The largest K within budget before the first K whose drop is over budget by more than
    1.96 standard errors (measurably over)."""
    k = 0
    for i, (d, se) in enumerate(zip(drops, ses)):
        if d - 1.96 * se > budget:
            break
        if d <= budget:
            k = i + 1
    return k


def extended_break(drops, budget, ses, more):
    """First break, where a K over budget by less than 1.96 standard errors is scored again on
    `more` (the drops and errors on the validation documents and as many again) before the
    curve stops there."""
    k = 0
    for i, (d, se) in enumerate(zip(drops, ses)):
        if d > budget and d - 1.96 * se <= budget:
            d = more[i]
        if d > budget:
            break
        k = i + 1
    return k


RULES = {
    "first break (run)": lambda drops, budget, ses: first_break(drops, budget),
    "largest within": lambda drops, budget, ses: largest_within(drops, budget),
    "monotone": lambda drops, budget, ses: isotonic(drops, budget),
    "measured break": measured_break,
}
# rules that may score a K again on as many documents more: given those drops last
EXTENDED = {"first break, extended": extended_break}


def drop(orig, slim, ids):
    return 100.0 * sum(orig[i] - slim[i] for i in ids) / len(ids)


def drop_se(orig, slim, ids):
    """The standard error of `drop` (points): of the mean paired difference."""
    diffs = [orig[i] - slim[i] for i in ids]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((x - mean) ** 2 for x in diffs) / max(n - 1, 1)
    return 100.0 * (var / n) ** 0.5


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--original", required=True)
    p.add_argument("--slim", required=True, help="path pattern with {k}")
    p.add_argument("--max-skip", type=int, default=10)
    p.add_argument("--max-drop", type=float, action="append")
    p.add_argument("--val", type=int, action="append")
    p.add_argument("--replays", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    orig = load(a.original)
    slims = [load(a.slim.format(k=k)) for k in range(1, a.max_skip + 1)]
    order = lambda i: (len(i), i)  # numeric ids in number order, any id in some fixed order
    ids = sorted(orig, key=order)
    for s in slims:
        assert sorted(s, key=order) == ids, "every file must score the same documents"
    n = len(ids)
    print(f"pool: {n} documents; original accuracy {100 * sum(orig.values()) / n:.1f}%")
    truth = [drop(orig, s, ids) for s in slims]
    print("K   drop on the pool (points)")
    for k, d in enumerate(truth, 1):
        print(f"{k:<3} {d:+.1f}")
    rng = random.Random(a.seed)
    for budget in a.max_drop or [1.0]:
        for val in a.val or [200]:
            print(f"\n--max-drop {budget}, {val} validation documents, {a.replays} replays")
            print(f"{'rule':<20} {'mean K':>6} {'no K':>6} {'over':>6} {'drop':>6}   replays per K (0..{a.max_skip})")
            tallies = {name: [0] * (a.max_skip + 1) for name in [*RULES, *EXTENDED]}
            for _ in range(a.replays):
                both = rng.sample(ids, min(2 * val, n))
                v = both[:val]
                drops = [drop(orig, s, v) for s in slims]
                ses = [drop_se(orig, s, v) for s in slims]
                for name, rule in RULES.items():
                    tallies[name][rule(drops, budget, ses)] += 1
                more = [drop(orig, s, both) for s in slims]
                for name, rule in EXTENDED.items():
                    tallies[name][rule(drops, budget, ses, more)] += 1
            for name, counts in tallies.items():
                share = lambda c: f"{100 * c / a.replays:5.1f}%"
                mean_k = sum(k * c for k, c in enumerate(counts)) / a.replays
                over = sum(c for k, c in enumerate(counts) if k and truth[k - 1] > budget + 0.5)
                mean_drop = sum(c * truth[k - 1] for k, c in enumerate(counts) if k) / a.replays
                print(f"{name:<20} {mean_k:6.2f} {share(counts[0])} {share(over)} {mean_drop:+6.2f}"
                      f"   {' '.join(str(c) for c in counts)}")


if __name__ == "__main__":
    main()
