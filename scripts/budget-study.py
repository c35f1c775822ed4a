#!/usr/bin/env python3
"""How well a quality budget's rule picks K from a noisy validation curve.

Reads `hopscotch eval --log-samples` files of the original and of each K's slim model, scored
on the same documents (held out of the fit and of the run's own validation documents), and
replays the budget many times: each replay draws a validation set of --val documents at random,
lets each rule choose K from the validation drops, and measures the chosen K's drop on the
documents left over. Prints the pool's own curve first.

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
    """Today's rule: the largest K before the first K over budget."""
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


RULES = {
    "first break (today)": first_break,
    "largest within": largest_within,
    "isotonic": isotonic,
}


def drop(orig, slim, ids):
    return 100.0 * sum(orig[i] - slim[i] for i in ids) / len(ids)


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
    ids = sorted(orig, key=int)
    for s in slims:
        assert sorted(s, key=int) == ids, "every file must score the same documents"
    n = len(ids)
    print(f"pool: {n} documents; original accuracy {100 * sum(orig.values()) / n:.1f}%")
    print("K   drop on the pool (points)")
    for k, s in enumerate(slims, 1):
        print(f"{k:<3} {drop(orig, s, ids):+.1f}")
    rng = random.Random(a.seed)
    for budget in a.max_drop or [1.0]:
        for val in a.val or [200]:
            print(f"\n--max-drop {budget}, {val} validation documents, {a.replays} replays"
                  f" (chosen K: mean and spread; the chosen K's drop on the other {n - val})")
            print("rule                  mean K   K counts (0..max)              mean drop  P(drop > budget + 1)")
            tallies = {name: ([0] * (a.max_skip + 1), []) for name in RULES}
            for _ in range(a.replays):
                shuffled = ids[:]
                rng.shuffle(shuffled)
                v, rest = shuffled[:val], shuffled[val:]
                drops = [drop(orig, s, v) for s in slims]
                for name, rule in RULES.items():
                    k = rule(drops, budget)
                    counts, held = tallies[name]
                    counts[k] += 1
                    held.append(0.0 if k == 0 else drop(orig, slims[k - 1], rest))
            for name, (counts, held) in tallies.items():
                mean_k = sum(k * c for k, c in enumerate(counts)) / a.replays
                over = sum(d > budget + 1 for d in held) / a.replays
                print(f"{name:<21} {mean_k:5.2f}    {' '.join(f'{c:>3}' for c in counts)}"
                      f"   {sum(held) / a.replays:+6.2f}     {100 * over:5.1f}%")


if __name__ == "__main__":
    main()
