"""Build the bundled demo sample: a small, seeded subset of the Kermany pediatric chest X-rays.

    python tools/make_demo_data.py ../shared/data/chest_xray_pneumonia src/scanomaly/demo_data/chest_xray

The source images are CC BY 4.0 (Kermany, Zhang, Goldbaum 2018, doi:10.17632/rscbjbr9sj); the
files are copied unchanged (128x128 grayscale PNG, as prepared in ../shared/data).
"""

import random
import shutil
import sys
from pathlib import Path

COUNTS = {("train", "normal"): 200, ("train", "abnormal"): 60, ("test", "normal"): 50, ("test", "abnormal"): 50}


def main(src: str, dst: str, seed: int = 0) -> None:
    src, dst = Path(src), Path(dst)
    rng = random.Random(seed)
    for (split, cls), n in COUNTS.items():
        files = sorted((src / split / cls).glob("*.png"))
        out = dst / split / cls
        out.mkdir(parents=True, exist_ok=True)
        for f in rng.sample(files, n):
            shutil.copy2(f, out / f.name)


if __name__ == "__main__":
    main(*sys.argv[1:3])
