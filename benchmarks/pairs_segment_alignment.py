"""Where a `pairs` segment RM's segments fall inside the items `the COLOR ANIMAL .` of held-out
responses (issue 24: why the segment RM's local credit is near 0).

    python benchmarks/pairs_segment_alignment.py RUN/segment/seed-0/rm RUN/data/preferences/test.jsonl

Splits the chosen and rejected responses of the first `--rows` held-out pairs into the RM's segments
(`segppo.rm.evaluate.inspect_response`, what `segppo rm inspect` prints) and counts, over every item,
after which of its words a segment ends. The demo's tokenizer is word-level, so words are tokens.
"""

import argparse
import collections
import json

import torch

from segppo.demo.task import parse_prompt
from segppo.rm.evaluate import inspect_response
from segppo.rm.scoring import load_scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rm", help="A segment-level RM folder of a `pairs` demo run.")
    parser.add_argument("pairs", help="Its held-out preference pairs (data/preferences/test.jsonl).")
    parser.add_argument("--rows", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scorer = load_scorer(args.rm, device="cpu")
    with open(args.pairs) as f:
        rows = [json.loads(line) for line in f if line.strip()][: args.rows]
    count = collections.Counter()
    for row in rows:
        for side in ("chosen", "rejected"):
            words, ends = [], set()  # ends: indices of the words a segment ends at
            for view in inspect_response(scorer, row["prompt"], row[side]):
                words += view.text.split()
                if view.index > 0:
                    ends.add(len(words) - 1)
            right = {(c.lower(), a.lower()) for c, a in parse_prompt(row["prompt"]).pairs}
            for i in range(len(words) - 3):
                if words[i] != "the" or words[i + 3] != ".":
                    continue
                count["items"] += 1
                count["right items"] += (words[i + 1], words[i + 2]) in right
                for offset, name in enumerate(("the", "COLOR", "ANIMAL", ".", "next item's first word")):
                    count[f"a segment ends at {name}"] += (i + offset) in ends
                count["COLOR ANIMAL in one segment"] += (i + 1) not in ends
    print(json.dumps({"rm": args.rm, "responses": 2 * len(rows), **count}, indent=1))


if __name__ == "__main__":
    main()
