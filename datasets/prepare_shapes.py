#!/usr/bin/env python
"""Generate the synthetic "shapes" dataset (layout: datasets/README.md).

    python datasets/prepare_shapes.py --out datasets/shapes --num-train 2000 --num-val 200 --image-size 128 --seed 0

The output is a pure function of the flags; re-running with the same flags is a no-op,
other flags on an existing directory need --overwrite. Data is written to a temporary
directory and renamed into place, so --out is never half-written.
"""
import argparse
import sys
import time

from up2.data.datasets.shapes import generate_shapes_dataset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="datasets/shapes", help="output directory (default: datasets/shapes)")
    parser.add_argument("--num-train", type=int, default=2000, help="training images (default: 2000)")
    parser.add_argument("--num-val", type=int, default=200, help="validation images (default: 200)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        written = generate_shapes_dataset(args.out, args.num_train, args.num_val, args.image_size, args.seed, args.overwrite)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    if written:
        print(f"wrote {args.num_train} train + {args.num_val} val images to {args.out} in {time.perf_counter() - start:.1f} s")
    else:
        print(f"{args.out} is up to date (same parameters); nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
