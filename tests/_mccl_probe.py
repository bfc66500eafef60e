"""Tiny distributed worker used by tests/test_msrun_launcher.py (not a test module itself).

Run under ``scripts/msrun_launcher.sh``. Each rank:
  1. calls ``mindspore.communication.init()`` (mccl on CPU),
  2. AllReduce-sums the rank-dependent vector ``(rank + 1) * [1, 2, 3, 4]``,
  3. checks it equals ``sum_{r < n} (r + 1) * [1, 2, 3, 4] = n (n + 1) / 2 * [1, 2, 3, 4]``,
  4. writes ``OUT_DIR/rank_<rank>.json`` (atomically) with what it saw, exits 0 on success.

``--fail_rank R`` makes rank R exit with status 3 right after ``init()`` (a crashing worker).
"""
import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out_dir", required=True, help="folder for rank_<rank>.json result files")
    parser.add_argument("--fail_rank", type=int, default=-1, help="rank that exits with status 3 after init()")
    args = parser.parse_args()

    import numpy as np
    import mindspore as ms
    from mindspore import ops
    from mindspore.communication import init, get_rank, get_group_size

    ms.set_context(mode=ms.PYNATIVE_MODE)
    init()
    rank, size = get_rank(), get_group_size()
    print(f"probe: rank {rank} of {size}, RANK_ID={os.environ.get('RANK_ID')}", flush=True)
    if rank == args.fail_rank:
        print(f"probe: rank {rank} fails on purpose", flush=True)
        sys.exit(3)

    base = np.arange(1, 5, dtype=np.float32)                       # (4,)
    summed = ops.AllReduce()(ms.Tensor(base * (rank + 1))).asnumpy()  # (4,)
    expected = base * size * (size + 1) / 2
    ok = bool(np.allclose(summed, expected))
    record = {"rank": rank, "size": size, "allreduce": summed.tolist(), "expected": expected.tolist(), "ok": ok,
              "pythonpath": os.environ.get("PYTHONPATH", ""), "cwd": os.getcwd()}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"rank_{rank}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    os.replace(path + ".tmp", path)
    print(f"probe: rank {rank} allreduce {summed.tolist()} expected {expected.tolist()} ok={ok}", flush=True)
    return 0 if ok else 4


if __name__ == "__main__":
    sys.exit(main())
