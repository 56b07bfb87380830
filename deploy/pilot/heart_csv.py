"""Writes a generated heart-disease-like CSV (no real patients) for one pilot site.

    python heart_csv.py OUT.csv SITE_INDEX [ROWS]

Columns follow the UCI heart-disease table; `label` is 1 for disease. Sites differ in their
age mix, as hospitals do. Standard library only, so it runs in the slim site image.
"""

from __future__ import annotations

import csv
import math
import random
import sys


def main() -> None:
    out, site = sys.argv[1], int(sys.argv[2])
    rows = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    rng = random.Random(1000 + site)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["age", "sex", "cp", "trestbps", "chol", "thalach", "oldpeak", "label"])
        for _ in range(rows):
            age = rng.gauss(52 + 6 * site, 9)
            sex, cp = rng.randint(0, 1), rng.randint(0, 3)
            trestbps, chol = rng.gauss(132, 17), rng.gauss(245, 50)
            thalach, oldpeak = rng.gauss(150 - 0.5 * (age - 52), 20), abs(rng.gauss(1.0, 1.1))
            risk = 0.06 * (age - 54) + 0.7 * sex + 0.5 * cp - 0.03 * (thalach - 150) + 0.6 * oldpeak
            label = int(rng.random() < 1 / (1 + math.exp(-(risk - 1.0))))
            writer.writerow([f"{age:.0f}", sex, cp, f"{trestbps:.0f}", f"{chol:.0f}",
                             f"{thalach:.0f}", f"{oldpeak:.1f}", label])  # fmt: skip


if __name__ == "__main__":
    main()
