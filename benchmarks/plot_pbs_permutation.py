"""Plot one real SmolLM2 head's block attention mass before and after PBS's key permutation -> docs/img/pbs_permutation.png.

Run: ``.venv/bin/python benchmarks/plot_pbs_permutation.py [--length 4096] [--layer 15] [--head H]``
(one dense prefill of Python stdlib source; ~10 s). Without ``--head`` the head whose permutation
saves the most blocks at tau=0.9 is drawn.
"""
from __future__ import annotations

import argparse
import os

import torch


def block_mass(q, k, perm, b: int) -> torch.Tensor:
    # [nqb, nkb] mean dense causal attention mass per (query block, key block in `perm` order)
    M, D = q.shape
    N = k.shape[0]
    s = (q.float() @ k.float().T) / D ** 0.5
    s.masked_fill_(torch.arange(N)[None, :] > (torch.arange(M) + N - M)[:, None], float("-inf"))
    p = torch.softmax(s, -1)[:, perm]
    nb = N // b
    return p[: nb * b, : nb * b].reshape(nb, b, nb, b).sum(3).mean(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--head", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "img", "pbs_permutation.png"))
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graphtune.codegen.pbs_attention.plan import PBSConfig, plan_pbs
    from graphtune.models import smollm2
    from graphtune.runtime.sparse_accuracy import calibration_ids, capture

    model, tok = smollm2()
    ids = calibration_ids(tok, a.length)
    q, k, v = capture(model, ids, keep=1).qkv[a.layer]
    cfg = PBSConfig(tau=0.9)
    pp, pn = plan_pbs(q, k, cfg), plan_pbs(q, k, PBSConfig(tau=0.9, permute=False))
    G = q.shape[1] // k.shape[1]
    h = a.head if a.head is not None else int((pn.density() - pp.density())[0].argmax())
    ident = torch.arange(k.shape[2])
    before = block_mass(q[0, h], k[0, h // G], ident, cfg.block)
    after = block_mass(q[0, h], k[0, h // G], pp.perm[0, h // G], cfg.block)
    fig, ax = plt.subplots(1, 2, figsize=(11, 5))
    for x, m, t, d in ((ax[0], before, "original key order", pn.density()[0, h]),
                       (ax[1], after, "keys permuted within 256-token segments", pp.density()[0, h])):
        im = x.imshow(torch.log10(m.clamp_min(1e-6)), cmap="viridis", vmin=-6, vmax=0)
        x.set_title(f"{t}\nblocks kept at tau=0.9: density {float(d):.3f}", fontsize=10)
        x.set_xlabel("key block (128 tokens)")
        x.set_ylabel("query block (128 tokens)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="log10 mean attention mass per block")
    fig.suptitle(f"SmolLM2-135M layer {a.layer} head {h}, {a.length} tokens of Python stdlib source")
    fig.savefig(a.out, dpi=110, bbox_inches="tight")
    print(f"wrote {os.path.abspath(a.out)} (head {h}: density {float(pn.density()[0, h]):.3f} -> "
          f"{float(pp.density()[0, h]):.3f})")


if __name__ == "__main__":
    main()
