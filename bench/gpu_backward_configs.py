"""Launch configs of the backward's query kernel (kernels/backward.py, ``_query_tiles``) on the GPU:
CUDA ms of ``_bwd_query_block`` and of the whole forward+backward step, per config, at the
standard workload (bf16, Hq 16, D 128, B * S = 32K, topk = window = 1024).

    PYTHONPATH=$PWD python3 bench/gpu_backward_configs.py [--S 32768] [--Hkv 16] --out $OUT
"""

import argparse
import json
import os

from sparsek_ops.kernels import backward
from profile_step import kernel_times, standard_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=32768)
    ap.add_argument("--Hkv", type=int, default=16)
    ap.add_argument("--configs", default="128:64:8:2,64:64:4:2,128:32:8:2,128:64:8:3")
    ap.add_argument("--tiles", default="64:64:2,64:128:2,64:32:2,64:128:3",
                    help="window-key kernel tiles rows:keys:stages to time after the query configs")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    S = a.S
    step, _ = standard_step(S, a.Hkv)

    rows = []
    query_tiles = backward._query_tiles
    for cfg in a.configs.split(",") if a.configs else []:
        tiles = tuple(int(x) for x in cfg.split(":"))
        backward._query_tiles = lambda *args, tiles=tiles: tiles  # rows other than the forward's: no shared selection
        times = kernel_times(step)
        query = sum(ms for ms, _, name in times if "_bwd_query_block" in name)
        rows.append(dict(config=cfg, query_ms=round(query, 3), step_ms=round(sum(t[0] for t in times), 3)))
        print(rows[-1], flush=True)
    # The window-key kernel's tiles (kernels/backward.py, ``_tiles``: rows, keys, stages; the rows
    # are the slot sweeps' too), with the query kernel back on its own choice.
    backward._query_tiles = query_tiles
    for cfg in a.tiles.split(",") if a.tiles else []:
        tiles = tuple(int(x) for x in cfg.split(":"))
        backward._tiles = lambda *args, tiles=tiles: tiles
        times = kernel_times(step)
        window = sum(ms for ms, _, name in times if "_bwd_window_keys" in name)
        rows.append(dict(tiles=cfg, window_ms=round(window, 3), step_ms=round(sum(t[0] for t in times), 3)))
        print(rows[-1], flush=True)
    with open(os.path.join(a.out, f"gpu_backward_configs_{S}_{a.Hkv}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
